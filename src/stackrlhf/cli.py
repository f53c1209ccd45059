"""The ``stackrlhf`` command line: thin wrappers that parse, load a config, and call one stage function."""

from __future__ import annotations

import functools
import sys

import click

from stackrlhf import __version__
from stackrlhf.config import config_options, load_config
from stackrlhf.data.config import DataConfig
from stackrlhf.errors import StackRLHFError


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


def main() -> None:
    cli(prog_name="stackrlhf")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
