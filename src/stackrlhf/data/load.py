"""Read the data stage's output from later stages."""

from __future__ import annotations

from pathlib import Path

import datasets

from stackrlhf.data.splits import EVALUATION_PAIRS, pair_half
from stackrlhf.errors import StackRLHFError


def load_split(data_dir: str | Path, dataset: str, split: str = "train") -> datasets.Dataset:
    """One split of a ``stackrlhf data build`` output (or a feedback export in the same layout), e.g.
    ``load_split(d, "reward", "train")``; the same as ``datasets.load_dataset(d, dataset, split=split)``
    without the hub machinery."""
    root = Path(data_dir)
    files = sorted((root / dataset).glob(f"{split}-*.parquet"))
    if not files:
        raise StackRLHFError(f"{root}: no {dataset}/{split} split here; is it a `stackrlhf data build` output?")
    import pyarrow.parquet as pq

    if all(pq.ParquetFile(f).metadata.num_rows == 0 for f in files):  # a small site can leave a split empty
        return datasets.Dataset(pq.read_table(files[0]))
    return datasets.Dataset.from_parquet([str(f) for f in files], keep_in_memory=False)


PAIR_COLUMNS = ["site", "qid", "date", "prompt", "chosen", "rejected", "score_j", "score_k", "date_j", "date_k"]


def load_pairs(dirs: list[str], split: str, limit: int = 0, seed: int = 0, half: str = "all",
               dataset: str = "reward") -> datasets.Dataset:
    """The ``<dataset>/<split>`` pairs of every directory, concatenated. Every directory must have training
    pairs; one without held-out pairs (a small feedback export, say) adds none to ``eval`` or ``test``.
    ``half`` (``proxy`` / ``gold``) keeps the vote pairs of one half of the questions only
    (:func:`stackrlhf.data.splits.pair_half`); labelled pairs (a `feedback export`, source ``feedback...``) are
    always kept: no gold RM learns from them."""
    parts = []
    for d in dirs:
        if split != "train" and not list((Path(d) / dataset).glob(f"{split}-*.parquet")):
            continue
        part = load_split(d, dataset, split)
        if half != "all":
            sources = part["source"] if "source" in part.column_names else [""] * len(part)
            keep = [i for i, (site, qid, source) in enumerate(zip(part["site"], part["qid"], sources))
                    if (source or "").startswith("feedback") or pair_half(site, qid) == half]
            part = part.select(keep)
        parts.append(part.select_columns(PAIR_COLUMNS))
    if not parts:
        return datasets.Dataset.from_dict({c: [] for c in PAIR_COLUMNS})
    pairs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if limit and len(pairs) > limit:
        pairs = pairs.shuffle(seed=seed).select(range(limit))
    return pairs


def load_test_pairs(dirs: list[str], limit: int = 0, seed: int = 0) -> datasets.Dataset:
    """The pairs of the ``evaluation`` questions (``evaluation_pairs/test``): no reward model trains on them or
    picks its epoch on them, so they measure it without the optimism of choosing the best epoch."""
    return load_pairs(dirs, EVALUATION_PAIRS[1], limit, seed, dataset=EVALUATION_PAIRS[0])
