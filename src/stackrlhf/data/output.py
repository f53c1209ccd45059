"""A dataset build's output directory: its content key (settings + input files), the up-to-date check, and the
"build in a temp directory beside ``out``, write the metadata, swap into place" plumbing that every builder
(dumps, hub pair datasets) uses, so a failed or interrupted build never leaves anything half-written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


from stackrlhf.config import save_config, write_text_atomic
from stackrlhf.data.config import DataConfig
from stackrlhf.data.splits import ALL_SPLITS
from stackrlhf.errors import StackRLHFError
from stackrlhf.console import console


MARKER = "stackrlhf-data"
_NOT_INPUTS = {"out", "progress", "overwrite", "cache_dir", "workers", "threads"}  # no effect on the output


def file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_key(cfg: DataConfig, inputs: dict[str, list[Path]]) -> str:
    """Key of a build's inputs: its settings and the identity (size, mtime) of every input file. It decides
    whether to build again (cheaply: no file is read); :func:`content_key` is what the result is known by."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_INPUTS and k != "dump"}
    files = {name: [file_fingerprint(p) for p in sorted(paths)] for name, paths in inputs.items()}
    blob = json.dumps({"settings": settings, "inputs": files, "version": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def up_to_date(out: Path, key: str, overwrite: bool) -> dict | None:
    """The previous stats if ``out`` was built with ``key``; else checks ``out`` may be replaced."""
    previous = read_stats(out) if out.exists() else None
    if previous is not None and previous.get("build_key") == key:
        console.print(f"[green]{out} is up to date[/] (same inputs and settings); nothing to do")
        return previous
    check_replaceable(out, previous, overwrite)
    return None


def read_stats(out: Path) -> dict | None:
    try:
        stats = json.loads((out / "stats.json").read_text())
    except (OSError, ValueError):
        return None
    return stats if stats.get("format") == MARKER else None


def parent_dir(out: Path) -> Path:
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def check_replaceable(out: Path, previous: dict | None, overwrite: bool) -> None:
    if not out.exists() or previous is not None or overwrite:
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise StackRLHFError(f"{out} exists and is not a stackrlhf dataset; choose another --out or pass --overwrite")


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished build over ``out`` (the old one, if any, is removed after the swap)."""
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def build_stats(cfg: DataConfig, key: str, per_site: dict, split_counts: dict, posts_bytes: int,
                seconds: float, stage_seconds: float) -> dict:
    """stats.json: per-site counts, ``split_counts`` (site -> {"dataset/split": rows}), totals and speeds."""
    split_names = [f"{d}/{s}" for d, s in ALL_SPLITS]
    for site, stats in per_site.items():
        counts = split_counts.get(site, {})
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


def write_metadata(root: Path, cfg: DataConfig, stats: dict) -> None:
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


@contextmanager
def temp_build_dir(out: Path) -> Iterator[Path]:
    """A fresh temp directory beside ``out`` to build into; removed if the build fails or is interrupted. One that
    a killed build left (its process gone) is removed first."""
    parent = parent_dir(out)
    for stale in parent.glob(f".{out.name}.tmp-*-*"):
        pid = stale.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def content_key(root: Path) -> str:
    """Hash of a build's data files (every Parquet shard, by path and bytes). What later stages key on: a rebuild
    of dump files that were only copied or touched gives the same bytes, so the models trained on it are kept."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.parquet")):
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def finish_build(tmp: Path, out: Path, cfg: DataConfig, stats: dict) -> None:
    """Write the metadata (stats.json with the data's ``content_key``, metrics.json, config.yaml, dataset card) and
    move the build into place."""
    stats["content_key"] = content_key(tmp)
    write_metadata(tmp, cfg, stats)
    swap_into_place(tmp, out)
