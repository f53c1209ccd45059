"""Read the data stage's output from later stages."""

from __future__ import annotations

from pathlib import Path

import datasets

from stackrlhf.errors import StackRLHFError


def load_split(data_dir: str | Path, dataset: str, split: str = "train") -> datasets.Dataset:
    """One split of a ``stackrlhf data build`` output (or a feedback export in the same layout), e.g.
    ``load_split(d, "reward", "train")``; the same as ``datasets.load_dataset(d, dataset, split=split)``
    without the hub machinery."""
    root = Path(data_dir)
    files = sorted((root / dataset).glob(f"{split}-*.parquet"))
    if not files:
        raise StackRLHFError(f"{root}: no {dataset}/{split} split here; is it a `stackrlhf data build` output?")
    return datasets.Dataset.from_parquet([str(f) for f in files], keep_in_memory=False)

