"""``stackrlhf data build``: dumps -> split datasets (Parquet, loadable with ``datasets``) + stats.json.

The output is built in a temp directory beside ``out`` and renamed into place when complete, so a
failed or interrupted build leaves nothing half-written. A build whose inputs and settings are
unchanged since the last one is skipped.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console

from stackrlhf.data.config import DataConfig
from stackrlhf.data.dumps import resolve_dump, shared_dump_dirs
from stackrlhf.data.emit import SplitWriters, connect, emit_site
from stackrlhf.data.output import build_key, build_stats, finish_build, temp_build_dir, up_to_date
from stackrlhf.data.stage import stage_dump
from stackrlhf.errors import StackRLHFError

console = Console(stderr=True)


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


def build_dataset(cfg: DataConfig) -> dict:
    """Run the data stage; returns the stats written to ``out/stats.json``."""
    if cfg.from_hub:
        from stackrlhf.data.hub import build_from_hub

        return build_from_hub(cfg)
    out = Path(cfg.out)
    cache = Path(cfg.cache) if cfg.cache else None
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
    with temp_build_dir(out) as tmp:
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
        stats = build_stats(cfg, key, per_site, writers, posts_bytes, seconds, stage_seconds)
        finish_build(tmp, out, cfg, stats)
    console.print(f"[green]wrote {out}[/] ({stats['totals']['questions']} questions, "
                  f"{stats['totals']['pairs']} pairs, {stats['posts_mb_per_s']:.1f} MB/s of Posts.xml)")
    return stats


