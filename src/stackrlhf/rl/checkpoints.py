"""Checkpoints of the RL trainers: ``OUT/checkpoints/step-N/state.pt``, written to a temp folder and renamed
when complete (a killed run never leaves half a checkpoint), the last two kept, RNG states included so a
resumed run repeats the uninterrupted one."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch


def _steps(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("step-*") if (p / "state.pt").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(folder: Path, step: int, state: dict, keep: int = 2) -> Path:
    target = folder / f"step-{step}"
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({**state, "step": step, "rng": rng}, tmp / "state.pt")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    for old in _steps(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_latest(folder: Path) -> tuple[dict, Path] | None:
    """The newest complete checkpoint's state (RNG states already restored) and its folder, or None."""
    done = _steps(folder)
    if not done:
        return None
    state = torch.load(done[-1] / "state.pt", weights_only=False)
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state, done[-1]
