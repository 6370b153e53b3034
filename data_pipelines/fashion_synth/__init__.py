"""fashion_synth: a procedurally rendered street-to-shop retrieval dataset.

Import `fashion_synth_dataset_builder` to register it with TFDS; `render` draws the images.
"""
