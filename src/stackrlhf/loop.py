"""``stackrlhf loop``: one turn of the continual feedback loop, and the registry of the versions it made.

A turn has two halves, because people label in between:
1. queue answers of the current policy (version n) for annotation, as feedback batch ``vN``;
2. once that batch has ``min_labels`` labels: export every label so far, retrain the RM on votes + human pairs,
   run the RL step (RLOO by default; ``vN+1/<algorithm>``) from the current policy with the new RM, evaluate the
   new policy against v0 (and its parent, and
   best-of-n from v0), by the proxy RM, the gold RM and a fixed judge when given, and register
   it as version n+1 (its model, RM, parent, data, metrics).
``stackrlhf loop`` does whichever half is due. Each training step is a pipeline stage with its own record in
``vN+1/.pipeline``, so a killed turn resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stackrlhf.config import config_from_dict, read_json, read_yaml_mapping, save_config, write_text_atomic
from stackrlhf.data.schema import shard_file
from stackrlhf.errors import StackRLHFError
from stackrlhf.evaluate.config import EvalConfig
from stackrlhf.feedback import DEFAULT_DB
from stackrlhf.pipeline import Stage, data_result_key, run_stage, stage_key
from stackrlhf.rl.config import PPOConfig
from stackrlhf.train.config import RMConfig
from stackrlhf.console import console

REGISTRY_FILE = "registry.json"
# The loop's RL step unless its `ppo` section names an algorithm. RLOO, not PPO: from the same turn-1 RM and the
# same 192 answers, PPO's cold critic gained +0.04 proxy reward in two seeds, RLOO +0.10 and +0.20 (docs/results-archive.md,
# 2026-12-02). 16 prompts x 4 answers, one pass in minibatches of 16: Adam moves each trained weight about the
# learning rate a step whatever the gradient's noise, so a step averages many answers and takes few optimiser steps.
LOOP_RL_DEFAULTS = {"algorithm": "rloo", "rloo_k": 4, "prompts_per_step": 16, "ppo_epochs": 1, "mini_batch_size": 16}
SETTINGS_FILE = "loop.yaml"


@dataclass
class LoopConfig:
    """The registry's settings, saved in ``REGISTRY/loop.yaml`` by the first turn and read by the next ones."""
    data: str = field(default="", metadata={"help": "The votes: a `stackrlhf data build` output (pairs, rl prompts)."})
    db: str = field(default=DEFAULT_DB, metadata={"help": "SQLAlchemy URL of the feedback store."})
    gold_reward: str = field(default="", metadata={
        "help": "A held-out judge for the evaluation (an RM trained with --pairs-half gold); optional."})
    judge: str = field(default="", metadata={
        "help": "A fixed judge every version is scored by (rm:DIR or reference; see `eval --judge`); optional."})
    judge_length_neutral: bool = field(default=False, metadata={"help": "Take the judge's trend in length off."})
    rm_votes: bool = field(default=True, metadata={
        "help": "Train each turn's RM on the data's vote pairs as well as on every label so far (false: labels only)."})
    best_of: list[int] = field(default_factory=list, metadata={
        "help": "Best-of-n from v0 under each turn's RM, evaluated beside the versions (the baseline RL must beat "
                "at equal KL), e.g. [4, 16]."})
    min_labels: int = field(default=20, metadata={"help": "Labels of the queued batch needed before a turn trains."})
    questions: int = field(default=20, metadata={"help": "Questions queued per turn (from the rl split)."})
    answers_per_question: int = field(default=2, metadata={"help": "Candidate answers per queued question (K)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Most tokens per answer: the queued ones, the RL "
                                                      "step's (every rollout this long, unless its `ppo` section "
                                                      "says otherwise) and the evaluation's."})
    max_prompt_tokens: int = field(default=128, metadata={"help": "Longer prompts are cut in the middle: the same "
                                                          "cut for the queued answers, the RL step and the "
                                                          "evaluation (unless their sections say otherwise)."})
    label_pairs: str = field(default="one", metadata={
        "help": "The pairs a label gives the RM (`feedback export --label-pairs`): one (the pick against the "
                "lowest-rated answer) or all (the whole K-way choice and the ratings, a label counting once)."})
    picks_coef: float = field(default=0.0, metadata={
        "help": "The RL step also imitates the annotators' picks (the chosen answer of every label so far), "
                "this weight x their per-token NLL added to each optimiser step's loss (PPOConfig.sft_coef; "
                "0: off)."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of the queued answers."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass of the queued answers."})
    rm: dict = field(default_factory=dict, metadata={"cli": False,  # sections of the --config file
                                                     "help": "RMConfig settings (data and out are filled in)."})
    ppo: dict = field(default_factory=dict, metadata={
        "cli": False, "help": "PPOConfig settings (model, reward, data and out are filled in). Without an "
                              "`algorithm` the loop's RL step is RLOO with k = 4 answers to 16 prompts a step "
                              "(LOOP_RL_DEFAULTS)."})
    eval: dict = field(default_factory=dict, metadata={
        "cli": False, "help": "EvalConfig settings (models, judges and out are filled in)."})

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("the loop needs --data: a `stackrlhf data build` output")
        if self.label_pairs not in ("one", "all"):
            raise ValueError(f"label_pairs {self.label_pairs!r}: one or all")
        if self.picks_coef < 0:
            raise ValueError("picks_coef must be >= 0")
        if self.min_labels < 1:
            raise ValueError("min_labels must be at least 1")
        if isinstance(self.best_of, int):
            self.best_of = [self.best_of]
        if any(n < 2 for n in self.best_of):
            raise ValueError(f"best_of {self.best_of}: every n must be at least 2")


def _load(registry: Path) -> dict:
    path = registry / REGISTRY_FILE
    if not path.is_file():
        return {"versions": [], "pending": None}
    return json.loads(path.read_text())


def _save(registry: Path, reg: dict) -> None:
    write_text_atomic(registry / REGISTRY_FILE, json.dumps(reg, indent=2) + "\n")


def _settings(registry: Path, overrides: dict, config_file: str | None) -> LoopConfig:
    values: dict = {}
    saved = registry / SETTINGS_FILE
    if saved.is_file():
        values.update(read_yaml_mapping(saved, "loop settings"))
    if config_file:
        values.update(read_yaml_mapping(Path(config_file), "loop config"))
    values.update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()
                   if v is not None and v != "" and v != ()})  # an option not given keeps the saved setting
    cfg = config_from_dict(LoopConfig, values, f"loop settings ({saved})")
    save_config(cfg, saved)
    return cfg


def batch_labels(db: str, batch: str) -> int:
    """Labels (skips excluded) given to the tasks of one feedback batch."""
    from stackrlhf.feedback.store import FeedbackStore

    store = FeedbackStore(db)
    tasks = {t.id for t in store.all_tasks() if t.batch == batch}
    return sum(1 for label in store.all_labels() if label.task_id in tasks and not label.skipped)


def loop_turn(registry: str | Path, policy: str = "", reward: str = "", config_file: str | None = None,
              **overrides) -> dict:
    """Do the half of a turn that is due; returns {"action": "queued" | "waiting" | "registered", ...}."""
    from stackrlhf.feedback.queue import queue_tasks
    from stackrlhf.models.generation import SamplingConfig

    registry = Path(registry)
    registry.mkdir(parents=True, exist_ok=True)
    reg = _load(registry)
    if not reg["versions"]:
        if not policy:
            raise StackRLHFError(f"{registry} holds no version yet: start it with --model SFT_DIR "
                                 "(and --reward RM_DIR, the RM that goes with it, if there is one)")
        cfg = _settings(registry, overrides, config_file)
        reg["versions"].append({"version": 0, "model": str(policy), "rm": str(reward) if reward else "",
                                "parent": None, "data": [cfg.data], "labels": 0,
                                "created": dt.datetime.now().isoformat(),
                                "metrics": _rm_metrics(Path(reward)) if reward else {}})
        _save(registry, reg)
    elif policy or reward:
        raise StackRLHFError(f"{registry} already has versions; --model/--reward only start an empty registry")
    cfg = _settings(registry, overrides, config_file)
    current = reg["versions"][-1]
    n = current["version"]
    batch = f"v{n}"
    if reg["pending"] is None:
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_prompt_tokens=cfg.max_prompt_tokens)
        queued = queue_tasks(cfg.db, [f"{batch}={current['model']}"], "rl", cfg.questions, cfg.answers_per_question,
                             False, sampling, cfg.data, seed=n, batch=batch)
        reg["pending"] = {"batch": batch, "tasks": queued["tasks"], "queued": dt.datetime.now().isoformat()}
        _save(registry, reg)
        console.print(f"queued {queued['tasks']} tasks of version {n}'s answers (batch {batch}) in {cfg.db}; "
                      f"annotate them (`stackrlhf feedback serve --db {cfg.db}`), then run `stackrlhf loop` again")
        return {"action": "queued", "batch": batch, "tasks": queued["tasks"]}
    labels = batch_labels(cfg.db, batch)
    if labels < cfg.min_labels:
        console.print(f"batch {batch}: {labels} of the {cfg.min_labels} labels needed; waiting for annotators")
        return {"action": "waiting", "batch": batch, "labels": labels, "needed": cfg.min_labels}
    return _train_turn(registry, reg, cfg, current, labels)


def _rm_metrics(rm: Path) -> dict:
    m = read_json(rm / "metrics.json") or {}
    return {k: m[k] for k in ("accuracy", "baseline_longer_wins", "accuracy_shorter_better") if k in m}


def rl_settings(cfg: LoopConfig, turn: int = 1) -> dict:
    """The loop's RL step settings: its ``ppo`` section, over :data:`LOOP_RL_DEFAULTS` unless it names an
    algorithm, over the answers' and prompts' budgets of the queue (training, labels and evaluation see the same
    inputs: every rollout as long as a queued answer). bonbon stops at the KL of iterated best-of-k: turn n
    distils best-of-k of turn n - 1, so it may be as far from v0 as best-of-k^n, log k^n - (k^n - 1) / k^n."""
    rl = {"min_new_tokens": cfg.max_new_tokens, "max_new_tokens": cfg.max_new_tokens,
          "max_prompt_tokens": cfg.max_prompt_tokens,
          **({} if "algorithm" in cfg.ppo else LOOP_RL_DEFAULTS), **cfg.ppo}
    if "algorithm" not in cfg.ppo and "mini_batch_size" not in cfg.ppo:  # fewer prompts a step: minibatches that fit
        from math import gcd

        answers = int(rl["prompts_per_step"]) * int(rl["rloo_k"])
        rl["mini_batch_size"] = gcd(answers, int(rl["mini_batch_size"]))
    if rl.get("algorithm") == "bonbon" and "kl_budget" not in rl:
        from stackrlhf.rl.bonbon import best_of_n_kl

        rl["kl_budget"] = best_of_n_kl(float(rl.get("rloo_k", PPOConfig.rloo_k)) ** turn)
    return rl


def turn_stages(reg: dict, cfg: LoopConfig, current: dict, n: int, vdir: Path, feedback: Path):
    """Turn n's stages (RM on the labels so far, the RL step from the current version in ``vN/<algorithm>``, eval
    against v0) and the RM's data. Each turn draws its own prompts and samples (the RL step's seed is offset by the
    version: the same seed would replay turn 1's prompt order and random numbers), and with a gold judge the RM
    learns only from the proxy half of the vote pairs (the gold RM's half stays held out; labels are always kept).
    KL is measured to v0 in every turn (the RL step's reference), so the controller holds the drift from v0, not
    from the parent. The registry's ``eval-cache`` keeps v0's and the parent's answers and v0's best-of-n pool: a
    turn samples only its new version."""
    v0 = reg["versions"][0]["model"]
    rl = rl_settings(cfg, n)
    if cfg.picks_coef:  # the annotators' picks so far, imitated beside the RL loss
        rl |= {"sft_data": str(feedback), "sft_coef": cfg.picks_coef}
    policy = vdir / rl.get("algorithm", "ppo")
    models = [f"v0={v0}"] + ([f"v{n - 1}={current['model']}"] if n > 1 else []) + [f"v{n}={policy}"]
    models += [f"bon{k}=bon:{k}@{v0}" for k in cfg.best_of]
    rm_data = [cfg.data, str(feedback)] if cfg.rm_votes else [str(feedback)]
    rm_half = cfg.rm.get("pairs_half", "proxy" if cfg.gold_reward else "all")
    stages = [
        Stage("rm", config_from_dict(RMConfig, {"label_weight": -1, **cfg.rm, "data": rm_data, "pairs_half": rm_half,
                                            "out": str(vdir / "rm")},
                                     "loop rm settings"),
              ["data", "feedback"], vdir / "rm"),
        Stage("rl", config_from_dict(PPOConfig, {**rl, "seed": int(cfg.ppo.get("seed", 0)) + n,
                                                 "model": current["model"], "reference": v0, "reward": str(vdir / "rm"),
                                                 "data": cfg.data, "out": str(policy)}, "loop ppo settings"),
              ["data", "rm"] + (["feedback"] if cfg.picks_coef else []), policy, [current["model"]]),
        # every version is compared with v0 (win rates, KL), beside best-of-n from v0 under this turn's RM
        Stage("eval", config_from_dict(EvalConfig, {"answer_cache": str(vdir.parent / "eval-cache"),
                                                    "max_new_tokens": cfg.max_new_tokens,
                                                    "max_prompt_tokens": cfg.max_prompt_tokens, **cfg.eval,
                                                    "model": models, "baseline": "v0", "reference": v0,
                                                    "data": cfg.data, "reward": str(vdir / "rm"),
                                                    "gold_reward": cfg.gold_reward, "judge": cfg.judge,
                                                    "judge_length_neutral": cfg.judge_length_neutral,
                                                    "out": str(vdir / "eval")}, "loop eval settings"),
              ["data", "rm", "rl"], vdir / "eval", [cfg.gold_reward, v0]),
    ]
    return stages, rm_data


def _train_turn(registry: Path, reg: dict, cfg: LoopConfig, current: dict, labels: int) -> dict:
    from stackrlhf.feedback.export import export_feedback
    from stackrlhf.feedback.store import FeedbackStore

    n = current["version"] + 1
    vdir = registry / f"v{n}"
    feedback = vdir / "feedback"
    summary = export_feedback(FeedbackStore(cfg.db), feedback, label_pairs=cfg.label_pairs)
    pairs_blob = (feedback / "reward" / shard_file("train")).read_bytes()
    keys = {"data": data_result_key(json.loads((Path(cfg.data) / "stats.json").read_text()), cfg.data),
            "feedback": hashlib.sha256(pairs_blob).hexdigest()[:16]}
    stamps = vdir / ".pipeline"
    stages, rm_data = turn_stages(reg, cfg, current, n, vdir, feedback)
    for stage in stages:
        keys[stage.name] = run_stage(stage, stage_key(stage, keys, vdir), stamps)["result_key"]
    policy = next(s.out for s in stages if s.name == "rl")
    ev = json.loads((vdir / "eval" / "eval.json").read_text())
    wanted = ("reward_", "win_rate_", "kl_", "gain_", "length_")
    pick = lambda m: {k: v for k, v in m.items() if k.startswith(wanted)}  # noqa: E731
    metrics = {"rm": _rm_metrics(vdir / "rm"), **pick(ev["models"][f"v{n}"]),
               "v0": pick(ev["models"]["v0"]),
               "best_of": {f"bon{k}": pick(ev["models"][f"bon{k}"]) for k in cfg.best_of},
               "rl": json.loads((policy / "metrics.json").read_text())}
    reg["versions"].append({"version": n, "model": str(policy), "rm": str(vdir / "rm"),
                            "parent": current["version"], "data": rm_data,
                            "labels": labels, "feedback_pairs": summary["pairs"],
                            "created": dt.datetime.now().isoformat(), "metrics": metrics})
    reg["pending"] = None
    _save(registry, reg)
    console.print(f"[green]registered version {n}[/]: {policy} (RM on {'votes + ' if cfg.rm_votes else ''}"
                  f"{summary['pairs']} labelled pairs, {summary.get('pairs_simulated', 0)} of them simulated)")
    return {"action": "registered", "version": n, "model": str(policy)}


def loop_status(registry: str | Path) -> dict:
    """Print the versions and their metrics as a table; returns the registry."""
    reg = _load(Path(registry))
    if not reg["versions"]:
        raise StackRLHFError(f"{registry} holds no version; start it with `stackrlhf loop --registry {registry} "
                             f"--model SFT_DIR --reward RM_DIR --data DATA`")
    table = Table(title=f"stackrlhf loop: {registry}")
    for col in ("version", "parent", "created", "labels", "RM acc", "proxy reward", "gold reward", "judge",
                "judge win vs v0", "KL to v0", "model"):
        table.add_column(col)
    for v in reg["versions"]:
        m = v["metrics"]
        win = m.get("win_rate_judge_vs_v0")
        acc = (m.get("rm") or m).get("accuracy")

        def f(x, fmt="{:.3f}"):
            return "" if x is None else fmt.format(x)

        table.add_row(str(v["version"]), "" if v["parent"] is None else str(v["parent"]), v["created"][:16],
                      str(v["labels"]), f(acc), f(m.get("reward_proxy")), f(m.get("reward_gold")),
                      f(m.get("reward_judge")), f(win, "{:.2f}"),
                      f(m.get("kl_to_reference"), "{:.2f}"), v["model"])
    Console().print(table)
    if reg["pending"]:
        Console().print(f"pending: batch {reg['pending']['batch']} ({reg['pending']['tasks']} tasks) awaits labels")
    return reg
