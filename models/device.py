"""Where models run: the only place that decides device and dtype.

CUDA + bf16 when a GPU is present (fp16 on GPUs without bf16), else CPU fp32. `PREFLOOP_DEVICE=cpu` forces the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" or "cpu"
    dtype_name: str  # "bfloat16" or "float32"

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)


def pick_placement() -> Placement:
    """CUDA + bf16 when a GPU is present (and PREFLOOP_DEVICE does not say otherwise), else CPU fp32."""
    import torch

    wanted = os.environ.get("PREFLOOP_DEVICE", "auto")
    if wanted in ("auto", "cuda") and torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return Placement("cuda", "bfloat16" if bf16 else "float16")
    return Placement("cpu", "float32")


def training_dtype_name() -> str:
    """bf16 weights on a bf16 GPU, else float32 (fp16-only GPUs train in fp32 weights with fp16 autocast)."""
    name = pick_placement().dtype_name
    return "bfloat16" if name == "bfloat16" else "float32"
