"""The split rule (one owner): which split a question belongs to.

A question's split depends only on a stable hash of ``site`` and question id, never on the other data,
so adding a site or a newer dump never moves an old question to another split, and the splits are
disjoint by question by construction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# (dataset, split) names of the outputs; the dataset directory and the HF config share the name.
FINETUNE_TRAIN = ("finetune", "train")
FINETUNE_EVAL = ("finetune", "eval")
REWARD_TRAIN = ("reward", "train")
REWARD_EVAL = ("reward", "eval")
RL_TRAIN = ("rl", "train")
EVALUATION = ("evaluation", "test")
EVALUATION_PAIRS = ("evaluation_pairs", "test")
ALL_SPLITS = (FINETUNE_TRAIN, FINETUNE_EVAL, REWARD_TRAIN, REWARD_EVAL, RL_TRAIN, EVALUATION, EVALUATION_PAIRS)


@dataclass(frozen=True)
class SplitFractions:
    """Shares of questions per split (they must sum to 1), and the held-out share inside finetune and reward."""

    finetune: float = 0.40
    reward: float = 0.35
    rl: float = 0.15
    evaluation: float = 0.10
    finetune_eval: float = 0.10
    reward_eval: float = 0.15

    def __post_init__(self) -> None:
        parts = (self.finetune, self.reward, self.rl, self.evaluation)
        if any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {parts} (sum {sum(parts):.4f})")
        for name in ("finetune_eval", "reward_eval"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def unit_hash(key: str) -> float:
    """A stable, uniform number in [0, 1) for ``key`` (independent of PYTHONHASHSEED and platform)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def question_split(site: str, qid: int, fractions: SplitFractions = SplitFractions()) -> str:
    """``finetune``, ``reward``, ``rl`` or ``evaluation`` for question ``qid`` of ``site``."""
    u = unit_hash(f"{site}/{qid}")
    edge = 0.0
    for name in ("finetune", "reward", "rl"):
        edge += getattr(fractions, name)
        if u < edge:
            return name
    return "evaluation"


def is_heldout(site: str, qid: int, share: float) -> bool:
    """Whether a finetune or reward question goes to that split's ``eval`` part (an independent hash)."""
    return unit_hash(f"heldout/{site}/{qid}") < share


def pair_half(site: str, qid: int) -> str:
    """``proxy`` or ``gold``: which of two reward models may learn from a question's pairs, when a held-out
    "gold" RM is trained on questions disjoint from the proxy RM's (to see over-optimisation, Gao et al. 2022)."""
    return "gold" if unit_hash(f"gold/{site}/{qid}") < 0.5 else "proxy"


def of_half(rows, half: str):
    """The rows (a ``datasets.Dataset`` with ``site`` and ``qid``) of one half's questions; all of them for "all"."""
    if half == "all":
        return rows
    return rows.select([i for i, (site, qid) in enumerate(zip(rows["site"], rows["qid"]))
                        if pair_half(site, qid) == half])
