"""Backbones and the ReID head."""

from fashion_jax.models.backbones import (BackboneSpec, backbone_names, build_backbone,
                                          parse_backbone)
from fashion_jax.models.reid import ReIDModel, ReIDOutput, build_model

__all__ = ['BackboneSpec', 'ReIDModel', 'ReIDOutput', 'backbone_names', 'build_backbone',
           'build_model', 'parse_backbone']
