"""`data build --workers N`: the XML cut into byte ranges and the join split into buckets across processes give
the same files as one worker, and bad input is still reported with the file's own line numbers."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import SHARED, site_dump
from stackrlhf.data.build import build_dataset
from stackrlhf.data.config import DataConfig
from stackrlhf.data.xml_rows import MIN_RANGE_BYTES, iter_rows, row_ranges
from stackrlhf.errors import DumpError

SITES = ["beer.stackexchange.com", "quantumcomputing.stackexchange.com"]
TIMINGS = {"seconds", "posts_mb_per_s", "parse_mb_per_s", "stage_seconds", "join_seconds", "workers", "build_key"}


def build(tmp_path, workers: int) -> tuple[dict, dict[str, bytes]]:
    out = tmp_path / f"w{workers}"
    # 1 MB buckets: 3 and 4 buckets for these two sites, so the join is spread too; votes: Votes.xml in ranges
    cfg = DataConfig(dump=[str(SHARED / s) for s in SITES], out=str(out), progress=False, workers=workers,
                     join_bucket_mb=1, upvotes_from="votes")
    stats = build_dataset(cfg)
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}
    return stats, files


@pytest.mark.needs_dumps
def test_any_number_of_workers_writes_the_same_files(tmp_path):
    one_stats, one = build(tmp_path, 1)
    assert one_stats["workers"] == 1
    assert len([f for f in one if f.startswith("reward/train-")]) == 7  # one shard per (site, bucket)
    assert sum(one_stats["splits"].values()) > 1000
    for workers in (2, 3):
        stats, files = build(tmp_path, workers)
        assert stats["workers"] == workers
        assert files.keys() == one.keys()
        assert [f for f in files if files[f] != one[f]] == []  # byte for byte
        assert {k: v for k, v in stats.items() if k not in TIMINGS} == \
               {k: v for k, v in one_stats.items() if k not in TIMINGS}


@pytest.mark.parametrize("name", ["Posts.xml", "Votes.xml", "Users.xml"])
@pytest.mark.parametrize("parts", [2, 3, 16])
def test_ranges_cover_every_row_once(name, parts):
    path = site_dump() / name
    spans = row_ranges(path, parts)
    assert len(spans) == max(1, min(parts, path.stat().st_size // MIN_RANGE_BYTES))
    assert spans[0][0] == 0 and spans[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    data = path.read_bytes()
    assert all(data[start - 1:start] == b"\n" for start, _ in spans[1:])  # each cut at a line's start
    whole = [dict(r) for r in iter_rows(path)]
    assert [dict(r) for span in spans for r in iter_rows(path, span=span)] == whole


def test_a_small_or_non_utf8_file_is_one_range(tmp_path):
    small = tmp_path / "Posts.xml"
    small.write_bytes(b'<?xml version="1.0" encoding="utf-8"?>\n<posts>\n  <row Id="1" />\n</posts>\n')
    assert row_ranges(small, 4) == [(0, small.stat().st_size)]
    latin = tmp_path / "latin.xml"
    latin.write_bytes(b'<?xml version="1.0" encoding="ISO-8859-1"?>\n<posts>\n'
                      + b'  <row Id="1" Body="caf\xe9" />\n' * 1000 + b"</posts>\n")
    assert row_ranges(latin, 4) == [(0, latin.stat().st_size)]


def copy_dump(tmp_path, posts: bytes):
    folder = tmp_path / site_dump().name
    shutil.copytree(site_dump(), folder)
    (folder / "Posts.xml").write_bytes(posts)
    return folder


@pytest.mark.parametrize("workers", [1, 3])
def test_an_error_late_in_the_file_names_its_own_line(tmp_path, workers):
    lines = (site_dump() / "Posts.xml").read_bytes().splitlines(keepends=True)
    bad = len(lines) * 9 // 10  # in the last of 3 ranges
    lines[bad] = b'  <row Id="99999" PostTypeId="1" Body=oops />\n'
    folder = copy_dump(tmp_path, b"".join(lines))
    with pytest.raises(DumpError, match=rf"Posts.xml: line {bad + 1}: malformed XML"):
        build_dataset(DataConfig(dump=[str(folder)], out=str(tmp_path / "out"), progress=False, workers=workers))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("workers", [1, 3])
def test_a_file_cut_at_a_row_boundary_is_still_truncated(tmp_path, workers):
    data = (site_dump() / "Posts.xml").read_bytes()
    cut = data.rindex(b"\n", 0, len(data) // 2) + 1  # whole rows, no closing </posts>
    folder = copy_dump(tmp_path, data[:cut])
    with pytest.raises(DumpError, match="truncated"):
        build_dataset(DataConfig(dump=[str(folder)], out=str(tmp_path / "out"), progress=False, workers=workers))


def test_stats_say_how_many_workers_ran(tmp_path):
    out = tmp_path / "out"
    build_dataset(DataConfig(dump=[str(site_dump())], out=str(out), progress=False, workers=2))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["workers"] == 2 and stats["stage_seconds"] > 0 and stats["join_seconds"] > 0
