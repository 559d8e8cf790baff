"""Stage two: light heads trained on cached encoder features.

Importing this package registers every head; build one with `create(name, dims, cfg)`.
A head owns its objective (`Head.objective`, `Head.second_step`); shared loss functions
are in `heads.losses`.
"""
from . import baselines, clip_ca_cg, hybrid_fusion, probe, spp_scl  # noqa: F401  (imported so their heads register)
from .base import Batch, Dims, Head, HeadConfig, HeadOutput
from .registry import available, build_config, config_class, configs, create, describe, register

__all__ = ["Batch", "Dims", "Head", "HeadConfig", "HeadOutput", "available", "build_config", "config_class", "configs",
           "create", "describe", "register"]
