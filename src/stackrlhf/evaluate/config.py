"""Settings of ``stackrlhf eval`` (torch-free, so the CLI starts fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stackrlhf.models.sampling import SAMPLER_PRECISION_HELP, SAMPLER_PRECISIONS


@dataclass
class EvalConfig:
    model: list[str] = field(default_factory=list, metadata={
        "help": "A model to evaluate, NAME=PATH (repeatable; PATH a model directory, a hub id, or an ILQL output, "
                "whose beta may be given as NAME=PATH@BETA). The first is the baseline of the win rates unless "
                "--baseline names another."})
    data: str = field(default="", metadata={"help": "A `stackrlhf data build` output (its evaluation split)."})
    reward: str = field(default="", metadata={"help": "The proxy reward model (the one RL optimised; best-of-n picks "
                                                      "with it). Optional when --judge or --gold-reward scores."})
    gold_reward: str = field(default="", metadata={
        "help": "A held-out gold reward model, trained on questions disjoint from the proxy's (`rm --pairs-half gold`)."})
    judge: str = field(default="", metadata={
        "help": "A third, fixed judge (models/judge.py): rm:DIR or reference (MiniLM similarity to the best human "
                "answer + relevance to the question); the one simulated annotators label with."})
    judge_length_neutral: bool = field(default=False, metadata={
        "help": "Take the judge's linear trend in length off (an rm: judge must carry one)."})
    reference: str = field(default="", metadata={"help": "The reference for KL (default: the baseline model)."})
    baseline: str = field(default="", metadata={"help": "NAME of the model the win rates compare against."})
    out: str = field(default="outputs/eval", metadata={"help": "Output directory (eval.json, samples.jsonl)."})
    questions: int = field(default=64, metadata={"help": "Held-out questions to answer (0: all)."})
    split: str = field(default="evaluation", metadata={
        "help": "Where the questions come from: evaluation (held out) or rl (the RL stages' prompts, each with "
                "its reference answer as the best human answer): a gain on rl but not on evaluation is one that "
                "does not carry to new questions."})
    max_new_tokens: int = field(default=96, metadata={"help": "Most tokens per answer."})
    max_prompt_tokens: int = field(default=256, metadata={"help": "Longer prompts are cut in the middle."})
    temperature: float = field(default=0.7, metadata={
        "help": "Sampling temperature; log-probs and KL use the same tempered distribution (keep top-k/top-p off: "
                "they bias the KL estimate)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1: off)."})
    sampler_precision: str = field(default="auto", metadata={"help": SAMPLER_PRECISION_HELP})
    generation_batch_size: int = field(default=16, metadata={"aliases": ("batch_size",),
                                                             "help": "Answers generated / scored per batch."})
    seed: int = field(default=0, metadata={"help": "Random seed (same questions and sampling noise for every model)."})
    samples_per_question: int = field(default=1, metadata={
        "help": "Answers each model samples per question (best-of-n: still one pick). A model's scores, KL and "
                "length are averaged per question before its gains, win rates and their standard errors: the "
                "sampling noise that dominates a one-answer comparison shrinks as 1/N, for N times the answers. The "
                "first answer of each question is the one N = 1 samples."})
    perplexity: bool = field(default=True, metadata={"help": "Score each model's perplexity of the held-out human "
                                                     "answers (false: skip it, one forward pass per model less)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    answer_cache: str = field(default="", metadata={"aliases": ("cache",),
        "help": "A folder that keeps each model's answers, their KL and its perplexity of the human answers (and "
                "best-of-n's sample pool), keyed by the model's weight files, the questions, the sampling settings "
                "and the seed: evaluating the same model again reads them instead of sampling again (the loop keeps "
                "one per registry). Empty: off."})

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = [self.model]
        if not self.model:
            raise ValueError("--model is required (NAME=PATH, repeatable)")
        if not self.data:
            raise ValueError("--data is required: a `stackrlhf data build` output")
        if self.split not in ("evaluation", "rl"):
            raise ValueError(f"--split {self.split}: evaluation or rl")
        if not (self.reward or self.gold_reward or self.judge):
            raise ValueError("give something to score with: --reward (the proxy reward model), --gold-reward or "
                             "--judge")
        if self.sampler_precision not in SAMPLER_PRECISIONS:
            raise ValueError(f"--sampler-precision {self.sampler_precision!r}: choose one of "
                             f"{', '.join(SAMPLER_PRECISIONS)}")
        if self.samples_per_question < 1:
            raise ValueError(f"--samples-per-question must be at least 1, not {self.samples_per_question}")


@dataclass
class ReportConfig:
    run: str = field(default="", metadata={
        "help": "A `stackrlhf run` directory: the report finds eval/, ppo/, rloo/, raft/, ilql/, rm/, rm-gold/, "
                "feedback/ in it."})
    eval: str = field(default="", metadata={"help": "A `stackrlhf eval` output (overrides the run's)."})
    ppo: str = field(default="", metadata={"help": "A `stackrlhf ppo` output, any --algorithm (its history.jsonl)."})
    ilql: str = field(default="", metadata={"help": "A `stackrlhf ilql` output (its history.jsonl)."})
    reward: str = field(default="", metadata={"aliases": ("rm",), "help": "The proxy reward model (its metrics.json)."})
    gold_reward: str = field(default="", metadata={"aliases": ("gold_rm",),
                                                   "help": "The gold reward model (its metrics.json)."})
    feedback: str = field(default="", metadata={
        "help": "Human feedback: a `feedback export` directory or the store's database URL."})
    registry: str = field(default="", metadata={
        "help": "A `stackrlhf loop` registry: its versions' judge scores against labels used and against KL."})
    out: str = field(default="report.html", metadata={"help": "The HTML file to write (one self-contained file)."})
    samples: int = field(default=6, metadata={"help": "Questions shown with every model's answer side by side."})
    title: str = field(default="stackrlhf report", metadata={"help": "The report's title."})

    def __post_init__(self) -> None:
        if not (self.run or self.eval or self.ppo or self.ilql or self.reward or self.registry):
            raise ValueError("give --run (a `stackrlhf run` directory), --registry (a loop registry) or the artifact "
                             "directories to report on")
