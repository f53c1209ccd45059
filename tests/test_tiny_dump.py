"""`data build` on the made-up fixture dump in tests/data (CC0), so the data rules are checked even on a
clone without ../shared: scores, pairs, splits disjoint by question, attribution on every row."""

from __future__ import annotations

import math
from xml.etree import ElementTree

import pytest

from helpers import TINY_DUMP
from stackrlhf.data.build import build_dataset
from stackrlhf.data.config import DataConfig
from stackrlhf.data.load import load_split


@pytest.fixture(scope="module")
def tea(tmp_path_factory):
    out = tmp_path_factory.mktemp("tea") / "data"
    build_dataset(DataConfig(dump=[str(TINY_DUMP)], out=str(out), progress=False))
    return out


def test_every_question_lands_in_exactly_one_split(tea):
    splits = {(c, s): {row["qid"] for row in load_split(tea, c, s)}
              for c, s in (("finetune", "train"), ("reward", "train"), ("reward", "eval"), ("rl", "train"),
                           ("evaluation", "test"))}
    seen = [q for qids in splits.values() for q in qids]
    assert len(seen) == len(set(seen)) == 16  # all 16 questions, none twice


def test_pairs_follow_the_scoring_rule_and_keep_attribution(tea):
    pairs = load_split(tea, "reward", "train")
    assert len(pairs) > 0
    for row in pairs:
        assert row["score_j"] > row["score_k"] and row["chosen"] == row["response_j"]
        assert row["site"] == "tea.example.com" and row["question_link"] == f"https://tea.example.com/q/{row['qid']}"
        assert row["author_j"] and row["author_k"] and row["license"].startswith("CC BY-SA")
    raw = {int(r.get("Id")): r.attrib for r in ElementTree.parse(TINY_DUMP / "Posts.xml").getroot()}
    accepted = {int(r["AcceptedAnswerId"]) for r in raw.values() if r.get("AcceptedAnswerId")}

    def expected(answer_id: int) -> int:  # round(log2(1 + votes)), +1 if accepted; -1 for negative votes
        votes = int(raw[answer_id]["Score"])
        return -1 if votes < 0 else round(math.log2(1 + votes)) + (answer_id in accepted)

    for row in pairs:
        assert raw[row["answer_id_j"]]["ParentId"] == raw[row["answer_id_k"]]["ParentId"] == str(row["qid"])
        assert (row["score_j"], row["score_k"]) == (expected(row["answer_id_j"]), expected(row["answer_id_k"]))


def test_an_empty_split_loads_as_an_empty_dataset_with_its_columns(tmp_path):
    """A small site can leave a split without a question: it loads with no rows (not a reader's crash)."""
    out = tmp_path / "data"
    build_dataset(DataConfig(dump=[str(TINY_DUMP)], out=str(out), progress=False, finetune_fraction=0.3,
                             reward_fraction=0.3, rl_fraction=0.25, evaluation_fraction=0.15))
    empty = [(d, s) for d, s in (("finetune", "eval"), ("reward", "eval"), ("rl", "train"), ("evaluation", "test"))
             if len(load_split(out, d, s)) == 0]
    assert ("finetune", "eval") in empty
    rows = load_split(out, "finetune", "eval")
    assert len(rows) == 0 and {"site", "qid", "prompt", "completion"} <= set(rows.column_names)
