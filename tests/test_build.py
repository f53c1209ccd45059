"""`data build` on the real shared dumps: counts, scores, pairs, splits, attribution, layout."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

import datasets
import pytest

from helpers import SHARED, SITES, read_parquet_rows, site_dump
from stackrlhf.data.build import build_dataset
from stackrlhf.data.config import DataConfig
from stackrlhf.data.load import load_split
from stackrlhf.data.scoring import answer_score
from stackrlhf.data.splits import ALL_SPLITS
from stackrlhf.prompts import format_prompt

# From ../shared/data/stackexchange/SOURCES.md (PostTypeId 1 and 2 rows).
EXPECTED = {
    "beer.stackexchange.com": (591, 1398),
    "cardano.stackexchange.com": (1042, 1496),
    "quantumcomputing.stackexchange.com": (612, 1060),
    "matheducators.stackexchange.com": (397, 1507),
}


def posts_of(site: str) -> dict[int, dict]:
    """Posts.xml parsed independently of the code under test (ElementTree, all in memory)."""
    return {int(r.get("Id")): dict(r.attrib) for r in ET.parse(SHARED / site / "Posts.xml").getroot()}


def users_of(site: str) -> dict[int, str]:
    return {int(r.get("Id")): r.get("DisplayName") for r in ET.parse(SHARED / site / "Users.xml").getroot()}


def test_exact_question_and_answer_counts(built_all):
    stats = json.loads((built_all / "stats.json").read_text())
    for site, (questions, answers) in EXPECTED.items():
        s = stats["sites"][site]
        assert (s["questions"], s["answers"]) == (questions, answers), site
        assert s["dropped_orphan_answers"] == 0
        assert set(s) >= {"questions", "answers", "pairs", "splits"}
    assert stats["totals"]["questions"] == sum(q for q, _ in EXPECTED.values())


def test_stats_match_the_files(built_all):
    stats = json.loads((built_all / "stats.json").read_text())
    for dataset, split in ALL_SPLITS:
        rows = read_parquet_rows(built_all, dataset, split)
        assert len(rows) == stats["splits"][f"{dataset}/{split}"] > 0, (dataset, split)
        by_site = Counter(r["site"] for r in rows)
        for site in SITES:
            assert by_site[site] == stats["sites"][site]["splits"][f"{dataset}/{split}"]
    pairs = sum(stats["splits"][k] for k in ("reward/train", "reward/eval", "evaluation_pairs/test"))
    assert pairs == stats["totals"]["pairs"]
    metrics = json.loads((built_all / "metrics.json").read_text())
    assert metrics["pairs"] == pairs


def test_splits_are_disjoint_by_question(built_all):
    owners: dict[tuple[str, int], set[str]] = defaultdict(set)
    for dataset, split in ALL_SPLITS:
        group = "evaluation" if dataset.startswith("evaluation") else dataset
        for r in read_parquet_rows(built_all, dataset, split):
            owners[(r["site"], r["qid"])].add(group)
    assert owners and all(len(groups) == 1 for groups in owners.values())
    train = {(r["site"], r["qid"]) for r in read_parquet_rows(built_all, "reward", "train")}
    held = {(r["site"], r["qid"]) for r in read_parquet_rows(built_all, "reward", "eval")}
    assert train and held and not train & held


def test_pair_rules_on_real_data(built_all):
    per_question = Counter()
    for dataset, split in (("reward", "train"), ("reward", "eval"), ("evaluation_pairs", "test")):
        seen = set()
        for r in read_parquet_rows(built_all, dataset, split):
            assert r["score_j"] > r["score_k"]
            assert r["chosen"] == r["response_j"] and r["rejected"] == r["response_k"]
            assert r["prompt"] == format_prompt(r["title"], r["question"])
            assert r["metadata"][0] == r["question_link"]
            assert r["answer_link_j"] == f"https://{r['site']}/a/{r['answer_id_j']}"
            key = (r["site"], r["qid"], r["answer_id_j"], r["answer_id_k"])
            assert key not in seen
            seen.add(key)
            per_question[(r["site"], r["qid"])] += 1
    assert max(per_question.values()) == 10  # the cap binds on these sites
    assert all(n <= 10 for n in per_question.values())


def test_scores_follow_the_rule_from_the_xml(built_all):
    site = "beer.stackexchange.com"
    posts = posts_of(site)
    checked = 0
    for r in read_parquet_rows(built_all, "evaluation", "test"):
        if r["site"] != site:
            continue
        accepted_id = posts[r["qid"]].get("AcceptedAnswerId")
        xml_answers = {i for i, p in posts.items() if p.get("ParentId") == str(r["qid"])}
        assert {a["answer_id"] for a in r["answers"]} == xml_answers
        for a in r["answers"]:
            post = posts[a["answer_id"]]
            accepted = accepted_id == str(a["answer_id"])
            assert a["accepted"] == accepted
            assert a["score"] == answer_score(int(post["Score"]), accepted)
            checked += 1
        assert [a["score"] for a in r["answers"]] == sorted((a["score"] for a in r["answers"]), reverse=True)
    assert checked > 50


def test_finetune_takes_the_accepted_or_best_answer(built_all):
    site = "cardano.stackexchange.com"
    posts = posts_of(site)
    rows = [r for r in read_parquet_rows(built_all, "finetune", "train") if r["site"] == site]
    assert rows
    for r in rows:
        accepted = posts[r["qid"]].get("AcceptedAnswerId")
        if accepted:
            assert r["answer_id"] == int(accepted) or answer_score(int(posts[int(accepted)]["Score"]), True) < 0
        else:
            scores = [int(p["Score"]) for p in posts.values() if p.get("ParentId") == str(r["qid"])]
            assert int(posts[r["answer_id"]]["Score"]) == max(scores)
        assert r["prompt"] == format_prompt(posts[r["qid"]]["Title"], r["question"])
        assert r["completion"]


def test_rl_prompts_carry_their_best_answer_for_judges(built_all):
    """The reference judge reads an rl question's highest-scored answer (by the scoring rule), with its link and
    author; an unanswered question has none."""
    site = "beer.stackexchange.com"
    posts = posts_of(site)
    rows = [r for r in read_parquet_rows(built_all, "rl", "train") if r["site"] == site]
    assert sum(bool(r["reference_answer"]) for r in rows) > 20
    for r in rows:
        children = {i: p for i, p in posts.items() if p.get("ParentId") == str(r["qid"])}
        assert bool(r["reference_answer"]) == bool(children) == (r["answer_count"] > 0)
        if not children:
            assert r["reference_answer_link"] == r["reference_answer_author"] == ""
            continue
        accepted = posts[r["qid"]].get("AcceptedAnswerId")
        scores = {i: answer_score(int(p["Score"]), str(i) == accepted) for i, p in children.items()}
        best = int(r["reference_answer_link"].rstrip("/").split("/")[-1])
        assert best in children and scores[best] == max(scores.values())
        assert r["reference_answer_link"].startswith(f"https://{site}/")


def test_attribution_on_every_row(built_all):
    users = users_of("quantumcomputing.stackexchange.com")
    posts = posts_of("quantumcomputing.stackexchange.com")
    for dataset, split in ALL_SPLITS:
        for r in read_parquet_rows(built_all, dataset, split):
            assert r["site"] in SITES and isinstance(r["qid"], int)
            assert r["question_link"] == f"https://{r['site']}/q/{r['qid']}"
            assert r["question_author"] and r["license"].startswith("CC BY-SA")
            if r["site"] == "quantumcomputing.stackexchange.com" and dataset == "finetune":
                owner = posts[r["answer_id"]].get("OwnerUserId")
                expected = users[int(owner)] if owner else posts[r["answer_id"]].get("OwnerDisplayName")
                assert r["answer_author"] == expected


def test_markdown_in_real_rows(built_all):
    texts = [r["completion"] for r in read_parquet_rows(built_all, "finetune", "train")]
    assert any("```" in t for t in texts)
    assert not any("<p>" in t for t in texts)


def test_loadable_with_hf_datasets(built_all):
    stats = json.loads((built_all / "stats.json").read_text())
    reward = datasets.load_dataset(str(built_all), "reward", split="train")
    assert len(reward) == stats["splits"]["reward/train"]
    assert {"qid", "question", "date", "metadata", "response_j", "response_k", "prompt", "chosen", "rejected",
            "score_j", "score_k", "answer_id_j", "answer_id_k", "site"} <= set(reward.column_names)
    finetune = load_split(built_all, "finetune", "eval")
    assert len(finetune) == stats["splits"]["finetune/eval"]
    assert {"prompt", "completion"} <= set(finetune.column_names)


def test_adding_a_site_moves_no_question(tmp_path, built_all):
    alone = tmp_path / "beer-only"
    build_dataset(DataConfig(dump=["beer"], out=str(alone), progress=False))
    for dataset, split in ALL_SPLITS:
        ours = [r for r in read_parquet_rows(alone, dataset, split)]
        theirs = [r for r in read_parquet_rows(built_all, dataset, split) if r["site"] == "beer.stackexchange.com"]
        key = lambda r: (r["qid"], r.get("answer_id_j") or 0, r.get("answer_id_k") or 0)  # noqa: E731
        assert sorted(ours, key=key) == sorted(theirs, key=key), (dataset, split)


def test_unchanged_build_is_skipped_and_changed_one_rebuilt(tmp_path):
    out = tmp_path / "d"
    cfg = DataConfig(dump=[str(site_dump())], out=str(out), progress=False)
    first = build_dataset(cfg)
    mtime = (out / "stats.json").stat().st_mtime_ns
    assert build_dataset(cfg) == first
    assert (out / "stats.json").stat().st_mtime_ns == mtime
    changed = build_dataset(DataConfig(dump=[str(site_dump())], out=str(out), progress=False,
                                       max_pairs_per_question=2))
    assert changed["build_key"] != first["build_key"]
    assert changed["totals"]["pairs"] < first["totals"]["pairs"]
    assert not list(tmp_path.glob(".d.*"))


@pytest.mark.needs_dumps
def test_filters(tmp_path):
    out = tmp_path / "hops"
    stats = build_dataset(DataConfig(dump=["beer"], out=str(out), progress=False, tags=["hops"],
                                     date_from="2014-02-01", min_answer_chars=200))
    rows = [r for d, s in ALL_SPLITS if d in ("finetune", "rl", "evaluation") for r in read_parquet_rows(out, d, s)]
    assert rows
    assert all("hops" in r["tags"] and r["date"] >= "2014-02-01" for r in rows)
    assert all(len(r["completion"]) >= 200 for r in read_parquet_rows(out, "finetune", "train"))
    assert 0 < stats["totals"]["questions"] < 591


def test_upvotes_from_votes_counts_votes_xml(tmp_path):
    upvotes = Counter(r.get("PostId") for r in ET.parse(site_dump() / "Votes.xml").getroot()
                      if r.get("VoteTypeId") == "2")
    out = tmp_path / "votes"
    build_dataset(DataConfig(dump=[str(site_dump())], out=str(out), progress=False, upvotes_from="votes"))
    rows = read_parquet_rows(out, "evaluation", "test")
    assert rows
    for r in rows:
        for a in r["answers"]:
            assert a["votes"] == upvotes[str(a["answer_id"])]
            assert a["score"] == answer_score(a["votes"], a["accepted"])


def test_dataset_card_and_config_written(built_all):
    card = (built_all / "README.md").read_text()
    assert "config_name: reward" in card and "CC BY-SA" in card
    assert "dump:" in (built_all / "config.yaml").read_text()
