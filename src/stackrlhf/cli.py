"""The ``stackrlhf`` command line: thin wrappers that parse, load a config, and call one stage function."""

from __future__ import annotations

import functools
import sys

import click

from stackrlhf import __version__
from stackrlhf.config import config_options, load_config
from stackrlhf.data.config import DataConfig
from stackrlhf.train.config import PretrainConfig, RMConfig, SFTConfig
from stackrlhf.errors import StackRLHFError
from stackrlhf.rl.config import PPOConfig


def user_errors(func):
    """Turn input errors into one-line messages and a non-zero exit, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (StackRLHFError, ValueError) as exc:
            raise click.ClickException(str(exc).replace("\n", " ")) from exc

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="stackrlhf")
def cli() -> None:
    """RLHF for Stack Exchange question answering: data dump -> SFT -> reward model -> PPO / ILQL."""


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


@cli.command("ask")
@click.argument("model")
@click.argument("question")
@click.option("--title", default="", help="The question's title; QUESTION is then its body.")
@click.option("--max-new-tokens", default=200, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", default=0.7, show_default=True, help="Sampling temperature (0: greedy).")
@click.option("--top-k", default=0, show_default=True, help="Sample among the k most likely tokens (0: off).")
@click.option("--top-p", default=0.95, show_default=True, help="Nucleus sampling mass (1: off).")
@click.option("--repetition-penalty", default=1.0, show_default=True, help="Penalty for repeated tokens.")
@click.option("--seed", default=None, type=int, help="Seed for reproducible sampling.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [cuda if available]")
@user_errors
def ask_cmd(model, question, title, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
            device) -> None:
    """Answer QUESTION with MODEL (a model directory or hub id), streamed token by token."""
    import torch
    import transformers
    from transformers import TextStreamer

    transformers.utils.logging.disable_progress_bar()  # stdout carries the answer alone

    from stackrlhf.models.generation import SamplingConfig, generate
    from stackrlhf.models.loading import load_causal_lm
    from stackrlhf.prompts import format_prompt

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm, tok = load_causal_lm(model, device=device)
    prompt = format_prompt(title, question)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    generate(lm, tok, [prompt], sampling, batch_size=1, seed=seed, streamer=streamer)


@cli.command("rm")
@config_options(RMConfig)
@user_errors
def rm_cmd(config_file, **options) -> None:
    """Train a reward model on answer pairs (Bradley-Terry), from one or more pair datasets.

    Example: stackrlhf rm --data outputs/data --data outputs/feedback --out outputs/rm
    """
    from stackrlhf.train.reward import train_reward_model

    train_reward_model(load_config(RMConfig, config_file, section="rm", **options))


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

    Example: stackrlhf ppo --policy outputs/sft --reward outputs/rm --data outputs/data --out outputs/ppo
    """
    from stackrlhf.rl.ppo import train_ppo

    train_ppo(load_config(PPOConfig, config_file, section="ppo", **options))


def main() -> None:
    cli(prog_name="stackrlhf")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
