"""The report draws every on-policy run of a pipeline (PPO, RLOO, RAFT), each named by the algorithm that ran."""

from __future__ import annotations

import json
import re

from stackrlhf.evaluate.config import ReportConfig
from stackrlhf.evaluate.report import write_report


def history(n: int) -> str:
    return "".join(json.dumps({"step": i, "reward/score_mean": 0.1 * i, "reward/total_mean": 0.05 * i,
                               "kl/mean": 0.2 * i, "kl/beta": 0.05, "response/words": 30 + i}) + "\n"
                   for i in range(1, n + 1))


def test_every_rl_run_of_a_pipeline_gets_its_curves(tmp_path):
    run = tmp_path / "run"
    for name in ("ppo", "rloo"):
        (run / name).mkdir(parents=True)
        (run / name / "history.jsonl").write_text(history(6))
        (run / name / "metrics.json").write_text(json.dumps({"algorithm": name}))
    page = write_report(ReportConfig(run=str(run), out=str(tmp_path / "report.html"))).read_text()
    plots = set(re.findall(r'data-plot="(\w+)"', page))
    assert {"ppo", "ppo_length", "rloo", "rloo_length"} <= plots
    assert "RLOO: reward and KL" in page and "No PPO, RLOO or RAFT history" not in page

    (run / "raft").mkdir()  # given explicitly, a run is named by the algorithm its metrics record
    (run / "raft" / "history.jsonl").write_text(history(4))
    (run / "raft" / "metrics.json").write_text(json.dumps({"algorithm": "raft"}))
    alone = write_report(ReportConfig(ppo=str(run / "raft"), out=str(tmp_path / "raft.html"))).read_text()
    assert {"raft", "raft_length"} <= set(re.findall(r'data-plot="(\w+)"', alone)) and 'data-plot="ppo"' not in alone
