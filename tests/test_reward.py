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
from stackrlhf.train.reward import evaluation_report, load_pairs, train_reward_model

WORDS = ("malt hops yeast barley water lager stout porter ale wheat bitter sweet cold warm glass bottle "
         "keg foam head aroma").split()
FAST = {"report_to": "none", "logging_steps": 5, "max_length": 48, "max_question_tokens": 16,
        "per_device_train_batch_size": 16, "learning_rate": 1e-4}


def write_pairs(root: Path, n_train: int, n_eval: int, seed: int = 0, marker: str = "excellent",
                site: str = "synthetic.example") -> Path:
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
    return root


@pytest.fixture(scope="module")
def planted_rm(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("rm")
    data = write_pairs(root / "pairs", 256, 96)
    metrics = train_reward_model(RMConfig(data=[str(data)], out=str(root / "rm"), num_train_epochs=2, **FAST))
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
    from stackrlhf.models.base import train_tokenizer

    out, _ = planted_rm
    rm = RewardModel.from_pretrained(out)
    policy_tok = train_tokenizer([" ".join(WORDS)] * 50, vocab_size=300)
    ids = policy_tok("the stout is excellent and cold")["input_ids"]
    text = policy_tok.decode(ids)
    assert type(policy_tok).__name__ != type(rm.tokenizer).__name__
    assert rm.score([format_prompt("q", "b")], [text]) == rm.score([format_prompt("q", "b")], [text])


def test_question_is_cut_before_the_answer():
    _, tok = load_backbone(default_backbone())
    ids = encode_pair(tok, "Question: " + "long " * 200 + "\n\nAnswer: ", "short answer here", 48, 16)
    assert len(ids) <= 48
    assert tok.decode(ids).endswith("short answer here [SEP]")


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
        "date_j": ["2020", "2021", "2020"], "date_k": ["2021", "2020", "2020"], "site": ["a", "a", "b"]})
    rewards = np.array([[1.0, 0.0], [2.0, 0.5], [0.0, 1.0]])
    r = evaluation_report(pairs, rewards)
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["baseline_longer_wins"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert r["baseline_earlier_wins"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert r["shorter_better_pairs"] == 1 and r["accuracy_shorter_better"] == 1.0
    assert r["per_site_accuracy"]["b"] == {"pairs": 1, "accuracy": 0.0}
    assert sum(c["pairs"] for c in r["calibration"]) == 3


def test_causal_lm_backbone(tmp_path):
    from stackrlhf.models.base import make_model, train_tokenizer

    tok = train_tokenizer([" ".join(WORDS)] * 50, vocab_size=300)
    make_model("tiny", tok).save_pretrained(str(tmp_path / "lm"))
    tok.save_pretrained(str(tmp_path / "lm"))
    data = write_pairs(tmp_path / "pairs", 32, 8)
    metrics = train_reward_model(RMConfig(backbone=str(tmp_path / "lm"), data=[str(data)], out=str(tmp_path / "rm"),
                                          max_steps=2, num_layers_unfrozen=1, **FAST))
    assert metrics["eval_pairs"] == 8
    rm = RewardModel.from_pretrained(tmp_path / "rm")
    assert type(rm.model).__name__ == "GPT2ForSequenceClassification"
    assert len(rm.score(["q"], ["a"])) == 1


def test_score_cli(planted_rm):
    out, _ = planted_rm
    result = CliRunner().invoke(cli, ["score", str(out), "malt question", "an excellent answer"])
    assert result.exit_code == 0, result.output
    float(result.stdout.strip())


def test_lora_reward_model(tmp_path):
    data = write_pairs(tmp_path / "pairs", 32, 8)
    metrics = train_reward_model(RMConfig(data=[str(data)], out=str(tmp_path / "rm"), max_steps=2, lora=True,
                                          lora_r=4, **FAST))
    assert metrics["eval_pairs"] == 8
    rm = RewardModel.from_pretrained(tmp_path / "rm")
    assert not any("lora" in n for n, _ in rm.model.named_parameters())
    assert len(rm.score(["q"], ["a"])) == 1


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
    cfg = RMConfig(data=["x"], debias_weight=2.0, max_length=32, max_question_tokens=8)
    items = PairDataset(tok, rows, cfg)
    assert [it["weight"] for it in items.items] == [1.0, 3.0, 3.0, 1.0]
    batch = PairCollator(tok.pad_token_id)(items.items)
    logits = torch.tensor([[1.0], [0.0], [2.0], [0.5], [0.0], [1.0], [0.0], [0.0]])  # r_j then r_k
    fake = types.SimpleNamespace(margin_scale=0.0)
    loss = RewardTrainer.compute_loss(fake, lambda **_: types.SimpleNamespace(logits=logits), dict(batch))
    per_pair = -torch.nn.functional.logsigmoid(torch.tensor([1.0, -1.0, 2.0, 0.5]))
    weights = torch.tensor([1.0, 3.0, 3.0, 1.0])
    assert float(loss) == pytest.approx(float((weights * per_pair).sum() / weights.sum()))
