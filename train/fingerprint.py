"""The machine that made a run, recorded in its config.json.

A record, not a check: which runs `results`, resume and the grids accept is decided by the
numerics version (train/numerics.py). The machine is recorded because float kernels, and so the
last bits of a number, differ between CPUs and thread counts: `pipeline.py replay` says so when
it retrains a run on another kind of CPU.
"""

from __future__ import annotations

import platform

import torch


def machine() -> dict:
    """What float kernels depend on besides the code: the CPU, torch and the thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads()}
