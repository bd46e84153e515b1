"""Which torch device a setting names."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): CUDA when this process sees a GPU, else the CPU; anything else as torch
    spells it (`cpu`, `cuda`, `cuda:1`)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
