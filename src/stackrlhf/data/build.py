"""``stackrlhf data build``: dumps -> split datasets (Parquet, loadable with ``datasets``) + stats.json.

Both passes run across ``--workers`` processes (default: every core): the XML in byte ranges, the join in
buckets of questions, one shard of every split per bucket; the output is the same for any number of workers.
The output is built in a temp directory beside ``out`` and renamed into place when complete, so a failed or
interrupted build leaves nothing half-written. A build whose inputs and settings are unchanged since the last
one is skipped.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path


from stackrlhf.data.config import DataConfig
from stackrlhf.data.dumps import resolve_dump, shared_dump_dirs
from stackrlhf.data.emit import close_worker_connection, connect, count_upvotes, emit_bucket
from stackrlhf.data.output import build_key, build_stats, finish_build, temp_build_dir, up_to_date
from stackrlhf.data.stage import StagedDump, stage_dump
from stackrlhf.data.workers import Workers, default_workers
from stackrlhf.errors import StackRLHFError
from stackrlhf.console import console



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
    n_workers = cfg.workers or default_workers()
    with temp_build_dir(out) as tmp, Workers(n_workers, cfg.progress) as workers:
        stage_root = tmp / "_stage"
        staged_sites: list[StagedDump] = []
        stage_seconds = 0.0
        for dump in dumps:  # pass 1: every site's XML, each file in byte ranges across the workers
            t0 = time.perf_counter()
            staged_sites.append(stage_dump(dump, cfg, stage_root / dump.site, workers))
            stage_seconds += time.perf_counter() - t0
        con = connect(cfg, stage_root / "duckdb_tmp")  # only now: the workers were forked without its threads
        for staged in staged_sites:
            count_upvotes(staged, con)
        con.close()
        # pass 2: every bucket of every site is one task, writing one shard of every split ((site, bucket) order)
        buckets = [(staged, k) for staged in staged_sites for k in range(staged.buckets)]
        tasks = [(staged, k, cfg, tmp, (i, len(buckets)), stage_root / "duckdb_tmp", 1 if workers.n > 1 else cfg.threads)
                 for i, (staged, k) in enumerate(buckets)]
        t0 = time.perf_counter()
        results = workers.map(emit_bucket, tasks, "questions to splits", unit="q",
                              total=sum(s.questions for s in staged_sites))
        if workers.n == 1:
            close_worker_connection()
        join_seconds = time.perf_counter() - t0
        per_site: dict[str, dict] = {}
        split_counts: dict[str, Counter] = {}
        for staged in staged_sites:
            mine = [r for t, r in zip(tasks, results) if t[0] is staged]
            counts = {k: sum(r["counts"][k] for r in mine) for k in mine[0]["counts"]}
            split_counts[staged.site] = sum((Counter(r["splits"]) for r in mine), Counter())
            per_site[staged.site] = {
                **counts, "dropped_orphan_answers": staged.answers - counts["answers"] - counts["filtered_answers"],
                "deleted_posts": staged.deleted,
                "filtered_questions": staged.filtered_questions + counts["filtered_questions"],
                "source": str(staged.folder),
                "has_votes": staged.has_votes, "has_users": staged.has_users,
            }
            console.print(f"{staged.site}: {counts['questions']} questions, {counts['answers']} answers, "
                          f"{counts['pairs']} pairs")
        shutil.rmtree(stage_root)
        seconds = time.perf_counter() - start
        posts_bytes = sum(s.posts_bytes for s in staged_sites)
        stats = build_stats(cfg, key, per_site, split_counts, posts_bytes, seconds, stage_seconds)
        stats.update(workers=workers.n, stage_seconds=round(stage_seconds, 3), join_seconds=round(join_seconds, 3))
        finish_build(tmp, out, cfg, stats)
    console.print(f"[green]wrote {out}[/] ({stats['totals']['questions']} questions, "
                  f"{stats['totals']['pairs']} pairs, {stats['posts_mb_per_s']:.1f} MB/s of Posts.xml)")
    return stats


