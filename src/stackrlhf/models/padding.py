"""The one padding helper (as TRL's ``trainer/utils.py:pad``): every batch of token lists becomes tensors here."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: the sequences padded with ``value`` to the longest, on the ``right`` (training, scoring)
    or the ``left`` (generation, so every prompt ends at the same position); ``mask`` is 1 on real tokens."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be left or right, not {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask
