"""Pass 2: join answers to their questions out of core (DuckDB, ordered by question) and write each
question to its split: finetune (question -> accepted or best answer), reward pairs, rl prompts,
evaluation (question + all answers, and its pairs). Each bucket is one task (see workers.py) writing its own
shard of every split; the shards are numbered in (site, bucket) order."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import duckdb

from stackrlhf.data.attribution import answer_link, author_name, post_license, question_link
from stackrlhf.data.config import DataConfig
from stackrlhf.data.markdown import html_to_md
from stackrlhf.data.pairs import make_pairs
from stackrlhf.data.scoring import answer_score
from stackrlhf.data.splits import (ALL_SPLITS, EVALUATION, EVALUATION_PAIRS, FINETUNE_EVAL, FINETUNE_TRAIN,
                                   REWARD_EVAL, REWARD_TRAIN, RL_TRAIN, is_heldout, question_split)
from stackrlhf.data.stage import StagedDump
from stackrlhf.data.workers import Progress
from stackrlhf.data.writers import ParquetRowWriter
from stackrlhf.prompts import format_prompt


class Answer:
    """One scored answer. Its Markdown is made from the HTML on first use only (see stage.py)."""

    __slots__ = ("answer_id", "score", "votes", "accepted", "date", "author", "link", "_html", "_text")

    def __init__(self, answer_id: int, score: int, votes: int, accepted: bool, date: str, author: str,
                 link: str, html: str = "", text: str | None = None):
        self.answer_id, self.score, self.votes, self.accepted = answer_id, score, votes, accepted
        self.date, self.author, self.link = date, author, link
        self._html, self._text = html, text

    @property
    def text(self) -> str:
        if self._text is None:
            self._text, self._html = html_to_md(self._html), ""
        return self._text


class Question:
    """One question with its attribution. Its Markdown body is made on first use only."""

    __slots__ = ("site", "qid", "title", "tags", "date", "author", "_html", "_body")

    def __init__(self, site: str, qid: int, title: str, tags: list[str], date: str, author: str,
                 html: str = "", body: str | None = None):
        self.site, self.qid, self.title, self.tags, self.date, self.author = site, qid, title, tags, date, author
        self._html, self._body = html, body

    @property
    def body(self) -> str:
        if self._body is None:
            self._body, self._html = html_to_md(self._html), ""
        return self._body

    @property
    def prompt(self) -> str:
        return format_prompt(self.title, self.body)

    @property
    def link(self) -> str:
        return question_link(self.site, self.qid)

    def base_row(self) -> dict:
        return {"site": self.site, "qid": self.qid, "title": self.title, "question": self.body,
                "prompt": self.prompt, "tags": self.tags, "date": self.date, "question_link": self.link,
                "question_author": self.author, "license": post_license(self.date)}


def pair_row(q: Question, better: Answer, worse: Answer, source: str = "votes") -> dict:
    """One preference pair in the pair schema (:data:`stackrlhf.data.schema.PAIRS`)."""
    link_j, link_k = better.link, worse.link
    newest = max(q.date or "", better.date or "", worse.date or "")
    return {"qid": q.qid, "question": q.body, "date": q.date, "metadata": [q.link] + [x for x in (link_j, link_k) if x],
            "response_j": better.text, "response_k": worse.text,
            "prompt": q.prompt, "chosen": better.text, "rejected": worse.text,
            "score_j": better.score, "score_k": worse.score,
            "answer_id_j": better.answer_id, "answer_id_k": worse.answer_id,
            "date_j": better.date, "date_k": worse.date, "site": q.site, "title": q.title,
            "question_link": q.link, "answer_link_j": link_j, "answer_link_k": link_k,
            "question_author": q.author, "author_j": better.author, "author_k": worse.author,
            "license": post_license(newest), "source": source}


class SplitWriters:
    """One Parquet writer per output split, and per-site row counts."""

    def __init__(self, root: Path, shard: tuple[int, int] = (0, 1)):
        from stackrlhf.data.schema import SCHEMAS, shard_file

        # Small row groups: a pair or evaluation row holds several posts, and every writer buffers at once.
        self.writers = {key: ParquetRowWriter(root / key[0] / shard_file(key[1], *shard), SCHEMAS[key[0]],
                                              flush_rows=512)
                        for key in ALL_SPLITS}
        self.counts: dict[str, Counter] = {}

    def add(self, site: str, key: tuple[str, str], row: dict) -> None:
        self.writers[key].add(row)
        self.counts.setdefault(site, Counter())[f"{key[0]}/{key[1]}"] += 1

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def answer_passes(answer: Answer, cfg: DataConfig) -> bool:
    """The optional answer-length filter (Markdown characters)."""
    if not cfg.min_answer_chars and not cfg.max_answer_chars:
        return True
    n = len(answer.text)
    return n >= cfg.min_answer_chars and not (cfg.max_answer_chars and n > cfg.max_answer_chars)


def emit_question(q: Question, answers: list[Answer], cfg: DataConfig, out: SplitWriters,
                  split: str | None = None, pairs: list[tuple[Answer, Answer]] | None = None,
                  source: str = "votes") -> int:
    """Write one question to its split; returns the number of pairs written.

    ``answers`` must already have passed :func:`answer_passes`, except for the finetune split, which
    converts and checks only as many answers as it needs to find its one. ``pairs`` are derived from
    the scores with :func:`make_pairs` unless given (hub data comes with its own).
    """
    split = split or question_split(q.site, q.qid, cfg.fractions)
    ranked = sorted(answers, key=lambda a: (not a.accepted if split == "finetune" else False, -a.score, a.answer_id))
    if split == "rl":  # the prompt, and its best human answer for judges only (RL never reads it)
        best = ranked[0] if ranked else None
        out.add(q.site, RL_TRAIN, {**q.base_row(), "answer_count": len(answers),
                                   "reference_answer": best.text if best else "",
                                   "reference_answer_link": best.link if best else "",
                                   "reference_answer_author": best.author if best else ""})
        return 0
    if split == "finetune":
        best = next((a for a in ranked if a.score >= cfg.finetune_min_score and answer_passes(a, cfg)), None)
        if best is None:
            return 0
        key = FINETUNE_EVAL if is_heldout(q.site, q.qid, cfg.finetune_eval_fraction) else FINETUNE_TRAIN
        out.add(q.site, key, {**q.base_row(), "completion": best.text, "answer_id": best.answer_id,
                              "answer_score": best.score, "accepted": best.accepted,
                              "answer_link": best.link, "answer_author": best.author})
        return 0
    if pairs is None:
        pairs = make_pairs(q.site, q.qid, answers, cfg.max_pairs_per_question, cfg.seed)
    if split == "reward":
        key = REWARD_EVAL if is_heldout(q.site, q.qid, cfg.reward_eval_fraction) else REWARD_TRAIN
    else:
        key = EVALUATION_PAIRS
        if ranked:
            out.add(q.site, EVALUATION, {
                **q.base_row(), "best_answer": ranked[0].text,
                "answers": [{"answer_id": a.answer_id, "text": a.text, "score": a.score, "votes": a.votes,
                             "accepted": a.accepted, "date": a.date, "author": a.author,
                             "link": a.link} for a in ranked]})
    for better, worse in pairs:
        out.add(q.site, key, pair_row(q, better, worse, source))
    return len(pairs)


_JOIN_SQL = """
SELECT q.id AS qid, q.title, q.body AS qbody, q.tags, q.date AS qdate, q.accepted_answer_id,
       coalesce(uq.name, q.owner_name) AS qname, q.owner_id AS qowner,
       a.id AS aid, a.body AS abody, a.score AS ascore, a.date AS adate,
       coalesce(ua.name, a.owner_name) AS aname, a.owner_id AS aowner,
       coalesce(v.upvotes, 0) AS upvotes
FROM read_parquet($questions) q
LEFT JOIN read_parquet($answers) a ON a.parent_id = q.id
LEFT JOIN read_parquet($users) uq ON uq.id = q.owner_id
LEFT JOIN read_parquet($users) ua ON ua.id = a.owner_id
LEFT JOIN read_parquet($upvotes) v ON v.post_id = a.id
ORDER BY q.id, a.id
"""


def _sql_str(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def arrow_batches(result, batch_rows: int):
    """Stream a DuckDB result as Arrow record batches (DuckDB 2 renamed ``fetch_record_batch``)."""
    if hasattr(result, "to_arrow_reader"):
        return result.to_arrow_reader(batch_rows)
    return result.fetch_record_batch(batch_rows)


def connect(cfg: DataConfig, temp_dir: Path, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with bounded memory that spills to ``temp_dir``."""
    con = duckdb.connect()
    con.execute(f"SET memory_limit = {_sql_str(cfg.memory_limit)}")
    con.execute(f"SET temp_directory = {_sql_str(temp_dir)}")
    con.execute("SET preserve_insertion_order = false")
    threads = cfg.threads if threads is None else threads
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def count_upvotes(staged: StagedDump, con: duckdb.DuckDBPyConnection) -> None:
    """Upvotes (VoteTypeId 2 rows) counted once per post, into a compact file that every bucket's join reads."""
    counted = staged.files["upvotes"].with_name("upvote_counts.parquet")
    files = "[" + ", ".join(_sql_str(f) for f in staged.bucket_files(0)["upvotes"]) + "]"
    con.execute(f"COPY (SELECT post_id, count(*) AS upvotes FROM read_parquet({files}) "
                f"GROUP BY post_id) TO {_sql_str(counted)} (FORMAT parquet)")
    staged.files["upvotes"] = counted


_connection: tuple[int, duckdb.DuckDBPyConnection] | None = None


def _worker_connection(cfg: DataConfig, temp_dir: Path, threads: int) -> duckdb.DuckDBPyConnection:
    """This process's DuckDB connection, opened on its first bucket."""
    global _connection
    if _connection is None or _connection[0] != os.getpid():
        _connection = (os.getpid(), connect(cfg, temp_dir / str(os.getpid()), threads))
    return _connection[1]


def close_worker_connection() -> None:
    global _connection
    if _connection is not None and _connection[0] == os.getpid():
        _connection[1].close()
    _connection = None


def emit_bucket(staged: StagedDump, k: int, cfg: DataConfig, root: Path, shard: tuple[int, int], temp_dir: Path,
                threads: int, batch_rows: int = 4096) -> dict:
    """Join bucket ``k`` of one staged site and write its questions to shard ``shard`` (index, count) of every
    split under ``root``; returns its counts and each split's row count. Questions come in id order, so a
    bucket's output does not depend on how the XML was cut into ranges or on which worker ran it."""
    con = _worker_connection(cfg, temp_dir, threads)
    out = SplitWriters(root, shard)
    use_votes = cfg.upvotes_from == "votes"
    site = staged.site
    counts = {"questions": 0, "answers": 0, "pairs": 0, "filtered_questions": 0, "filtered_answers": 0}
    progress = Progress()

    def finish(q: Question, answers: list[Answer]) -> None:
        progress.add(rows=1)
        if cfg.max_question_chars and len(q.body) > cfg.max_question_chars:
            counts["filtered_questions"] += 1
            return
        split = question_split(site, q.qid, cfg.fractions)
        if split in ("reward", "evaluation"):
            kept = [a for a in answers if answer_passes(a, cfg)]
            counts["filtered_answers"] += len(answers) - len(kept)
            answers = kept
        counts["questions"] += 1
        counts["answers"] += len(answers)
        counts["pairs"] += emit_question(q, answers, cfg, out, split)

    current: Question | None = None
    accepted_id = None
    answers: list[Answer] = []
    rows = (r for batch in arrow_batches(con.sql(_JOIN_SQL, params=staged.bucket_files(k)), batch_rows)
            for r in batch.to_pylist())
    for r in rows:
        if current is None or r["qid"] != current.qid:
            if current is not None:
                finish(current, answers)
            current = Question(site=site, qid=r["qid"], title=r["title"], tags=r["tags"] or [],
                               date=r["qdate"], author=author_name(r["qname"], r["qowner"]), html=r["qbody"])
            accepted_id = r["accepted_answer_id"]
            answers = []
        if r["aid"] is None:
            continue
        upvotes = r["upvotes"] if use_votes else r["ascore"]
        accepted = r["aid"] == accepted_id
        answers.append(Answer(answer_id=r["aid"], score=answer_score(upvotes, accepted), votes=upvotes,
                              accepted=accepted, date=r["adate"], author=author_name(r["aname"], r["aowner"]),
                              link=answer_link(site, r["aid"]), html=r["abody"]))
    if current is not None:
        finish(current, answers)
    out.close()
    progress.flush()
    return {"counts": counts, "splits": dict(out.counts.get(site, {}))}

