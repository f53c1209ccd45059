"""Shared fixtures: the real dumps in ../shared/data/stackexchange and one build of all four sites."""

from __future__ import annotations

import os
from pathlib import Path

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
