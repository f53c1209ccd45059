"""Human feedback: the app (login, sanitising, labels, bad input), replication, export, agreement, a load test."""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
import uuid

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from stackrlhf.cli import cli
from stackrlhf.feedback.app import create_app
from stackrlhf.feedback.export import cohen_kappa, feedback_stats, krippendorff_alpha
from stackrlhf.feedback.store import FeedbackStore, Label, scoped_client_id
from stackrlhf.data.load import load_split
from stackrlhf.data.load import load_pairs

from helpers import free_port, site_dump, start_server

EVIL = "Is <script>window.__pwned = 1</script> safe? <img src=x onerror=alert(1)>"


def question(i: int, body: str = "How long should a lager ferment?") -> dict:
    return {"site": "beer.stackexchange.com", "qid": 1000 + i, "title": f"Lager question {i}", "question": body,
            "prompt": f"Question: Lager question {i}\n\n{body}\n\nAnswer: ",
            "question_link": f"https://beer.stackexchange.com/q/{1000 + i}", "question_author": "alice",
            "license": "CC BY-SA 4.0"}


def candidates(i: int) -> list[dict]:
    return [{"text": f"Two weeks at 10 C (answer {i}a).", "model": "sft", "sampling": {"temperature": 0.7}},
            {"text": f"**Four** weeks, then lager cold (answer {i}b).", "model": "ppo"}]


def labels_in(db: str) -> list[Label]:
    return FeedbackStore(db).all_labels()


def rating_form(task: dict, client_id: str, u=(4, 2), a=(5, 3), best=0, comment="") -> dict:
    ids = task["candidates"]
    form = {"client_id": client_id, "comment": comment, "best": str(ids[best]) if best != "tie" else "tie"}
    for cid, uu, aa in zip(ids, u, a):
        form[f"u_{cid}"] = str(uu)
        form[f"a_{cid}"] = str(aa)
    return form


BROWSER = {"accept": "text/html", "origin": "http://testserver"}  # what a browser's form post sends


@pytest.fixture()
def app_db(db_url):
    db = db_url
    store = FeedbackStore(db)
    store.add_task(question(0, EVIL), [{"text": "Fine. <script>window.__pwned = 2</script>", "model": "sft"},
                                       {"text": "Use `lager` yeast.", "model": "ppo"}])
    for i in range(1, 4):
        store.add_task(question(i), candidates(i))
    tokens = {name: store.add_annotator(name) for name in ("ann", "bob", "cat")}
    tokens["admin"] = store.add_annotator("admin", admin=True)
    return db, tokens


def test_login_task_page_is_sanitised_and_labels_advance_progress(app_db):
    db, tokens = app_db
    client = TestClient(create_app(db))
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"
    assert client.post("/login", data={"token": "wrong"}).status_code == 401
    page = client.post("/login", data={"token": tokens["ann"]})  # cookie, then / -> the first task
    assert page.status_code == 200 and "Lager question 0" in page.text
    assert "<script>window" not in page.text and "<img" not in page.text  # shown as text, never as markup
    assert "&lt;script&gt;" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "0 / 4 done" in page.text
    task_id = int(str(page.url).rsplit("/", 1)[1])
    cids = sorted({int(m) for m in re.findall(r'name="u_(\d+)"', page.text)})
    assert len(cids) == 2
    form = {"client_id": str(uuid.uuid4()), "best": str(cids[1]), "comment": "clear"}
    for cid in cids:
        form[f"u_{cid}"], form[f"a_{cid}"] = "4", "3"
    after = client.post(f"/task/{task_id}", data=form, headers=BROWSER)
    assert after.status_code == 200 and "1 / 4 done" in after.text  # redirected to the next task
    again = client.post(f"/task/{task_id}", data=form, headers=BROWSER)  # a retried submit
    assert again.status_code == 200
    stored = labels_in(db)
    assert len(stored) == 1 and stored[0].best_candidate_id == cids[1] and stored[0].comment == "clear"
    # the annotator may edit their own label (a new submission of the same task)
    form2 = dict(form, client_id=str(uuid.uuid4()), best="tie")
    assert client.post(f"/task/{task_id}", data=form2).status_code == 403  # a cookie post must name its origin
    client.post(f"/task/{task_id}", data=form2, headers=BROWSER)
    stored = labels_in(db)
    assert len(stored) == 1 and stored[0].best_candidate_id is None


def test_bad_input_gets_a_clear_4xx_and_stores_nothing(app_db):
    db, tokens = app_db
    client = TestClient(create_app(db, max_comment=50))
    auth = {"authorization": f"Bearer {tokens['bob']}"}
    task = client.get("/api/next", headers=auth).json()
    good = rating_form(task, str(uuid.uuid4()))
    cases = [
        (dict(good, **{f"u_{task['candidates'][0]}": "abc"}), 422, "whole number"),
        (dict(good, **{f"a_{task['candidates'][1]}": "7"}), 422, "between 1 and 5"),
        ({k: v for k, v in good.items() if not k.startswith("u_")}, 422, "usefulness is missing"),
        (dict(good, best="999999"), 422, "better answer"),
        (dict(good, comment="x" * 51), 413, "at most 50"),
        (dict(good, client_id="x"), 400, "client_id"),
    ]
    for form, status, text in cases:
        r = client.post(f"/task/{task['task']}", data=form, headers=auth)
        assert r.status_code == status and text in r.json()["error"], (form, r.text)
    r = client.post("/task/123456", data=good, headers=auth)
    assert r.status_code == 404 and "not one of your tasks" in r.json()["error"]
    assert client.post(f"/task/{task['task']}", data=good).status_code == 401
    assert client.get("/admin", headers=auth).status_code == 403
    # oversized bodies: refused by their Content-Length, and when streamed without one
    huge = dict(good, pad="x" * 100_000)
    r = client.post(f"/task/{task['task']}", data=huge, headers=auth)
    assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["error"]
    body = urllib.parse.urlencode(huge).encode()
    r = client.post(f"/task/{task['task']}", content=(body[i:i + 4096] for i in range(0, len(body), 4096)),
                    headers={**auth, "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    assert labels_in(db) == []
    assert client.post(f"/task/{task['task']}", data=good, headers=auth).status_code == 201


def test_each_task_goes_to_at_most_r_annotators_never_twice(db_url):
    db = db_url
    store = FeedbackStore(db)
    for i in range(3):
        store.add_task(question(i), candidates(i))
    ids = [FeedbackStore(db).annotator_by_token(store.add_annotator(f"a{i}")).id for i in range(4)]
    seen: dict[int, list[int]] = {}
    for who in ids:
        while (task := store.next_task(who, replication=2)) is not None:
            assert who not in seen.setdefault(task, [])
            seen[task].append(who)
            store.save_label(who, task, str(uuid.uuid4()), {}, None, False, "")  # a tie (a skip frees the slot)
    assert sorted(len(v) for v in seen.values()) == [2, 2, 2]


def test_agreement_statistics_match_hand_computed_values():
    a = ["0", "0", "1", "1"]
    b = ["0", "1", "1", "1"]
    assert cohen_kappa(a, b) == pytest.approx(0.5)  # p_o = .75, p_e = (2*1 + 2*3) / 16 = .5
    assert krippendorff_alpha([[x, y] for x, y in zip(a, b)]) == pytest.approx(1 - 2 / (30 / 7))
    assert krippendorff_alpha([["0", "0"], ["1", "1", "1"], ["tie"]]) == pytest.approx(1.0)


def test_export_pairs_train_beside_the_votes_and_stats_by_model(app_db, site_data, tmp_path):
    db, tokens = app_db
    client = TestClient(create_app(db))
    for who, best in (("ann", 0), ("bob", 0), ("cat", 1)):
        auth = {"authorization": f"Bearer {tokens[who]}"}
        for _ in range(2):
            task = client.get("/api/next", headers=auth).json()
            r = client.post(f"/task/{task['task']}", data=rating_form(task, str(uuid.uuid4()), best=best), headers=auth)
            assert r.status_code == 201
    out = tmp_path / "feedback"
    result = CliRunner().invoke(cli, ["feedback", "export", "--db", db, "--out", str(out)])
    assert result.exit_code == 0, result.output
    pairs = load_pairs([str(site_data), str(out)], "train")
    votes = load_pairs([str(site_data)], "train")
    assert len(pairs) == len(votes) + 6
    mine = load_split(out, "reward", "train").to_list()
    assert all(r["site"] == "beer.stackexchange.com" and r["source"].startswith("feedback:") for r in mine)
    # chosen / rejected carry the annotator's ratings (usefulness + accuracy): 9 vs 5, or 5 vs 9 for cat
    assert sorted((r["score_j"], r["score_k"]) for r in mine) == [(5, 9)] * 2 + [(9, 5)] * 4
    stats = feedback_stats(FeedbackStore(db))
    assert stats["labels"] == 6 and stats["labels_per_annotator"] == {"ann": 2, "bob": 2, "cat": 2}
    assert set(stats["by_model"]) == {"sft", "ppo"}
    admin = client.get("/admin", headers={"authorization": f"Bearer {tokens['admin']}"})
    assert admin.status_code == 200 and "Krippendorff" in admin.text
    cli_stats = CliRunner().invoke(cli, ["feedback", "stats", "--db", db])
    assert cli_stats.exit_code == 0 and "ann: 2 labels" in cli_stats.output


def test_a_k_way_label_exports_every_pair_it_says_and_counts_once_in_the_rm(tmp_path):
    """Four answers, the second picked, the others rated 6, 8, 8: `all` gives the pick against each of the three
    and the 8s against the 6 (5 pairs), `one` the pick against the lowest-rated; the RM spreads a label's weight
    over its pairs, so a label counts as much as one vote pair whatever K."""
    from stackrlhf.train.config import RMConfig
    from stackrlhf.train.reward import PairDataset, label_groups, label_loss_weight

    db = f"sqlite:///{tmp_path / 'k.db'}"
    store = FeedbackStore(db)
    four = [{"text": f"Answer {c} about lager.", "model": "sft"} for c in "abcd"]
    store.add_task(question(0), four, split="rl")
    token = store.add_annotator("ann")
    client = TestClient(create_app(db))
    auth = {"authorization": f"Bearer {token}"}
    task = client.get("/api/next", headers=auth).json()
    form = rating_form(task, str(uuid.uuid4()), u=(3, 5, 4, 4), a=(3, 5, 4, 4), best=1)
    assert client.post(f"/task/{task['task']}", data=form, headers=auth).status_code == 201
    text = {cid: c["text"] for cid, c in zip(task["candidates"], four)}  # queue order = positions
    for mode, expected in (("all", {("b", "a"), ("b", "c"), ("b", "d"), ("c", "a"), ("d", "a")}),
                           ("one", {("b", "a")})):
        out = tmp_path / mode
        result = CliRunner().invoke(cli, ["feedback", "export", "--db", db, "--out", str(out), "--label-pairs", mode])
        assert result.exit_code == 0, result.output
        rows = load_split(out, "reward", "train").to_list()
        got = {(r["chosen"].split()[1], r["rejected"].split()[1]) for r in rows}
        assert got == expected and len(rows) == len(expected)
        assert all(r["score_j"] > r["score_k"] for r in rows)
    assert set(text.values()) == {c["text"] for c in four}
    pairs = load_split(tmp_path / "all", "reward", "train")
    assert label_groups(pairs) == [5] * 5
    weights = [item["weight"] for item in PairDataset(_ByteTok(), pairs, RMConfig(data=["x"], out="y")).items]
    assert sum(weights) == pytest.approx(1.0) and label_loss_weight(pairs, -1) == 1.0


class _ByteTok:
    """Enough of a tokenizer for PairDataset: bytes as ids."""
    cls_token_id, sep_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False, **kw):
        return {"input_ids": list(text.encode())[:200]}


def test_export_leaves_out_evaluation_questions_unless_asked(tmp_path):
    """Labels on questions of the evaluation split must not train the reward model that `eval` then judges with:
    the export makes no pairs of them (and says how many it left out) unless --include-evaluation."""
    db = f"sqlite:///{tmp_path / 'split.db'}"
    store = FeedbackStore(db)
    for i, split in enumerate(("rl", "evaluation", "evaluation")):
        store.add_task(question(i), candidates(i), split=split)
    token = store.add_annotator("ann")
    client = TestClient(create_app(db))
    auth = {"authorization": f"Bearer {token}"}
    for _ in range(3):
        task = client.get("/api/next", headers=auth).json()
        assert client.post(f"/task/{task['task']}", data=rating_form(task, str(uuid.uuid4())),
                           headers=auth).status_code == 201

    result = CliRunner().invoke(cli, ["feedback", "export", "--db", db, "--out", str(tmp_path / "rl-only")])
    assert result.exit_code == 0, result.output
    assert "left out 2 labels on evaluation-split questions" in result.output
    kept = load_split(tmp_path / "rl-only", "reward", "train").to_list()
    assert [r["qid"] for r in kept] == [1000]
    stats = json.loads((tmp_path / "rl-only" / "stats.json").read_text())
    assert stats["pairs"] == 1 and stats["pairs_left_out_evaluation"] == 2
    import pyarrow.parquet as pq

    ratings = pq.read_table(tmp_path / "rl-only" / "ratings.parquet").to_pylist()  # every rating, split named
    assert sorted(r["split"] for r in ratings) == ["evaluation"] * 4 + ["rl"] * 2

    result = CliRunner().invoke(cli, ["feedback", "export", "--db", db, "--out", str(tmp_path / "all"),
                                      "--include-evaluation"])
    assert result.exit_code == 0 and "left out" not in result.output
    assert sorted(r["qid"] for r in load_split(tmp_path / "all", "reward", "train").to_list()) == [1000, 1001, 1002]


def test_queue_generates_candidates_with_a_control(tiny_lm, site_data, tmp_path):
    db = f"sqlite:///{tmp_path / 'q.db'}"
    result = CliRunner().invoke(cli, ["feedback", "queue", "--db", db, "--model", f"tiny={tiny_lm}", "--data",
                                      str(site_data), "--questions", "3", "--answers-per-question", "3", "--control",
                                      "--split", "evaluation", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    tasks = FeedbackStore(db).all_tasks()
    assert len(tasks) == 3 and {t.split for t in tasks} == {"evaluation"}
    refused = CliRunner().invoke(cli, ["feedback", "queue", "--db", db, "--model", f"tiny={tiny_lm}", "--data",
                                       str(site_data), "--control"])  # the default split, rl, has no answers
    assert refused.exit_code != 0 and "--control needs --split evaluation" in refused.output
    for t in tasks:
        sources = sorted(c.source for c in t.candidates)
        assert sources == ["human", "model", "model"]
        assert all(c.sampling["path"] == str(tiny_lm) for c in t.candidates if c.source == "model")
        assert t.question_link.startswith(f"https://{site_dump().name}/")


def test_queue_answers_do_not_depend_on_the_generation_batch(tiny_lm, site_data, tmp_path):
    """The queue answers many prompts together (--generation-batch-size); row i's random numbers are its own, so the stored
    answers are those of one-at-a-time generation."""
    texts = {}
    for size in (1, 32):
        db = f"sqlite:///{tmp_path / f'b{size}.db'}"
        result = CliRunner().invoke(cli, ["feedback", "queue", "--db", db, "--model", f"tiny={tiny_lm}", "--data",
                                          str(site_data), "--questions", "5", "--answers-per-question", "2",
                                          "--max-new-tokens", "8", "--generation-batch-size", str(size)])
        assert result.exit_code == 0, result.output
        texts[size] = sorted((t.question_link, c.text) for t in FeedbackStore(db).all_tasks() for c in t.candidates)
    assert len(texts[1]) == 10 and len({text for _, text in texts[1]}) > 1
    assert texts[1] == texts[32]
    bad = CliRunner().invoke(cli, ["feedback", "queue", "--db", f"sqlite:///{tmp_path / 'z.db'}", "--model",
                                   f"tiny={tiny_lm}", "--data", str(site_data), "--generation-batch-size", "0"])
    assert bad.exit_code != 0 and "--generation-batch-size" in bad.output


# ---------------------------------------------------------------- load test against a real server

@pytest.mark.slow  # a real server under 20 concurrent annotators: tens of seconds per store
def test_load_20_annotators_50_labels_each_with_retries_and_a_restart(db_url):
    db = db_url
    store = FeedbackStore(db)
    for i in range(600):  # 20 x 50 labels with R = 2 (spare tasks: the last annotators must not run dry)
        store.add_task(question(i), candidates(i))
    tokens = [store.add_annotator(f"annotator{i}") for i in range(20)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sent: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def annotate(token: str, n: int) -> None:
        aid = FeedbackStore(db).annotator_by_token(token).id  # the store keeps client ids scoped to the annotator
        with httpx.Client(base_url=base, headers={"authorization": f"Bearer {token}"}, timeout=60) as client:
            for k in range(n):
                task = client.get("/api/next").json()
                if task["task"] is None:
                    with lock:
                        errors.append("no task left")
                    return
                form = rating_form(task, str(uuid.uuid4()), best=k % 2)
                for _attempt in range(2 if k % 7 == 0 else 1):  # every 7th submit is retried (same client id)
                    r = client.post(f"/task/{task['task']}", data=form)
                    if r.status_code not in (200, 201):
                        with lock:
                            errors.append(f"{r.status_code} {r.text[:200]}")
                with lock:
                    sent[scoped_client_id(aid, form["client_id"])] = task["task"]

    for _phase in range(2):  # stop and restart the server between the halves
        server = start_server(db, port)
        try:
            threads = [threading.Thread(target=annotate, args=(t, 25)) for t in tokens]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert errors == []
    labels = labels_in(db)
    assert len(sent) == 1000 and len(labels) == 1000  # every label stored, none twice, none lost
    assert {label.client_id for label in labels} == set(sent)
    per_task: dict[int, int] = {}
    for label in labels:
        per_task[label.task_id] = per_task.get(label.task_id, 0) + 1
    assert max(per_task.values()) <= 2
    assert json.loads(json.dumps(feedback_stats(FeedbackStore(db))["labels_per_annotator"])) == {
        f"annotator{i}": 50 for i in range(20)}


def test_feedback_commands_share_the_store_s_defaults(tmp_path, monkeypatch):
    """The replication `serve` runs with is recorded in the store, and `simulate` and `stats` count against it
    unless told otherwise; every feedback command defaults to the same store."""
    from stackrlhf.feedback import DEFAULT_DB
    from stackrlhf.feedback.config import SimulateConfig

    db = f"sqlite:///{tmp_path / 'r.db'}"
    assert FeedbackStore(db).replication() == 2  # nothing recorded yet
    create_app(db, replication=1)
    store = FeedbackStore(db)
    assert store.replication() == 1 and store.replication(3) == 3
    store.add_task(question(0), candidates(0))
    for i in range(3):  # with R = 1 a task is offered 3 times: three skips leave it out of offers
        who = store.annotator_by_token(store.add_annotator(f"s{i}")).id
        task = store.next_task(who, store.replication())
        store.save_label(who, task, str(uuid.uuid4()), {}, None, True, "")

    def out_of_offers(*options: str) -> int:
        result = CliRunner().invoke(cli, ["feedback", "stats", "--db", db, "--json", *options])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["tasks_out_of_offers"]

    assert out_of_offers() == 1 and out_of_offers("--replication", "2") == 0
    assert SimulateConfig(judge="reference", data="d").db == DEFAULT_DB
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli, ["feedback", "stats", "--json"]).exit_code == 0  # sqlite:///feedback.db here
    assert (tmp_path / "feedback.db").exists()
