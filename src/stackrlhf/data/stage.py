"""Pass 1: stream a dump's XML files into narrow Parquet tables (questions, answers, users, upvotes).

Bodies stay HTML here: pass 2 converts to Markdown only the posts that end up in a row (an rl question
needs only its best answer, for judges; a finetune question only its best one), which is most of the work saved.
Nothing is held beyond one row group. Each XML file is parsed in byte ranges, one task each (see workers.py);
a range writes its own file in every bucket, so the tasks share nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from stackrlhf.data.config import DataConfig
from stackrlhf.data.dumps import Dump
from stackrlhf.data.writers import ParquetRowWriter
from stackrlhf.data.workers import Progress, Workers
from stackrlhf.data.xml_rows import iter_rows, row_ranges
from stackrlhf.errors import DumpError

QUESTIONS = pa.schema([
    ("id", pa.int64()), ("title", pa.string()), ("body", pa.string()), ("tags", pa.list_(pa.string())),
    ("date", pa.string()), ("accepted_answer_id", pa.int64()), ("owner_id", pa.int64()),
    ("owner_name", pa.string()),
])
ANSWERS = pa.schema([
    ("id", pa.int64()), ("parent_id", pa.int64()), ("body", pa.string()), ("score", pa.int64()),
    ("date", pa.string()), ("owner_id", pa.int64()), ("owner_name", pa.string()),
])
USERS = pa.schema([("id", pa.int64()), ("name", pa.string())])
UPVOTES = pa.schema([("post_id", pa.int64())])

MAX_BUCKETS = 256  # open writers (file handles, buffers) during staging
RANGES_PER_WORKER = 2  # byte ranges of Posts.xml per worker: the ranges differ in cost, more of them balance the load
_TAG_RE = re.compile(r"<([^<>]+)>")


def parse_tags(raw: str | None) -> list[str]:
    """Both dump spellings: ``<a><b>`` (older) and ``|a|b|`` (2023+)."""
    if not raw:
        return []
    if raw.startswith("|"):
        return [t for t in raw.split("|") if t]
    return _TAG_RE.findall(raw)


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


@dataclass
class StagedDump:
    site: str
    folder: Path
    posts_bytes: int = 0
    questions: int = 0
    answers: int = 0
    deleted: int = 0
    filtered_questions: int = 0
    other_posts: int = 0
    has_users: bool = False
    has_votes: bool = False
    buckets: int = 1
    ranges: int = 1
    files: dict[str, Path] = field(default_factory=dict)

    def bucket_files(self, k: int) -> dict:
        """The files the join of bucket ``k`` reads (one per XML range that was parsed)."""
        parts = [f"{i:05d}.parquet" for i in range(self.ranges)]
        return {"questions": [str(self.files["questions"] / str(k) / p) for p in parts],
                "answers": [str(self.files["answers"] / str(k) / p) for p in parts],
                "users": parquet_files(self.files["users"]), "upvotes": parquet_files(self.files["upvotes"])}


def parquet_files(folder: Path) -> list[str]:
    """The Parquet files in ``folder``, in name order (a list, not a glob: ``folder`` may hold glob characters)."""
    return sorted(str(p) for p in folder.glob("*.parquet")) if folder.is_dir() else [str(folder)]


def stage_dump(dump: Dump, cfg: DataConfig, stage_dir: Path, workers: Workers) -> StagedDump:
    """Stream ``dump`` into ``stage_dir`` (each XML file in byte ranges, one task each) and return counts;
    raises :class:`DumpError` on bad input."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    posts = dump.file("Posts.xml")
    if posts is None:
        raise DumpError(f"{dump.folder}: no Posts.xml in this dump folder")
    out = StagedDump(site=dump.site, folder=dump.folder, posts_bytes=posts.stat().st_size)
    out.buckets = min(MAX_BUCKETS, max(1, -(-out.posts_bytes // (cfg.join_bucket_mb << 20))))
    out.files = {"questions": stage_dir / "questions", "answers": stage_dir / "answers",
                 "users": stage_dir / "users", "upvotes": stage_dir / "upvotes"}
    spans = row_ranges(posts, 1 if workers.n == 1 else workers.n * RANGES_PER_WORKER)
    out.ranges = len(spans)
    for counts in workers.map(_stage_posts, [(posts, span, i, cfg, out) for i, span in enumerate(spans)],
                              f"{dump.site} Posts.xml", total=out.posts_bytes, rows_label="posts"):
        for name, value in counts.items():
            setattr(out, name, getattr(out, name) + value)
    if out.questions == 0:
        raise DumpError(f"{posts}: no questions in this dump (no row with PostTypeId=\"1\" passed the filters)"
                        if out.filtered_questions else
                        f"{posts}: no questions in this dump (no row with PostTypeId=\"1\"); is it empty?")
    users = dump.file("Users.xml")
    out.has_users = users is not None
    _stage_table(users, _stage_users, out.files["users"], USERS, workers, f"{dump.site} Users.xml", "users")
    votes = dump.file("Votes.xml")
    out.has_votes = votes is not None
    if cfg.upvotes_from == "votes" and votes is None:
        raise DumpError(f"{dump.folder}: --upvotes-from votes needs Votes.xml, which this dump lacks; "
                        f"use --upvotes-from score")
    _stage_table(votes if cfg.upvotes_from == "votes" else None, _stage_upvotes, out.files["upvotes"], UPVOTES,
                 workers, f"{dump.site} Votes.xml", "votes")
    return out


def _stage_table(path: Path | None, fn, folder: Path, schema: pa.Schema, workers: Workers, desc: str,
                 label: str) -> None:
    """One Parquet file per byte range of ``path`` in ``folder`` (one empty file when there is no ``path``)."""
    if path is None:
        ParquetRowWriter(folder / "00000.parquet", schema).close()
        return
    spans = row_ranges(path, workers.n)
    workers.map(fn, [(path, span, folder / f"{i:05d}.parquet") for i, span in enumerate(spans)], desc,
                total=path.stat().st_size, rows_label=label)


def _rows(path: Path, span: tuple[int, int], progress: Progress):
    for row in iter_rows(path, on_bytes=progress.add, span=span):
        yield row
        progress.rows += 1


def _stage_users(path: Path, span: tuple[int, int], dest: Path) -> None:
    progress = Progress()
    writer = ParquetRowWriter(dest, USERS, flush_rows=8192)
    for row in _rows(path, span, progress):
        writer.add({"id": _int(row.get("Id")), "name": row.get("DisplayName")})
    writer.close()
    progress.flush()


def _stage_upvotes(path: Path, span: tuple[int, int], dest: Path) -> None:
    progress = Progress()
    writer = ParquetRowWriter(dest, UPVOTES, flush_rows=65536)
    for row in _rows(path, span, progress):
        if row.get("VoteTypeId") == "2":
            writer.add({"post_id": _int(row.get("PostId"))})
    writer.close()
    progress.flush()


def _stage_posts(posts: Path, span: tuple[int, int], index: int, cfg: DataConfig, staged: StagedDump) -> dict:
    """Parse one byte range of Posts.xml into this range's file of every bucket; returns its counts."""
    wanted_tags = set(cfg.tags)
    counts = dict(questions=0, answers=0, deleted=0, filtered_questions=0, other_posts=0)
    # Rows go to bucket (question id % buckets), answers by their question's id, so that each bucket's
    # join reads only its own files. Per-writer buffers are capped in bytes: memory ~ 2 x buckets x flush.
    n = staged.buckets
    flush = min(1 << 20, max(1 << 16, (64 << 20) // n))
    name = f"{index:05d}.parquet"
    qws = [ParquetRowWriter(staged.files["questions"] / str(k) / name, QUESTIONS, compression="none",
                            flush_bytes=flush) for k in range(n)]
    aws = [ParquetRowWriter(staged.files["answers"] / str(k) / name, ANSWERS, compression="none",
                            flush_bytes=flush) for k in range(n)]
    progress = Progress()
    for row in _rows(posts, span, progress):
        kind = row.get("PostTypeId")
        if kind not in ("1", "2"):
            counts["other_posts"] += 1
            continue
        if row.get("DeletionDate"):
            counts["deleted"] += 1
            continue
        date = row.get("CreationDate") or ""
        if kind == "1":
            tags = parse_tags(row.get("Tags"))
            if (wanted_tags and not wanted_tags.intersection(tags)) or \
                    (cfg.date_from and date < cfg.date_from) or (cfg.date_to and date >= cfg.date_to):
                counts["filtered_questions"] += 1
                continue
            qid = _int(row.get("Id"))
            body = row.get("Body") or ""
            qws[qid % n].add({"id": qid, "title": (row.get("Title") or "").strip(), "body": body,
                              "tags": tags, "date": date, "accepted_answer_id": _int(row.get("AcceptedAnswerId")),
                              "owner_id": _int(row.get("OwnerUserId")), "owner_name": row.get("OwnerDisplayName")},
                             len(body))
            counts["questions"] += 1
        else:
            parent = _int(row.get("ParentId"))
            body = row.get("Body") or ""
            aws[(parent or 0) % n].add({"id": _int(row.get("Id")), "parent_id": parent, "body": body,
                                        "score": _int(row.get("Score")) or 0, "date": date,
                                        "owner_id": _int(row.get("OwnerUserId")),
                                        "owner_name": row.get("OwnerDisplayName")}, len(body))
            counts["answers"] += 1
    for w in qws + aws:
        w.close()
    progress.flush()
    return counts
