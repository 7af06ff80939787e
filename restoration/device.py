"""The one place that chooses where tensors run."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when this process can see a GPU (Ray sets CUDA_VISIBLE_DEVICES per actor), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
