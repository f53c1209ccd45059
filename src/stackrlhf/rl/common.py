"""What the RL trainers (PPO, ILQL) share, as plain functions rather than a base class, so each algorithm's
``step`` still reads top to bottom in its own file: seeding, the per-pass batches, the metrics writer
(TensorBoard, W&B), checkpoints and the final artifacts.

Checkpoints are ``OUT/checkpoints/step-N/state.pt``, written to a temp folder and renamed when complete (a killed
run never leaves half a checkpoint), the last two kept, the RNG states of every process included (Python, numpy,
torch's CPU and CUDA generators), so a resumed run repeats the uninterrupted one on any number of processes."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stackrlhf.config import report_targets, save_config, write_text_atomic
from stackrlhf.errors import StackRLHFError
from stackrlhf.console import console



def make_accelerator():
    """The RL trainers' accelerator: processes and devices only, no mixed precision of accelerate's own (they run
    their forward under :func:`stackrlhf.models.precision.autocast` with float32 master weights). accelerate keeps
    one state per process, so a bf16 Trainer stage run earlier in the same process (a pipeline, a test) would
    otherwise wrap every later forward in its bf16 autocast: slower on a CPU, and not the ``--dtype`` asked for."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", "no") != "no":
        AcceleratorState._reset_state(reset_partial_state=False)  # keeps the process group of a multi-process run
    return Accelerator(mixed_precision="no")


def seed_everything(seed: int, process_index: int = 0) -> None:
    """Seed torch, numpy and ``random``, offset per process (each samples its own rollouts or dropout)."""
    seed = seed + process_index
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def pass_batch(n: int, step: int, batch_size: int, num_processes: int = 1, process_index: int = 0,
               seed: int = 0) -> list[int]:
    """Indices of step ``step``'s batch: a seeded permutation per pass over ``n`` items, each process its own
    slice, so a resumed run (or a run on more processes) sees exactly the items it would have."""
    per_step = batch_size * num_processes
    steps_per_pass = max(n // per_step, 1)
    order = list(range(n))
    random.Random(seed + step // steps_per_pass).shuffle(order)
    start = (step % steps_per_pass) * per_step + process_index * batch_size
    return order[start:start + batch_size]


class MetricsWriter:
    """Scalars and text to TensorBoard (``OUT/runs``) and/or Weights & Biases, as ``report_to`` says; a no-op on
    processes other than the main one and with ``none``."""

    def __init__(self, out: Path, report_to: str, enabled: bool = True, config: Any = None):
        targets = report_targets(report_to) if enabled else []
        self.tensorboard = self.wandb = None
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(out / "runs"))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError as exc:
                raise StackRLHFError("--report-to wandb needs the wandb package: pip install wandb (or use "
                                     "--report-to tensorboard)") from exc
            settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
            self.wandb = wandb.init(name=out.name, dir=str(out), config=settings, resume="allow")

    def scalars(self, metrics: dict, step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_text(tag, text, step)
        if self.wandb is not None:
            self.wandb.log({tag: text}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _steps(folder: Path) -> list[Path]:
    """The complete checkpoints (``step-N`` with its state), oldest first; ``step-N.tmp`` is a save in progress,
    or one a kill interrupted."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("step-*") if p.name[5:].isdigit() and (p / "state.pt").is_file()),
                  key=lambda p: int(p.name[5:]))


def rng_state() -> dict:
    """This process's random generators: Python's, numpy's, torch's CPU one and every CUDA device's."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(accelerator=None) -> list[dict]:
    """Every process's :func:`rng_state`, in process order (a collective: every process must call it)."""
    mine = rng_state()
    if accelerator is None or accelerator.num_processes == 1:
        return [mine]
    import torch.distributed as dist

    states: list = [None] * accelerator.num_processes
    dist.all_gather_object(states, mine)
    return states


def save_checkpoint(folder: Path, step: int, state: dict, keep: int = 2, rng: list[dict] | None = None) -> Path:
    """Write ``state`` with ``rng`` (every process's generators, :func:`gather_rng_states`; default: this
    process's) as ``step-N``; only the main process calls it."""
    target = folder / f"step-{step}"
    tmp = target.with_name(target.name + ".tmp")
    for stale in folder.glob("step-*.tmp"):  # saves a kill interrupted
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "step": step, "rng": rng if rng is not None else [rng_state()]}, tmp / "state.pt")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    for old in _steps(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_latest(folder: Path, process_index: int = 0) -> tuple[dict, Path] | None:
    """The newest complete checkpoint's state (this process's RNG states already restored) and its folder, or
    None. A checkpoint of fewer processes than this run has restores process 0's generators on the others,
    with a warning."""
    done = _steps(folder)
    if not done:
        return None
    state = torch.load(done[-1] / "state.pt", weights_only=False)
    rng = state["rng"]
    if isinstance(rng, dict):  # checkpoints that kept one process's generators
        rng = [rng]
    if process_index >= len(rng):
        console.print(f"[yellow]{done[-1]} has the random generators of {len(rng)} process(es); process "
                      f"{process_index} continues from process 0's[/]")
    set_rng_state(rng[process_index] if process_index < len(rng) else rng[0])
    return state, done[-1]


def resume_latest(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  process_index: int = 0) -> dict | None:
    """Load the newest complete checkpoint's tensors (``params``) into ``module`` and its optimizer state; returns
    the whole state (step, history, the trainer's own values) for the caller to take the rest, or None."""
    found = load_latest(folder, process_index)
    if found is None:
        return None
    state, where = found
    result = module.load_state_dict(state["params"], strict=False)
    if result.unexpected_keys:
        raise StackRLHFError(f"{where}: checkpoint does not match this model ({result.unexpected_keys[:3]})")
    optimizer.load_state_dict(state["optimizer"])
    console.print(f"resumed from {where} (step {state['step']})")
    return state


def write_run_artifacts(out: Path, cfg: Any, history: list[dict], metrics: dict) -> None:
    """``config.yaml`` (the exact settings), ``history.jsonl`` (one line per step) and ``metrics.json``."""
    save_config(cfg, out / "config.yaml")
    write_text_atomic(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
    write_text_atomic(out / "metrics.json", json.dumps(clean, indent=2) + "\n")
