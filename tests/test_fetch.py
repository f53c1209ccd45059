"""Downloads against a local HTTP server on 127.0.0.1, archives, and dump lookup order."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import py7zr
import pytest
from click.testing import CliRunner

from helpers import SHARED, site_dump
from http_server import FileServer
from stackrlhf.cli import cli
from stackrlhf.data.dumps import resolve_dump
from stackrlhf.data.fetch import download, fetch_site
from stackrlhf.errors import DumpError

SITE = site_dump().name


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory) -> Path:
    """A real `<site>.7z` in the official layout, built from a site-sized dump."""
    root = tmp_path_factory.mktemp("served")
    with py7zr.SevenZipFile(root / f"{SITE}.7z", "w") as z:
        for name in ("Posts.xml", "Votes.xml", "Users.xml"):
            z.write(site_dump() / name, arcname=name)
    return root


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_site_downloads_and_unpacks(tmp_path, archive_dir):
    with FileServer(archive_dir) as srv:
        result = CliRunner().invoke(cli, ["data", "fetch", "--site", SITE, "--cache", str(tmp_path),
                                          "--base-url", srv.url, "--no-progress"])
    assert result.exit_code == 0, result.output
    folder = Path(result.output.strip().splitlines()[-1])
    assert folder == tmp_path / SITE
    assert sha(folder / "Posts.xml") == sha(site_dump() / "Posts.xml")
    assert srv.requests == [(f"/{SITE}.7z", None)]
    # already there: no second request
    with FileServer(archive_dir) as srv2:
        assert fetch_site(SITE, tmp_path, srv2.url, progress=False) == folder
    assert srv2.requests == []


def test_download_resumes_a_partial_file(tmp_path, archive_dir):
    src = archive_dir / f"{SITE}.7z"
    dest = tmp_path / f"{SITE}.7z"
    half = src.stat().st_size // 2
    (tmp_path / f"{SITE}.7z.part").write_bytes(src.read_bytes()[:half])
    with FileServer(archive_dir) as srv:
        download(f"{srv.url}/{SITE}.7z", dest, progress=False)
    assert srv.requests == [(f"/{SITE}.7z", f"bytes={half}-")]
    assert sha(dest) == sha(src)
    assert not (tmp_path / f"{SITE}.7z.part").exists()


def test_download_retries_server_errors_and_dropped_connections(tmp_path, archive_dir):
    src = archive_dir / f"{SITE}.7z"
    with FileServer(archive_dir, fail_first=2) as srv:
        download(f"{srv.url}/{SITE}.7z", tmp_path / "a.7z", backoff_s=0.01, progress=False)
    assert len(srv.requests) == 3 and sha(tmp_path / "a.7z") == sha(src)
    cut = src.stat().st_size // 2  # the connection drops halfway
    assert cut > 4 << 12
    with FileServer(archive_dir, cut_after=cut) as srv:
        download(f"{srv.url}/{SITE}.7z", tmp_path / "b.7z", backoff_s=0.01, chunk_bytes=1 << 12, progress=False)
    assert srv.requests[0][1] is None and len(srv.requests) == 2
    resumed_at = int(srv.requests[1][1].removeprefix("bytes=").rstrip("-"))
    assert cut - (1 << 12) <= resumed_at <= cut  # kept what arrived, asked only for the rest
    assert sha(tmp_path / "b.7z") == sha(src)


def test_download_gives_up_with_a_clear_error(tmp_path, archive_dir):
    with FileServer(archive_dir, fail_first=100) as srv:
        with pytest.raises(DumpError, match="failed after 3 attempts.*HTTP 503"):
            download(f"{srv.url}/{SITE}.7z", tmp_path / "x.7z", retries=2, backoff_s=0.01, progress=False)
    assert not (tmp_path / "x.7z").exists()


def test_build_from_a_url(tmp_path, archive_dir):
    with FileServer(archive_dir) as srv:
        result = CliRunner().invoke(cli, ["data", "build", "--dump", f"{srv.url}/{SITE}.7z", "--out",
                                          str(tmp_path / "out"), "--cache", str(tmp_path / "c"),
                                          "--no-progress"])
    assert result.exit_code == 0, result.output
    import json

    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    from xml.etree import ElementTree

    kinds = [row.get("PostTypeId") for row in ElementTree.parse(site_dump() / "Posts.xml").getroot()]
    assert stats["sites"][SITE]["questions"] == kinds.count("1")
    assert stats["sites"][SITE]["answers"] == kinds.count("2")


def test_lookup_order_explicit_then_env_then_shared(tmp_path, monkeypatch, archive_dir):
    # explicit folder
    assert resolve_dump(site_dump()).folder == site_dump()
    # explicit .7z: unpacked to the cache
    d = resolve_dump(archive_dir / f"{SITE}.7z", cache_dir=tmp_path / "c")
    assert d.site == SITE and (d.folder / "Posts.xml").is_file() and tmp_path / "c" in d.folder.parents
    # by name: $STACKRLHF_DUMPS wins over the shared folder
    mine = tmp_path / "dumps" / SITE
    mine.mkdir(parents=True)
    shutil.copy(site_dump() / "Posts.xml", mine / "Posts.xml")
    monkeypatch.setenv("STACKRLHF_DUMPS", str(tmp_path / "dumps"))
    assert resolve_dump(SITE).folder == mine
    # not anywhere and downloads off: a clear error
    with pytest.raises(DumpError, match="no dump found"):
        resolve_dump("nosuchsite", cache_dir=tmp_path / "c", download_missing=False)


@pytest.mark.needs_dumps
def test_a_short_name_finds_the_shared_folder():
    assert resolve_dump("beer").folder.resolve() == (SHARED / "beer.stackexchange.com").resolve()


def test_unknown_site_downloads_from_base_url(tmp_path, archive_dir):
    (archive_dir / "other.stackexchange.com.7z").write_bytes((archive_dir / f"{SITE}.7z").read_bytes())
    with FileServer(archive_dir) as srv:
        d = resolve_dump("other", cache_dir=tmp_path, base_url=srv.url)
    assert d.site == "other.stackexchange.com" and (d.folder / "Posts.xml").is_file()


@pytest.mark.needs_dumps
def test_demo_sites_download_on_a_clone_without_shared(tmp_path, monkeypatch):
    """A connected user's fresh clone (no ../shared, no $STACKRLHF_DUMPS): the demo's data section names its
    four sites, so the build downloads them (here from a local server standing in for archive.org)."""
    import stackrlhf.data.dumps as dumps
    from stackrlhf.config import load_config
    from stackrlhf.data.build import build_dataset
    from stackrlhf.data.config import DataConfig

    from helpers import REPO, SITES

    served = tmp_path / "served"
    served.mkdir()
    for site in SITES:
        with py7zr.SevenZipFile(served / f"{site}.7z", "w") as z:
            for name in ("Posts.xml", "Votes.xml", "Users.xml"):
                if (SHARED / site / name).is_file():
                    z.write(SHARED / site / name, arcname=name)
    monkeypatch.setattr(dumps, "shared_dump_dirs", lambda: [])  # as on a clone with nothing beside it
    with FileServer(served) as srv:
        cfg = load_config(DataConfig, REPO / "configs" / "demo.yaml", section="data", base_url=srv.url,
                          out=str(tmp_path / "data"), cache=str(tmp_path / "cache"), progress=False)
        assert sorted(cfg.dump) == ["beer", "cardano", "matheducators", "quantumcomputing"]
        build_dataset(cfg)
    assert len(list((tmp_path / "cache").rglob("Posts.xml"))) == 4  # all four fetched and unpacked
    assert (tmp_path / "data" / "stats.json").is_file()
