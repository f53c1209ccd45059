"""The annotation app and the report in a real headless Chromium (Debian's package, driven by Playwright).

Screenshots land in ``test-artifacts/`` at the repository root (kept by CI as test artifacts)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from playwright.sync_api import expect

from stackrlhf.feedback.store import FeedbackStore

from helpers import REPO, free_port, start_server

ARTIFACTS = REPO / "test-artifacts"
EVIL = "Is <script>window.__pwned = 1</script> safe? <img src=x onerror=\"window.__pwned = 2\">"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = os.environ.get("STACKRLHF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        message = "no Chromium: apt-get install chromium (or set STACKRLHF_CHROMIUM)"
        if os.environ.get("STACKRLHF_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=FLAGS)
        yield b
        b.close()


def test_annotating_with_the_keyboard_in_chromium(browser, tmp_path):
    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(db)
    store.add_task(
        {"site": "beer.stackexchange.com", "qid": 53, "title": "Does chocolate stout contain real chocolate?",
         "question": EVIL + "\n\nVarious microbreweries make **chocolate stout**. How is chocolate used?",
         "prompt": "Question: Does chocolate stout contain real chocolate?\n\nAnswer: ",
         "question_link": "https://beer.stackexchange.com/q/53", "question_author": "Lars Kotthoff",
         "license": "CC BY-SA 3.0"},
        [{"text": "It depends on the brew: most of the flavour comes from **roasted malts**.\n\n"
                  "<script>window.__pwned = 3</script>", "model": "sft"},
         {"text": "Yes, always:\n\n1. cocoa nibs in the secondary\n2. cocoa powder in the boil", "model": "ppo"}])
    store.add_task({"site": "beer.stackexchange.com", "qid": 54, "title": "What is a lager?", "question": "Is it cold?",
                    "prompt": "Question: What is a lager?\n\nAnswer: ", "question_link": "https://beer.stackexchange.com/q/54",
                    "question_author": "x", "license": "CC BY-SA 3.0"},
                   [{"text": "A bottom-fermented beer.", "model": "sft"}, {"text": "Cold beer.", "model": "ppo"}])
    token = store.add_annotator("ann")
    port = free_port()
    server = start_server(db, port)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        dialogs, console = [], []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: console.append(m.text))
        page.goto(f"http://127.0.0.1:{port}/login")
        page.fill("input[name=token]", token)
        page.press("input[name=token]", "Enter")
        page.wait_for_url("**/task/*")
        assert page.text_content("#progress").strip().startswith("0 / 2")
        # the dump's and the model's <script> are shown as text, never run
        assert page.evaluate("window.__pwned") is None and dialogs == []
        assert "<script>window.__pwned = 1</script>" in page.text_content("body")
        assert page.locator("strong", has_text="roasted malts").count() == 1  # Markdown is rendered
        a, b = page.locator("#answer-a").bounding_box(), page.locator("#answer-b").bounding_box()
        assert a["y"] == b["y"] and b["x"] > a["x"] + a["width"] - 1  # side by side
        assert not [m for m in console if "Content Security Policy" in m]  # the page's own styles all apply
        for key in "4253":  # usefulness A, accuracy A, usefulness B, accuracy B
            page.keyboard.press(key)
        page.keyboard.press("a")  # answer A is better
        checked = page.eval_on_selector_all("input[type=radio]:checked", "els => els.map(e => e.name + '=' + e.value)")
        assert len(checked) == 5 and sum(c.startswith("best=") for c in checked) == 1
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "annotation.png"), full_page=True)
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert "/task/" in page.url, page.text_content("body")
        expect(page.locator("#progress")).to_have_text(re.compile(r"^\s*1 / 2"))
        assert page.evaluate("window.__pwned") is None
    finally:
        server.terminate()
        server.wait(timeout=30)
    labels = FeedbackStore(db).all_labels()
    assert len(labels) == 1
    ratings = sorted((r["usefulness"], r["accuracy"]) for r in labels[0].ratings.values())
    assert ratings == [(4, 2), (5, 3)]  # A: usefulness 4, accuracy 2; B: 5, 3
    task = FeedbackStore(db).get_task(labels[0].task_id)
    assert labels[0].best_candidate_id == next(c.id for c in task.candidates if c.position == 0)


def test_report_renders_its_plots_in_chromium(browser, tmp_path):
    from stackrlhf.evaluate.config import ReportConfig
    from stackrlhf.evaluate.report import write_report

    run = tmp_path / "run"
    for d in ("eval", "ppo", "ilql", "rm", "feedback"):
        (run / d).mkdir(parents=True)
    models = {name: {"path": name, "beta": None, "reward_proxy": r, "reward_gold": r / 2, "reward_proxy_std": 1.0,
                     "reward_gold_std": 1.0, "kl_to_reference": kl, "human_answer_perplexity": 50.0,
                     "length_tokens": 40.0, "ended": 0.5, "distinct_2": 0.9, "win_rate_proxy_vs_sft": 0.5,
                     "win_rate_gold_vs_sft": 0.5, "best_of": n or None}
              for name, r, kl, n in (("sft", 0.0, 0.0, 0), ("ppo", 0.4, 3.0, 0), ("rloo", 0.3, 2.0, 0),
                                     ("dpo", 0.1, 1.0, 0), ("bon4", 0.2, 0.64, 4), ("bon16", 0.35, 1.84, 16))}
    (run / "eval" / "eval.json").write_text(json.dumps({
        "questions": 2, "baseline": "sft", "judges": {"proxy": "rm", "gold": "rm-gold"},
        "sampling": {"temperature": 1.0, "max_new_tokens": 8}, "models": models}))
    (run / "eval" / "samples.jsonl").write_text(json.dumps({
        "site": "beer.stackexchange.com", "qid": 1, "title": "Q", "question_link": "https://beer.stackexchange.com/q/1",
        "question_author": "a", "license": "CC BY-SA 4.0", "prompt": "Question: Q", "best_answer": "<b>hi</b>",
        "answers": {"sft": {"text": "<script>window.__pwned = 1</script>", "proxy": 0.1}}}) + "\n")
    (run / "ppo" / "history.jsonl").write_text("".join(json.dumps(
        {"step": i, "reward/score_mean": 0.1 * i, "reward/total_mean": 0.05 * i, "kl/mean": 0.3 * i, "kl/beta": 0.05,
         "response/words": 20 + i, "response/words_each": [20 + i, 22 + i], "reward/score_each": [0.1 * i, 0.1 * i]})
        + "\n" for i in range(1, 6)))
    (run / "ilql" / "history.jsonl").write_text("".join(json.dumps(
        {"step": i, "loss/q": 1 / i, "loss/v": 0.5 / i, "loss/awac": 6 - i / 10, "values/q_mean": 0.1,
         "values/v_mean": 0.05, "values/advantage_mean": 0.05}) + "\n" for i in range(1, 6)))
    (run / "rm" / "metrics.json").write_text(json.dumps({
        "accuracy": 0.6, "baseline_longer_wins": 0.6, "baseline_earlier_wins": 0.7, "baseline_random": 0.5,
        "accuracy_shorter_better": 0.4, "eval_pairs": 100}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"model": m, "usefulness": u, "accuracy": a} for m, u, a in
                                         (("sft", 2, 3), ("ppo", 4, 4), (None, 5, 5), ("sft", 3, 2))]),
                   run / "feedback" / "ratings.parquet")
    out = write_report(ReportConfig(run=str(run), out=str(tmp_path / "report.html")))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(out.as_uri())
    plots = page.eval_on_selector_all("img.plot", "els => els.map(e => [e.dataset.plot, e.complete, e.naturalWidth])")
    assert {name for name, _, _ in plots} == {"frontier", "ppo", "ppo_length", "ilql", "rm_accuracy", "feedback"}
    assert all(complete and width > 300 for _, complete, width in plots)  # decoded, not broken images
    assert page.evaluate("window.__pwned") is None
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
