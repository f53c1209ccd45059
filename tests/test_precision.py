"""bfloat16 training keeps float32 master weights: at RL learning rates every trainable tensor still moves
(in pure bf16 most updates round away), and the bf16 forward agrees with float32. All on CPU, which supports
bf16 autocast, so CI checks the GPU path's arithmetic without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stackrlhf.data.load import load_split
from stackrlhf.models.loading import load_causal_lm
from stackrlhf.models.precision import autocast, upcast_trainable
from stackrlhf.rl.config import ILQLConfig, PPOConfig
from stackrlhf.rl.ilql import ILQLTrainer, ScoredSample
from stackrlhf.rl.ppo import PPOTrainer
from stackrlhf.train.config import SFTConfig
from stackrlhf.train.sft import sft

from helpers import save_tiny_lm


@pytest.fixture(scope="module")
def tiny(site_data, tmp_path_factory) -> Path:
    texts = list(load_split(site_data, "rl", "train")["prompt"]) * 3
    return save_tiny_lm(texts, tmp_path_factory.mktemp("bf16") / "tiny")


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _unchanged(before: dict, module) -> list[str]:
    now = dict(module.named_parameters())
    return [n for n, p in before.items() if torch.equal(p, now[n].detach())]


def test_pure_bf16_adam_loses_small_updates():
    """The defect this guards against: AdamW straight on bf16 weights at lr 1e-5 leaves LayerNorm gains at 1."""
    weight = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = torch.optim.AdamW([weight], lr=1e-5)
    for _ in range(4):
        weight.grad = torch.randn(64).to(torch.bfloat16)
        opt.step()
    assert torch.equal(weight.detach(), torch.ones(64, dtype=torch.bfloat16))


def test_ppo_bf16_trains_every_tensor_in_float32(tiny, site_data, tmp_path):
    cfg = PPOConfig(model=str(tiny), data=str(site_data), out=str(tmp_path / "ppo"), prompts_per_step=8, mini_batch_size=4,
                    ppo_epochs=1, min_new_tokens=8, max_new_tokens=8, learning_rate=1e-5, num_layers_unfrozen=1,
                    report_to="none", progress=False, sample_every=0, save_every=0, dtype="bfloat16", steps=2)
    trainer = PPOTrainer(cfg, scorer=lambda q, a: [len(x) / 50 for x in a])
    params = dict(trainer.policy.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in _trainable(trainer.policy))
    frozen = [p for p in trainer.policy.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # trunk and hydra reference stay bf16
    before = _trainable(trainer.policy)
    assert any("ln" in n for n in before)
    for _ in range(2):
        metrics = trainer.step()
        assert torch.isfinite(torch.tensor(metrics["loss/policy"]))
    assert _unchanged(before, trainer.policy) == []


def test_bf16_forward_matches_float32(tiny):
    lm32, tok = load_causal_lm(str(tiny), dtype="float32")
    mixed, _ = load_causal_lm(str(tiny), dtype="bfloat16")
    for p in list(mixed.parameters())[-6:]:  # trainable top in float32, the rest bf16, as in training
        p.requires_grad_(True)
    for p in list(mixed.parameters())[:-6]:
        p.requires_grad_(False)
    upcast_trainable(mixed)
    ids = tok(["Question: which hops for a stout?\n\nAnswer: east kent goldings"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(lm32(ids).logits.float(), -1)
        with autocast("cpu", torch.bfloat16):
            got = torch.log_softmax(mixed(ids).logits.float(), -1)
    assert (got - ref).abs().max() < 0.1


def test_ilql_bf16_trains_every_tensor_in_float32(tiny, tmp_path):
    lm, tok = load_causal_lm(str(tiny), dtype="bfloat16")
    prompt = tok("Question: best yeast?\n\nAnswer:")["input_ids"]
    samples = [ScoredSample(prompt, tok(f" answer {i} with some words")["input_ids"] + [tok.eos_token_id],
                            float(i % 3 - 1)) for i in range(16)]
    cfg = ILQLConfig(model=str(tiny), out=str(tmp_path / "ilql"), steps=3, per_device_train_batch_size=8, learning_rate=1e-5,
                     num_layers_unfrozen=1, dtype="bfloat16", report_to="none", progress=False, save_every=0,
                     warmup_steps=0)
    trainer = ILQLTrainer(cfg, samples, lm, tok)
    assert all(p.dtype == torch.float32 for p in trainer.model.heads.parameters())
    before = _trainable(trainer.model)
    for _ in range(3):
        trainer.step()
    assert _unchanged(before, trainer.model) == []


def test_sft_bf16_keeps_float32_weights_and_fp32_losses(tiny, site_data, tmp_path):
    common = dict(model=str(tiny), data=str(site_data), max_steps=4, learning_rate=1e-5, report_to="none",
                  max_train_samples=32, max_eval_samples=8, per_device_train_batch_size=8, max_length=128,
                  save_steps=100, warmup_ratio=0.0)
    m32 = sft(SFTConfig(out=str(tmp_path / "fp32"), dtype="float32", **common))
    m16 = sft(SFTConfig(out=str(tmp_path / "bf16"), dtype="bfloat16", **common))
    assert m16["train_loss"] == pytest.approx(m32["train_loss"], rel=0.02)
    start, _ = load_causal_lm(str(tiny), dtype="float32")
    trained, _ = load_causal_lm(str(tmp_path / "bf16"), dtype="float32")
    moved = dict(trained.named_parameters())
    unchanged = [n for n, p in start.named_parameters() if torch.equal(p, moved[n])]
    assert not [n for n in unchanged if "ln" in n or ".h." in n]  # every block and LayerNorm moved
