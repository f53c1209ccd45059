"""Reward model: planted preference, any-tokenizer scoring, save/reload, several pair datasets, metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from stackrlhf.cli import cli
from stackrlhf.data.schema import PAIRS
from stackrlhf.models.reward import RewardModel, default_backbone, encode_pair, load_backbone
from stackrlhf.prompts import format_prompt
from stackrlhf.train.config import RMConfig
from stackrlhf.data.load import load_pairs
from stackrlhf.evaluate.reward_report import evaluation_report
from stackrlhf.train.reward import train_reward_model

WORDS = ("malt hops yeast barley water lager stout porter ale wheat bitter sweet cold warm glass bottle "
         "keg foam head aroma").split()
FAST = {"report_to": "none", "logging_steps": 5, "max_length": 48, "max_prompt_tokens": 16,
        "per_device_train_batch_size": 16, "learning_rate": 1e-4}


def write_pairs(root: Path, n_train: int, n_eval: int, seed: int = 0, marker: str = "excellent",
                site: str = "synthetic.example", n_test: int = 0) -> Path:
    """Pairs whose better answer contains ``marker``; lengths are random, so length carries no signal."""
    rng = random.Random(seed)

    def answer(with_marker: bool) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 20))]
        if with_marker:
            words.insert(rng.randrange(len(words)), marker)
        return " ".join(words)

    def rows(n: int, offset: int) -> list[dict]:
        out = []
        for i in range(n):
            qid = offset + i
            title, body = f"question {qid}", " ".join(rng.choice(WORDS) for _ in range(8))
            chosen, rejected = answer(True), answer(False)
            row = {name: None for name in PAIRS.names}
            row.update(qid=qid, question=body, date="2020-01-01", metadata=[], response_j=chosen, response_k=rejected,
                       prompt=format_prompt(title, body), chosen=chosen, rejected=rejected, score_j=2, score_k=1,
                       answer_id_j=2 * qid, answer_id_k=2 * qid + 1, date_j="2020-01-02", date_k="2020-01-03",
                       site=site, title=title, source="synthetic")
            out.append(row)
        return out

    (root / "reward").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows(n_train, 0), schema=PAIRS), root / "reward" / "train-00000.parquet")
    if n_eval:
        pq.write_table(pa.Table.from_pylist(rows(n_eval, 10**6), schema=PAIRS), root / "reward" / "eval-00000.parquet")
    if n_test:  # the pairs of the evaluation questions
        (root / "evaluation_pairs").mkdir()
        pq.write_table(pa.Table.from_pylist(rows(n_test, 2 * 10**6), schema=PAIRS),
                       root / "evaluation_pairs" / "test-00000.parquet")
    return root


@pytest.fixture(scope="module")
def planted_rm(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("rm")
    data = write_pairs(root / "pairs", 256, 96, n_test=40)
    metrics = train_reward_model(RMConfig(data=[str(data)], out=str(root / "rm"), num_train_epochs=2,
                                          num_layers_unfrozen=2, **FAST))
    return root / "rm", metrics


def test_default_backbone_is_minilm():
    path = Path(default_backbone())
    assert (path / "config.json").is_file()
    model, tok = load_backbone(str(path))
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 1


def test_planted_preference_is_learnt(planted_rm):
    out, metrics = planted_rm
    assert metrics["accuracy"] > 0.95
    assert abs(metrics["baseline_longer_wins"] - 0.5) < 0.2  # length is no help here
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "baseline_longer_wins", "baseline_earlier_wins", "baseline_random",
                "accuracy_shorter_better", "per_site_accuracy", "reward_mean", "reward_std", "calibration"):
        assert key in saved
    assert saved["per_site_accuracy"]["synthetic.example"]["pairs"] == 96
    assert saved["test"]["eval_pairs"] == 40 and saved["test"]["accuracy"] > 0.95  # never used to pick the epoch
    assert saved["test"]["accuracy_ci95"][0] > 0.8
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["std"] > 0 and stats["answers"] == 512


def test_scores_any_text_deterministically_and_reload_identical(planted_rm, tmp_path):
    out, _ = planted_rm
    rm = RewardModel.from_pretrained(out)
    q = [format_prompt("question 1", "malt and hops")] * 3
    a = ["malt excellent hops", "malt hops", "Ünïcode ✓ <b>html</b> and a very long " + "word " * 300]
    first = rm.score(q, a, batch_size=1)
    again = rm.score(q, a, batch_size=3)
    assert np.allclose(first, again, atol=1e-5)
    assert first[0] > first[1]  # the marker wins
    rm.save_pretrained(tmp_path / "copy")
    reloaded = RewardModel.from_pretrained(tmp_path / "copy")
    assert reloaded.score(q, a) == rm.score(q, a)
    normed = rm.score(q, a, normalize=True)
    assert np.allclose(normed, (np.array(first) - rm.stats["mean"]) / rm.stats["std"], atol=1e-4)


def test_text_from_another_tokenizer_is_scored(planted_rm):
    """The policy's tokenizer (a byte-level BPE) is not the RM's (WordPiece): scoring goes through text."""
    from stackrlhf.models.offline_base import train_tokenizer

    out, _ = planted_rm
    rm = RewardModel.from_pretrained(out)
    policy_tok = train_tokenizer([" ".join(WORDS)] * 50, vocab_size=300)
    texts = [policy_tok.decode(policy_tok(t)["input_ids"]) for t in ("stout excellent cold keg", "stout cold keg")]
    assert type(policy_tok).__name__ != type(rm.tokenizer).__name__
    assert texts == ["stout excellent cold keg", "stout cold keg"]  # the policy's ids come back as the same text
    q = [format_prompt("q", "b")] * 2
    with_marker, without = rm.score(q, texts)
    assert with_marker > without  # the planted preference survives the trip through another tokenizer
    assert rm.score(q, texts) == rm.score(q, ["stout excellent cold keg", "stout cold keg"])


def test_question_is_cut_before_the_answer():
    _, tok = load_backbone(default_backbone())
    ids = encode_pair(tok, "Question: " + "long " * 200 + "\n\nAnswer: ", "short answer here", 48, 16)
    assert len(ids) <= 48
    assert tok.decode(ids).endswith("short answer here [SEP]")


def test_question_budget_at_or_above_the_room_still_fits():
    _, tok = load_backbone(default_backbone())
    for question_tokens in (61, 62, 63, 200):  # room for an encoder at 64 is 61 (3 special tokens)
        ids = encode_pair(tok, "Question: " + "long " * 200, "answer " * 300, 64, question_tokens)
        assert len(ids) <= 64


def test_two_pair_datasets_at_once(tmp_path):
    a = write_pairs(tmp_path / "votes", 40, 10, seed=1, site="votes.example")
    b = write_pairs(tmp_path / "human", 24, 0, seed=2, site="human.example")
    train = load_pairs([str(a), str(b)], "train")
    held = load_pairs([str(a), str(b)], "eval")
    assert len(train) == 64 and set(train["site"]) == {"votes.example", "human.example"}
    assert len(held) == 10
    metrics = train_reward_model(RMConfig(data=[str(a), str(b)], out=str(tmp_path / "rm"), max_steps=2, **FAST))
    assert metrics["train_pairs"] == 64 and metrics["eval_pairs"] == 10


def test_evaluation_report_baselines():
    import datasets

    pairs = datasets.Dataset.from_dict({
        "chosen": ["long answer text", "s", "same"], "rejected": ["short", "much longer one", "same"],
        "date_j": ["2020", "2021", "2020"], "date_k": ["2021", "2020", "2020"], "site": ["a", "a", "b"],
        "qid": [1, 1, 2]})
    rewards = np.array([[1.0, 0.0], [2.0, 0.5], [0.0, 1.0]])
    r = evaluation_report(pairs, rewards)
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["baseline_longer_wins"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert r["baseline_earlier_wins"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert r["shorter_better_pairs"] == 1 and r["accuracy_shorter_better"] == 1.0
    assert r["per_site_accuracy"]["b"] == {"pairs": 1, "accuracy": 0.0}
    assert sum(c["pairs"] for c in r["calibration"]) == 3
    assert r["eval_questions"] == 2
    lo, hi = r["accuracy_ci95"]
    assert 0.0 <= lo <= r["accuracy"] <= hi <= 1.0


def test_bootstrap_interval_resamples_whole_questions():
    from stackrlhf.evaluate.reward_report import question_bootstrap_ci

    assert question_bootstrap_ci(np.ones(30), list(range(30))) == [1.0, 1.0]
    assert question_bootstrap_ci(np.array([]), []) is None
    # 20 questions of 10 pairs: half the questions all right, half all wrong
    values = np.repeat(np.array([1.0, 0.0] * 10), 10)
    clustered = question_bootstrap_ci(values, list(np.repeat(np.arange(20), 10)))
    independent = question_bootstrap_ci(values, list(range(200)))
    assert clustered[0] < 0.5 < clustered[1] and independent[0] < 0.5 < independent[1]
    assert clustered[1] - clustered[0] > 2 * (independent[1] - independent[0])


def test_drop_time_only_pairs(tmp_path):
    from stackrlhf.errors import StackRLHFError
    from stackrlhf.train.reward import time_only

    def row(score_j, date_j, date_k="2020-02-01"):
        return {"score_j": score_j, "score_k": 1, "date_j": date_j, "date_k": date_k}

    assert time_only(row(2, "2020-01-01"))          # earlier, one point ahead
    assert not time_only(row(3, "2020-01-01"))      # earlier, but two points ahead
    assert not time_only(row(2, "2020-03-01"))      # later: it won despite less exposure
    assert not time_only(row(2, None, None))        # a human label without dates
    data = write_pairs(tmp_path / "pairs", 16, 4)   # every pair: earlier, 2 vs 1 points
    with pytest.raises(StackRLHFError, match="left no training pairs"):
        train_reward_model(RMConfig(data=[str(data)], out=str(tmp_path / "rm"), max_steps=1,
                                    drop_time_only_pairs=True, **FAST))
    path = data / "reward" / "train-00000.parquet"
    table = pq.read_table(path).to_pylist()
    for r in table[:6]:
        r["score_j"] = 3                            # two points ahead: kept
    pq.write_table(pa.Table.from_pylist(table, schema=PAIRS), path)
    metrics = train_reward_model(RMConfig(data=[str(data)], out=str(tmp_path / "rm"), max_steps=1,
                                          drop_time_only_pairs=True, **FAST))
    assert metrics["train_pairs"] == 6 and metrics["train_pairs_dropped_time_only"] == 10


def test_causal_lm_backbone(tmp_path):
    from stackrlhf.models.offline_base import make_model, train_tokenizer

    tok = train_tokenizer([" ".join(WORDS)] * 50, vocab_size=300)
    make_model("tiny", tok).save_pretrained(str(tmp_path / "lm"))
    tok.save_pretrained(str(tmp_path / "lm"))
    data = write_pairs(tmp_path / "pairs", 32, 8)
    metrics = train_reward_model(RMConfig(model=str(tmp_path / "lm"), data=[str(data)], out=str(tmp_path / "rm"),
                                          max_steps=2, num_layers_unfrozen=1, **FAST))
    assert metrics["eval_pairs"] == 8
    rm = RewardModel.from_pretrained(tmp_path / "rm")
    assert type(rm.model).__name__ == "GPT2ForSequenceClassification"
    assert len(rm.score(["q"], ["a"])) == 1


def test_score_cli(planted_rm):
    out, _ = planted_rm
    rm = RewardModel.from_pretrained(out)
    printed = []
    for answer in ("malt excellent hops", "malt hops"):
        result = CliRunner().invoke(cli, ["score", str(out), "malt question", answer])
        assert result.exit_code == 0, result.output
        printed.append(float(result.stdout.strip()))
        expected = rm.score([format_prompt("", "malt question")], [answer])[0]
        assert printed[-1] == pytest.approx(expected, abs=1e-3)  # the RM's raw score, to the 4 decimals printed
    assert printed[0] > printed[1]  # the planted marker wins through the CLI too


def test_lora_reward_model(tmp_path):
    data = write_pairs(tmp_path / "pairs", 32, 8)
    metrics = train_reward_model(RMConfig(data=[str(data)], out=str(tmp_path / "rm"), max_steps=2, lora=True,
                                          lora_r=4, **FAST))
    assert metrics["eval_pairs"] == 8
    rm = RewardModel.from_pretrained(tmp_path / "rm")
    assert not any("lora" in n for n, _ in rm.model.named_parameters())
    assert len(rm.score(["q"], ["a"])) == 1


class _Scores(torch.nn.Module):
    """A stand-in reward model that returns fixed logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **_):
        import types

        return types.SimpleNamespace(logits=self.logits)


def test_debias_weight_counts_pairs_against_length_and_time_more():
    import types

    from stackrlhf.train.reward import PairCollator, PairDataset, RewardTrainer, against_bias

    def row(chosen, rejected, date_j, date_k):
        return {"prompt": "Question: q\n\nAnswer: ", "chosen": chosen, "rejected": rejected, "score_j": 2,
                "score_k": 1, "date_j": date_j, "date_k": date_k}

    rows = [row("a long answer", "short", "2020-01-01", "2020-02-01"),  # longer and earlier: with both biases
            row("short", "a long answer", "2020-01-01", "2020-02-01"),  # shorter: against the length bias
            row("a long answer", "short", "2020-03-01", "2020-02-01"),  # later: against the time bias
            row("a long answer", "short", None, None)]                  # a human label without dates
    assert [against_bias(r) for r in rows] == [False, True, True, False]
    model, tok = load_backbone(default_backbone())
    cfg = RMConfig(data=["x"], debias_weight=2.0, max_length=32, max_prompt_tokens=8)
    items = PairDataset(tok, rows, cfg)
    assert [it["weight"] for it in items.items] == [1.0, 3.0, 3.0, 1.0]
    batch = PairCollator(tok.pad_token_id)(items.items)
    logits = torch.tensor([[1.0], [0.0], [2.0], [0.5], [0.0], [1.0], [0.0], [0.0]])  # r_j then r_k
    fake = types.SimpleNamespace(margin_scale=0.0, decorrelation=0.0)
    loss = RewardTrainer.compute_loss(fake, _Scores(logits), dict(batch))
    per_pair = -torch.nn.functional.logsigmoid(torch.tensor([1.0, -1.0, 2.0, 0.5]))
    weights = torch.tensor([1.0, 3.0, 3.0, 1.0])
    assert float(loss) == pytest.approx(float((weights * per_pair).sum() / weights.sum()))


def test_reward_ensemble(planted_rm, tmp_path):
    import shutil

    rm_dir, _ = planted_rm
    root = tmp_path / "runs"
    shutil.copytree(rm_dir, root / "rm-a")
    data = write_pairs(tmp_path / "pairs", 32, 16, seed=3, n_test=8)
    train_reward_model(RMConfig(data=[str(data)], out=str(root / "rm-b"), max_steps=2, seed=1, **FAST))
    runner = CliRunner()
    result = runner.invoke(cli, ["rm-ensemble", str(root / "rm-a"), str(root / "rm-b"), "--data", str(data),
                                 "--out", str(root / "ens")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "ens" / "metrics.json").read_text())
    assert metrics["members"] == 2 and metrics["eval_pairs"] == 16
    assert set(metrics["member_accuracy"]) == {str(root / "rm-a"), str(root / "rm-b")}
    assert metrics["test"]["eval_pairs"] == 8 and len(metrics["test"]["member_accuracy"]) == 2
    assert json.loads((root / "ens" / "ensemble.json").read_text())["members"] == ["../rm-a", "../rm-b"]

    shutil.move(str(root), str(tmp_path / "moved"))  # members beside the ensemble move with it
    ens = RewardModel.from_pretrained(tmp_path / "moved" / "ens")
    a, b = RewardModel.from_pretrained(tmp_path / "moved" / "rm-a"), RewardModel.from_pretrained(tmp_path / "moved" / "rm-b")
    qs, ans = [format_prompt("", "which malt?")] * 3, ["excellent malt", "cold keg foam", "warm stout excellent"]
    za, zb = np.array(a.score(qs, ans, normalize=True)), np.array(b.score(qs, ans, normalize=True))
    assert ens.score(qs, ans) == pytest.approx(list((za + zb) / 2), abs=1e-5)
    mean, std = ens.stats["mean"], ens.stats["std"]
    assert std > 0
    assert ens.score(qs, ans, normalize=True) == pytest.approx(list(((za + zb) / 2 - mean) / std), abs=1e-4)
    ens.combine = "min"
    assert ens.score(qs, ans) == pytest.approx(list(np.minimum(za, zb)), abs=1e-5)
    result = runner.invoke(cli, ["score", str(tmp_path / "moved" / "ens"), "which malt?", "excellent malt"])
    assert result.exit_code == 0 and float(result.output) == pytest.approx(float((za[0] + zb[0]) / 2), abs=1e-3)

    for args, message in (([str(tmp_path / "moved" / "rm-a")], "two or more"),
                          ([str(tmp_path / "moved" / "ens"), str(tmp_path / "moved" / "rm-a")], "itself an ensemble"),
                          ([str(tmp_path / "moved" / "rm-a"), str(tmp_path)], "not a reward-model directory")):
        result = runner.invoke(cli, ["rm-ensemble", *args, "--data", str(data), "--out", str(tmp_path / "bad")])
        assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "bad").exists()


def test_label_pairs_are_weighted_against_the_votes():
    import datasets

    from stackrlhf.train.reward import PairDataset, label_loss_weight

    def row(source):
        return {"prompt": "Question: q\n\nAnswer: ", "chosen": "a", "rejected": "b", "score_j": 2, "score_k": 1,
                "date_j": None, "date_k": None, "source": source}

    rows = [row("stackexchange")] * 9 + [row("feedback:alice"), row("feedback-simulated:bot:sim-1"), row("feedback:bo")]
    pairs = datasets.Dataset.from_list(rows)
    assert label_loss_weight(pairs, -1) == 3.0  # 9 vote pairs, 3 label pairs: equal total weight
    assert label_loss_weight(pairs, 2.5) == 2.5 and label_loss_weight(pairs.select(range(9)), -1) == 1.0
    _, tok = load_backbone(default_backbone())
    items = PairDataset(tok, rows, RMConfig(data=["x"], max_length=32, max_prompt_tokens=8), label_weight=3.0)
    weights = [it["weight"] for it in items.items]
    assert weights == [1.0] * 9 + [3.0] * 3 and sum(weights[:9]) == sum(weights[9:])
    with pytest.raises(ValueError, match="label-weight"):
        RMConfig(data=["x"], label_weight=-2)
