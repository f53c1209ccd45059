"""What several test modules use: the repository's paths, the shared dumps, a tiny LM, a real annotation server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from stackrlhf.data.schema import shard_file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "stackexchange"
SITES = ("beer.stackexchange.com", "cardano.stackexchange.com", "quantumcomputing.stackexchange.com",
         "matheducators.stackexchange.com")

DUMPS_MISSING = (None if all((SHARED / site / "Posts.xml").is_file() for site in SITES) else
                 f"the shared Stack Exchange dumps are not in {SHARED}: clone this repository beside ../shared")


def read_parquet_rows(root: Path, dataset: str, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(root / dataset / shard_file(split)).to_pylist()


def save_tiny_lm(texts: list[str], out: Path) -> Path:
    """A randomly initialised 2-layer GPT-2 with a 400-token BPE vocabulary learned from ``texts``, saved."""
    import torch

    from stackrlhf.models.offline_base import make_model, train_tokenizer

    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    model = make_model("tiny", tok)
    model.transformer.h = model.transformer.h[:2]
    model.config.n_layer = 2
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


# ---------------------------------------------------------------- a real annotation server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "stackrlhf", "feedback", "serve", "--db", db, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not start: {proc.stderr.read().decode()[-2000:]}")
