"""Confounder-adjusted reward models: the covariates, their Bradley-Terry fit, the test-pair report, and the
planted-signal check that the adjustment recovers content while the plain RM falls for length."""

from __future__ import annotations

import math
import random
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from stackrlhf.cli import cli
from stackrlhf.data.schema import PAIRS
from stackrlhf.errors import StackRLHFError
from stackrlhf.stats import (answer_covariates, fit_bradley_terry, hours_after, parse_confounders,
                                          spearman, words)
from stackrlhf.models.reward import RewardModel
from stackrlhf.prompts import format_prompt
from stackrlhf.train.config import RMConfig
from stackrlhf.evaluate.reward_report import confounder_report
from stackrlhf.train.reward import batch_covariance, train_reward_model

WORDS = ("malt hops yeast barley water lager stout porter ale wheat bitter sweet cold warm glass bottle "
         "keg foam head aroma").split()
MARKER = "excellent"
START = np.datetime64("2020-01-01T00:00:00")


def _date(hours: float) -> str:
    return str(START + np.timedelta64(int(hours * 3600), "s"))


def confounded_pairs(root: Path, n_train: int, n_eval: int, n_test: int, seed: int = 0) -> Path:
    """Votes as Stack Exchange casts them, with a known truth: P(j beats k) = sigmoid(3 (c_j - c_k) +
    2.5 (log words_j - log words_k) - (log hours_j - log hours_k)), where c (the marker word) is the content
    and is independent of length and time. So the label goes with length and early posting as well as with c."""
    rng = random.Random(seed)

    def answer():
        ws = [rng.choice(WORDS) for _ in range(rng.randint(4, 32))]
        content = rng.random() < 0.5
        if content:
            ws.insert(rng.randrange(len(ws)), MARKER)
        return " ".join(ws), content, rng.uniform(0.5, 500.0)

    def rows(n: int, offset: int) -> list[dict]:
        out = []
        for qid in range(offset, offset + n):
            a, b = answer(), answer()
            logit = (3.0 * (a[1] - b[1]) + 2.5 * (math.log1p(words(a[0])) - math.log1p(words(b[0])))
                     - (math.log1p(a[2]) - math.log1p(b[2])))
            if rng.random() > 1 / (1 + math.exp(-logit)):
                a, b = b, a
            title, body = f"question {qid}", " ".join(rng.choice(WORDS) for _ in range(8))
            row = {name: None for name in PAIRS.names}
            row.update(qid=qid, question=body, date=str(START), metadata=[], response_j=a[0], response_k=b[0],
                       prompt=format_prompt(title, body), chosen=a[0], rejected=b[0], score_j=2, score_k=1,
                       answer_id_j=2 * qid, answer_id_k=2 * qid + 1, date_j=_date(a[2]), date_k=_date(b[2]),
                       site="synthetic.example", title=title, source="synthetic")
            out.append(row)
        return out

    for dataset, split, n, offset in (("reward", "train", n_train, 0), ("reward", "eval", n_eval, 10**6),
                                      ("evaluation_pairs", "test", n_test, 2 * 10**6)):
        (root / dataset).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows(n, offset), schema=PAIRS), root / dataset / f"{split}-00000.parquet")
    return root


FAST = {"report_to": "none", "logging_steps": 5, "max_length": 64, "max_prompt_tokens": 16,
        "per_device_train_batch_size": 16, "learning_rate": 1e-4, "num_train_epochs": 2, "num_layers_unfrozen": 2}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("confounded")
    data = confounded_pairs(root / "pairs", 320, 64, 80)
    out = {}
    for name, adjust in (("plain", []), ("adjusted", ["length,time"])):
        metrics = train_reward_model(RMConfig(data=[str(data)], out=str(root / name), adjust=adjust, **FAST))
        out[name] = (RewardModel.from_pretrained(root / name), metrics)
    out["data"] = data
    return out


def _probe_answers(seed: int = 5) -> tuple[list[str], list[str]]:
    """Content-only pairs: the same words, once with the marker and once with an ordinary word in its place."""
    rng = random.Random(seed)
    good, bad = [], []
    for _ in range(60):
        ws = [rng.choice(WORDS) for _ in range(rng.randint(4, 32))]
        at = rng.randrange(len(ws))
        good.append(" ".join(ws[:at] + [MARKER] + ws[at:]))
        bad.append(" ".join(ws[:at] + [rng.choice(WORDS)] + ws[at:]))
    return good, bad


def test_adjusted_rm_learns_content_not_length(planted):
    rm, metrics = planted["adjusted"]
    good, bad = _probe_answers()
    q = [format_prompt("question x", "malt hops")] * len(good)
    content_accuracy = np.mean(np.array(rm.score(q, good)) > np.array(rm.score(q, bad)))
    assert content_accuracy >= 0.9
    assert abs(metrics["test"]["length_spearman"]) <= 0.2
    mixed = good[::2] + bad[1::2]  # content independent of length
    assert abs(spearman([words(a) for a in mixed], rm.score(q[:len(mixed)], mixed))) <= 0.25
    # the learnt weights keep the planted signs: longer wins, later loses
    assert metrics["confounder_weights"]["length"] > 0.5 and metrics["confounder_weights"]["time"] < -0.2
    assert rm.adjusted_for == metrics["confounder_weights"]  # saved with the model
    assert metrics["test"]["incremental_log_loss_gain_ci95"][0] > 0  # it knows what length and time don't


def test_plain_rm_falls_for_length(planted):
    _, plain = planted["plain"]
    _, adjusted = planted["adjusted"]
    assert plain["test"]["length_spearman"] > 0.35
    assert plain["test"]["length_spearman"] - abs(adjusted["test"]["length_spearman"]) > 0.25
    assert plain["confounder_weights"] == {} and plain["adjust"] == []


def test_report_keys_are_in_metrics_json(planted):
    _, metrics = planted["adjusted"]
    t = metrics["test"]
    for key in ("covariates_accuracy", "covariates_log_loss", "incremental_log_loss_gain",
                "incremental_log_loss_gain_ci95", "length_spearman", "length_matched_accuracy",
                "length_matched_pairs", "close_in_time_accuracy", "close_in_time_pairs", "covariates_fit_on"):
        assert key in t
    assert t["covariates_fit_on"] == "held-out"
    assert 0.5 < t["covariates_accuracy"] < 0.95  # length and time do predict these votes


def test_covariates_and_fit():
    assert parse_confounders(["length,time"]) == ["length", "time"]
    assert parse_confounders(["time", "length"]) == ["length", "time"]
    assert parse_confounders(["none"]) == [] and parse_confounders([]) == []
    with pytest.raises(StackRLHFError, match="unknown confounder 'votes'"):
        parse_confounders(["length,votes"])
    assert hours_after("2020-01-01T00:00:00", "2020-01-02T12:00:00") == 36.0
    assert math.isnan(hours_after("2020-01-01T00:00:00", None))
    length, time = answer_covariates("one two three", "2020-01-01T00:00:00", "2020-01-01T03:00:00")
    assert length == pytest.approx(math.log(4)) and time == pytest.approx(math.log(4))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 2))
    truth = np.array([1.5, -0.7])
    flip = rng.random(4000) > 1 / (1 + np.exp(-x @ truth))
    x[flip] *= -1  # the first column is always the chosen-minus-rejected difference
    assert np.allclose(fit_bradley_terry(x), truth, atol=0.15)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 2, 3], [4, 3, 3, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_covariance_penalty_is_bounded_and_ignores_unknown():
    import torch

    r = torch.tensor([1e-4, 2e-4, 3e-4, 4e-4], requires_grad=True)
    z = torch.tensor([[1.0, float("nan")], [2.0, float("nan")], [3.0, 1.0], [4.0, 2.0]])
    cov = batch_covariance(r, z)
    assert cov[0].item() == pytest.approx(np.cov([1e-4, 2e-4, 3e-4, 4e-4], [1, 2, 3, 4], bias=True)[0, 1]
                                          / np.std([1, 2, 3, 4]), rel=1e-3)
    assert cov[1].item() == 0.0  # two known rows: no estimate
    cov.square().sum().backward()
    assert torch.isfinite(r.grad).all() and r.grad.abs().max() < 1e-3  # no 1/std(r) blow-up


def test_covariance_within_sites_sees_what_pooling_hides():
    import torch

    # within each site r rises with z; across the two sites it falls (site b is longer but scored lower)
    z = torch.tensor([[1.0], [2.0], [3.0], [11.0], [12.0], [13.0]])
    r = torch.tensor([10.0, 11.0, 12.0, 0.0, 1.0, 2.0])
    sites = torch.tensor([0, 0, 0, 1, 1, 1])
    assert batch_covariance(r, z)[0] < 0  # pooled: negative
    within = batch_covariance(r, z, sites)[0]
    assert within > 0 and within.item() == pytest.approx(np.cov([-1, 0, 1] * 2, [-1, 0, 1] * 2, bias=True)[0, 1]
                                                          / np.std([-1, 0, 1] * 2), rel=1e-5)


def test_report_measures_what_rewards_add():
    pairs = datasets.Dataset.from_list([
        {"prompt": f"q{i}", "chosen": "a " * (5 + i % 7), "rejected": "b " * (5 + (i * 3) % 7), "site": "s",
         "qid": i, "date": "2020-01-01T00:00:00", "date_j": _date(1 + i % 5), "date_k": _date(1 + (i * 2) % 5)}
        for i in range(200)])
    knowing = np.c_[np.ones(200), np.zeros(200)]  # always right
    blind = np.zeros((200, 2))
    t_knowing = confounder_report(pairs, knowing, pairs, knowing)
    t_blind = confounder_report(pairs, blind, pairs, blind)
    assert t_knowing["incremental_log_loss_gain"] > 0.3 and t_knowing["incremental_log_loss_gain_ci95"][0] > 0
    assert abs(t_blind["incremental_log_loss_gain"]) < 1e-6
    assert t_knowing["length_matched_pairs"] + 0 == sum(
        min(words(c), words(r)) >= 0.8 * max(words(c), words(r)) for c, r in zip(pairs["chosen"], pairs["rejected"]))


def test_time_adjustment_needs_dates(tmp_path):
    data = confounded_pairs(tmp_path / "pairs", 20, 0, 0)
    table = pq.read_table(data / "reward" / "train-00000.parquet").to_pylist()
    for row in table:
        row["date_j"] = row["date_k"] = None  # as in a feedback export
    pq.write_table(pa.Table.from_pylist(table, schema=PAIRS), data / "reward" / "train-00000.parquet")
    with pytest.raises(StackRLHFError, match="--adjust time: none of the 20 training pairs"):
        train_reward_model(RMConfig(data=[str(data)], out=str(tmp_path / "rm"), adjust=["time"], **FAST))
    assert not (tmp_path / "rm" / "config.json").exists()
    result = CliRunner().invoke(cli, ["rm", "--data", str(data), "--out", str(tmp_path / "rm2"), "--adjust", "size"])
    assert result.exit_code != 0 and "unknown confounder 'size'" in result.output
    assert not (tmp_path / "rm2").exists()


def test_residualized_length_trend_is_removed_from_scores(planted, tmp_path):
    """--residualize-length: the plain RM's linear trend in log words, fitted on its training answers, comes off
    every score (and survives a save and reload), so its length correlation on new answers falls."""
    from stackrlhf.data.load import load_pairs, load_test_pairs
    from stackrlhf.train.reward import answer_scores, residualize_length

    rm, _ = planted["plain"]
    train, test = load_pairs([str(planted["data"])], "train"), load_test_pairs([str(planted["data"])])
    answers = sorted({(r["prompt"], a) for r in test for a in (r["chosen"], r["rejected"])})
    before = spearman([words(a) for _, a in answers], rm.score([q for q, _ in answers], [a for _, a in answers]))
    assert before > 0.35
    corrected = residualize_length(rm, answer_scores(rm, train, 32, ""))
    assert abs(spearman([words(a) for _, a in corrected], list(corrected.values()))) < 0.2  # on training answers
    assert rm.length_slope > 0
    rm.save_pretrained(tmp_path / "res")
    again = RewardModel.from_pretrained(tmp_path / "res")
    after = spearman([words(a) for _, a in answers], again.score([q for q, _ in answers], [a for _, a in answers]))
    assert abs(after) < 0.2 and after < before - 0.2
    rm.length_slope = 0.0  # leave the shared fixture as it was


def test_the_length_correction_is_fitted_within_questions():
    """A reward that follows length only between questions (questions with long answers score higher) and not
    within one is left alone; a reward that prefers the longer of a question's answers loses that trend, and
    does not turn to preferring the shorter one."""
    from types import SimpleNamespace

    from stackrlhf.train.reward import residualize_length

    def answer(n):
        return " ".join(["word"] * n)

    between = {("short q", answer(5)): 0.0, ("short q", answer(8)): 0.0,
               ("long q", answer(60)): 2.0, ("long q", answer(90)): 2.0}
    rm = SimpleNamespace()
    corrected = residualize_length(rm, between)
    assert rm.length_slope == pytest.approx(0.0, abs=1e-9) and corrected == between
    within = {("a", answer(5)): 0.0, ("a", answer(20)): 1.0, ("b", answer(50)): 3.0, ("b", answer(200)): 4.0}
    corrected = residualize_length(rm, within)
    assert rm.length_slope > 0
    for q in ("a", "b"):  # the longer answer of each question no longer scores higher, nor lower
        short, long_ = sorted((k for k in corrected if k[0] == q), key=lambda k: len(k[1]))
        assert corrected[long_] == pytest.approx(corrected[short], abs=0.35)
