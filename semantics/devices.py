"""Where a run's tensors live: the device names users pass (``"cpu"``, ``"cuda"``,
``"cuda:1"``, ``"auto"``) resolved to one torch can use, or a clear error."""
from __future__ import annotations

from typing import Any

import torch

from .errors import PPLError


def resolve_device(device: Any) -> str:
    """``device`` as a torch device name: "auto" picks CUDA when a GPU is there, else the
    CPU; asking for CUDA without a GPU is an error with a hint."""
    d = str(device)
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise PPLError(f"device '{d}' requested but no CUDA GPU is available",
                       hint="use device='cpu' (or 'auto' to pick a GPU when there is one)")
    return d
