from dataclasses import dataclass

import pytest

from stackrlhf.data.pairs import make_pairs
from stackrlhf.data.splits import SplitFractions, is_heldout, question_split, unit_hash


@dataclass
class A:
    answer_id: int
    score: int


def test_pairs_have_no_ties_and_better_first():
    answers = [A(1, 3), A(2, 3), A(3, 1), A(4, 0)]
    pairs = make_pairs("s", 1, answers, max_pairs=100)
    assert all(b.score > w.score for b, w in pairs)
    assert len(pairs) == 5  # (1,3) (1,4) (2,3) (2,4) (3,4); not (1,2)
    assert {(b.answer_id, w.answer_id) for b, w in pairs} == {(1, 3), (1, 4), (2, 3), (2, 4), (3, 4)}


def test_pairs_capped_deterministic_and_order_free():
    answers = [A(i, i) for i in range(8)]  # 28 pairs
    one = make_pairs("s", 7, answers, max_pairs=10, seed=0)
    again = make_pairs("s", 7, list(reversed(answers)), max_pairs=10, seed=0)
    assert len(one) == 10
    assert [(b.answer_id, w.answer_id) for b, w in one] == [(b.answer_id, w.answer_id) for b, w in again]
    others = {tuple((b.answer_id, w.answer_id) for b, w in make_pairs("s", 7, answers, 10, seed=s))
              for s in range(1, 6)}
    assert len(others) > 1  # the seed matters


def test_no_pairs_when_all_tied_or_single():
    assert make_pairs("s", 1, [A(1, 2), A(2, 2)]) == []
    assert make_pairs("s", 1, [A(1, 2)]) == []


def test_split_rule_is_stable_and_follows_fractions():
    assert question_split("beer.stackexchange.com", 1) == question_split("beer.stackexchange.com", 1)
    assert 0 <= unit_hash("x") < 1
    n = 20000
    counts = {}
    for qid in range(n):
        s = question_split("example.com", qid)
        counts[s] = counts.get(s, 0) + 1
    f = SplitFractions()
    for name in ("finetune", "reward", "rl", "evaluation"):
        assert abs(counts[name] / n - getattr(f, name)) < 0.015
    held = sum(is_heldout("example.com", q, 0.15) for q in range(n)) / n
    assert abs(held - 0.15) < 0.015


def test_split_fractions_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitFractions(finetune=0.5, reward=0.5, rl=0.5, evaluation=0.0)
    with pytest.raises(ValueError, match="reward_eval"):
        SplitFractions(reward_eval=1.5)
