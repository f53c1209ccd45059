"""Benchmark of `stackrlhf data build`: MB/s of Posts.xml end to end and peak RSS, on a shared dump (1x)
and on a Posts.xml 10x larger synthesised from it (rows repeated with new ids).

Side by side: lxml iterparse alone over the same file (the floor of any streaming reader) and
html-to-markdown alone over its bodies. Each build runs in its own process, on one core, so its
peak RSS is its own. Last line: ``mb_per_s=<1x> rss_ratio_10x=<peak RSS at 10x / at 1x>``.

    python benchmarks/data_pipeline.py [--site quantumcomputing.stackexchange.com] [--factor 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "stackexchange"
_ID_ATTRS = re.compile(rb'\b(Id|ParentId|AcceptedAnswerId)="(\d+)"')


def synthesise(src: Path, dst: Path, factor: int) -> None:
    """Write ``factor`` copies of src's rows, copy k shifting every post id by k * (max id + 1)."""
    lines = src.read_bytes().splitlines(keepends=True)
    rows = [ln for ln in lines if ln.lstrip().startswith(b"<row ")]
    head = [ln for ln in lines[:3] if not ln.lstrip().startswith(b"<row ")]
    max_id = max(int(m.group(2)) for ln in rows for m in _ID_ATTRS.finditer(ln))
    with open(dst, "wb") as out:
        out.writelines(head)
        for k in range(factor):
            shift = k * (max_id + 1)
            for ln in rows:
                out.write(_ID_ATTRS.sub(lambda m, shift=shift: b'%s="%d"' % (m.group(1), int(m.group(2)) + shift), ln))
        out.write(b"</posts>\n")


def run_build(dump: Path, out: Path) -> tuple[float, float, int]:
    """(build seconds, process seconds, peak RSS bytes) of one `data build` in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "stackrlhf.cli", "data", "build", "--dump", str(dump), "--out", str(out),
           "--no-progress", "--threads", "1", "--memory-limit", "1GB"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"build failed: {proc.stderr.read().decode()}")
    stats = json.loads((out / "stats.json").read_text())
    return stats["seconds"], wall, usage.ru_maxrss * 1024


def iterparse_only(posts: Path) -> float:
    from lxml import etree

    start = time.perf_counter()
    for _, el in etree.iterparse(str(posts), events=("end",), tag="row", huge_tree=True):
        el.get("Body")
        el.clear()
    return time.perf_counter() - start


def markdown_only(posts: Path) -> tuple[float, float | None]:
    """Seconds of html-to-markdown and (if installed) markdownify over every body of ``posts``."""
    from lxml import etree

    from stackrlhf.data.markdown import html_to_md

    bodies = []
    for _, el in etree.iterparse(str(posts), events=("end",), tag="row"):
        bodies.append(el.get("Body") or "")
        el.clear()
    start = time.perf_counter()
    for b in bodies:
        html_to_md(b)
    ours = time.perf_counter() - start
    try:
        import markdownify
    except ImportError:
        return ours, None
    start = time.perf_counter()
    for b in bodies:
        markdownify.markdownify(b)
    return ours, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--site", default="quantumcomputing.stackexchange.com")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    src = SHARED / args.site / "Posts.xml"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = tmp / args.site
        one.mkdir()
        shutil.copy(src, one / "Posts.xml")
        big = tmp / f"x{args.factor}" / args.site
        big.mkdir(parents=True)
        synthesise(src, big / "Posts.xml", args.factor)
        rows = []
        results = {}
        for label, folder in (("1x", one), (f"{args.factor}x", big)):
            mb = (folder / "Posts.xml").stat().st_size / 1e6
            runs = [run_build(folder, tmp / f"out-{label}") for _ in range(args.repeats)]
            build_s = statistics.median(r[0] for r in runs)
            wall_s = statistics.median(r[1] for r in runs)
            rss = max(r[2] for r in runs)
            parse_s = statistics.median(iterparse_only(folder / "Posts.xml") for _ in range(args.repeats))
            results[label] = (mb / build_s, rss)
            rows.append((label, mb, mb / build_s, mb / wall_s, mb / parse_s, rss / 2**20))
        md_s, mdify_s = markdown_only(src)
    mb1 = src.stat().st_size / 1e6
    print(f"data build, {args.site} Posts.xml, one core, median of {args.repeats}")
    print(f"{'input':>6} {'MB':>8} {'build MB/s':>11} {'process MB/s':>13} {'iterparse MB/s':>15} {'peak RSS MiB':>13}")
    for label, mb, b, w, p, rss in rows:
        print(f"{label:>6} {mb:8.1f} {b:11.1f} {w:13.1f} {p:15.1f} {rss:13.0f}")
    print(f"html->markdown over the 1x bodies: html-to-markdown {mb1 / md_s:.1f} MB/s of Posts.xml"
          + (f", markdownify {mb1 / mdify_s:.1f} MB/s" if mdify_s else ", markdownify not installed"))
    ratio = results[f"{args.factor}x"][1] / results["1x"][1]
    print(f"mb_per_s={results['1x'][0]:.1f} rss_ratio_10x={ratio:.2f}")


if __name__ == "__main__":
    main()
