"""Backbones and the ReID head."""

from fashion_jax.models.reid import ReIDModel, ReIDOutput, backbone_names, build_model, parse_backbone

__all__ = ['ReIDModel', 'ReIDOutput', 'backbone_names', 'build_model', 'parse_backbone']
