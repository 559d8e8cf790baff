"""Stage two: light heads trained on cached encoder features.

Importing this package registers every head; build one with `create(name, dims, cfg)`.
A head owns its objective (`Head.objective`, `Head.second_step`); shared loss functions
are in `heads.losses`.
"""
from . import baselines, clip_ca_cg, hybrid_fusion, probe, spp_scl  # noqa: F401  (imported so their heads register)
from .base import Batch, Dims, Head, HeadConfig, HeadOutput
from .registry import Flag, available, build_config, config_class, create, describe, flag_values, flags, parse_sets, register

__all__ = ["Batch", "Dims", "Flag", "Head", "HeadConfig", "HeadOutput", "available", "build_config", "config_class",
           "create", "describe", "flag_values", "flags", "parse_sets", "register"]
