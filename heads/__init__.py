"""Stage two: light heads trained on cached encoder features.

Importing this package registers every head; build one with `create(name, dims, cfg)`.
The loss terms the trainer applies are in `heads.losses`.
"""
from . import baselines, spp_scl  # noqa: F401  (imported so their heads register)
from .base import Batch, Dims, HeadConfig, HeadOutput
from .registry import available, create, register

__all__ = ["Batch", "Dims", "HeadConfig", "HeadOutput", "available", "create", "register"]
