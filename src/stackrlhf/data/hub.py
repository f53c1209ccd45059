"""``--from-hub``: build the same splits from a pair dataset in lvwerra/stack-exchange-paired's schema
(``qid, question, date, metadata, response_j, response_k``), from the hub or a local Parquet path.

Such data has no vote scores, only which answer of each pair is better, so answers are ranked by
their number of wins within their question; the given pairs are kept as they are (at most
``max_pairs_per_question`` per question, sampled with the same rule as dump pairs).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from stackrlhf.data.config import DataConfig
from stackrlhf.data.output import build_key, build_stats, console, finish_build, temp_build_dir, up_to_date
from stackrlhf.errors import StackRLHFError

PAIRED_COLUMNS = ("qid", "question", "date", "metadata", "response_j", "response_k")


def download_hub_parquet(repo_id: str, cache_dir: Path | None) -> list[Path]:
    """The Parquet files of a hub dataset repository (needs network access to the hub)."""
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=["*.parquet", "**/*.parquet"],
                                  cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as exc:  # network, auth, missing repo: all surface to the user the same way
        raise StackRLHFError(f"--from-hub {repo_id}: could not download ({type(exc).__name__}: {exc}); "
                             f"give a local Parquet path instead") from exc
    return sorted(Path(local).rglob("*.parquet"))


def hub_parquet_files(spec: str, cache_dir: Path | None) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise StackRLHFError(f"{path}: no .parquet files in this folder")
        return files
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        files = download_hub_parquet(spec, cache_dir)
        if not files:
            raise StackRLHFError(f"--from-hub {spec}: the dataset has no Parquet files")
        return files
    raise StackRLHFError(f"--from-hub {spec}: no such file or folder, and not a hub id like owner/name")


def _site_of(metadata: list[str] | None, fallback: str) -> str:
    for link in metadata or []:
        host = urlparse(str(link)).netloc
        if host:
            return host
    return fallback


def build_from_hub(cfg: DataConfig) -> dict:
    import pyarrow.parquet as pq

    from stackrlhf.data.emit import Answer, Question, SplitWriters, arrow_batches, connect, emit_question
    from stackrlhf.data.pairs import sample_pairs

    files = hub_parquet_files(cfg.from_hub, Path(cfg.cache) if cfg.cache else None)
    for f in files:
        names = set(pq.read_schema(f).names)
        missing = [c for c in PAIRED_COLUMNS if c not in names]
        if missing:
            raise StackRLHFError(f"{f}: missing column(s) {', '.join(missing)}; "
                                 f"expected lvwerra/stack-exchange-paired's {', '.join(PAIRED_COLUMNS)}")
    out = Path(cfg.out)
    fallback = "hub:" + Path(cfg.from_hub).stem if Path(cfg.from_hub).exists() else "hub:" + cfg.from_hub
    key = build_key(cfg, {"hub": files})
    previous = up_to_date(out, key, cfg.overwrite)
    if previous is not None:
        return previous
    start = time.perf_counter()
    with temp_build_dir(out) as tmp:
        writers = SplitWriters(tmp)
        per_site: dict[str, dict] = {}
        con = connect(cfg, tmp / "_duckdb")
        reader = arrow_batches(con.sql(
            "SELECT qid, question, date, metadata, response_j, response_k FROM read_parquet($files) "
            "ORDER BY qid", params={"files": [str(f) for f in files]}), 4096)
        group: list[dict] = []
        bar = tqdm(unit="pairs", desc="hub pairs", disable=not cfg.progress, leave=False)

        def flush(rows: list[dict]) -> None:
            first = rows[0]
            site = _site_of(first["metadata"], fallback)
            q = Question(site=site, qid=int(first["qid"]), title="", body=first["question"] or "", tags=[],
                         date=str(first["date"] or ""), author="unknown")
            texts: dict[str, int] = {}
            wins: dict[str, int] = {}
            for r in rows:
                for t in (r["response_j"], r["response_k"]):
                    texts.setdefault(t, len(texts))
                    wins.setdefault(t, 0)
                wins[r["response_j"]] += 1
            answers = {t: Answer(answer_id=i, score=wins[t], votes=wins[t], accepted=False, date="",
                                 author="unknown", link="", text=t) for t, i in texts.items()}
            stats = per_site.setdefault(site, {"questions": 0, "answers": 0, "pairs": 0})
            stats["questions"] += 1
            stats["answers"] += len(answers)
            # keep the dataset's own pairs, not ones re-derived from win counts
            pairs = sample_pairs(site, q.qid, [(answers[r["response_j"]], answers[r["response_k"]]) for r in rows],
                                 cfg.max_pairs_per_question, cfg.seed)
            stats["pairs"] += emit_question(q, list(answers.values()), cfg, writers, pairs=pairs, source="hub")
            bar.update(len(rows))

        for batch in reader:
            for r in batch.to_pylist():
                if group and r["qid"] != group[0]["qid"]:
                    flush(group)
                    group = []
                group.append(r)
        if group:
            flush(group)
        bar.close()
        con.close()
        writers.close()
        shutil.rmtree(tmp / "_duckdb", ignore_errors=True)
        stats = build_stats(cfg, key, per_site, writers.counts, 0, time.perf_counter() - start, 1.0)
        stats["source"] = cfg.from_hub
        finish_build(tmp, out, cfg, stats)
    console.print(f"[green]wrote {out}[/] from {cfg.from_hub}")
    return stats
