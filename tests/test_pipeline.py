"""`stackrlhf run`: every stage from one YAML file, skipped when unchanged, resumed after a kill; the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stackrlhf import pipeline
from stackrlhf.cli import cli
from stackrlhf.errors import StackRLHFError

from helpers import site_dump

TINY = {
    "data": {"dump": [str(site_dump())], "progress": False},
    "sft": {"max_steps": 2, "max_train_samples": 32, "max_eval_samples": 8, "max_length": 64,
            "max_prompt_tokens": 32, "report_to": "none"},
    "rm": {"max_steps": 2, "max_train_pairs": 32, "max_eval_pairs": 16, "max_length": 48,
           "max_prompt_tokens": 16, "report_to": "none", "adjust": ["length", "time"]},
    "gold_rm": {"max_steps": 2, "max_train_pairs": 32, "max_eval_pairs": 16, "max_length": 48,
                "max_prompt_tokens": 16, "report_to": "none"},
    "ppo": {"steps": 2, "prompts_per_step": 4, "mini_batch_size": 2, "min_new_tokens": 4, "max_new_tokens": 8,
            "num_layers_unfrozen": 1, "save_every": 1, "report_to": "none", "progress": False},
    "ilql": {"steps": 3, "per_device_train_batch_size": 4, "max_samples": 32, "max_answer_tokens": 32, "report_to": "none",
             "progress": False},
    "eval": {"questions": 4, "max_new_tokens": 8, "generation_batch_size": 4, "ilql_betas": [0, 2], "progress": False},
    "report": {"samples": 2},
}


def write_config(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def statuses(result: dict) -> dict[str, str]:
    return {name: s["status"] for name, s in result["stages"].items()}


@pytest.mark.slow
def test_run_skips_unchanged_stages_reruns_changed_ones_and_resumes_after_a_kill(tiny_lm, tmp_path, monkeypatch):
    run = tmp_path / "run"
    spec = {"out": str(run), "base": str(tiny_lm), **TINY}
    config = write_config(tmp_path / "pipeline.yaml", spec)

    first = pipeline.run_pipeline(config)
    assert list(first["stages"]) == ["data", "sft", "rm", "gold_rm", "ppo", "ilql", "eval", "report"]
    assert set(statuses(first).values()) == {"ran"}
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert set(ev["models"]) == {"sft", "base", "ppo", "ilql-b0", "ilql-b2"}  # the base beside SFT by default
    assert ev["judges"] == {"proxy": str(run / "rm"), "gold": str(run / "rm-gold")}
    rm_cfg = yaml.safe_load((run / "rm" / "config.yaml").read_text())
    gold_cfg = yaml.safe_load((run / "rm-gold" / "config.yaml").read_text())
    assert (rm_cfg["pairs_half"], gold_cfg["pairs_half"]) == ("proxy", "gold")
    assert yaml.safe_load((run / "ppo" / "config.yaml").read_text())["model"] == str(run / "sft")
    page = (run / "report.html").read_text()
    assert {"ppo", "ppo_length", "ilql", "frontier", "rm_accuracy"} <= set(re.findall(r'data-plot="(\w+)"', page))
    assert "log-loss gain beyond it" in page  # the RM table beyond length and time
    length = json.loads((run / "ppo" / "metrics.json").read_text())["length"]  # PPO's length analysis, as reported
    if length["reward_gain"] is None:
        assert "Too few steps to compare." in page
    else:
        assert f"answers {length['words_early']:.1f} -&gt; {length['words_late']:.1f} words" in page
        assert f"reward gain {length['reward_gain']:+.3f} overall" in page
    rm_metrics = json.loads((run / "rm" / "metrics.json").read_text())
    assert set(rm_metrics["confounder_weights"]) == {"length", "time"}
    spearman = rm_metrics["test"]["length_spearman"]
    assert isinstance(spearman, float) and -1 <= spearman <= 1 and rm_metrics["test"]["length_spearman_answers"] > 2
    gains = ev["models"]["ppo"]
    assert isinstance(gains["gain_proxy_vs_sft_length_adjusted"], float)

    sft_weights = (run / "sft" / "model.safetensors").stat().st_mtime_ns
    second = pipeline.run_pipeline(config)
    assert statuses(second) == {"data": "ran", "sft": "skipped", "rm": "skipped", "gold_rm": "skipped",
                                "ppo": "skipped", "ilql": "skipped", "eval": "skipped", "report": "ran"}
    assert (run / "sft" / "model.safetensors").stat().st_mtime_ns == sft_weights

    # a changed PPO setting reruns PPO (afresh: its old checkpoints would not match) and what reads it
    spec["ppo"] = {**spec["ppo"], "steps": 3}
    write_config(config, spec)
    third = pipeline.run_pipeline(config)
    assert statuses(third)["ppo"] == "ran" and statuses(third)["eval"] == "ran"
    assert statuses(third)["sft"] == statuses(third)["ilql"] == "skipped"
    assert json.loads((run / "ppo" / "metrics.json").read_text())["steps"] == 3

    # kill the run inside the evaluation: the next run skips everything before it and finishes
    spec["eval"] = {**spec["eval"], "questions": 3}
    write_config(config, spec)
    real_runner = pipeline.runner

    def killed(name):
        if name == "eval":
            def die(cfg):
                raise KeyboardInterrupt
            return die
        return real_runner(name)

    monkeypatch.setattr(pipeline, "runner", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(config)
    assert json.loads((run / ".pipeline" / "eval.json").read_text())["status"] == "running"
    monkeypatch.setattr(pipeline, "runner", real_runner)
    fourth = pipeline.run_pipeline(config)
    assert statuses(fourth)["eval"] == "ran" and statuses(fourth)["ppo"] == "skipped"
    assert json.loads((run / "eval" / "eval.json").read_text())["questions"] == 3

    # `stackrlhf report` on explicit artifact directories, and `--until`
    result = CliRunner().invoke(cli, ["report", "--eval", str(run / "eval"), "--reward", str(run / "rm"),
                                      "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert 'data-plot="rm_accuracy"' in page and 'data-plot="ppo"' not in page and "No PPO, RLOO or RAFT history" in page
    partial = pipeline.run_pipeline(config, out=tmp_path / "other", until="sft")
    assert list(partial["stages"]) == ["data", "sft"]


def test_dumps_copied_again_rebuild_the_data_but_keep_the_models_trained_on_it(tiny_lm, tmp_path):
    """A dump copied afresh (same bytes, new mtimes: a re-synced share, a re-extracted .7z) is built again, but the
    build's files are the same, so the SFT model trained on them is kept, not thrown away and retrained."""
    import os
    import shutil

    dump = tmp_path / site_dump().name
    shutil.copytree(site_dump(), dump)
    run = tmp_path / "run"
    spec = {"out": str(run), "base": str(tiny_lm), "data": {"dump": [str(dump)], "progress": False},
            "sft": TINY["sft"], "rm": TINY["rm"]}
    config = write_config(tmp_path / "pipeline.yaml", spec)
    assert statuses(pipeline.run_pipeline(config, until="sft")) == {"data": "ran", "sft": "ran"}
    first = json.loads((run / "data" / "stats.json").read_text())
    weights = (run / "sft" / "model.safetensors").stat().st_mtime_ns
    for f in dump.iterdir():
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))

    assert statuses(pipeline.run_pipeline(config, until="sft")) == {"data": "ran", "sft": "skipped"}
    second = json.loads((run / "data" / "stats.json").read_text())
    assert second["build_key"] != first["build_key"]  # the inputs look new: the data was built again...
    assert second["content_key"] == first["content_key"]  # ...into the same bytes
    assert (run / "sft" / "model.safetensors").stat().st_mtime_ns == weights

    # a dump whose content changed is a new dataset: the model is trained again
    posts = dump / "Posts.xml"
    text = posts.read_text(encoding="utf-8")
    posts.write_text(text.replace(' Body="', ' Body="Edited. '), encoding="utf-8")
    assert statuses(pipeline.run_pipeline(config, until="sft")) == {"data": "ran", "sft": "ran"}


def test_report_escapes_dump_and_model_text(tmp_path):
    from stackrlhf.evaluate.config import ReportConfig
    from stackrlhf.evaluate.report import write_report

    (tmp_path / "eval").mkdir()
    sample = {"site": "beer.stackexchange.com", "qid": 1, "title": "<script>alert(1)</script>",
              "question_link": "https://beer.stackexchange.com/q/1", "question_author": "a<b>",
              "license": "CC BY-SA 4.0", "prompt": "Question: x", "best_answer": "<img src=x onerror=alert(2)>",
              "answers": {"sft": {"text": "</pre><script>alert(3)</script>", "proxy": 0.5}}}
    (tmp_path / "eval" / "samples.jsonl").write_text(json.dumps(sample) + "\n")
    page = write_report(ReportConfig(eval=str(tmp_path / "eval"), out=str(tmp_path / "r.html"))).read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in page and "a&lt;b&gt;" in page
    assert "default-src 'none'" in page  # nothing external loads, nothing inline runs


@pytest.mark.parametrize("spec, message", [
    ({"data": {}, "rm": {}}, "needs a `sft:` section"),
    ({"data": {}, "sft": {}, "rm": {}, "pp0": {}}, "unknown section"),
    ({"data": {}, "sft": {"epochs": 2}, "rm": {}}, "pipeline section `sft`: unknown setting"),
    ({"data": {}, "sft": [], "rm": {}}, "must be a mapping"),
])
def test_bad_pipeline_files_are_refused(tmp_path, spec, message):
    with pytest.raises(StackRLHFError, match=re.escape(message)):
        pipeline.run_pipeline(write_config(tmp_path / "p.yaml", {"out": str(tmp_path / "run"), **spec}))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "p.yaml")])
    assert result.exit_code != 0 and message.split("`")[0] in result.output


def test_demo_config_plans_every_stage_but_dpo():
    """Offline (the tests' STACKRLHF_OFFLINE, an empty cache) `base: auto` falls back to the pretrain stage."""
    stages = pipeline.plan(pipeline.read_pipeline_file(pipeline.find_demo_config()), Path("/tmp/demo"))
    assert [s.name for s in stages] == [n for n in pipeline.STAGES if n != "dpo"]
    by_name = {s.name: s for s in stages}
    eval_models = by_name["eval"].cfg.model
    assert eval_models == ["sft=/tmp/demo/sft", "base=/tmp/demo/base", "ppo=/tmp/demo/ppo", "rloo=/tmp/demo/rloo",
                           "bon4=bon:4@/tmp/demo/sft", "bon16=bon:16@/tmp/demo/sft", "ilql-b4=/tmp/demo/ilql@4"]
    assert by_name["ppo"].cfg.temperature == by_name["rloo"].cfg.temperature == by_name["eval"].cfg.temperature == 0.7


def test_frontier_config_plans_every_stage_and_shares_the_demos_keys():
    demo = pipeline.read_pipeline_file(pipeline.find_demo_config())
    full = pipeline.read_pipeline_file(pipeline.find_demo_config().with_name("frontier.yaml"))
    stages = {s.name: s for s in pipeline.plan(full, Path("/tmp/f"))}
    assert list(stages) == list(pipeline.STAGES)
    assert stages["rloo"].cfg.algorithm == "rloo" and stages["rloo"].parents == ["data", "sft", "rm"]
    assert stages["dpo"].cfg.data == ["/tmp/f/data"] and stages["dpo"].cfg.model == "/tmp/f/sft"
    models = stages["eval"].cfg.model
    assert {"rloo=/tmp/f/rloo", "dpo=/tmp/f/dpo", "bon4=bon:4@/tmp/f/sft", "bon16=bon:16@/tmp/f/sft",
            "ilql-b0=/tmp/f/ilql@0", "ilql-b4=/tmp/f/ilql@4"} <= set(models)
    keys: dict = {}
    for s in pipeline.plan(demo, Path("/tmp/f")):  # a demo run's finished stages count for the frontier run
        keys[s.name] = pipeline.stage_key(s, keys, Path("/tmp/f"))
    fkeys: dict = {}
    for s in pipeline.plan(full, Path("/tmp/f")):
        fkeys[s.name] = pipeline.stage_key(s, fkeys, Path("/tmp/f"))
    for name in ("data", "pretrain", "sft", "rm", "gold_rm", "ppo", "rloo", "ilql"):
        assert keys[name] == fkeys[name], name


@pytest.mark.parametrize("key", ["model", "backbone"])  # backbone: the setting's old name, still accepted
def test_reward_model_on_the_runs_sft_model(key):
    spec = {"data": {}, "sft": {}, "rm": {key: "sft", "learning_rate": 1e-4}, "gold_rm": {}}
    stages = {s.name: s for s in pipeline.plan(spec, Path("/tmp/run"))}
    assert stages["rm"].cfg.model == "/tmp/run/sft" and stages["rm"].parents == ["data", "sft"]
    assert stages["rm"].cfg.learning_rate == 1e-4 and stages["rm"].cfg.pairs_half == "proxy"
    assert stages["gold_rm"].cfg.model == "" and stages["gold_rm"].parents == ["data"]


def test_base_auto_falls_back_to_the_offline_pretrain_only_when_no_pretrained_model_can_be_had(monkeypatch):
    """The tests run with HF_HUB_OFFLINE and STACKRLHF_OFFLINE and an empty cache: no SmolLM2 to be had, so `auto`
    plans the offline pretrain and says why (tests/test_pretrained.py covers the hub, cache and package paths)."""
    from stackrlhf.pipeline import plan

    stages = {s.name: s for s in plan({"base": "auto", "data": {}, "sft": {}, "rm": {}}, Path("/tmp/auto-run"))}
    assert "pretrain" in stages and stages["sft"].cfg.model == "/tmp/auto-run/base"
    stages = {s.name: s for s in plan({"base": "gpt2", "data": {}, "sft": {}, "rm": {}}, Path("/tmp/auto-run"))}
    assert "pretrain" not in stages and stages["sft"].cfg.model == "gpt2" and stages["sft"].external == ["gpt2"]


def test_the_run_temperature_reaches_every_stage_that_samples():
    spec = {"temperature": 0.7, "data": {}, "sft": {}, "rm": {}, "ppo": {}, "rloo": {"temperature": 1.0},
            "ilql": {}, "eval": {}}
    stages = {s.name: s for s in pipeline.plan(spec, Path("/tmp/run"))}
    assert stages["ppo"].cfg.temperature == 0.7 and stages["eval"].cfg.temperature == 0.7
    assert stages["rloo"].cfg.temperature == 1.0  # a section's own setting wins
    without = {s.name: s for s in pipeline.plan({k: v for k, v in spec.items() if k != "temperature"},
                                                Path("/tmp/run"))}
    # without one, the stages' own defaults, which agree (KL in eval means what it meant in training)
    assert without["ppo"].cfg.temperature == without["eval"].cfg.temperature == 0.7


def test_force_deletes_the_stage_and_reruns_everything_that_reads_it(tmp_path, monkeypatch):
    """`--force ppo` starts PPO from an empty directory (no final checkpoint to resume from) and re-keys the
    stages after it, so the evaluation runs again; the next plain run skips them all."""
    calls: list[str] = []

    def fake(name):
        def stage(cfg):
            out = Path(cfg.out)
            calls.append(name)
            if name == "report":
                out.write_text("report")
                return out
            found = sorted(p.name for p in out.glob("*")) if out.exists() else []
            out.mkdir(parents=True, exist_ok=True)
            (out / f"run-{len(calls)}").write_text(json.dumps(found))
            return {"content_key": "same-bytes"} if name == "data" else {}
        return stage

    monkeypatch.setattr(pipeline, "runner", fake)
    spec = {"out": str(tmp_path / "run"), "base": "some/base", "data": {"dump": ["x"]}, "sft": {}, "rm": {},
            "ppo": {}, "dpo": {}, "eval": {}, "report": {}}
    config = write_config(tmp_path / "p.yaml", spec)
    assert set(statuses(pipeline.run_pipeline(config)).values()) == {"ran"}

    calls.clear()
    forced = pipeline.run_pipeline(config, force=("ppo",))
    assert statuses(forced) == {"data": "ran", "sft": "skipped", "rm": "skipped", "ppo": "ran", "dpo": "skipped",
                                "eval": "ran", "report": "ran"}
    ppo_files = sorted(p.name for p in (tmp_path / "run" / "ppo").iterdir())
    assert len(ppo_files) == 1  # the first run's files were deleted before the second started
    assert json.loads((tmp_path / "run" / "ppo" / ppo_files[0]).read_text()) == []

    again = pipeline.run_pipeline(config)
    assert statuses(again) == {"data": "ran", "sft": "skipped", "rm": "skipped", "ppo": "skipped", "dpo": "skipped",
                               "eval": "skipped", "report": "ran"}

    # forcing the data stage rebuilds it from nothing and retrains everything, though its bytes are the same
    everything = pipeline.run_pipeline(config, force=("data",))
    assert set(statuses(everything).values()) == {"ran"}
    assert set(statuses(pipeline.run_pipeline(config)).values()) - {"skipped"} == {"ran"}
    assert statuses(pipeline.run_pipeline(config))["sft"] == "skipped"


def test_rl_stages_on_a_reward_model_below_chance_do_not_run_and_the_report_says_why(tmp_path, monkeypatch):
    """The demo's proxy RM can be below chance on held-out pairs (few votes): `run` then skips PPO and RLOO
    rather than optimise against the votes, evaluates the rest, and the report's first screen says why; a
    section with `allow_below_chance_reward: true` runs anyway."""
    from stackrlhf.evaluate.config import ReportConfig
    from stackrlhf.evaluate.report import write_report

    seen: dict = {}

    def fake(name):
        def stage(cfg):
            out = Path(cfg.out)
            seen[name] = cfg
            if name == "report":
                return out
            out.mkdir(parents=True, exist_ok=True)
            if name == "rm":
                (out / "metrics.json").write_text(json.dumps(
                    {"accuracy": 0.35, "accuracy_ci95": [0.25, 0.46], "eval_pairs": 80}))
            return {"content_key": "same-bytes"} if name == "data" else {}
        return stage

    monkeypatch.setattr(pipeline, "runner", fake)
    run = tmp_path / "run"
    spec = {"out": str(run), "base": "some/base", "data": {"dump": ["x"]}, "sft": {}, "rm": {}, "ppo": {},
            "rloo": {"allow_below_chance_reward": True}, "eval": {"include_base": False}, "report": {}}
    result = pipeline.run_pipeline(write_config(tmp_path / "p.yaml", spec))
    assert statuses(result) == {"data": "ran", "sft": "ran", "rm": "ran", "ppo": "refused", "rloo": "ran",
                                "eval": "ran", "report": "ran"}
    assert "0.35 [0.25, 0.46]" in result["stages"]["ppo"]["why"] and "ppo" not in seen
    assert [m.split("=")[0] for m in seen["eval"].model] == ["sft", "rloo"]
    assert json.loads((run / "ppo" / "refused.json").read_text())["stage"] == "ppo"
    page = write_report(ReportConfig(run=str(run), out=str(tmp_path / "r.html"))).read_text()
    head = page[:page.index("<h2>")]
    assert "The ppo stage did not run" in head and "below chance" in head
