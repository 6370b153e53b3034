"""fashion_jax: fashion retrieval with a person re-identification strong baseline, in JAX.

The JAX side (models, losses, training step, checkpoints, retrieval) never imports TensorFlow.
"""
