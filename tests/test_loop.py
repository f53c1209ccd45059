"""`stackrlhf loop`: queue the policy's answers, wait for labels, retrain the RM on votes + labels, PPO, register.
Two turns: the first labelled by a person, the second by simulated annotators; the loop cannot tell them apart."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

from stackrlhf.cli import cli
from stackrlhf.errors import StackRLHFError
from stackrlhf.feedback.config import SimulateConfig
from stackrlhf.feedback.simulate import simulate
from stackrlhf.feedback.store import FeedbackStore
from stackrlhf.loop import loop_status, loop_turn
from stackrlhf.models.reward import RewardModel, default_backbone, load_backbone

SMALL = {
    "rm": {"max_steps": 2, "max_train_pairs": 24, "max_eval_pairs": 12, "max_length": 48, "max_prompt_tokens": 16,
           "report_to": "none"},
    "ppo": {"steps": 2, "prompts_per_step": 4, "mini_batch_size": 2, "min_new_tokens": 4, "max_new_tokens": 8,
            "num_layers_unfrozen": 1, "report_to": "none", "progress": False},
    "eval": {"questions": 3, "max_new_tokens": 8, "progress": False},
}


def label_tasks(db: str, batch: str, n: int) -> None:
    store = FeedbackStore(db)
    token = store.add_annotator(f"ann-{batch}")
    annotator = store.annotator_by_token(token)
    for task in [t for t in store.all_tasks() if t.batch == batch][:n]:
        first, second = task.candidates
        store.save_label(annotator.id, task.id, f"{batch}-{task.id}", {
            first.id: {"usefulness": 4, "accuracy": 4}, second.id: {"usefulness": 2, "accuracy": 3}},
            best=first.id, skipped=False, comment="")


@pytest.mark.slow
def test_a_loop_turn_queues_waits_then_retrains_and_registers(tiny_lm, site_data, tmp_path):
    torch.manual_seed(0)
    model, tok = load_backbone(default_backbone())
    rm0 = tmp_path / "rm0"
    RewardModel(model, tok, max_length=48, max_question_tokens=16).save_pretrained(rm0)
    registry, db = tmp_path / "registry", f"sqlite:///{tmp_path / 'feedback.db'}"
    settings = tmp_path / "loop.yaml"
    settings.write_text(yaml.safe_dump({"questions": 4, "max_new_tokens": 12, "judge": "reference",
                                        "best_of": [2], **SMALL}))

    with pytest.raises(StackRLHFError, match="holds no version"):
        loop_turn(registry)
    first = loop_turn(registry, policy=str(tiny_lm), reward=str(rm0), config_file=str(settings),
                      data=str(site_data), db=db, min_labels=3)
    assert first == {"action": "queued", "batch": "v0", "tasks": 4}
    tasks = FeedbackStore(db).all_tasks()
    assert len(tasks) == 4 and {c.model for t in tasks for c in t.candidates} == {"v0"}

    # the settings were saved with the registry: later turns need only --registry
    assert loop_turn(registry) == {"action": "waiting", "batch": "v0", "labels": 0, "needed": 3}
    label_tasks(db, "v0", 3)
    done = loop_turn(registry)
    assert done["action"] == "registered" and done["version"] == 1
    reg = json.loads((registry / "registry.json").read_text())
    v1 = reg["versions"][1]
    assert (v1["parent"], v1["labels"], v1["feedback_pairs"]) == (0, 3, 3) and reg["pending"] is None
    assert v1["data"] == [str(site_data), str(registry / "v1" / "feedback")]
    rm_cfg = yaml.safe_load((registry / "v1" / "rm" / "config.yaml").read_text())
    assert rm_cfg["data"] == v1["data"]  # the RM learned from votes and the human labels
    algorithm = yaml.safe_load((registry / "v1" / "rloo" / "config.yaml").read_text())  # named by what ran
    assert algorithm["model"] == str(tiny_lm) and algorithm["algorithm"] == "rloo"
    assert "win_rate_proxy_vs_v0" in v1["metrics"] and v1["metrics"]["rl"]["steps"] == 2
    assert v1["metrics"]["rl"]["algorithm"] == "rloo" and v1["model"] == str(registry / "v1" / "rloo")
    assert_judged(registry, v1, 1)

    # the next turn queues the new version's answers
    assert loop_turn(registry)["batch"] == "v1"
    assert {c.model for t in FeedbackStore(db).all_tasks() if t.batch == "v1" for c in t.candidates} == {"v1"}
    result = CliRunner().invoke(cli, ["loop", "status", "--registry", str(registry)])
    assert result.exit_code == 0, result.output
    assert "pending: batch v1" in result.output
    assert [v["version"] for v in loop_status(registry)["versions"]] == [0, 1]
    result = CliRunner().invoke(cli, ["loop", "--registry", str(registry), "--policy", str(tiny_lm)])
    assert result.exit_code != 0 and "already has versions" in result.output

    # turn 2: simulated annotators label the batch through the app; this RM learns from the labels alone
    made = simulate(SimulateConfig(db=db, judge="reference", data=str(site_data), annotators=2, replication=1,
                                   noise=0.0, seed=1))
    # every task once (replication 1): the person's labels above were stored without the app's assignments; a
    # task skipped (an unanswered question, nothing to judge by) is offered to the other annotator, who skips it too
    store = FeedbackStore(db)
    skipped = {label.task_id for label in store.all_labels() if label.skipped}
    assert made["labels"] == 8 + len(skipped)
    v1_tasks = {t.id for t in store.all_tasks() if t.batch == "v1"}
    kept = [label for label in store.all_labels() if not label.skipped]  # unanswered questions are skipped
    assert 0 < sum(label.task_id in v1_tasks for label in kept) <= 4
    assert loop_turn(registry, rm_votes=False, min_labels=1)["version"] == 2
    v2 = json.loads((registry / "registry.json").read_text())["versions"][2]
    assert (v2["parent"], v2["labels"]) == (1, sum(label.task_id in v1_tasks for label in kept))
    assert v2["feedback_pairs"] == len(kept)  # every label so far, the person's and the simulated ones
    assert v2["data"] == [str(registry / "v2" / "feedback")]
    assert yaml.safe_load((registry / "v2" / "rloo" / "config.yaml").read_text())["model"] == v1["model"]
    assert_judged(registry, v2, 2)
    # turn 2 read v0's and v1's answers, their KL and v0's best-of-n pool from the registry's evaluation cache
    turns = [json.loads((registry / f"v{n}" / "eval" / "eval.json").read_text())["models"] for n in (1, 2)]
    assert len(list((registry / "eval-cache").glob("*.json"))) >= 4
    assert turns[1]["v1"]["kl_to_reference"] == turns[0]["v1"]["kl_to_reference"]
    assert turns[1]["v1"]["length_tokens"] == turns[0]["v1"]["length_tokens"]

    # the report shows the versions: judge score against labels used and against KL, best-of-n beside them
    from stackrlhf.evaluate.config import ReportConfig
    from stackrlhf.evaluate.report import loop_versions, write_report

    rows = loop_versions(registry)
    assert [r["name"] for r in rows] == ["v0", "v1", "bon2 (RM of v1)", "v2", "bon2 (RM of v2)"]
    assert [r["labels"] for r in rows] == [0, 3, 3, 3 + v2["labels"], 3 + v2["labels"]]
    assert rows[3]["score"] == v2["metrics"]["reward_judge"] and rows[3]["judge_name"] == "judge"
    page = write_report(ReportConfig(registry=str(registry), out=str(tmp_path / "report.html"))).read_text()
    assert "<h2>Feedback loop</h2>" in page and "data:image/png;base64," in page and "bon2 (RM of v2)" in page


def assert_judged(registry, version: dict, n: int) -> None:
    """A registered version carries the fixed judge's score, its gain over v0 with a standard error, win rate and
    KL against v0, and best-of-2 from v0 under the turn's RM, all from one evaluation of the same questions."""
    m = version["metrics"]
    for key in ("reward_judge", "win_rate_judge_vs_v0", "gain_judge_vs_v0", "gain_judge_vs_v0_se",
                "kl_to_reference", "length_words"):
        assert isinstance(m[key], float), key
    ev = json.loads((registry / f"v{n}" / "eval" / "eval.json").read_text())
    assert ev["baseline"] == "v0" and ev["judges"]["judge"] == "reference"
    assert set(ev["models"]) == {"v0", f"v{n}", "bon2"} | ({f"v{n - 1}"} if n > 1 else set())
    assert m["reward_judge"] == ev["models"][f"v{n}"]["reward_judge"]
    assert m["v0"]["reward_judge"] == ev["models"]["v0"]["reward_judge"]
    assert abs(m["gain_judge_vs_v0"] - (m["reward_judge"] - m["v0"]["reward_judge"])) < 1e-9
    assert abs(ev["models"]["v0"]["kl_to_reference"]) < 1e-4  # v0 is the reference
    assert m["best_of"]["bon2"]["kl_to_reference"] == pytest.approx(math.log(2) - 0.5, abs=1e-4)


@pytest.mark.slow
def test_a_loop_turn_killed_anywhere_resumes_to_what_an_uninterrupted_turn_registers(tiny_lm, site_data, tmp_path):
    """`stackrlhf loop` killed with SIGKILL inside a turn's RM, RL step and evaluation, and rerun each time, registers
    the version an uninterrupted turn registers: the same weights (within 1e-6) and the same evaluation."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from helpers import REPO

    torch.manual_seed(0)
    model, tok = load_backbone(default_backbone())
    rm0 = tmp_path / "rm0"
    RewardModel(model, tok, max_length=48, max_question_tokens=16).save_pretrained(rm0)
    settings = tmp_path / "loop.yaml"
    small = {**SMALL, "rm": {**SMALL["rm"], "save_steps": 1}, "ppo": {**SMALL["ppo"], "save_every": 1}}
    settings.write_text(yaml.safe_dump({"questions": 4, "max_new_tokens": 12, **small}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("whole", "killed"):  # the same queue and the same labels in each
        db = f"sqlite:///{tmp_path / f'{name}.db'}"
        loop_turn(tmp_path / name, policy=str(tiny_lm), reward=str(rm0), config_file=str(settings),
                  data=str(site_data), db=db, min_labels=3)
        label_tasks(db, "v0", 3)

    def turn(name: str, pattern: str | None = None) -> bool:
        proc = subprocess.Popen([sys.executable, "-m", "stackrlhf.cli", "loop", "--registry", str(tmp_path / name)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + 600
        while pattern and time.monotonic() < deadline and proc.poll() is None:
            found = list((tmp_path / name / "v1").glob(pattern))
            if found and (not pattern.endswith(".json") or '"running"' in found[0].read_text()):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.01)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return False

    turn("whole")
    landed = [p for p in ("rm/checkpoints/checkpoint-*", "rloo/checkpoints/step-*", ".pipeline/eval.json")
              if turn("killed", p)]
    assert len(landed) == 3, landed
    turn("killed")
    regs = [json.loads((tmp_path / name / "registry.json").read_text()) for name in ("whole", "killed")]
    assert [len(r["versions"]) for r in regs] == [2, 2]
    for part in ("rm", "rloo"):
        a, b = (load_file(str(tmp_path / name / "v1" / part / "model.safetensors")) for name in ("whole", "killed"))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, part
    evals = [json.loads((tmp_path / name / "v1" / "eval" / "eval.json").read_text())["models"]
             for name in ("whole", "killed")]
    assert {m: e["reward_proxy"] for m, e in evals[0].items()} == {m: e["reward_proxy"] for m, e in evals[1].items()}
