"""The plumbing the RL trainers share (rl/common.py), the one pad helper, and where metrics go."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from stackrlhf.config import report_targets
from stackrlhf.errors import StackRLHFError
from stackrlhf.models.padding import pad
from stackrlhf.rl.common import MetricsWriter, load_latest, pass_batch, save_checkpoint, seed_everything


def test_pad_right_and_left():
    ids, mask = pad([[1, 2, 3], [4], []], value=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = pad([[1, 2, 3], [4]], value=9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="side"):
        pad([[1]], 0, side="middle")


def test_pass_batch_covers_each_pass_once_and_splits_processes():
    n, batch = 10, 2
    for step_pass in range(2):  # one pass = n // (batch * processes) steps
        seen = []
        for step in range(step_pass * 2, step_pass * 2 + 2):
            a = pass_batch(n, step, batch, num_processes=2, process_index=0, seed=3)
            b = pass_batch(n, step, batch, num_processes=2, process_index=1, seed=3)
            assert not set(a) & set(b)
            seen += a + b
        assert len(set(seen)) == 8  # 8 of the 10 items in a pass, none twice
    assert pass_batch(n, 5, batch, seed=3) == pass_batch(n, 5, batch, seed=3)  # resumable: a pure function
    assert pass_batch(n, 5, batch, seed=3) != pass_batch(n, 0, batch, seed=3)  # the next pass is reshuffled


def test_seeding_is_offset_per_process():
    seed_everything(7, 0)
    a = torch.rand(3)
    seed_everything(7, 1)
    b = torch.rand(3)
    seed_everything(7, 0)
    assert torch.equal(a, torch.rand(3)) and not torch.equal(a, b)


def test_checkpoint_keeps_the_last_two_and_restores_rng(tmp_path):
    for step in (1, 2, 3):
        torch.manual_seed(step)
        save_checkpoint(tmp_path, step, {"x": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
    expected = torch.rand(2)  # what the RNG gives right after the step-3 save ...
    torch.manual_seed(123)
    state, folder = load_latest(tmp_path)
    assert state["x"] == 3 and folder.name == "step-3"
    assert torch.equal(torch.rand(2), expected)  # ... and gives again after loading it


def test_a_save_a_kill_interrupted_is_ignored_then_cleared(tmp_path):
    """A kill during a save leaves ``step-N.tmp`` (its state.pt possibly whole): resuming takes the last complete
    checkpoint, and the next save removes the leftover."""
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, 1, {"x": 1})
    (folder / "step-2.tmp").mkdir()
    torch.save({"x": 2, "step": 2, "rng": []}, folder / "step-2.tmp" / "state.pt")
    state, where = load_latest(folder)
    assert where.name == "step-1" and state["x"] == 1
    save_checkpoint(folder, 3, {"x": 3})
    assert sorted(p.name for p in folder.iterdir()) == ["step-1", "step-3"]


def test_report_targets():
    assert report_targets("both") == ["tensorboard", "wandb"]
    assert report_targets("tensorboard,wandb,tensorboard") == ["tensorboard", "wandb"]
    assert report_targets("none") == [] and report_targets("") == []
    with pytest.raises(StackRLHFError, match="tensorboard, wandb, both, none"):
        report_targets("mlflow")


def test_wandb_is_wired_and_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    logged, inits = [], []

    class Run:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append("finished")

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: inits.append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    writer = MetricsWriter(tmp_path, "both", config=None)
    writer.scalars({"loss": 1.5, "each": [1.0, 2.0], "steps": 3, "nan": float("nan")}, step=4)
    writer.close()
    assert inits and inits[0]["name"] == tmp_path.name
    assert logged == [(4, {"loss": 1.5, "steps": 3.0}), "finished"]
    assert any((tmp_path / "runs").iterdir())  # TensorBoard wrote its event file too
    off = MetricsWriter(tmp_path / "other", "wandb", enabled=False)  # not the main process: nothing
    assert off.wandb is None and off.tensorboard is None
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(StackRLHFError, match="pip install wandb"):
        MetricsWriter(tmp_path, "wandb")


def test_rl_trainers_do_not_inherit_an_earlier_stages_bf16_autocast(tmp_path):
    """accelerate keeps one state per process: after a bf16 Trainer stage (a pipeline runs stages in one
    process) a plain Accelerator() would wrap ILQL's and PPO's forward in bf16 autocast; ours asks for none."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from stackrlhf.rl.common import make_accelerator
    from stackrlhf.rl.config import ILQLConfig
    from stackrlhf.rl.ilql import ILQLTrainer
    from randomwalks import generate_random_walks, walk_model, walk_tokenizer

    AcceleratorState._reset_state()
    assert Accelerator(mixed_precision="bf16").mixed_precision == "bf16"  # what a bf16 Trainer stage leaves
    assert make_accelerator().mixed_precision == "no"
    AcceleratorState._reset_state()
    Accelerator(mixed_precision="bf16")  # the same state again, for the trainer
    task = generate_random_walks()
    tok = walk_tokenizer(task.n_nodes)
    trainer = ILQLTrainer(ILQLConfig(model="randomwalks", out=str(tmp_path / "w"), steps=1, per_device_train_batch_size=8,
                                     report_to="none", progress=False, save_every=0),
                          task.samples(tok), walk_model(tok), tok)
    assert trainer.accelerator.mixed_precision == "no"
    AcceleratorState._reset_state()
