"""`stackrlhf dpo`: TRL's DPOTrainer on the project's pairs. The loss is checked against the formula computed here
from the model's own log-probs; training raises the chosen-minus-rejected margin; resume; bad input."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from stackrlhf.cli import cli
from stackrlhf.errors import StackRLHFError
from stackrlhf.models.loading import load_causal_lm
from stackrlhf.train.config import DPOConfig
from stackrlhf.train.dpo import dpo, dpo_pairs, dpo_trainer
from stackrlhf.data.load import load_pairs

FAST = dict(max_length=96, max_prompt_tokens=32, per_device_train_batch_size=4, per_device_eval_batch_size=4,
            report_to="none", logging_steps=1, kl_prompts=0, save_steps=1000)


def sequence_logps(model, batch) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens of each row (chosen rows first, then rejected)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    tokens = batch["input_ids"][:, 1:]
    logp = F.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def make_trainer(tiny_lm, site_data, tmp_path, loss="sigmoid", pairs=16, **extra):
    cfg = DPOConfig(model=str(tiny_lm), data=[str(site_data)], out=str(tmp_path / "dpo"), loss=loss,
                    max_train_pairs=pairs, precompute_ref_log_probs=False, **{**FAST, **extra})
    model, tok = load_causal_lm(str(tiny_lm), "float32")
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():  # move the policy away from the reference, so the log-ratios are not all 0
        for p in model.transformer.h[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    train = dpo_pairs(load_pairs(cfg.data, "train", pairs, 0), tok, cfg.max_prompt_tokens)
    return dpo_trainer(cfg, model, tok, train, None, tmp_path / "dpo", reference), model, reference


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "sigmoid_norm"])
def test_loss_equals_the_formula(tiny_lm, site_data, tmp_path, loss):
    trainer, model, reference = make_trainer(tiny_lm, site_data, tmp_path, loss, pairs=8)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(model, batch)
        pi, ref = sequence_logps(model, batch), sequence_logps(reference, batch)
    n = batch["completion_mask"][:, 1:].sum(1).float()
    beta = trainer.args.beta
    (pc, pr), (rc, rr), (nc, nr) = pi.chunk(2), ref.chunk(2), n.chunk(2)
    if loss == "sigmoid":  # Rafailov et al. 2023, eq. 7
        expected = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    elif loss == "ipo":  # Azar et al. 2023, eq. 17, on per-token averaged log-ratios
        expected = (((pc - rc) / nc - (pr - rr) / nr) - 1 / (2 * beta)).pow(2).mean()
    else:
        expected = -F.logsigmoid(beta * ((pc - rc) / nc - (pr - rr) / nr)).mean()
    assert abs(float(got) - float(expected)) < 1e-4 * max(1.0, abs(float(expected)))
    assert float(((pc - rc) - (pr - rr)).abs().max()) > 1e-3  # the check is not vacuous: the ratios differ


def test_training_raises_the_margin_on_training_pairs(tiny_lm, site_data, tmp_path):
    trainer, model, reference = make_trainer(tiny_lm, site_data, tmp_path, pairs=8, learning_rate=1e-3,
                                             max_steps=12, per_device_train_batch_size=8)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])

    def margin() -> float:
        model.eval()
        with torch.no_grad():
            d = sequence_logps(model, batch) - sequence_logps(reference, batch)
        chosen, rejected = d.chunk(2)
        return float((chosen - rejected).mean())

    before = margin()
    trainer.train()
    assert margin() > before + 1.0


def test_cli_trains_resumes_and_reports(tiny_lm, site_data, tmp_path):
    out = tmp_path / "dpo"
    args = ["dpo", "--model", str(tiny_lm), "--data", str(site_data), "--out", str(out), "--max-train-pairs", "16",
            "--max-eval-pairs", "8", "--max-length", "96", "--max-prompt-tokens", "32", "--report-to", "none",
            "--per-device-train-batch-size", "4", "--save-steps", "1", "--kl-prompts", "4"]
    first = CliRunner().invoke(cli, [*args, "--max-steps", "2"])
    assert first.exit_code == 0, first.output
    (out / "metrics.json").unlink()  # as if killed before the end: the checkpoints remain
    shutil.rmtree(out / "checkpoints" / "checkpoint-1", ignore_errors=True)
    second = CliRunner().invoke(cli, [*args, "--max-steps", "4"])
    assert second.exit_code == 0, second.output
    import json

    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from"] == "checkpoint-2" and m["steps"] == 4
    for key in ("heldout_accuracy", "heldout_margin", "test_accuracy", "kl_to_reference", "heldout_loss_start"):
        assert key in m and math.isfinite(m[key]), key
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()


def test_bad_input(tiny_lm, site_data, tmp_path):
    empty = tmp_path / "export"
    (empty / "reward").mkdir(parents=True)  # an export without any pairs
    other_tok = tmp_path / "other"
    from helpers import save_tiny_lm

    save_tiny_lm(["completely different text " * 50, "another vocabulary entirely " * 50], other_tok)
    with pytest.raises(StackRLHFError, match="another tokenizer"):
        dpo(DPOConfig(model=str(tiny_lm), reference=str(other_tok), data=[str(site_data)], out=str(tmp_path / "o"),
                      **FAST))
    result = CliRunner().invoke(cli, ["dpo", "--model", str(tiny_lm), "--data", str(empty), "--out",
                                      str(tmp_path / "o2")])
    assert result.exit_code != 0 and "reward/train" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["dpo", "--data", str(site_data), "--out", str(tmp_path / "o3")])
    assert result.exit_code != 0 and "--model is required" in result.output


def test_dpo_measures_its_kl_at_the_temperature_eval_and_rl_use(tiny_lm, site_data, tmp_path, monkeypatch):
    """DPO's KL to the reference is measured on answers sampled at 0.7, as eval's and the RL stages' are, so
    the KL columns of every stage compare; any other temperature is an explicit choice."""
    from stackrlhf.evaluate.config import EvalConfig
    from stackrlhf.rl.config import PPOConfig
    from stackrlhf.train import dpo as dpo_module

    seen = []
    monkeypatch.setattr(dpo_module, "sample_kl", lambda mine, ref, prompts, sampling, **kw: seen.append(
        sampling.temperature) or [0.5, 0.7])
    model, tok = load_causal_lm(str(tiny_lm), "float32")
    cfg = DPOConfig(model=str(tiny_lm), data=[str(site_data)], out=str(tmp_path / "d"), **{**FAST, "kl_prompts": 2})
    assert dpo_module.kl_to_reference(model, tok, cfg)["kl_to_reference"] == pytest.approx(0.6)
    assert EvalConfig.temperature == PPOConfig.temperature == 0.7 and seen == [0.7]
    dpo_module.kl_to_reference(model, tok, DPOConfig(model=str(tiny_lm), data=[str(site_data)],
                                                     out=str(tmp_path / "e"), kl_temperature=1.0, **FAST))
    assert seen[-1] == 1.0
