"""The one place that chooses where tensors run."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when this process can see a GPU (Ray sets CUDA_VISIBLE_DEVICES per actor), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bfloat16 natively (Intel AMX or AVX512-BF16), read from /proc/cpuinfo (Linux).

    Without those units oneDNN emulates bfloat16 and is slower than float32, so "auto" keeps float32 there.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve a precision setting for inference on `device`.

    Args:
        precision: "fp32", "bf16", or "auto" (bf16 on CUDA GPUs that support it and on CPUs with bf16 units).
        device: where the model runs.
    Returns:
        True to run under bfloat16 autocast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16_units()
