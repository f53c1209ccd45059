"""Shared fixtures: the real dumps in ../shared/data/stackexchange and one build of all four sites."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "stackexchange"
SITES = ("beer.stackexchange.com", "cardano.stackexchange.com", "quantumcomputing.stackexchange.com",
         "matheducators.stackexchange.com")

if not (SHARED / SITES[0] / "Posts.xml").is_file():  # pragma: no cover - the checkout is incomplete
    raise RuntimeError(f"the shared Stack Exchange dumps are missing: expected them in {SHARED}")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the user's cache or dump folders, or the network."""
    monkeypatch.setenv("STACKRLHF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STACKRLHF_DUMPS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def built_all(tmp_path_factory) -> Path:
    """``data build`` over the four shared dumps, once per session."""
    from stackrlhf.data.build import build_dataset
    from stackrlhf.data.config import DataConfig

    out = tmp_path_factory.mktemp("data") / "all"
    os.environ.setdefault("STACKRLHF_CACHE", str(tmp_path_factory.mktemp("cache")))
    build_dataset(DataConfig(dump=list(SITES), out=str(out), progress=False))
    return out


@pytest.fixture(scope="session")
def beer_data(tmp_path_factory) -> Path:
    """``data build`` of the beer dump alone, once per session (the training stages' tests use it)."""
    from stackrlhf.data.build import build_dataset
    from stackrlhf.data.config import DataConfig

    out = tmp_path_factory.mktemp("beer") / "data"
    build_dataset(DataConfig(dump=["beer"], out=str(out), progress=False))
    return out


def read_parquet_rows(root: Path, dataset: str, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(root / dataset / f"{split}-00000-of-00001.parquet").to_pylist()


def save_tiny_lm(texts: list[str], out: Path) -> Path:
    """A randomly initialised 2-layer GPT-2 with a 400-token BPE vocabulary learned from ``texts``, saved."""
    import torch

    from stackrlhf.models.base import make_model, train_tokenizer

    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    model = make_model("tiny", tok)
    model.transformer.h = model.transformer.h[:2]
    model.config.n_layer = 2
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_lm(beer_data, tmp_path_factory) -> Path:
    """A tiny untrained LM whose vocabulary comes from beer answers (ILQL, eval, feedback tests)."""
    from stackrlhf.data.load import load_split

    texts = list(load_split(beer_data, "finetune", "train")["completion"])[:300]
    return save_tiny_lm(texts, tmp_path_factory.mktemp("tiny-lm") / "tiny")


# ---------------------------------------------------------------- database servers for the feedback store

POSTGRES_URL = os.environ.get("STACKRLHF_TEST_POSTGRES_URL", "")  # a server's admin URL; `.ci/postgres.sh` starts one


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh feedback-store URL: an SQLite file, and a new database on the PostgreSQL server that `.ci/run`
    starts (`STACKRLHF_TEST_POSTGRES_URL`). CI sets STACKRLHF_REQUIRE_SERVICES=1, so there a missing server
    fails the run instead of skipping these cases."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
        return
    if not POSTGRES_URL:
        message = "no PostgreSQL server: `eval $(bash .ci/postgres.sh)` starts one on loopback and sets the URL"
        if os.environ.get("STACKRLHF_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    import uuid

    import sqlalchemy

    name = f"stackrlhf_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


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
