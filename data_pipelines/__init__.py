"""TFDS dataset builders (one package per dataset) and the tf.data input pipeline.

Importing a builder module registers its dataset with TFDS.
"""
