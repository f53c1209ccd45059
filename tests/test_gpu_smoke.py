"""benchmarks/gpu_smoke.py runs on a CPU with a tiny model: every stage trains every trainable tensor in bf16
autocast over float32 weights, with and without gradient checkpointing (the script a lent GPU runs)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import REPO


@pytest.mark.slow  # every stage of the GPU check, on the CPU
def test_gpu_smoke_runs_on_cpu(site_data, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "benchmarks" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    code = smoke.main(["--tiny", "--steps", "2", "--data", str(site_data), "--out", str(tmp_path / "smoke")])
    rows = json.loads((tmp_path / "smoke" / "smoke.json").read_text())["rows"]
    assert {(r["stage"], r["grad_ckpt"]) for r in rows} == {(s, g) for s in ("sft", "rm", "ppo", "rloo", "dpo", "ilql")
                                                            for g in (False, True)}
    assert all(r["changed"] == 1.0 for r in rows), rows
    assert code == 0, [r["detail"] for r in rows if not r["ok"]]
