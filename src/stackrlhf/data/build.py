"""``stackrlhf data build``: dumps -> split datasets (Parquet, loadable with ``datasets``) + stats.json.

The output is built in a temp directory beside ``out`` and renamed into place when complete, so a
failed or interrupted build leaves nothing half-written. A build whose inputs and settings are
unchanged since the last one is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console

from stackrlhf.config import save_config, write_text_atomic
from stackrlhf.data.config import DataConfig
from stackrlhf.data.dumps import resolve_dump, shared_dump_dirs
from stackrlhf.data.emit import SplitWriters, connect, emit_site
from stackrlhf.data.splits import ALL_SPLITS
from stackrlhf.data.stage import stage_dump
from stackrlhf.errors import StackRLHFError

MARKER = "stackrlhf-data"
_NOT_INPUTS = {"out", "progress", "overwrite", "cache_dir"}
console = Console(stderr=True)


def _file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def default_dumps() -> list[str]:
    """The embedded default input: every dump folder in the first of ``$STACKRLHF_DUMPS`` and
    ``../shared/data/stackexchange`` that has any."""
    for root in shared_dump_dirs():
        found = sorted(str(p.parent) for p in root.glob("*/Posts.xml")) if root.is_dir() else []
        if found:
            return found
    searched = ", ".join(str(d) for d in shared_dump_dirs())
    raise StackRLHFError(f"no --dump given and no dumps found in {searched}; give --dump (a folder, .7z, URL "
                         f"or site name like beer.stackexchange.com) or --from-hub")


def build_key(cfg: DataConfig, inputs: dict[str, list[Path]]) -> str:
    """Content key of a build: its settings and the identity (size, mtime) of every input file."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_INPUTS and k != "dump"}
    files = {name: [_file_fingerprint(p) for p in sorted(paths)] for name, paths in inputs.items()}
    blob = json.dumps({"settings": settings, "inputs": files, "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def up_to_date(out: Path, key: str, overwrite: bool) -> dict | None:
    """The previous stats if ``out`` was built with ``key``; else checks ``out`` may be replaced."""
    previous = _read_stats(out) if out.exists() else None
    if previous is not None and previous.get("build_key") == key:
        console.print(f"[green]{out} is up to date[/] (same inputs and settings); nothing to do")
        return previous
    _check_replaceable(out, previous, overwrite)
    return None


def _read_stats(out: Path) -> dict | None:
    try:
        stats = json.loads((out / "stats.json").read_text())
    except (OSError, ValueError):
        return None
    return stats if stats.get("format") == MARKER else None


def build_dataset(cfg: DataConfig) -> dict:
    """Run the data stage; returns the stats written to ``out/stats.json``."""
    if cfg.from_hub:
        from stackrlhf.data.hub import build_from_hub

        return build_from_hub(cfg)
    out = Path(cfg.out)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    specs = cfg.dump or default_dumps()
    dumps = [resolve_dump(spec, cache, cfg.base_url) for spec in specs]
    sites = [d.site for d in dumps]
    if len(set(sites)) != len(sites):
        raise StackRLHFError(f"the same site is given twice: {', '.join(sites)}")
    key = build_key(cfg, {d.site: list(d.folder.glob("*.xml")) for d in dumps})
    previous = up_to_date(out, key, cfg.overwrite)
    if previous is not None:
        return previous

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=_parent(out)))
    try:
        stage_root = tmp / "_stage"
        writers = SplitWriters(tmp)
        per_site: dict[str, dict] = {}
        posts_bytes = 0
        stage_seconds = 0.0
        con = connect(cfg, stage_root / "duckdb_tmp")
        for dump in dumps:
            t0 = time.perf_counter()
            staged = stage_dump(dump, cfg, stage_root / dump.site)
            stage_seconds += time.perf_counter() - t0
            counts = emit_site(staged, cfg, writers, con)
            posts_bytes += staged.posts_bytes
            per_site[dump.site] = {
                **counts, "dropped_orphan_answers": staged.answers - counts["answers"] - counts["filtered_answers"],
                "deleted_posts": staged.deleted,
                "filtered_questions": staged.filtered_questions + counts["filtered_questions"],
                "source": str(dump.folder),
                "has_votes": staged.has_votes, "has_users": staged.has_users,
            }
            console.print(f"{dump.site}: {counts['questions']} questions, {counts['answers']} answers, "
                          f"{counts['pairs']} pairs")
        con.close()
        writers.close()
        shutil.rmtree(stage_root)
        seconds = time.perf_counter() - start
        stats = _stats(cfg, key, per_site, writers, posts_bytes, seconds, stage_seconds)
        _write_metadata(tmp, cfg, stats)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.print(f"[green]wrote {out}[/] ({stats['totals']['questions']} questions, "
                  f"{stats['totals']['pairs']} pairs, {stats['posts_mb_per_s']:.1f} MB/s of Posts.xml)")
    return stats


def _parent(out: Path) -> Path:
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _check_replaceable(out: Path, previous: dict | None, overwrite: bool) -> None:
    if not out.exists() or previous is not None or overwrite:
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise StackRLHFError(f"{out} exists and is not a stackrlhf dataset; choose another --out or pass --overwrite")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished build over ``out`` (the old one, if any, is removed after the swap)."""
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _stats(cfg: DataConfig, key: str, per_site: dict, writers: SplitWriters, posts_bytes: int,
           seconds: float, stage_seconds: float) -> dict:
    split_names = [f"{d}/{s}" for d, s in ALL_SPLITS]
    for site, stats in per_site.items():
        counts = writers.counts.get(site, {})
        stats["splits"] = {name: counts.get(name, 0) for name in split_names}
    totals = {k: sum(s[k] for s in per_site.values()) for k in ("questions", "answers", "pairs")}
    splits = {name: sum(s["splits"][name] for s in per_site.values()) for name in split_names}
    return {
        "format": MARKER, "build_key": key, "sites": per_site, "totals": totals, "splits": splits,
        "upvotes_from": cfg.upvotes_from, "seconds": round(seconds, 3),
        "posts_mb": round(posts_bytes / 1e6, 3),
        "posts_mb_per_s": round(posts_bytes / 1e6 / max(seconds, 1e-9), 3),
        "parse_mb_per_s": round(posts_bytes / 1e6 / max(stage_seconds, 1e-9), 3),
    }


def _write_metadata(root: Path, cfg: DataConfig, stats: dict) -> None:
    write_text_atomic(root / "stats.json", json.dumps(stats, indent=2) + "\n")
    metrics = {"questions": stats["totals"]["questions"], "answers": stats["totals"]["answers"],
               "pairs": stats["totals"]["pairs"], "seconds": stats["seconds"],
               "posts_mb_per_s": stats["posts_mb_per_s"], **{f"rows/{k}": v for k, v in stats["splits"].items()}}
    write_text_atomic(root / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    save_config(cfg, root / "config.yaml")
    write_text_atomic(root / "README.md", dataset_card(stats))


def dataset_card(stats: dict) -> str:
    """A Hugging Face dataset card: the configs (so ``load_dataset(DIR, "reward")`` works), licence, sources."""
    configs: dict[str, list[str]] = {}
    for dataset, split in ALL_SPLITS:
        configs.setdefault(dataset, []).append(split)
    lines = ["---", "license: cc-by-sa-4.0", "configs:"]
    for dataset, splits in configs.items():
        lines.append(f"- config_name: {dataset}")
        lines.append("  data_files:")
        for split in splits:
            lines.append(f"  - split: {split}")
            lines.append(f"    path: {dataset}/{split}-*.parquet")
    lines.append("---")
    lines.append("")
    lines.append("# Stack Exchange question answering data, built by stackrlhf")
    lines.append("")
    lines.append("| site | questions | answers | pairs |")
    lines.append("|---|---|---|---|")
    for site, s in stats["sites"].items():
        lines.append(f"| {site} | {s['questions']} | {s['answers']} | {s['pairs']} |")
    lines.append("")
    lines.append("Content from the Stack Exchange network, licensed CC BY-SA (2.5 before 2011-04-08, 3.0 until "
                 "2018-05-02, 4.0 after; the `license` column has each row's). Every row names its site, links "
                 "to the original post (`question_link`, answer links) and names its authors. Stack Exchange, "
                 "Inc. does not endorse this use.")
    return "\n".join(lines) + "\n"
