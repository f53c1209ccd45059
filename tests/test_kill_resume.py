"""Kill anywhere, resume exactly: `stackrlhf run` on the tiny fixture dump, killed with SIGKILL inside the data
build, SFT, the reward model, RL and the evaluation, each time rerun with the same command, ends with what an
uninterrupted run writes (weights within 1e-6, the same evaluation answers and scores) and no stray temp
folders. Needs no ../shared."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from helpers import REPO, TINY_DUMP, save_tiny_lm

pytestmark = pytest.mark.slow  # several runs of the whole pipeline in subprocesses

STAGES = {
    "data": {"dump": [str(TINY_DUMP)], "progress": False, "finetune_fraction": 0.3, "reward_fraction": 0.3,
             "rl_fraction": 0.25, "evaluation_fraction": 0.15},
    "sft": {"max_steps": 4, "save_steps": 1, "max_length": 64, "max_prompt_tokens": 32, "report_to": "none",
            "per_device_train_batch_size": 2, "warmup_ratio": 0.0},
    "rm": {"max_steps": 4, "save_steps": 1, "max_length": 48, "max_prompt_tokens": 16, "report_to": "none",
           "per_device_train_batch_size": 2},
    "ppo": {"steps": 4, "save_every": 1, "prompts_per_step": 2, "mini_batch_size": 2, "min_new_tokens": 4,
            "max_new_tokens": 6, "num_layers_unfrozen": 1, "report_to": "none", "progress": False, "sample_every": 0},
    "eval": {"questions": 2, "max_new_tokens": 6, "progress": False},
    "report": {"samples": 2},
}
# where each kill lands: once a file matching the pattern (relative to the run) exists, the run is killed
KILL_AFTER = [("data", ".pipeline/data.json"), ("sft", "sft/checkpoints/checkpoint-*"),
              ("rm", "rm/checkpoints/checkpoint-*"), ("ppo", "ppo/checkpoints/step-*"),
              ("eval", ".pipeline/eval.json")]


def start(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "stackrlhf.cli", "run", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def run_to_end(config: Path) -> None:
    proc = start(config)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def kill_when(config: Path, run: Path, pattern: str) -> bool:
    """Start the run, SIGKILL its process group once a file matching ``pattern`` exists in ``run`` (a stage
    record: once it says the stage runs); whether the kill came before the run ended."""
    proc = start(config)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(run.glob(pattern))
        ready = bool(found)
        if ready and pattern.endswith(".json"):
            try:
                ready = json.loads(found[0].read_text()).get("status") == "running"
            except ValueError:
                ready = False
        if ready:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return False


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def strays(run: Path) -> list[str]:
    """Temp folders and files a killed write could leave behind (checkpoints' `.tmp`, atomic writes' `.name.*`)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith("tmp-")
                  or (p.name.startswith(".") and p.name != ".pipeline"))


def test_a_run_killed_anywhere_resumes_to_what_an_uninterrupted_run_writes(tmp_path):
    from stackrlhf.data.xml_rows import iter_rows

    texts = [row.get("Body", "") for row in iter_rows(TINY_DUMP / "Posts.xml")]
    base = save_tiny_lm(texts * 4, tmp_path / "base")
    configs = {}
    for name in ("whole", "killed"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({"out": str(tmp_path / name), "base": str(base), **STAGES}))
    run_to_end(configs["whole"])

    killed = tmp_path / "killed"
    landed = [stage for stage, pattern in KILL_AFTER if kill_when(configs["killed"], killed, pattern)]
    print("kills landed in", landed)
    assert len(landed) >= 4, landed  # the kills came while the run was still going
    run_to_end(configs["killed"])

    whole = tmp_path / "whole"
    for stage in ("sft", "rm", "ppo"):
        a, b = weights(whole / stage), weights(killed / stage)
        assert a.keys() == b.keys()
        gap = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert gap <= 1e-6, (stage, gap)
    rows = [[json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
            for run in (whole, killed)]
    assert [{m: (a["text"], round(a["proxy"], 6)) for m, a in r["answers"].items()} for r in rows[0]] == \
           [{m: (a["text"], round(a["proxy"], 6)) for m, a in r["answers"].items()} for r in rows[1]]
    assert (killed / "report.html").exists()
    assert strays(killed) == []
    done = {p.stem: json.loads(p.read_text())["status"] for p in (killed / ".pipeline").glob("*.json")}
    assert set(done.values()) == {"done"}
