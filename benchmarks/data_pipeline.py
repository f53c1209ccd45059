"""Benchmark of `stackrlhf data build`: MB/s of Posts.xml end to end and peak RSS, with 1, 2 and all cores'
workers, on a shared dump (1x) and on a Posts.xml 10x larger synthesised from it (rows repeated with new ids).

Side by side: lxml iterparse alone over the same file (one core; the floor of any streaming reader) and
html-to-markdown alone over its bodies. Each build runs in its own process (a one-worker build pinned to one
core); its peak memory is the sum of the process's and its workers' proportional set sizes (PSS: pages the
forked workers share with the parent are counted once). Last line (the 10x file):
``mb_per_s=<1 worker> mb_per_s_all=<all cores> speedup=<all/1> rss_ratio_10x=<peak PSS at 10x / at 1x, all cores>``.

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


def run_build(dump: Path, out: Path, workers: int, memory: bool = False) -> tuple[float, float, int]:
    """(build seconds, process seconds, peak PSS bytes of the process and its workers together) of one
    `data build --workers N` in a fresh process; a one-worker build is pinned to one core. The memory is
    sampled (``memory=True``) in runs of their own: the sampler takes CPU from the workers."""
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "stackrlhf.cli", "data", "build", "--dump", str(dump), "--out", str(out),
           "--no-progress", "--workers", str(workers), "--threads", "1", "--memory-limit", "1GB"]
    pin = (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if workers == 1 else None
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=pin)
    peak = 0
    try:
        parent = psutil.Process(proc.pid)
        while memory and proc.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)
    except psutil.Error:
        pass
    if proc.wait() != 0:
        raise SystemExit(f"build failed: {proc.stderr.read().decode()}")
    wall = time.perf_counter() - start
    stats = json.loads((out / "stats.json").read_text())
    return stats["seconds"], wall, peak


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
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, min(2, cores), cores})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = tmp / args.site
        one.mkdir()
        shutil.copy(src, one / "Posts.xml")
        big = tmp / f"x{args.factor}" / args.site
        big.mkdir(parents=True)
        synthesise(src, big / "Posts.xml", args.factor)
        rows, speed, rss = [], {}, {}
        for label, folder in (("1x", one), (f"{args.factor}x", big)):
            mb = (folder / "Posts.xml").stat().st_size / 1e6
            runs: dict[int, list] = {n: [] for n in counts}
            for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits every count alike
                for n in counts:
                    runs[n].append(run_build(folder, tmp / f"out-{label}-{n}", n))
            parse_s = statistics.median(iterparse_only(folder / "Posts.xml") for _ in range(args.repeats))
            for n in counts:
                build_s = statistics.median(r[0] for r in runs[n])
                wall_s = statistics.median(r[1] for r in runs[n])
                speed[label, n] = mb / build_s
                rss[label, n] = run_build(folder, tmp / f"out-{label}-{n}", n, memory=True)[2]
                rows.append((label, n, mb, mb / build_s, mb / build_s / n, mb / wall_s, mb / parse_s,
                             rss[label, n] / 2**20))
        md_s, mdify_s = markdown_only(src)
    mb1 = src.stat().st_size / 1e6
    big_label = f"{args.factor}x"
    print(f"data build, {args.site} Posts.xml, median of {args.repeats}; a one-worker build pinned to one core; "
          f"{cores} cores")
    print(f"{'input':>6} {'workers':>8} {'MB':>7} {'build MB/s':>11} {'MB/s/core':>10} {'process MB/s':>13} "
          f"{'iterparse MB/s':>15} {'peak PSS MiB':>13}")
    for label, n, mb, b, per_core, w, p, r in rows:
        print(f"{label:>6} {n:>8} {mb:7.1f} {b:11.1f} {per_core:10.1f} {w:13.1f} {p:15.1f} {r:13.0f}")
    print(f"html->markdown over the 1x bodies: html-to-markdown {mb1 / md_s:.1f} MB/s of Posts.xml"
          + (f", markdownify {mb1 / mdify_s:.1f} MB/s" if mdify_s else ", markdownify not installed"))
    print(f"speed-up at {big_label}: " + ", ".join(f"{n} workers {speed[big_label, n] / speed[big_label, 1]:.2f}x"
                                                   for n in counts))
    print(f"mb_per_s={speed[big_label, 1]:.1f} mb_per_s_all={speed[big_label, cores]:.1f} "
          f"speedup={speed[big_label, cores] / speed[big_label, 1]:.2f} "
          f"rss_ratio_10x={rss[big_label, cores] / rss['1x', cores]:.2f}")


if __name__ == "__main__":
    main()
