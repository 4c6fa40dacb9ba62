"""The arithmetic the backbone and the ACG run in at inference, from what the hardware multiplies natively."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import EXTRACT_PRECISIONS, PRECISIONS
from .validate import choice

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def native_bf16(device: str) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware: CUDA with bf16 support, or an x86 CPU with
    AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower than float32)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if str(device) != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def inference_dtype(precision: str, device: str) -> torch.dtype:
    """The dtype the ACG runs in at inference: 'auto' is bf16 where the hardware has it, else fp32."""
    choice("--precision", precision, PRECISIONS)
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def extract_precision(precision: str, device: str) -> str:
    """What extract's backbone computes in: 'auto' is bf16 autocast on a GPU (as before the option existed) and
    fp32 on a CPU; 'bf16' on a CPU is autocast too, fast only where the CPU multiplies bf16 natively."""
    choice("--precision", precision, EXTRACT_PRECISIONS)
    if precision == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    return precision
