"""Mixed precision as it must be done for training: the weights the optimizer updates stay in float32 (its
master copy), the forward runs in bfloat16 under autocast, and frozen weights (trunk, reference) may stay in
bfloat16 to save memory. Updating bfloat16 weights directly loses every step smaller than bf16's rounding
step (about 1/128 of the weight): at RL learning rates most entries, and every LayerNorm gain, never move."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def upcast_trainable(module: nn.Module) -> int:
    """Cast every trainable floating-point parameter to float32 in place; returns how many were cast."""
    cast = 0
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


def autocast(device: str | torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (CPU and CUDA both support bfloat16); a no-op for float32."""
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
