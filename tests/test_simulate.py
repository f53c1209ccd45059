"""`stackrlhf feedback simulate`: simulated annotators label through the real app (a server in the test), as
annotators of kind `simulated`; replication and tokens are honoured; a seed makes the labels reproducible."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner

from stackrlhf.cli import cli
from stackrlhf.errors import StackRLHFError
from stackrlhf.feedback.config import SimulateConfig
from stackrlhf.feedback.export import export_feedback, feedback_stats
from stackrlhf.feedback.simulate import choose, simulate
from stackrlhf.feedback.store import FeedbackStore
from stackrlhf.models.reward import RewardModel, default_backbone, load_backbone

from helpers import free_port, start_server

ANSWERS = ["Two weeks at 10 C.", "Use a clean carboy, pitch enough yeast and keep it cool; lager for a month.",
           "No idea.", "Hops."]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model, tok = load_backbone(default_backbone())
    out = tmp_path_factory.mktemp("judge")
    RewardModel(model, tok, max_length=64, max_question_tokens=16).save_pretrained(out)
    return out


def fill(db: str, n: int = 6) -> None:
    store = FeedbackStore(db)
    for i in range(n):
        body = f"How long should lager number {i} ferment?"
        store.add_task({"site": "beer.stackexchange.com", "qid": 500 + i, "title": f"Lager {i}", "question": body,
                        "prompt": f"Question: Lager {i}\n\n{body}\n\nAnswer: ",
                        "question_link": f"https://beer.stackexchange.com/q/{500 + i}", "license": "CC BY-SA 4.0"},
                       [{"text": ANSWERS[(i + k) % 4], "model": f"m{k}"} for k in range(2)])


def test_choose_follows_the_judge():
    rng = random.Random(0)
    assert choose([0.1, 2.0, -1.0], 0.0, rng) == 1
    picks = [choose([0.0, 1.0], 1.0, rng) for _ in range(4000)]
    assert sum(picks) / len(picks) == pytest.approx(1 / (1 + 2.718281828 ** -1), abs=0.03)  # sigmoid(1)


def test_simulated_annotators_label_through_the_real_app(judge_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 'fb.db'}"
    fill(db)
    FeedbackStore(db).add_annotator("alice")  # a person, whose labels must stay apart
    port = free_port()
    server = start_server(db, port)
    try:
        result = simulate(SimulateConfig(db=db, url=f"http://127.0.0.1:{port}", judge=f"rm:{judge_dir}",
                                         annotators=3, noise=0.0, replication=2, seed=1))
        # tokens: the API refuses no token, and an annotator cannot read a task it was not given
        assert httpx.get(f"http://127.0.0.1:{port}/api/task/1").status_code == 401
        outsider = FeedbackStore(db).add_annotator("bob")
        assert httpx.get(f"http://127.0.0.1:{port}/api/task/1",
                         headers={"Authorization": f"Bearer {outsider}"}).status_code == 404
    finally:
        server.terminate()
        server.wait(timeout=30)
    store = FeedbackStore(db)
    labels = store.all_labels()
    assert result["labels"] == len(labels) == 12  # 6 tasks x replication 2
    per_task: dict[int, list[int]] = {}
    for label in labels:
        per_task.setdefault(label.task_id, []).append(label.annotator_id)
    assert all(len(v) == 2 == len(set(v)) for v in per_task.values())  # two different annotators each
    kinds = {a.id: a.kind for a in store.annotators()}
    assert {kinds[label.annotator_id] for label in labels} == {"simulated"} and kinds[1] == "human"
    rm = RewardModel.from_pretrained(judge_dir)
    for label in labels:  # noise 0: each preference is the judge's best answer
        task = store.get_task(label.task_id)
        scores = rm.score([task.prompt] * 2, [c.text for c in task.candidates], normalize=True)
        assert label.best_candidate_id == task.candidates[max(range(2), key=lambda i: scores[i])].id
    stats = feedback_stats(store, 2)
    assert stats["labels_by_kind"] == {"simulated": 12}
    summary = export_feedback(store, tmp_path / "export")
    assert summary["pairs"] == summary["pairs_simulated"] == 12
    import pyarrow.parquet as pq

    ratings = pq.read_table(tmp_path / "export" / "ratings.parquet").to_pylist()
    assert {r["annotator_kind"] for r in ratings} == {"simulated"}


def test_a_seed_makes_the_labels_reproducible(judge_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        db = f"sqlite:///{tmp_path / f'{name}.db'}"
        fill(db, 5)
        simulate(SimulateConfig(db=db, judge=f"rm:{judge_dir}", annotators=1, replication=1, noise=1.0,
                                rating_noise=1.0, skip_rate=0.2, seed=7))  # starts its own local app
        runs.append([(lb.task_id, lb.best_candidate_id, lb.skipped, sorted(lb.ratings.items()))
                     for lb in sorted(FeedbackStore(db).all_labels(), key=lambda x: x.task_id)])
    assert runs[0] == runs[1] and len(runs[0]) == 5


def test_bad_settings_are_refused(judge_dir, tmp_path):
    with pytest.raises(ValueError, match="rm:DIR"):
        SimulateConfig(db="sqlite:///x.db", judge=str(judge_dir))
    with pytest.raises(ValueError, match="needs --data"):
        SimulateConfig(db="sqlite:///x.db", judge="reference")
    with pytest.raises(StackRLHFError, match="residualize-length"):
        simulate(SimulateConfig(db=f"sqlite:///{tmp_path / 'x.db'}", judge=f"rm:{judge_dir}", judge_length_neutral=True))
    result = CliRunner().invoke(cli, ["feedback", "simulate", "--db", f"sqlite:///{tmp_path / 'y.db'}", "--judge",
                                      f"rm:{judge_dir}", "--skip-rate", "1.5"])
    assert result.exit_code != 0 and "skip-rate" in result.output and "Traceback" not in result.output


def test_a_store_from_before_annotator_kinds_is_upgraded(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the annotators table as earlier versions made it, with one person
        conn.execute("CREATE TABLE annotators (id INTEGER PRIMARY KEY, name VARCHAR(100) UNIQUE, token_hash "
                     "VARCHAR(64) UNIQUE, is_admin BOOLEAN, created DATETIME)")
        conn.execute("INSERT INTO annotators VALUES (1, 'carol', 'x', 0, '2026-01-01 00:00:00')")
    store = FeedbackStore(f"sqlite:///{path}")
    assert [(a.name, a.kind) for a in store.annotators()] == [("carol", "human")]
    store.add_annotator("bot:sim-1", kind="simulated")
    assert {a.name: a.kind for a in store.annotators()} == {"carol": "human", "bot:sim-1": "simulated"}


def test_the_reference_judge_prefers_the_questions_own_human_answer(site_data):
    """The reference judge (MiniLM similarity to the best human answer + relevance) ranks a question's own best
    answer above another question's, is on the scale of held-out human answers, and its length-neutral form has
    no linear trend in length on them."""
    import numpy as np

    from stackrlhf.data.load import load_split
    from stackrlhf.stats import words
    from stackrlhf.models.judge import ReferenceJudge, load_judge

    rows = [r for r in load_split(site_data, "rl", "train").to_list() if r["reference_answer"]][:20]
    judge = load_judge("reference", str(site_data))
    assert load_judge("reference", str(site_data)) is judge  # one calibration per process
    own = judge.score(rows, [r["reference_answer"] for r in rows])
    other = judge.score(rows, [rows[(i + 1) % len(rows)]["reference_answer"] for i in range(len(rows))])
    assert sum(a > b for a, b in zip(own, other)) >= 0.8 * len(rows)
    assert np.mean(own) > np.mean(other) + 1.0  # in standard deviations of human answers

    evaluation = [r for r in load_split(site_data, "evaluation", "test").to_list() if len(r["answers"]) > 1]
    qs = [r for r in evaluation for _ in r["answers"][1:]]
    texts = [a["text"] for r in evaluation for a in r["answers"][1:]]
    logw = np.log1p([words(t) for t in texts])
    neutral = ReferenceJudge(str(site_data), length_neutral=True)
    assert abs(np.corrcoef(neutral.score(qs, texts), logw)[0, 1]) < 0.05
    raw = np.asarray(judge.score(qs, texts))
    assert abs(raw.mean()) < 0.05 and abs(raw.std() - 1) < 0.05  # calibrated on exactly these answers
    with pytest.raises(StackRLHFError, match="knows no human answer"):
        judge.score([{"site": "beer.stackexchange.com", "qid": -1, "prompt": "?"}], ["a"])


def test_simulated_annotators_label_with_the_reference_judge(site_data, tmp_path):
    """Through the app: with noise 0 each preference is the question's own human answer over another question's;
    a question without a human answer is skipped, with the reason."""
    from stackrlhf.data.load import load_split

    rl = load_split(site_data, "rl", "train").to_list()
    answered = [r for r in rl if r["reference_answer"]][:4]
    unanswered = [r for r in rl if not r["reference_answer"]][:1]
    db = f"sqlite:///{tmp_path / 'ref.db'}"
    store = FeedbackStore(db)
    for i, q in enumerate(answered):
        store.add_task(q, [{"text": answered[(i + 1) % 4]["reference_answer"], "model": "other"},
                           {"text": q["reference_answer"], "model": "own"}])
    for q in unanswered:
        store.add_task(q, [{"text": "Use more hops.", "model": "a"}, {"text": "Use less.", "model": "b"}])
    made = simulate(SimulateConfig(db=db, judge="reference", data=str(site_data), annotators=2, replication=1,
                                   noise=0.0, seed=3))
    labels = store.all_labels()
    tasks = {t.id: t for t in store.all_tasks()}
    picked = {c.model for lb in labels if not lb.skipped for c in tasks[lb.task_id].candidates
              if c.id == lb.best_candidate_id}
    assert picked == {"own"} and sum(not lb.skipped for lb in labels) == 4
    skipped = [lb for lb in labels if lb.skipped]
    assert made["labels"] == len(labels) and skipped and all("no reference answer" in lb.comment for lb in skipped)
