"""``stackrlhf run``: every stage of one YAML file in order, each skipped when its settings and inputs are unchanged.

A pipeline file has one section per stage (``data``, ``pretrain``, ``sft``, ``rm``, ``gold_rm``, ``ppo``, ``rloo``,
``dpo``, ``ilql``, ``eval``, ``report``) holding that stage's own settings, plus ``out`` (the run directory) and
``base`` (a hub id or path, or ``pretrain`` for the offline base). The pipeline wires the paths: each stage writes
``OUT/<dir>`` and reads its parents' directories. A stage's key hashes its settings and its parents' keys; when a
stage finishes, ``OUT/.pipeline/<stage>.json`` records the key. A stage with a finished record of the same key is
skipped; a stage killed part-way starts again and resumes from its own checkpoints; a stage whose key changed starts
afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from rich.table import Table

from stackrlhf.config import config_from_dict, read_json, read_yaml_mapping, write_text_atomic
from stackrlhf.data.config import DataConfig
from stackrlhf.errors import StackRLHFError
from stackrlhf.evaluate.config import EvalConfig, ReportConfig
from stackrlhf.rl.config import ILQLConfig, PPOConfig
from stackrlhf.train.config import DPOConfig, PretrainConfig, RMConfig, SFTConfig
from stackrlhf.console import console


# stage -> (directory under the run, settings class); the order is the run order
STAGES: dict[str, tuple[str, type]] = {
    "data": ("data", DataConfig),
    "pretrain": ("base", PretrainConfig),
    "sft": ("sft", SFTConfig),
    "rm": ("rm", RMConfig),
    "gold_rm": ("rm-gold", RMConfig),
    "ppo": ("ppo", PPOConfig),
    "rloo": ("rloo", PPOConfig),
    "dpo": ("dpo", DPOConfig),
    "ilql": ("ilql", ILQLConfig),
    "eval": ("eval", EvalConfig),
    "report": ("report.html", ReportConfig),
}
REQUIRED = ("data", "sft", "rm")
TOP_LEVEL = {"out", "base", "temperature"}
# settings that do not change a stage's result
NOT_IN_KEY = {"out", "progress", "report_to", "resume", "overwrite", "cache_dir", "cache"}
DEMO_CONFIG = "configs/demo.yaml"
# the data stage checks its own inputs (the dump files) and returns at once when they are unchanged;
# the report takes seconds and should show the run as it is now
ALWAYS_RUN = ("data", "report")


@dataclass
class Stage:
    name: str
    cfg: Any
    parents: list[str]
    out: Path
    external: list[str] = field(default_factory=list)  # inputs outside the run (hub ids, paths), hashed by name


def find_demo_config() -> Path:
    """``configs/demo.yaml`` from the working directory, else from the source checkout this package runs from."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / DEMO_CONFIG).is_file():
            return root / DEMO_CONFIG
    raise StackRLHFError(f"no config given and no {DEMO_CONFIG} here; pass a pipeline file: stackrlhf run FILE")


def read_pipeline_file(path: Path) -> dict:
    spec = read_yaml_mapping(path, "pipeline file")
    unknown = sorted(set(spec) - set(STAGES) - TOP_LEVEL)
    if unknown:
        raise StackRLHFError(f"pipeline file {path}: unknown section(s) {', '.join(unknown)}; "
                             f"valid: {', '.join([*TOP_LEVEL, *STAGES])}")
    return spec


def section(spec: dict, name: str) -> dict | None:
    """A stage's settings; None when the stage is off (absent or ``false``). ``null`` or ``{}`` means defaults."""
    if name not in spec or spec[name] is False:
        if name in REQUIRED:
            raise StackRLHFError(f"the pipeline needs a `{name}:` section (it may be empty)")
        return None
    value = spec[name] if spec[name] is not None else {}
    if not isinstance(value, dict):
        raise StackRLHFError(f"section `{name}` must be a mapping of settings, `{{}}` for the defaults, or false")
    return dict(value)


def plan(spec: dict, out: Path | None = None) -> list[Stage]:
    """The stages to run, with every path wired to the run directory."""
    run = Path(out or spec.get("out") or "outputs/run")
    d = {name: run / sub for name, (sub, _) in STAGES.items()}
    stages: list[Stage] = []

    def add(name: str, parents: list[str], wired: dict, external: list[str] | None = None,
            sec: dict | None = None) -> None:
        values = {**(sec if sec is not None else section(spec, name) or {}), **wired, "out": str(d[name])}
        cfg = config_from_dict(STAGES[name][1], values, f"pipeline section `{name}`")
        stages.append(Stage(name, cfg, parents, d[name], external or []))

    data = str(d["data"])
    add("data", [], {})
    temperature = spec.get("temperature")

    def sampled(sec: dict | None) -> dict | None:
        """The run's sampling temperature (part of the policy: rollouts, log-probs, KL and eval share it) for a
        stage that samples, unless its section sets its own."""
        if sec is not None and temperature is not None:
            sec.setdefault("temperature", temperature)
        return sec

    base = str(spec.get("base") or "pretrain")
    if base == "auto":
        from stackrlhf.models.pretrained import resolve_base

        base, why = resolve_base()
        console.print(f"base: auto -> {base}: {why}")
    if base == "pretrain":
        add("pretrain", ["data"], {"data": data}, sec=section(spec, "pretrain") or {})
        base_parents, base_path, external = ["pretrain"], str(d["pretrain"]), []
    else:
        base_parents, base_path, external = [], base, [base]
    add("sft", ["data", *base_parents], {"model": base_path, "data": data}, external)
    def add_rm(name: str, sec: dict, half: str) -> None:
        """``model: sft`` (or its old name ``backbone: sft``) puts the reward head on this run's SFT model (as
        StackLLaMA did)."""
        wired, parents = {"data": [data, *sec.pop("data", [])]}, ["data"]
        if sec.get("model", sec.get("backbone")) == "sft":
            sec.pop("model", None), sec.pop("backbone", None)
            wired["model"], parents = str(d["sft"]), ["data", "sft"]
        add(name, parents, wired, sec={"pairs_half": half, **sec})

    gold = section(spec, "gold_rm")
    add_rm("rm", section(spec, "rm") or {}, "proxy" if gold is not None else "all")
    if gold is not None:
        add_rm("gold_rm", gold, "gold")
    if (ppo := sampled(section(spec, "ppo"))) is not None:
        add("ppo", ["data", "sft", "rm"], {"model": str(d["sft"]), "reward": str(d["rm"]), "data": data}, sec=ppo)
    if (rloo := sampled(section(spec, "rloo"))) is not None:  # PPO's trainer with --algorithm rloo
        add("rloo", ["data", "sft", "rm"], {"model": str(d["sft"]), "reward": str(d["rm"]), "data": data,
                                            "algorithm": "rloo"}, sec=rloo)
    # with a gold RM, the methods that learn from vote pairs keep to the proxy half: the gold half stays held out
    held_out = {"pairs_half": "proxy"} if gold is not None else {}
    if (dpo := section(spec, "dpo")) is not None:  # the vote pairs (+ any `data:` given, e.g. a feedback export)
        add("dpo", ["data", "sft"], {"model": str(d["sft"]), "data": [data, *dpo.pop("data", [])]},
            sec={**held_out, **dpo})
    if (ilql := section(spec, "ilql")) is not None:
        add("ilql", ["data", "sft"], {"model": str(d["sft"]), "data": data}, sec={**held_out, **ilql})
    names = [s.name for s in stages]
    if (ev := sampled(section(spec, "eval"))) is not None:
        models = [f"sft={d['sft']}"]
        if ev.pop("include_base", True):  # beside SFT by default: SFT can lower the judge, and a user should see it
            models.append(f"base={base_path}")
        models += [f"{n}={d[n]}" for n in ("ppo", "rloo", "dpo") if n in names]
        models += [f"bon{n}=bon:{n}@{d['sft']}" for n in ev.pop("best_of", [])]
        betas = ev.pop("ilql_betas", None)
        if "ilql" in names:
            for beta in betas if betas is not None else [stages[names.index("ilql")].cfg.beta]:
                models.append(f"ilql-b{beta:g}={d['ilql']}@{beta:g}")
        parents = [n for n in names if n != "data"] + ["data"]
        add("eval", parents, {"model": models, "data": data, "reward": str(d["rm"]),
                              "gold_reward": str(d["gold_rm"]) if gold is not None else ""}, sec=ev)
    if (rep := section(spec, "report")) is not None:
        add("report", [s.name for s in stages], {"run": str(run)}, sec=rep)
    return stages


def stage_key(stage: Stage, parent_keys: dict[str, str], run: Path) -> str:
    """Hash of the settings that change the result (run paths made relative) and of the parents' keys."""
    settings = {k: v for k, v in dataclasses.asdict(stage.cfg).items() if k not in NOT_IN_KEY}
    text = json.dumps(settings, sort_keys=True, default=str).replace(str(run), "$RUN")
    blob = json.dumps({"stage": stage.name, "settings": text, "external": stage.external,
                       "parents": {p: parent_keys[p] for p in stage.parents}, "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


RUNNERS = {  # stage -> its function, imported late: the CLI starts fast and a stage pulls in only what it needs
    "data": "stackrlhf.data.build:build_dataset",
    "pretrain": "stackrlhf.train.pretrain:pretrain",
    "sft": "stackrlhf.train.sft:sft",
    "rm": "stackrlhf.train.reward:train_reward_model",
    "gold_rm": "stackrlhf.train.reward:train_reward_model",
    "ppo": "stackrlhf.rl.ppo:train_ppo",
    "rloo": "stackrlhf.rl.ppo:train_ppo",
    "rl": "stackrlhf.rl.ppo:train_ppo",  # the loop's RL step, whichever algorithm it runs
    "dpo": "stackrlhf.train.dpo:dpo",
    "ilql": "stackrlhf.rl.ilql:train_ilql",
    "eval": "stackrlhf.evaluate.metrics:evaluate_models",
    "report": "stackrlhf.pipeline:report_stage",
}


def report_stage(cfg: ReportConfig) -> Path:
    """The report stage (and `stackrlhf report`). Human feedback given as the store's URL is exported first (to a
    temp folder), so the report reads only artifacts, the ``ratings.parquet`` of a ``feedback export``."""
    import tempfile

    from stackrlhf.evaluate.report import write_report as write

    if "://" not in cfg.feedback:
        return write(cfg)
    from stackrlhf.feedback.export import export_feedback
    from stackrlhf.feedback.store import FeedbackStore

    with tempfile.TemporaryDirectory() as tmp:
        export_feedback(FeedbackStore(cfg.feedback), Path(tmp) / "feedback")
        return write(dataclasses.replace(cfg, feedback=str(Path(tmp) / "feedback")))


def runner(name: str) -> Callable[[Any], Any]:
    module, function = RUNNERS[name].split(":")
    return getattr(importlib.import_module(module), function)


def data_result_key(stats: dict, default: str) -> str:
    """What the stages after a data build key on: the hash of its files (older builds: the key of their inputs)."""
    return stats.get("content_key") or stats.get("build_key") or default


def run_stage(stage: Stage, key: str, stamps: Path, force: bool = False) -> dict:
    """Run one stage unless its finished record has ``key``; returns {status, key, result_key, seconds}.

    ``force`` deletes the stage's directory and runs it from scratch, and bumps its ``generation``: the key the
    stages after it read changes with it, so they run again too (and stay up to date on the next plain run)."""
    stamp_path = stamps / f"{stage.name}.json"
    stamp = read_json(stamp_path) or {}
    generation = int(stamp.get("generation", 0))
    done = stamp.get("key") == key and stamp.get("status") == "done" and stage.out.exists()
    if done and not force and stage.name not in ALWAYS_RUN:
        console.print(f"[green]{stage.name}[/]: up to date ({key}), skipped")
        return {"status": "skipped", "key": key, "result_key": stamp.get("result_key", key),
                "seconds": stamp.get("seconds")}
    if force:
        console.print(f"[yellow]{stage.name}[/]: --force: deleting {stage.out} and running it from scratch")
        generation += 1
        _remove(stage.out)
    elif stamp.get("key") not in (None, key) and stage.out.exists() and stage.name != "data":
        console.print(f"[yellow]{stage.name}[/]: settings or inputs changed; starting it afresh")
        _remove(stage.out)
    elif stamp.get("status") == "running":
        console.print(f"[yellow]{stage.name}[/]: resuming an interrupted run")
    console.rule(f"[bold]{stage.name}[/] -> {stage.out}")
    stamps.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stamp_path, json.dumps({"key": key, "status": "running", "started": time.time(),
                                              "generation": generation}))
    t0 = time.perf_counter()
    result = runner(stage.name)(stage.cfg)
    seconds = round(time.perf_counter() - t0, 1)
    # the data stage's result is known by its bytes: a rebuild of copied or touched dumps keeps the models after it
    result_key = data_result_key(result, key) if stage.name == "data" and isinstance(result, dict) else key
    if generation:  # a forced rerun: what reads this stage is keyed anew
        result_key = hashlib.sha256(f"{result_key}:{generation}".encode()).hexdigest()[:16]
    write_text_atomic(stamp_path, json.dumps({"key": key, "result_key": result_key, "status": "done",
                                              "seconds": seconds, "finished": time.time(),
                                              "generation": generation}))
    return {"status": "ran", "key": key, "result_key": result_key, "seconds": seconds}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_pipeline(config: str | Path | None = None, out: str | Path | None = None, force: tuple[str, ...] = (),
                 until: str | None = None) -> dict:
    """Run (or resume) the pipeline of ``config``; returns the run summary also written to OUT/pipeline.json."""
    path = Path(config) if config else find_demo_config()
    spec = read_pipeline_file(path)
    stages = plan(spec, Path(out) if out else None)
    run = Path(out or spec.get("out") or "outputs/run")
    planned = [s.name for s in stages]
    for option, names in (("--force", force), ("--until", [until] if until else [])):
        for name in names:
            if name not in STAGES:
                raise StackRLHFError(f"{option} {name}: unknown stage; stages: {', '.join(STAGES)}")
            if name not in planned:
                raise StackRLHFError(f"{option} {name}: {path} does not run that stage (it runs {', '.join(planned)}); "
                                     f"add a `{name}:` section or name one of those")
    console.print(f"[bold]stackrlhf run[/] {path} -> {run}: {', '.join(s.name for s in stages)}")
    keys: dict[str, str] = {}
    summary: dict[str, dict] = {}
    t_run = time.perf_counter()
    for stage in stages:
        if (why := refused(stage)):
            keys[stage.name] = hashlib.sha256(f"refused:{why}".encode()).hexdigest()[:16]
            summary[stage.name] = {"status": "refused", "key": keys[stage.name], "seconds": None,
                                   "out": str(stage.out), "why": why}
            for later in stages:  # the evaluation leaves the stage's model out
                if isinstance(getattr(later.cfg, "model", None), list):
                    later.cfg.model = [m for m in later.cfg.model if not m.endswith(f"={stage.out}")]
            continue
        done = run_stage(stage, stage_key(stage, keys, run), run / ".pipeline", stage.name in force)
        keys[stage.name] = done.pop("result_key")
        summary[stage.name] = {**done, "out": str(stage.out)}
        if stage.name == until:
            break
    result = {"config": str(path), "out": str(run), "seconds": round(time.perf_counter() - t_run, 1),
              "stages": summary}
    write_text_atomic(run / "pipeline.json", json.dumps(result, indent=2) + "\n")
    print_summary(result)
    return result


def refused(stage: Stage) -> str:
    """Why an RL stage of the pipeline does not run: its reward model is below chance on held-out pairs
    (:func:`stackrlhf.stats.below_chance`) and its section does not set
    ``allow_below_chance_reward``. The stage's directory then holds only ``refused.json`` (the report shows it)
    and the evaluation leaves its model out; the other stages run."""
    from stackrlhf.stats import below_chance

    cfg = stage.cfg
    if not isinstance(cfg, PPOConfig) or cfg.allow_below_chance_reward:
        return ""
    why = below_chance(read_json(Path(cfg.reward) / "metrics.json"))
    if why:
        console.print(f"[yellow]{stage.name}[/]: not run: its reward model {cfg.reward} has {why} "
                      "(`allow_below_chance_reward: true` in its section runs it anyway)")
        _remove(stage.out)
        stage.out.mkdir(parents=True)
        write_text_atomic(stage.out / "refused.json", json.dumps({"stage": stage.name, "reward": cfg.reward,
                                                                  "why": why}, indent=2) + "\n")
    return why


def print_summary(result: dict) -> None:
    table = Table(title=f"stackrlhf run: {result['out']} ({result['seconds']:.0f} s)")
    for col in ("stage", "status", "seconds", "output"):
        table.add_column(col)
    for name, s in result["stages"].items():
        table.add_row(name, s["status"], f"{s['seconds']:.0f}" if s.get("seconds") is not None else "", s["out"])
    console.print(table)
    report = result["stages"].get("report")
    if report:
        console.print(f"[bold green]report:[/] {report['out']}")
