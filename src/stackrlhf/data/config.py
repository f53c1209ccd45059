"""Settings of ``stackrlhf data build``."""

from __future__ import annotations

from dataclasses import dataclass, field

from stackrlhf.data.fetch import DEFAULT_BASE_URL
from stackrlhf.data.splits import SplitFractions


@dataclass
class DataConfig:
    dump: list[str] = field(default_factory=list, metadata={
        "help": "Dump to read: a folder with Posts.xml, a .7z, a URL, or a site name (repeatable). "
                "Default: every dump in $STACKRLHF_DUMPS, else in ../shared/data/stackexchange."})
    out: str = field(default="outputs/data", metadata={"help": "Output dataset directory."})
    from_hub: str | None = field(default=None, metadata={
        "help": "Instead of a dump: a hub dataset id with lvwerra/stack-exchange-paired's schema, "
                "or a local Parquet file/folder with that schema."})
    upvotes_from: str = field(default="score", metadata={
        "choices": ("score", "votes"),
        "help": "'score': the post's net Score (as the reference datasets); 'votes': upvotes counted in Votes.xml."})
    max_pairs_per_question: int = field(default=10, metadata={"help": "At most this many pairs per question (-1: all)."})
    seed: int = field(default=0, metadata={"help": "Seed of the per-question pair sample."})
    finetune_fraction: float = field(default=0.40, metadata={"help": "Share of questions in the finetune split."})
    reward_fraction: float = field(default=0.35, metadata={"help": "Share of questions in the reward split."})
    rl_fraction: float = field(default=0.15, metadata={"help": "Share of questions in the rl split."})
    evaluation_fraction: float = field(default=0.10, metadata={"help": "Share of questions held out for evaluation."})
    finetune_eval_fraction: float = field(default=0.10, metadata={"help": "Share of finetune questions in its eval part."})
    reward_eval_fraction: float = field(default=0.15, metadata={"help": "Share of reward questions in its eval part."})
    tags: list[str] = field(default_factory=list, metadata={
        "help": "Keep only questions with at least one of these tags (repeatable)."})
    min_answer_chars: int = field(default=0, metadata={"help": "Drop answers shorter than this (Markdown chars)."})
    max_answer_chars: int = field(default=0, metadata={"help": "Drop answers longer than this (0: no limit)."})
    max_question_chars: int = field(default=0, metadata={"help": "Drop questions longer than this (0: no limit)."})
    date_from: str | None = field(default=None, metadata={"help": "Keep questions created on or after (YYYY-MM-DD)."})
    date_to: str | None = field(default=None, metadata={"help": "Keep questions created before (YYYY-MM-DD)."})
    finetune_min_score: int = field(default=0, metadata={
        "help": "Finetune rows need an answer scoring at least this (the score rule's -1 marks negative posts)."})
    cache: str | None = field(default=None, metadata={"aliases": ("cache_dir",),
        "help": "Where downloads and unpacked archives go [$STACKRLHF_CACHE or ~/.cache/stackrlhf]."})
    base_url: str = field(default=DEFAULT_BASE_URL, metadata={"help": "Base URL of the dump archives."})
    workers: int = field(default=0, metadata={
        "help": "Processes that parse the XML (in byte ranges) and join the buckets (0: one per core). "
                "The output is the same for any number."})
    join_bucket_mb: int = field(default=4, metadata={
        "help": "Answers are joined to questions in buckets of about this many MB of Posts.xml, so the join's "
                "memory is bounded by the bucket, not by the dump (at most 256 buckets); a bucket is one "
                "worker's task. Changing it changes the row order of the output."})
    memory_limit: str = field(default="2GB", metadata={
        "help": "DuckDB memory limit for the join, per worker; it spills beyond."})
    threads: int = field(default=0, metadata={"help": "DuckDB threads with --workers 1 (0: all cores); "
                                                      "with more workers each uses one."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --out even if it is not a stackrlhf dataset."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        if isinstance(self.dump, str):
            self.dump = [self.dump]
        if isinstance(self.tags, str):
            self.tags = [self.tags]
        self._fractions = SplitFractions(  # validates; built once, read per question
            self.finetune_fraction, self.reward_fraction, self.rl_fraction, self.evaluation_fraction,
            self.finetune_eval_fraction, self.reward_eval_fraction)
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: one per core), got {self.workers}")
        if self.max_pairs_per_question < -1:
            raise ValueError(f"max_pairs_per_question must be -1 (all pairs) or >= 0, got {self.max_pairs_per_question}")
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value is not None:
                value = str(value)
                setattr(self, name, value)
                if len(value) < 4 or not value[:4].isdigit():
                    raise ValueError(f"{name} must look like YYYY-MM-DD, got {value!r}")

    @property
    def fractions(self) -> SplitFractions:
        return self._fractions
