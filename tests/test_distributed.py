"""Two CPU processes (gloo) under `accelerate launch` give what one process gives, for SFT, DPO, PPO, RLOO and ILQL.

The runs are set up so that both see the same global batches: the per-process batch is half the single run's,
no shuffling in SFT, greedy rollouts of a fixed length in PPO, and dropout off (its masks are drawn per
process). Stated tolerance: the trained weights agree to 1e-5 (SFT, PPO) and 1e-4 (ILQL, whose per-token loss
means are taken per process before DDP averages them), while training moves them by about 2e-3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stackrlhf.models.reward import RewardModel, default_backbone, load_backbone

from helpers import REPO

pytestmark = pytest.mark.slow  # each test launches two training runs in subprocesses

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          str(REPO / "configs" / "accelerate" / "cpu-2proc.yaml"), "-m", "stackrlhf.cli"]


@pytest.fixture(scope="module")
def no_dropout_lm(tiny_lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-nodrop") / "lm"
    shutil.copytree(tiny_lm, out)
    config = json.loads((out / "config.json").read_text())
    config.update({k: 0.0 for k in ("attn_pdrop", "embd_pdrop", "resid_pdrop")})
    (out / "config.json").write_text(json.dumps(config))
    return out


def run(args: list[str], processes: int) -> None:
    cmd = (LAUNCH if processes == 2 else [sys.executable, "-m", "stackrlhf.cli"]) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def weights_gap(a: Path, b: Path, name: str = "model.safetensors") -> float:
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


SFT_COMMON = ["sft", "--max-train-samples", "64", "--max-eval-samples", "16", "--max-length", "96",
              "--max-prompt-tokens", "48", "--report-to", "none", "--warmup-ratio", "0", "--lr-scheduler-type",
              "constant", "--learning-rate", "1e-3", "--no-shuffle", "--seed", "0", "--save-steps", "2"]
FSDP_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
               "-m", "stackrlhf.cli"]


def test_sft_with_two_processes_matches_one_under_ddp_and_fsdp(no_dropout_lm, site_data, tmp_path):
    """DDP (cpu-2proc.yaml) and FSDP (configs/accelerate/fsdp.yaml: FSDP2, sharded checkpoints) on 2 CPU processes
    against one process. accelerate alone would run fsdp.yaml as DDP on CPUs (see cli._fsdp_on_cpu). The FSDP run
    stops after step 2 and resumes from its sharded checkpoint. Tolerances: DDP 1e-5; FSDP 1e-4 (it reduces
    gradients in shards; the gap seen is 4e-5), while training moves the weights by about 4e-3."""
    common = SFT_COMMON + ["--model", str(no_dropout_lm), "--data", str(site_data)]
    run(common + ["--out", str(tmp_path / "one"), "--per-device-train-batch-size", "8", "--max-steps", "4"], 1)
    run(common + ["--out", str(tmp_path / "two"), "--per-device-train-batch-size", "4", "--max-steps", "4"], 2)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["train_tokens"] == two["train_tokens"]  # the same examples, counted over both processes
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-4)
    assert weights_gap(tmp_path / "one", no_dropout_lm) > 1e-3  # training moved the weights
    assert weights_gap(tmp_path / "one", tmp_path / "two") < 1e-5

    fsdp = common + ["--out", str(tmp_path / "fsdp"), "--per-device-train-batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for steps in ("2", "4"):
        done = subprocess.run(FSDP_LAUNCH + fsdp + ["--max-steps", steps], capture_output=True, text=True,
                              timeout=600, env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr
    shards = tmp_path / "fsdp" / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp_0"
    assert len(list(shards.glob("*.distcp"))) == 2  # really sharded, one file per process
    resumed = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert resumed["resumed_from"] == "checkpoint-2" and resumed["steps"] == 4
    assert resumed["train_tokens"] == one["train_tokens"]
    assert resumed["eval_loss_start"] == pytest.approx(one["eval_loss_start"], abs=1e-5)
    assert resumed["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-4)
    assert weights_gap(tmp_path / "one", tmp_path / "fsdp") < 1e-4
    # the reward model under FSDP on CPU processes is refused (runs hung), before anything is written
    rm = subprocess.run(FSDP_LAUNCH + ["rm", "--data", str(site_data), "--out", str(tmp_path / "rm"), "--max-steps", "1"],
                        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert rm.returncode != 0 and "not supported on CPU processes" in rm.stdout + rm.stderr
    assert not (tmp_path / "rm").exists()


def test_dpo_with_two_processes_matches_one(no_dropout_lm, site_data, tmp_path):
    """DPO measures the pairs before training (an evaluation before `train()`): without the fix in
    `train/common.py` each process would then train alone on its half of the pairs."""
    common = ["dpo", "--model", str(no_dropout_lm), "--data", str(site_data), "--max-steps", "2",
              "--max-train-pairs", "32", "--max-eval-pairs", "8", "--max-length", "96", "--max-prompt-tokens", "32",
              "--report-to", "none", "--warmup-ratio", "0", "--lr-scheduler-type", "constant", "--learning-rate",
              "1e-3", "--no-shuffle", "--seed", "0", "--kl-prompts", "0", "--save-steps", "100"]
    run(common + ["--out", str(tmp_path / "one"), "--per-device-train-batch-size", "8"], 1)
    run(common + ["--out", str(tmp_path / "two"), "--per-device-train-batch-size", "4"], 2)
    moved = weights_gap(tmp_path / "one", no_dropout_lm)
    assert moved > 1e-3  # training moved the weights
    assert weights_gap(tmp_path / "one", tmp_path / "two") < 1e-5


def test_ppo_with_two_processes_matches_one(no_dropout_lm, site_data, tmp_path):
    torch.manual_seed(0)
    model, tok = load_backbone(default_backbone())
    RewardModel(model, tok, max_length=48, max_question_tokens=16).save_pretrained(tmp_path / "rm")
    common = ["ppo", "--policy", str(no_dropout_lm), "--reward", str(tmp_path / "rm"), "--data", str(site_data),
              "--steps", "3", "--min-new-tokens", "8", "--max-new-tokens", "8", "--top-k", "1", "--ppo-epochs", "1",
              "--no-whiten-advantages", "--num-layers-unfrozen", "1", "--learning-rate", "1e-3", "--report-to",
              "none", "--no-progress", "--save-every", "0", "--sample-every", "0", "--seed", "0"]
    run(common + ["--out", str(tmp_path / "one"), "--prompts-per-step", "8", "--mini-batch-size", "8"], 1)
    run(common + ["--out", str(tmp_path / "two"), "--prompts-per-step", "4", "--mini-batch-size", "4"], 2)
    one, two = ([json.loads(line) for line in (tmp_path / d / "history.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    for a, b in zip(one, two):  # rewards and KL are means over every process's episodes
        for key in ("reward/score_mean", "kl/mean", "kl/beta", "response/length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert one[1]["kl/mean"] == 0.0  # step 0 warmed up the critic alone (--value-warmup-steps 1)
    assert one[2]["kl/mean"] != 0.0  # then the first policy update moved the policy
    assert weights_gap(tmp_path / "one", no_dropout_lm) > 1e-3  # training moved the weights
    assert weights_gap(tmp_path / "one", tmp_path / "two") < 1e-5
    assert weights_gap(tmp_path / "one", tmp_path / "two", "value_head.safetensors") < 1e-5


def test_rloo_with_two_processes_matches_one(no_dropout_lm, site_data, tmp_path):
    """Sampled (not greedy) answers, so the k answers of a prompt differ: the rollout's sampling seeds continue
    from one process to the next, so 2 processes x 2 prompts sample what 1 process x 4 prompts does."""
    torch.manual_seed(0)
    model, tok = load_backbone(default_backbone())
    RewardModel(model, tok, max_length=48, max_question_tokens=16).save_pretrained(tmp_path / "rm")
    common = ["ppo", "--algorithm", "rloo", "--rloo-k", "2", "--policy", str(no_dropout_lm), "--reward",
              str(tmp_path / "rm"), "--data", str(site_data), "--steps", "2", "--min-new-tokens", "8",
              "--max-new-tokens", "8", "--temperature", "1", "--ppo-epochs", "1", "--no-whiten-advantages",
              "--num-layers-unfrozen", "1", "--learning-rate", "1e-3", "--report-to", "none", "--no-progress",
              "--save-every", "0", "--sample-every", "0", "--seed", "0", "--generation-batch-size", "4"]
    run(common + ["--out", str(tmp_path / "one"), "--prompts-per-step", "4", "--mini-batch-size", "8"], 1)
    run(common + ["--out", str(tmp_path / "two"), "--prompts-per-step", "2", "--mini-batch-size", "4"], 2)
    one, two = ([json.loads(line) for line in (tmp_path / d / "history.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    for a, b in zip(one, two):
        assert sorted(b["reward/score_each"]) == pytest.approx(sorted(a["reward/score_each"]), abs=1e-5)
        for key in ("reward/score_mean", "kl/mean", "response/length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert len(set(one[0]["reward/score_each"])) > 1  # the answers differ, so the advantages are not all zero
    assert weights_gap(tmp_path / "one", no_dropout_lm) > 1e-3  # training moved the weights
    assert weights_gap(tmp_path / "one", tmp_path / "two") < 1e-5


def test_ilql_with_two_processes_matches_one(no_dropout_lm, site_data, tmp_path):
    common = ["ilql", "--model", str(no_dropout_lm), "--data", str(site_data), "--steps", "3", "--max-samples", "64",
              "--max-answer-tokens", "32", "--max-prompt-tokens", "32", "--report-to", "none", "--no-progress",
              "--save-every", "0", "--seed", "0", "--warmup-steps", "0", "--learning-rate", "1e-3"]
    run(common + ["--out", str(tmp_path / "one"), "--per-device-train-batch-size", "8"], 1)
    run(common + ["--out", str(tmp_path / "two"), "--per-device-train-batch-size", "4"], 2)
    moved = weights_gap(tmp_path / "one", no_dropout_lm)
    assert moved > 1e-3  # training moved the weights
    # not bit-equal: the processes' gradients are summed in another order, and Adam turns the rounding of a
    # near-zero gradient into a whole step of either sign. The Q heads' output layers start at zero, so their
    # hidden layers' gradients are near zero for the first steps: a few of their entries (11 of 131k measured)
    # end an Adam step apart. Every other entry agrees to an order of magnitude below what training moved.
    assert weights_gap(tmp_path / "one", tmp_path / "two") < 0.1 * moved
    x = load_file(str(tmp_path / "one" / "ilql_heads.safetensors"))
    y = load_file(str(tmp_path / "two" / "ilql_heads.safetensors"))
    gaps = torch.cat([(x[k] - y[k]).abs().flatten() for k in x])
    assert float(gaps.max()) < 2 * 1e-3  # at most about one Adam step (lr 1e-3) on any entry
    assert float((gaps > 0.1 * moved).float().mean()) < 1e-3


def test_ppo_resumed_on_two_processes_repeats_the_uninterrupted_run(no_dropout_lm, site_data, tmp_path):
    """Each process shuffles its own minibatches with its own generator: a checkpoint keeps every process's
    generators (and both optimisers), so a 2-process run stopped after step 2 and resumed ends with the
    uninterrupted run's weights. With only process 0's generator saved, process 1 would resume with another
    minibatch order."""
    torch.manual_seed(0)
    model, tok = load_backbone(default_backbone())
    RewardModel(model, tok, max_length=48, max_question_tokens=16).save_pretrained(tmp_path / "rm")
    common = ["ppo", "--policy", str(no_dropout_lm), "--reward", str(tmp_path / "rm"), "--data", str(site_data),
              "--min-new-tokens", "8", "--max-new-tokens", "8", "--ppo-epochs", "2", "--prompts-per-step", "4",
              "--mini-batch-size", "2", "--num-layers-unfrozen", "1", "--learning-rate", "1e-3", "--report-to",
              "none", "--no-progress", "--save-every", "1", "--sample-every", "0", "--seed", "0",
              "--value-warmup-steps", "2"]
    run(common + ["--out", str(tmp_path / "whole"), "--steps", "4"], 2)
    run(common + ["--out", str(tmp_path / "resumed"), "--steps", "2"], 2)  # stops (as if killed) after step 2
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step-2" / "state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and state["value_optimizer"]["state"]  # both processes, the critic's Adam
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    run(common + ["--out", str(tmp_path / "resumed"), "--steps", "4"], 2)
    assert weights_gap(tmp_path / "whole", no_dropout_lm) > 1e-3  # training moved the weights
    assert weights_gap(tmp_path / "whole", tmp_path / "resumed") < 1e-6
    assert weights_gap(tmp_path / "whole", tmp_path / "resumed", "value_head.safetensors") < 1e-6
