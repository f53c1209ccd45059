"""The one channel for what the tool tells its user: notes, warnings and summaries go to stderr through
:data:`console` (rich), Python warnings (``warnings.warn``, a library's deprecations) through it too once the
command line has called :func:`configure`. Results a command prints for a script to read (a model path, JSON)
go to stdout with ``click.echo``.

``stackrlhf --quiet``: warnings and errors only; ``--verbose``: also the libraries' informational logs."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)
_always = Console(stderr=True)  # warnings: shown even with --quiet


def warn(message: str) -> None:
    """A warning on stderr (shown even with --quiet)."""
    _always.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True, markup=True)


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Route Python warnings and logging through the console at the verbosity asked for."""
    console.quiet = quiet
    handler = RichHandler(console=_always, show_time=False, show_path=verbose, markup=False)
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    if not verbose:
        for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
