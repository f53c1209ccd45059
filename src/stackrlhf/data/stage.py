"""Pass 1: stream a dump's XML files into narrow Parquet tables (questions, answers, users, upvotes).

Bodies stay HTML here: pass 2 converts to Markdown only the posts that end up in a row (an rl question
needs only its best answer, for judges; a finetune question only its best one), which is most of the work saved.
Nothing is held beyond one row group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from stackrlhf.data.config import DataConfig
from stackrlhf.data.dumps import Dump
from stackrlhf.data.writers import ParquetRowWriter
from stackrlhf.data.xml_rows import iter_rows
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
    files: dict[str, Path] = field(default_factory=dict)

    def bucket_files(self, k: int) -> dict[str, str]:
        """The files the join of bucket ``k`` reads."""
        return {"questions": str(self.files["questions"] / f"{k}.parquet"),
                "answers": str(self.files["answers"] / f"{k}.parquet"),
                "users": str(self.files["users"]), "upvotes": str(self.files["upvotes"])}


def stage_dump(dump: Dump, cfg: DataConfig, stage_dir: Path) -> StagedDump:
    """Stream ``dump`` into ``stage_dir`` and return counts; raises :class:`DumpError` on bad input."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    posts = dump.file("Posts.xml")
    if posts is None:
        raise DumpError(f"{dump.folder}: no Posts.xml in this dump folder")
    out = StagedDump(site=dump.site, folder=dump.folder, posts_bytes=posts.stat().st_size)
    out.buckets = min(MAX_BUCKETS, max(1, -(-out.posts_bytes // (cfg.join_bucket_mb << 20))))
    out.files = {"questions": stage_dir / "questions", "answers": stage_dir / "answers",
                 "users": stage_dir / "users.parquet", "upvotes": stage_dir / "upvotes.parquet"}
    _stage_posts(posts, cfg, out)
    if out.questions == 0:
        raise DumpError(f"{posts}: no questions in this dump (no row with PostTypeId=\"1\" passed the filters)"
                        if out.filtered_questions else
                        f"{posts}: no questions in this dump (no row with PostTypeId=\"1\"); is it empty?")
    users = dump.file("Users.xml")
    out.has_users = users is not None
    writer = ParquetRowWriter(out.files["users"], USERS, flush_rows=8192)
    if users is not None:
        for row in _progress_rows(users, cfg, f"{dump.site} Users.xml"):
            writer.add({"id": _int(row.get("Id")), "name": row.get("DisplayName")})
    writer.close()
    votes = dump.file("Votes.xml")
    out.has_votes = votes is not None
    writer = ParquetRowWriter(out.files["upvotes"], UPVOTES, flush_rows=65536)
    if cfg.upvotes_from == "votes":
        if votes is None:
            raise DumpError(f"{dump.folder}: --upvotes-from votes needs Votes.xml, which this dump lacks; "
                            f"use --upvotes-from score")
        for row in _progress_rows(votes, cfg, f"{dump.site} Votes.xml"):
            if row.get("VoteTypeId") == "2":
                writer.add({"post_id": _int(row.get("PostId"))})
    writer.close()
    return out


def _progress_rows(path: Path, cfg: DataConfig, desc: str):
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               disable=not cfg.progress, leave=False)
    try:
        yield from iter_rows(path, on_bytes=bar.update)
    finally:
        bar.close()


def _stage_posts(posts: Path, cfg: DataConfig, out: StagedDump) -> None:
    wanted_tags = set(cfg.tags)
    # Rows go to bucket (question id % buckets), answers by their question's id, so that each bucket's
    # join reads only its own files. Per-writer buffers are capped in bytes: memory ~ buckets x 1 MB.
    n = out.buckets
    qws = [ParquetRowWriter(out.files["questions"] / f"{k}.parquet", QUESTIONS, compression="none",
                            flush_bytes=1 << 20) for k in range(n)]
    aws = [ParquetRowWriter(out.files["answers"] / f"{k}.parquet", ANSWERS, compression="none",
                            flush_bytes=1 << 20) for k in range(n)]
    for row in _progress_rows(posts, cfg, f"{out.site} Posts.xml"):
        kind = row.get("PostTypeId")
        if kind not in ("1", "2"):
            out.other_posts += 1
            continue
        if row.get("DeletionDate"):
            out.deleted += 1
            continue
        date = row.get("CreationDate") or ""
        if kind == "1":
            tags = parse_tags(row.get("Tags"))
            if (wanted_tags and not wanted_tags.intersection(tags)) or \
                    (cfg.date_from and date < cfg.date_from) or (cfg.date_to and date >= cfg.date_to):
                out.filtered_questions += 1
                continue
            qid = _int(row.get("Id"))
            body = row.get("Body") or ""
            qws[qid % n].add({"id": qid, "title": (row.get("Title") or "").strip(), "body": body,
                              "tags": tags, "date": date, "accepted_answer_id": _int(row.get("AcceptedAnswerId")),
                              "owner_id": _int(row.get("OwnerUserId")), "owner_name": row.get("OwnerDisplayName")},
                             len(body))
            out.questions += 1
        else:
            parent = _int(row.get("ParentId"))
            body = row.get("Body") or ""
            aws[(parent or 0) % n].add({"id": _int(row.get("Id")), "parent_id": parent, "body": body,
                                        "score": _int(row.get("Score")) or 0, "date": date,
                                        "owner_id": _int(row.get("OwnerUserId")),
                                        "owner_name": row.get("OwnerDisplayName")}, len(body))
            out.answers += 1
    for w in qws + aws:
        w.close()
