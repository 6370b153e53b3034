"""Backbones and the ReID head."""

from fashion_jax.models.backbones import backbone_names, build_backbone, get_backbone, register
from fashion_jax.models.base import Backbone
from fashion_jax.models.reid import ReIDModel, ReIDOutput, build_model

__all__ = ['Backbone', 'ReIDModel', 'ReIDOutput', 'backbone_names', 'build_backbone',
           'build_model', 'get_backbone', 'register']
