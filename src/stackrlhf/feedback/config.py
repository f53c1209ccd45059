"""Settings of the feedback commands that are dataclasses (torch- and database-free, so the CLI starts fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stackrlhf.feedback import DEFAULT_DB

DB_HELP = "SQLAlchemy URL of the feedback store (SQLite file, or postgresql+psycopg://...)."

MAX_SIMULATED_ANNOTATORS = 64


@dataclass
class SimulateConfig:
    db: str = field(default=DEFAULT_DB, metadata={"help": DB_HELP + " Its simulated annotators are created there."})
    url: str = field(default="", metadata={"help": "The running app (`feedback serve`), e.g. http://127.0.0.1:8000; "
                                                   "empty: start one on a free loopback port for the run."})
    judge: str = field(default="", metadata={"help": "rm:DIR (a reward model or ensemble directory) or reference "
                                                     "(MiniLM similarity to the best human answer + relevance)."})
    data: str = field(default="", metadata={"help": "The data build the tasks' questions came from (the reference "
                                                    "judge reads their best human answers there)."})
    annotators: int = field(default=3, metadata={"help": "Simulated annotators, labelling concurrently."})
    noise: float = field(default=1.0, metadata={"help": "Bradley-Terry temperature of the preference (0: always "
                                                        "the judge's best)."})
    rating_noise: float = field(default=0.5, metadata={"help": "Standard deviation of the Gaussian noise on ratings."})
    skip_rate: float = field(default=0.0, metadata={"help": "Probability of skipping a task."})
    max_labels: int = field(default=0, metadata={"help": "Labels per annotator at most (0: until no task is left)."})
    replication: int = field(default=0, metadata={
        "help": "Annotators per task for the app it starts (0: as `feedback serve` last recorded in the store, else "
                "2)."})
    judge_length_neutral: bool = field(default=False, metadata={"aliases": ("length_neutral",),
        "help": "A judge that length alone cannot please: the reference judge takes its trend in log words off; an "
                "rm: judge must have one (`stackrlhf rm --residualize-length`)."})
    seed: int = field(default=0, metadata={"help": "Seed of the annotators' noise (reproducible labels)."})
    name_prefix: str = field(default="sim", metadata={"help": "Annotators are named bot:PREFIX-1 .. bot:PREFIX-N."})

    def __post_init__(self) -> None:
        if self.judge != "reference" and (not self.judge.startswith("rm:") or len(self.judge) == 3):
            raise ValueError(f"--judge {self.judge!r}: give rm:DIR (a reward model directory) or reference")
        if self.judge == "reference" and not self.data:
            raise ValueError("--judge reference needs --data: the data build the queued questions came from")
        if not 1 <= self.annotators <= MAX_SIMULATED_ANNOTATORS:
            raise ValueError(f"--annotators {self.annotators}: give 1 to {MAX_SIMULATED_ANNOTATORS} (each is a thread "
                             "holding a connection to the app)")
        if not self.name_prefix or len(self.name_prefix) > 80:
            raise ValueError("--name-prefix: give 1 to 80 characters")
        if self.annotators < 1 or self.noise < 0 or self.rating_noise < 0 or not 0 <= self.skip_rate < 1:
            raise ValueError("need --annotators >= 1, --noise >= 0, --rating-noise >= 0 and 0 <= --skip-rate < 1")


@dataclass
class QueueConfig:
    """`feedback queue` (its sampling settings are :class:`stackrlhf.models.sampling.SamplingConfig`'s)."""
    db: str = field(default=DEFAULT_DB, metadata={"help": DB_HELP})
    model: list[str] = field(default_factory=list, metadata={
        "help": "NAME=PATH of a model that answers (repeatable; ILQL outputs as NAME=PATH@BETA)."})
    data: str = field(default="", metadata={"help": "A `stackrlhf data build` output."})
    split: str = field(default="rl", metadata={"choices": ("rl", "evaluation"), "help": (
        "The split the questions come from. Labels on evaluation questions measure models but train nothing: "
        "`feedback export` leaves them out of its pairs.")})
    questions: int = field(default=20, metadata={"help": "Questions to queue."})
    answers_per_question: int = field(default=2, metadata={"help": "Candidates per task (K)."})
    control: bool = field(default=False, metadata={
        "help": "Mix in the dump's best answer as one of the K (needs --split evaluation)."})
    seed: int = field(default=0, metadata={"help": "Seed of the questions' choice and of the sampling."})
    batch: str = field(default="", metadata={"help": "A name for this batch of tasks (recorded with each)."})
    generation_batch_size: int = field(default=32, metadata={"aliases": ("batch_size",),
        "help": "Answers generated together (more is faster up to memory; the answers do not depend on it)."})

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = [self.model]
        if not self.model:
            raise ValueError("--model is required: NAME=PATH of a model that answers")
        if not self.data:
            raise ValueError("--data is required: a `stackrlhf data build` output")


@dataclass
class ServeConfig:
    """`feedback serve`: the app's address and its limits."""
    db: str = field(default=DEFAULT_DB, metadata={"help": DB_HELP})
    host: str = field(default="127.0.0.1", metadata={"help": "The address to listen on."})
    port: int = field(default=8000, metadata={"help": "The port to listen on."})
    replication: int = field(default=2, metadata={"help": "Annotators per task (R)."})
    cookie_secure: bool = field(default=False, metadata={
        "help": "Mark the sign-in cookie Secure (sent over HTTPS only): set it when TLS ends at a reverse proxy."})
    allowed_host: list[str] = field(default_factory=list, metadata={
        "help": "A Host name the app answers (repeatable; * for any). Default: the loopback names and --host."})
    allowed_origin: list[str] = field(default_factory=list, metadata={
        "help": "A page origin that may post, e.g. https://labels.example (repeatable): the public address when a "
                "reverse proxy rewrites Host."})
    trusted_proxy: list[str] = field(default_factory=list, metadata={
        "help": "Address of a reverse proxy whose X-Forwarded-For names the client (repeatable). Default: none, "
                "the TCP peer is the client (anyone can send the header)."})
