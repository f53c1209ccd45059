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
