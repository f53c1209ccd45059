"""Preference pairs (one owner of the pair rule): for a question, every (better, worse) pair of answers
with different scores, no ties, at most ``max_pairs`` per question chosen deterministically from a seed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol


class ScoredAnswer(Protocol):
    answer_id: int
    score: int


def make_pairs(site: str, qid: int, answers: Sequence[ScoredAnswer], max_pairs: int = 10,
               seed: int = 0) -> list[tuple[ScoredAnswer, ScoredAnswer]]:
    """(better, worse) pairs for one question, in a stable order (better answer's rank, then worse's).

    The sample depends only on ``seed``, ``site``, ``qid`` and the answers themselves, not on the
    order they are given in or on any other question.
    """
    ranked = sorted(answers, key=lambda a: (-a.score, a.answer_id))
    pairs = [(ranked[i], ranked[j]) for i in range(len(ranked)) for j in range(i + 1, len(ranked))
             if ranked[i].score > ranked[j].score]
    return sample_pairs(site, qid, pairs, max_pairs, seed)


def sample_pairs(site: str, qid: int, pairs: list, max_pairs: int, seed: int) -> list:
    """At most ``max_pairs`` of ``pairs`` (-1: all), kept in their order, chosen by ``seed``, site and qid."""
    if max_pairs < 0 or len(pairs) <= max_pairs:
        return pairs
    rng = random.Random(f"{seed}/{site}/{qid}")
    return [pairs[i] for i in sorted(rng.sample(range(len(pairs)), max_pairs))]
