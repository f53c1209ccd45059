"""Shared fixtures: builds of the dumps in ../shared/data/stackexchange (or, without them, of a synthetic site of
the same size), a tiny LM, feedback-store URLs. Without the dumps, only the tests that read them are skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import DUMPS_MISSING, SITES, save_tiny_lm, site_dump

DUMP_FIXTURES = {"built_all"}


def pytest_collection_modifyitems(config, items):
    """Without the shared dumps, skip (with the reason) every test that reads them: through the fixture that builds
    all four, or marked ``needs_dumps``; the rest of the suite runs on a synthetic site."""
    if DUMPS_MISSING is None:
        return
    skip = pytest.mark.skip(reason=DUMPS_MISSING)
    for item in items:
        if DUMP_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("needs_dumps"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the user's cache or dump folders, or the network."""
    monkeypatch.setenv("STACKRLHF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STACKRLHF_DUMPS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STACKRLHF_OFFLINE", "1")  # `base: auto` downloads no model package (slow tests may)
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
def site_data(tmp_path_factory) -> Path:
    """``data build`` of one site-sized dump (beer, or a synthetic site without ../shared), once per session: the
    training stages' tests use it."""
    from stackrlhf.data.build import build_dataset
    from stackrlhf.data.config import DataConfig

    out = tmp_path_factory.mktemp("site") / "data"
    build_dataset(DataConfig(dump=[str(site_dump())], out=str(out), progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_lm(site_data, tmp_path_factory) -> Path:
    """A tiny untrained LM whose vocabulary comes from the site's answers (ILQL, eval, feedback tests)."""
    from stackrlhf.data.load import load_split

    texts = list(load_split(site_data, "finetune", "train")["completion"])[:300]
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
