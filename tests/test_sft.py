"""Base model, SFT and generation on a real shared dump, with a tiny model and few steps."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from stackrlhf.cli import cli
from stackrlhf.data.load import load_split
from stackrlhf.errors import StackRLHFError
from stackrlhf.models.freezing import apply_lora, freeze_bottom, snapshot, transformer_blocks
from stackrlhf.models.generation import SamplingConfig, generate
from stackrlhf.models.loading import load_causal_lm
from stackrlhf.train.common import GuardCallback, last_checkpoint
from stackrlhf.train.config import PretrainConfig, SFTConfig
from stackrlhf.train.pretrain import pretrain
from stackrlhf.train.sft import IGNORE, encode_example, sft

QUIET = {"report_to": "none", "logging_steps": 5, "save_steps": 1000}


@pytest.fixture(scope="module")
def tiny_base(site_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "tiny"
    pretrain(PretrainConfig(data=str(site_data), out=str(out), size="tiny", block_size=128, max_steps=25,
                            per_device_train_batch_size=8, **QUIET))
    return out


@pytest.fixture(scope="module")
def tiny_sft(site_data, tiny_base, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sft") / "sft"
    metrics = sft(SFTConfig(model=str(tiny_base), data=str(site_data), out=str(out), max_steps=30, max_length=192,
                            per_device_train_batch_size=8, learning_rate=1e-3, **QUIET))
    return out, metrics


def test_pretrain_artifact(tiny_base):
    metrics = json.loads((tiny_base / "metrics.json").read_text())
    assert metrics["steps"] == 25 and 256 < metrics["vocab_size"] <= 8000  # 8000, or all the dump's text has
    assert metrics["eval_loss"] < math.log(metrics["vocab_size"]) - 0.1  # it learnt something from the dump text
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))  # plain transformers loads it
    assert model.config.n_layer == 4 and model.config.n_embd == 256
    assert (tiny_base / "config.yaml").is_file()


def test_sft_lowers_heldout_answer_loss(tiny_sft):
    out, metrics = tiny_sft
    assert metrics["eval_loss"] < metrics["eval_loss_start"] - 0.1
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("eval_loss", "eval_perplexity", "train_tokens_per_second"):
        assert saved[key] > 0
    assert saved["train_tokens"] > 30 * 8 * 20


def test_loss_mask_covers_exactly_the_answer(site_data, tiny_base):
    _, tok = load_causal_lm(str(tiny_base))
    row = load_split(site_data, "finetune", "train")[0]
    ex = encode_example(tok, row["prompt"], row["completion"], max_length=4096, max_prompt_length=4096)
    answer_ids = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    prompt_ids = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE]
    assert tok.decode(answer_ids) == row["completion"] + tok.eos_token
    assert tok.decode(prompt_ids) == row["prompt"]
    assert [lab for lab in ex["labels"] if lab != IGNORE] == answer_ids
    # truncated: the prompt is cut in the middle, the "Answer: " cue and the answer's start survive
    short = encode_example(tok, row["prompt"], row["completion"], max_length=64, max_prompt_length=32)
    assert len(short["input_ids"]) == 64
    prompt_part = tok.decode([t for t, lab in zip(short["input_ids"], short["labels"]) if lab == IGNORE])
    assert prompt_part.startswith("Question: ") and prompt_part.endswith("Answer: ")


def test_num_layers_unfrozen_trains_only_top_block_and_head(site_data, tiny_base, tmp_path):
    out = tmp_path / "top1"
    sft(SFTConfig(model=str(tiny_base), data=str(site_data), out=str(out), max_steps=1, num_layers_unfrozen=1,
                  learning_rate=1e-2, warmup_ratio=0.0, max_train_samples=16, max_eval_samples=8,
                  per_device_train_batch_size=4, **QUIET))
    before = AutoModelForCausalLM.from_pretrained(str(tiny_base)).state_dict()
    after = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = ("transformer.h.3.", "transformer.ln_f.", "lm_head.")
    assert changed and all(k.startswith(allowed) for k in changed), sorted(changed)
    assert any(k.startswith("transformer.h.3.") for k in changed)
    assert any(k.startswith("lm_head.") for k in changed)


def test_freeze_bottom_and_lora_select_parameters(tiny_base):
    model, _ = load_causal_lm(str(tiny_base))
    freeze_bottom(model, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("transformer.h.2.", "transformer.h.3.", "transformer.ln_f.", "lm_head."))
                             for n in trainable)
    assert len(transformer_blocks(model)) == 4
    with pytest.raises(StackRLHFError, match="has 4 blocks"):
        freeze_bottom(model, 5)

    model, tok = load_causal_lm(str(tiny_base))
    lora = apply_lora(model, r=4)
    before = snapshot(lora)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    batch = tok(["Question: why?\n\nAnswer: because hops."], return_tensors="pt")
    lora(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    changed = {n for n, p in lora.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)


def test_lora_sft_saves_adapter_and_merged_model(site_data, tiny_base, tmp_path):
    out = tmp_path / "lora"
    sft(SFTConfig(model=str(tiny_base), data=str(site_data), out=str(out), max_steps=2, lora=True, lora_r=4,
                  max_train_samples=16, max_eval_samples=8, per_device_train_batch_size=4, **QUIET))
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_save_and_reload_generate_identically(tiny_sft, tmp_path):
    out, _ = tiny_sft
    model, tok = load_causal_lm(str(out))
    prompts = ["Question: What is a hop?\n\nAnswer: ", "Question: Is beer vegan?\n\nAnswer: "]
    sampling = SamplingConfig(max_new_tokens=20, temperature=0.8)
    first = generate(model, tok, prompts, sampling, seed=123)
    model.save_pretrained(str(tmp_path / "again"))
    tok.save_pretrained(str(tmp_path / "again"))
    model2, tok2 = load_causal_lm(str(tmp_path / "again"))
    second = generate(model2, tok2, prompts, sampling, seed=123)
    assert first.texts == second.texts and first.response_ids == second.response_ids
    assert all(len(r) <= 20 for r in first.response_ids)
    other = generate(model, tok, prompts, sampling, seed=124)
    assert other.response_ids != first.response_ids


def test_batched_generation_matches_one_by_one(tiny_sft):
    out, _ = tiny_sft
    model, tok = load_causal_lm(str(out))
    prompts = ["Question: Short?\n\nAnswer: ", "Question: A much longer question about lagers and ales?\n\nAnswer: "]
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    batched = generate(model, tok, prompts, greedy, batch_size=2)
    single = [generate(model, tok, [p], greedy, batch_size=1).response_ids[0] for p in prompts]
    assert batched.response_ids == single


def test_ask_streams_a_reproducible_answer(tiny_sft):
    out, _ = tiny_sft
    args = ["ask", str(out), "What is the best beer for a hot day?", "--max-new-tokens", "15", "--seed", "7",
            "--temperature", "1.0",
            "--device", "cpu"]
    a = CliRunner().invoke(cli, args)
    b = CliRunner().invoke(cli, args)
    assert a.exit_code == 0, a.output
    assert a.stdout.strip() and a.stdout == b.stdout


def test_resume_from_last_checkpoint(site_data, tiny_base, tmp_path):
    out = tmp_path / "resume"
    common = dict(model=str(tiny_base), data=str(site_data), out=str(out), max_train_samples=64, max_eval_samples=8,
                  per_device_train_batch_size=4, report_to="none", save_steps=2)
    first = sft(SFTConfig(max_steps=2, **common))
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    (out / "checkpoints" / "checkpoint-3").mkdir()  # killed -9 while saving: empty
    partial = out / "checkpoints" / "checkpoint-5"
    shutil.copytree(out / "checkpoints" / "checkpoint-2", partial)
    (partial / "trainer_state.json").unlink()  # weights and optimizer written, the state not yet
    assert last_checkpoint(out, True).endswith("checkpoint-2")
    shutil.rmtree(partial)
    metrics = sft(SFTConfig(max_steps=4, **common))
    assert metrics["steps"] == 4 and metrics["resumed_from"] == "checkpoint-2"
    assert metrics["eval_loss_start"] == first["eval_loss_start"]  # the first run's figure, kept
    assert metrics["train_tokens"] > first["train_tokens"]  # whole-run count
    assert (out / "checkpoints" / "checkpoint-4").is_dir()


def test_resume_is_exact_with_the_default_length_grouping(site_data, tiny_base, tmp_path):
    """Killed after step 3 (of 4 per epoch) and resumed: steps 4-7 (into the second epoch) have the losses of an
    uninterrupted run, with --group-by-length on (the default)."""
    def run(out, steps):
        return sft(SFTConfig(model=str(tiny_base), data=str(site_data), out=str(out), max_train_samples=16,
                             max_eval_samples=4, per_device_train_batch_size=4, report_to="none", save_steps=3,
                             logging_steps=1, max_steps=steps, lr_scheduler_type="constant", warmup_ratio=0.0))

    def losses(out, step):
        state = json.loads((out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
        return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}

    assert SFTConfig(model="m", data="d").group_by_length
    run(tmp_path / "whole", 6)
    run(tmp_path / "cut", 3)
    run(tmp_path / "cut", 6)
    whole, resumed = losses(tmp_path / "whole", 6), losses(tmp_path / "cut", 6)
    assert set(whole) == set(resumed) == set(range(1, 7))
    for step in range(4, 7):
        assert abs(whole[step] - resumed[step]) < 1e-6, (step, whole[step], resumed[step])


def test_guard_stops_on_nan():
    guard = GuardCallback()

    class State:
        global_step = 7

    class Args:
        output_dir = "x/checkpoints"

    guard.on_log(Args(), State(), None, logs={"loss": 1.0})
    with pytest.raises(StackRLHFError, match="loss is nan at step 7"):
        guard.on_log(Args(), State(), None, logs={"loss": float("nan")})


def test_bad_model_path_is_a_clear_error(site_data, tmp_path, monkeypatch):
    result = CliRunner().invoke(cli, ["sft", "--model", str(tmp_path / "nope"), "--data", str(site_data),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "nope: does not exist" in result.output
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["sft", "--model", str(tmp_path / "empty"), "--data", str(site_data),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "not a model directory" in result.output
    monkeypatch.chdir(tmp_path)  # `outputs/sft` beside an outputs/ folder is a path, not a hub id: no hub call
    (tmp_path / "outputs").mkdir()
    result = CliRunner().invoke(cli, ["sft", "--model", "outputs/sft", "--data", str(site_data), "--out", "o"])
    assert result.exit_code != 0 and "outputs/sft: does not exist" in result.output
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start
