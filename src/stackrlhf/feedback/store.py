"""The feedback store (SQLAlchemy): annotators, comparison tasks with their candidate answers, assignments,
and labels. SQLite (WAL) by default; any SQLAlchemy URL works (PostgreSQL: ``postgresql+psycopg://...``).

Every submission carries a client id, scoped to its annotator (two annotators' clients may pick the same id)
and remembered for good: a retried submit is stored once, and a late replay of an older submission is
acknowledged and ignored, so it never overwrites a newer edit. A task goes to at most ``replication``
annotators who label it, never twice to the same one (a unique assignment row); a skip frees its slot for
another annotator, up to ``MAX_OFFERS_PER_SLOT`` offers per slot, so a task that everyone skips ends. A skip
is final (its slot may have gone to someone else), an annotator holds at most one open task (a unique row in
``open_assignments``), and revoking an annotator frees their open task and ends their sign-ins.
"""

from __future__ import annotations

import hashlib
import random
import secrets
from datetime import datetime, timedelta, timezone

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, delete, event, func, inspect, select, text)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from stackrlhf.errors import StackRLHFError
from stackrlhf.feedback import DEFAULT_DB

MAX_COMMENT = 2000
MAX_OFFERS_PER_SLOT = 3  # a task is offered to at most replication * this annotators (skips free slots)
MAX_ID = 2**31 - 1  # ids are 32-bit INTEGER columns on PostgreSQL
MAX_SUBMISSIONS_PER_TASK = 50  # an annotator's edits of one task; more are refused (the table cannot be flooded)
SESSION_DAYS = 30
MAX_TAKE_ATTEMPTS = 1000  # lost races for a slot before next_task gives up with an error (never a silent None)
SPREAD_AFTER_COLLISION = 8  # after a lost race, take one of the first this-many open tasks at random
SIMULATED_PREFIX = "bot:"  # simulated annotators' names start with it, and people's never do


def now() -> datetime:
    return datetime.now(timezone.utc)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Base(DeclarativeBase):
    pass


class StoreError(StackRLHFError):
    """A request the store refuses, with the HTTP status the app answers it with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Annotator(Base):
    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    kind: Mapped[str] = mapped_column(String(20), default="human")  # "simulated": `feedback simulate`'s annotators


ANNOTATOR_KINDS = ("human", "simulated")


class Task(Base):
    """One question and its candidate answers, to be compared."""

    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    site: Mapped[str] = mapped_column(String(200))
    qid: Mapped[int] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(Text)
    question: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text)
    question_link: Mapped[str] = mapped_column(Text, default="")
    question_author: Mapped[str] = mapped_column(Text, default="")
    license: Mapped[str] = mapped_column(Text, default="")
    split: Mapped[str] = mapped_column(String(50), default="")
    batch: Mapped[str] = mapped_column(String(100), default="")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    candidates: Mapped[list[Candidate]] = relationship(back_populates="task", order_by="Candidate.position",
                                                         cascade="all, delete-orphan")


class Candidate(Base):
    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(20))  # "model" or "human" (a dump answer, the control)
    model: Mapped[str] = mapped_column(Text, default="")  # which model made it ("" for a human answer)
    sampling: Mapped[dict] = mapped_column(JSON, default=dict)
    answer_link: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(Text, default="")
    task: Mapped[Task] = relationship(back_populates="candidates")


class Assignment(Base):
    """Task -> annotator. ``slot`` (0 .. R-1) is unique per task, so two concurrent requests can never hand
    a task to more than R annotators: the second insert of a slot fails in the database, whatever the server."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("task_id", "annotator_id"), UniqueConstraint("task_id", "slot"))
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    slot: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class OpenAssignment(Base):
    """The one task an annotator holds and has not labelled yet: ``annotator_id`` is unique, so concurrent
    requests can never hand one annotator several tasks (which nobody else could then take)."""

    __tablename__ = "open_assignments"
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))


class LoginSession(Base):
    """A browser sign-in: the cookie holds a random id (stored hashed), never the annotator's token, so logging
    out (or revoking the annotator) ends it on the server and a copied cookie stops working."""

    __tablename__ = "sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def scoped_client_id(annotator_id: int, client_id: str) -> str:
    """The stored form of a client id: hashed with its annotator, so ids are unique per annotator (64 hex)."""
    return hashlib.sha256(f"{annotator_id}:{client_id}".encode()).hexdigest()


class Submission(Base):
    """Every client id ever accepted (scoped to its annotator): a replay of any of them is a no-op."""

    __tablename__ = "submissions"
    id: Mapped[int] = mapped_column(primary_key=True)
    client_key: Mapped[str] = mapped_column(String(64), unique=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Label(Base):
    """An annotator's judgement of one task: ratings per candidate, the better one (or a tie), a comment."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("task_id", "annotator_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    best_candidate_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id"), nullable=True)  # None: tie
    ratings: Mapped[dict] = mapped_column(JSON, default=dict)  # {candidate_id: {"usefulness": n, "accuracy": n}}
    comment: Mapped[str] = mapped_column(Text, default="")
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, onupdate=now)


class Setting(Base):
    """A setting of the store that every command shares (``replication``: annotators per task, as `serve` runs)."""
    __tablename__ = "settings"
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="")


DEFAULT_REPLICATION = 2


# ---------------------------------------------------------------- the store

class FeedbackStore:
    def __init__(self, url: str = DEFAULT_DB):
        self.url = url
        kwargs: dict = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        try:
            self.engine = create_engine(url, pool_pre_ping=True, **kwargs)
        except Exception as exc:  # a malformed URL or a missing driver
            raise StackRLHFError(f"--db {url}: cannot open ({exc})") from exc
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _pragmas(conn, _record):  # WAL: readers do not block the writer; wait for locks, do not fail
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        with self.engine.connect() as conn:
            upgrade = inspect(conn).has_table("assignments") and not inspect(conn).has_table("open_assignments")
        Base.metadata.create_all(self.engine)
        with self.engine.begin() as conn:  # a store made before annotators had a kind: every one of them is a person
            if "kind" not in {c["name"] for c in inspect(conn).get_columns("annotators")}:
                conn.execute(text("ALTER TABLE annotators ADD COLUMN kind VARCHAR(20) DEFAULT 'human'"))
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        if upgrade:
            self._record_open_assignments()

    def _record_open_assignments(self) -> None:
        """Upgrade a store made before ``open_assignments``: each annotator keeps their oldest unlabelled task;
        any further ones they held (which nobody else could take) go back to the pool."""
        with self.session() as s:
            labelled = {(t, a) for t, a in s.execute(select(Label.task_id, Label.annotator_id))}
            kept: set[int] = set()
            for row in s.scalars(select(Assignment).order_by(Assignment.id)):
                if (row.task_id, row.annotator_id) in labelled:
                    continue
                if row.annotator_id in kept:
                    s.delete(row)
                else:
                    kept.add(row.annotator_id)
                    s.add(OpenAssignment(annotator_id=row.annotator_id, task_id=row.task_id))
            s.commit()

    # annotators
    def set_replication(self, replication: int) -> None:
        """Record the annotators per task the app serves with, for the commands that count against it."""
        if replication < 1:
            raise StackRLHFError(f"--replication {replication}: give at least 1 annotator per task")
        with self.session.begin() as s:
            s.merge(Setting(name="replication", value=str(int(replication))))

    def replication(self, given: int = 0) -> int:
        """``given`` when set (> 0), else what `serve` recorded, else :data:`DEFAULT_REPLICATION`."""
        if given > 0:
            return given
        with self.session() as s:
            row = s.get(Setting, "replication")
        return int(row.value) if row is not None else DEFAULT_REPLICATION

    def add_annotator(self, name: str, admin: bool = False, kind: str = "human") -> str:
        """Create an annotator; returns their token (shown once, stored hashed)."""
        if kind not in ANNOTATOR_KINDS:
            raise StackRLHFError(f"annotator kind {kind!r}: use one of {', '.join(ANNOTATOR_KINDS)}")
        if not name.strip() or len(name) > 100:
            raise StackRLHFError(f"annotator name {name[:120]!r}: give 1 to 100 characters")
        if (kind == "simulated") != name.startswith(SIMULATED_PREFIX):
            raise StackRLHFError(f"annotator name {name!r}: names starting with {SIMULATED_PREFIX!r} are kept for "
                                 "simulated annotators (and theirs always start so); choose another name")
        token = secrets.token_urlsafe(24)
        with self.session() as s:
            if s.scalar(select(Annotator).where(Annotator.name == name)) is not None:
                raise StackRLHFError(f"an annotator named {name!r} exists already")
            s.add(Annotator(name=name, token_hash=hash_token(token), is_admin=admin, kind=kind))
            s.commit()
        return token

    def annotator_by_token(self, token: str | None) -> Annotator | None:
        if not token:
            return None
        with self.session() as s:
            return s.scalar(select(Annotator).where(Annotator.token_hash == hash_token(token)))

    # sign-ins
    def start_session(self, annotator_id: int) -> str:
        """A new sign-in for the annotator; returns its id (for a cookie, or as a Bearer credential)."""
        session_id = secrets.token_urlsafe(32)
        with self.session() as s:
            s.execute(delete(LoginSession).where(LoginSession.expires < now()))  # expired ones go
            s.add(LoginSession(id_hash=hash_token(session_id), annotator_id=annotator_id,
                               expires=now() + timedelta(days=SESSION_DAYS)))
            s.commit()
        return session_id

    def annotator_by_session(self, session_id: str | None) -> Annotator | None:
        if not session_id:
            return None
        with self.session() as s:
            return s.scalar(select(Annotator).join(LoginSession, LoginSession.annotator_id == Annotator.id)
                            .where(LoginSession.id_hash == hash_token(session_id), LoginSession.expires > now()))

    def end_session(self, session_id: str | None) -> None:
        if session_id:
            with self.session() as s:
                s.execute(delete(LoginSession).where(LoginSession.id_hash == hash_token(session_id)))
                s.commit()

    # tasks
    def add_task(self, question: dict, candidates: list[dict], split: str = "", batch: str = "") -> int:
        with self.session() as s:
            task = Task(site=question["site"], qid=int(question["qid"]), title=question.get("title") or "",
                        question=question.get("question") or "", prompt=question["prompt"],
                        question_link=question.get("question_link") or "",
                        question_author=question.get("question_author") or "", license=question.get("license") or "",
                        split=split, batch=batch)
            for i, c in enumerate(candidates):
                task.candidates.append(Candidate(position=i, text=c["text"], source=c.get("source", "model"),
                                                 model=c.get("model", ""), sampling=c.get("sampling") or {},
                                                 answer_link=c.get("answer_link", ""), author=c.get("author", "")))
            s.add(task)
            s.commit()
            return task.id

    def get_task(self, task_id: int) -> Task | None:
        with self.session() as s:
            task = s.get(Task, task_id)
            if task is not None:
                task.candidates  # noqa: B018 - load them before the session closes
            return task

    def next_task(self, annotator_id: int, replication: int) -> int | None:
        """The annotator's open task, else a new one: the oldest task with fewer than ``replication`` holders
        that this annotator has not had; None only when no such task exists. Concurrent callers race for the
        same slot; the unique slot and open-assignment rows decide, and the loser looks again (finding the task
        it now holds, or another one: after a lost race it picks at random among the first few, so twenty
        annotators do not keep colliding on one task). Every lost race means someone else took a slot, and
        slots are finite, so the loop ends; the bound only turns a defect into an error instead of a hang."""
        for attempt in range(MAX_TAKE_ATTEMPTS):
            with self.session() as s:
                held = s.scalar(select(OpenAssignment.task_id).where(OpenAssignment.annotator_id == annotator_id))
                if held is not None:
                    return held
                mine = select(Assignment.task_id).where(Assignment.annotator_id == annotator_id)
                offered, holding = self._slot_counts()
                rows = s.execute(
                    select(Task.id, func.coalesce(self._counts.c.top, -1) + 1)
                    .outerjoin(self._counts, self._counts.c.task_id == Task.id)
                    .outerjoin(self._skips, self._skips.c.task_id == Task.id)
                    .where(Task.id.not_in(mine), holding < replication, offered < replication * MAX_OFFERS_PER_SLOT)
                    .order_by(holding.desc(), Task.id).limit(1 if attempt == 0 else SPREAD_AFTER_COLLISION)).all()
                if not rows:
                    return None
                candidate, slot = rows[0] if attempt == 0 else random.choice(rows)  # slot: unique per task
                s.add(Assignment(task_id=candidate, annotator_id=annotator_id, slot=slot))
                s.add(OpenAssignment(annotator_id=annotator_id, task_id=candidate))
                try:
                    s.commit()
                    return candidate
                except IntegrityError:
                    s.rollback()
        raise StoreError(503, f"could not take a task after {MAX_TAKE_ATTEMPTS} attempts (every one collided); "
                         "try again")

    # The per-task counts the queries join, built once. They were built lazily per store, and two threads' first
    # calls could each build one: a query then joined one object and filtered on the other's columns, which SQL
    # reads as a cross join with an empty table before any assignment exists, so it found no task at all.
    _counts = (select(Assignment.task_id, func.count().label("n"), func.max(Assignment.slot).label("top"))
               .group_by(Assignment.task_id).subquery())
    _skips = (select(Label.task_id, func.count().label("n")).where(Label.skipped.is_(True))
              .group_by(Label.task_id).subquery())

    def _slot_counts(self):
        """(annotators offered the task, annotators holding a slot: offered minus those who skipped it)."""
        offered = func.coalesce(self._counts.c.n, 0)
        return offered, offered - func.coalesce(self._skips.c.n, 0)

    def is_assigned(self, task_id: int, annotator_id: int) -> bool:
        with self.session() as s:
            return s.scalar(select(Assignment.id).where(Assignment.task_id == task_id,
                                                        Assignment.annotator_id == annotator_id)) is not None

    def progress(self, annotator_id: int, replication: int) -> tuple[int, int]:
        """(labels done, labels this annotator can be given in all: done + open tasks they may still take)."""
        with self.session() as s:
            done = s.scalar(select(func.count()).select_from(Label).where(Label.annotator_id == annotator_id)) or 0
            mine = select(Assignment.task_id).where(Assignment.annotator_id == annotator_id)
            offered, held = self._slot_counts()
            available = s.scalar(select(func.count()).select_from(Task)
                                 .outerjoin(self._counts, self._counts.c.task_id == Task.id)
                                 .outerjoin(self._skips, self._skips.c.task_id == Task.id)
                                 .where(Task.id.not_in(mine), held < replication,
                                        offered < replication * MAX_OFFERS_PER_SLOT)) or 0
            assigned = s.scalar(select(func.count()).select_from(Assignment)
                                .where(Assignment.annotator_id == annotator_id)) or 0
            return done, assigned + available

    # labels
    def save_label(self, annotator_id: int, task_id: int, client_id: str, ratings: dict, best: int | None,
                   skipped: bool, comment: str, seconds: float = 0.0) -> bool:
        """Store (or, from the same annotator, replace) a label. Returns False when this annotator's ``client_id``
        was accepted before (a retried submit, or a late replay of an older edit): nothing changes then."""
        key = scoped_client_id(annotator_id, client_id)
        with self.session() as s:
            if s.scalar(select(Submission.id).where(Submission.client_key == key)) is not None:
                return False
            label = s.scalar(select(Label).where(Label.task_id == task_id, Label.annotator_id == annotator_id))
            if label is not None and label.skipped and not skipped:
                raise StoreError(409, f"You skipped task {task_id}: its place went back to the pool (someone else "
                                      "may have it now), so it can no longer take your label.")
            edits = s.scalar(select(func.count()).select_from(Submission).where(
                Submission.annotator_id == annotator_id, Submission.task_id == task_id)) or 0
            if edits >= MAX_SUBMISSIONS_PER_TASK:
                raise StoreError(429, f"Task {task_id} has been submitted {edits} times by you, the most allowed; "
                                      "your last submission stands.")
            s.add(Submission(client_key=key, annotator_id=annotator_id, task_id=task_id))
            s.execute(delete(OpenAssignment).where(OpenAssignment.annotator_id == annotator_id,
                                                   OpenAssignment.task_id == task_id))
            if label is None:
                label = Label(task_id=task_id, annotator_id=annotator_id, client_id=key)
                s.add(label)
            label.client_id = key
            label.ratings = {str(k): v for k, v in ratings.items()}
            label.best_candidate_id = best
            label.skipped = skipped
            label.comment = comment
            label.seconds = seconds
            try:
                s.commit()
            except IntegrityError:  # the same client id raced in from a parallel retry
                s.rollback()
                return False
            return True

    def label_of(self, task_id: int, annotator_id: int) -> Label | None:
        with self.session() as s:
            return s.scalar(select(Label).where(Label.task_id == task_id, Label.annotator_id == annotator_id))

    def all_labels(self) -> list[Label]:
        with self.session() as s:
            return list(s.scalars(select(Label).order_by(Label.id)))

    def all_tasks(self) -> list[Task]:
        with self.session() as s:
            tasks = list(s.scalars(select(Task).order_by(Task.id)))
            for t in tasks:
                t.candidates  # noqa: B018
            return tasks

    def annotators(self) -> list[Annotator]:
        with self.session() as s:
            return list(s.scalars(select(Annotator).order_by(Annotator.id)))

    def revoke(self, name: str) -> int:
        """Invalidate an annotator's token and end their sign-ins (their labels stay); the tasks they held
        unlabelled go back to the pool. `add-annotator` is refused for the name, so a new token is issued with
        :meth:`reissue`. Returns how many tasks were freed."""
        with self.session() as s:
            who = s.scalar(select(Annotator).where(Annotator.name == name))
            if who is None:
                raise StackRLHFError(f"no annotator named {name!r}")
            who.token_hash = "revoked:" + secrets.token_hex(24)  # matches no token's hash
            labelled = select(Label.task_id).where(Label.annotator_id == who.id)
            freed = s.execute(delete(Assignment).where(Assignment.annotator_id == who.id,
                                                       Assignment.task_id.not_in(labelled))).rowcount
            s.execute(delete(OpenAssignment).where(OpenAssignment.annotator_id == who.id))
            s.execute(delete(LoginSession).where(LoginSession.annotator_id == who.id))
            s.commit()
            return freed

    def reissue(self, name: str) -> str:
        """A new token for an existing annotator (the old one stops working); returns it."""
        token = secrets.token_urlsafe(24)
        with self.session() as s:
            who = s.scalar(select(Annotator).where(Annotator.name == name))
            if who is None:
                raise StackRLHFError(f"no annotator named {name!r}")
            who.token_hash = hash_token(token)
            s.execute(delete(LoginSession).where(LoginSession.annotator_id == who.id))  # the old sign-ins end too
            s.commit()
        return token

    def skipped_tasks(self, replication: int) -> dict:
        """Tasks someone skipped, and those that ran out of offers without ``replication`` labels."""
        with self.session() as s:
            skipped = dict(s.execute(select(Label.task_id, func.count()).where(Label.skipped.is_(True))
                                     .group_by(Label.task_id)).all())
            offered = dict(s.execute(select(Assignment.task_id, func.count()).group_by(Assignment.task_id)).all())
        exhausted = [t for t, n in skipped.items() if offered.get(t, 0) >= replication * MAX_OFFERS_PER_SLOT]
        return {"tasks_with_skips": len(skipped), "tasks_out_of_offers": len(exhausted)}

    def counts(self) -> dict:
        with self.session() as s:
            return {"tasks": s.scalar(select(func.count()).select_from(Task)) or 0,
                    "labels": s.scalar(select(func.count()).select_from(Label)) or 0,
                    "annotators": s.scalar(select(func.count()).select_from(Annotator)) or 0}
