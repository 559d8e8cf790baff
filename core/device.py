"""Where tensors run: CUDA when present, the CPU otherwise (both stages use this)."""

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
