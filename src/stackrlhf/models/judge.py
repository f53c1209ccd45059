"""Judges: score answers to questions for the simulated annotators (``feedback simulate``) and for ``eval --judge``.

A judge is known and fixed, unlike the proxy RM that learns from its labels (Gao et al. 2022's gold model):
- ``rm:DIR``: a reward model or ensemble, normalised with its training statistics;
- ``reference``: how close the answer is to the question's best human answer, plus how relevant it is to the
  question, as cosine similarities of all-MiniLM-L6-v2 sentence embeddings (the offline encoder of the ``rm``
  extra): s = cos(answer, best human answer) + 0.25 cos(answer, question) (relevance down-weighted: it alone
  ordered answers much as the whole judge did, so repeating the question paid). It is put on a standard scale by the
  scores of the other human answers of held-out questions (their mean and spread), so 0 is a typical human
  answer and one unit is one standard deviation of them.
``length_neutral``: the judge's linear trend in log words is taken off, so length alone cannot please it; an RM
must carry one (``stackrlhf rm --residualize-length``), the reference judge fits its own on its human answers.
Every judge takes question rows (``prompt``, ``site``, ``qid``; the reference judge finds the best human answer
by (site, qid) in the data build) and answers, and returns one score per answer.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from stackrlhf.errors import StackRLHFError
from stackrlhf.stats import words

CALIBRATION_QUESTIONS = 200  # held-out questions whose non-best human answers set the reference judge's scale
# the weight of cos(answer, question) beside cos(answer, best human answer). At 1 an answer that only repeats the
# question scored +1.5 SD above a typical human answer; at 0.25, +1.1, with the same accuracy on pairs of human
# answers (0.59 vs 0.60, SE 0.03; benchmarks/judge_check.py on the four shared sites, 2026-12-01)
RELEVANCE_WEIGHT = 0.25


def judge_kind(spec: str) -> str:
    """``rm`` or ``reference``; a clear error for anything else."""
    if spec == "reference":
        return "reference"
    if spec.startswith("rm:") and len(spec) > 3:
        return "rm"
    raise StackRLHFError(f"judge {spec!r}: give rm:DIR (a reward model or ensemble directory) or reference")


def load_judge(spec: str, data: str = "", length_neutral: bool = False, device: str = "cpu"):
    """The judge a spec names (``rm:DIR`` or ``reference``, which needs the data build ``data``)."""
    if judge_kind(spec) == "rm":
        return RewardModelJudge(spec[3:], length_neutral, device)
    if not data:
        raise StackRLHFError("the reference judge needs --data: the `stackrlhf data build` whose questions were asked")
    key = (str(data), length_neutral, device)
    if key not in _REFERENCE_JUDGES:  # its scale and embeddings are reused by every later simulate/eval call
        _REFERENCE_JUDGES[key] = ReferenceJudge(data, length_neutral, device)
    return _REFERENCE_JUDGES[key]


_REFERENCE_JUDGES: dict[tuple, ReferenceJudge] = {}


class RewardModelJudge:
    def __init__(self, path: str, length_neutral: bool, device: str = "cpu"):
        from stackrlhf.models.reward import RewardModel

        self.rm = RewardModel.from_pretrained(path, device=device)
        if length_neutral and not getattr(self.rm, "length_slope", 0.0):
            raise StackRLHFError(f"length-neutral judge: {path} has no length correction; train it with "
                                 "`stackrlhf rm --residualize-length`")
        self.lock = threading.Lock()  # annotator threads share one judge

    def knows(self, question: dict) -> bool:
        return True

    def score(self, questions: list[dict], answers: list[str]) -> list[float]:
        with self.lock:
            return self.rm.score([q["prompt"] for q in questions], answers, normalize=True)


def _rows(data: str, dataset: str, split: str) -> list[dict]:
    from stackrlhf.data.load import load_split

    try:
        return load_split(data, dataset, split).to_list()
    except StackRLHFError:
        return []


class ReferenceJudge:
    def __init__(self, data: str, length_neutral: bool, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        from stackrlhf.models.reward import default_backbone

        self.encoder = SentenceTransformer(default_backbone(), device=device)
        self.relevance_weight = RELEVANCE_WEIGHT
        self.lock = threading.Lock()
        self.cache: dict[str, np.ndarray] = {}  # embeddings of the human answers and questions, computed once
        self.references: dict[tuple[str, int], str] = {}
        evaluation = _rows(data, "evaluation", "test")
        rl = _rows(data, "rl", "train")
        if rl and "reference_answer" not in rl[0]:
            raise StackRLHFError(f"{data}: its rl split has no reference answers (built by an older version); "
                                 "rebuild it with `stackrlhf data build`")
        for row in rl:
            if row["reference_answer"]:
                self.references[(row["site"], int(row["qid"]))] = row["reference_answer"]
        for row in evaluation:
            if row["best_answer"]:
                self.references[(row["site"], int(row["qid"]))] = row["best_answer"]
        if not self.references:
            raise StackRLHFError(f"{data}: no question with a human answer in its rl or evaluation split")
        # the scale: every non-best human answer of up to CALIBRATION_QUESTIONS held-out questions
        rng = np.random.RandomState(0)
        calibration = [row for row in evaluation if len(row["answers"]) > 1]
        calibration = [calibration[i] for i in sorted(rng.permutation(len(calibration))[:CALIBRATION_QUESTIONS])]
        qs = [row for row in calibration for _ in row["answers"][1:]]
        texts = [a["text"] for row in calibration for a in row["answers"][1:]]
        self.mean, self.std, self.slope, self.center = 0.0, 1.0, 0.0, 0.0
        if len(texts) < 10:
            raise StackRLHFError(f"{data}: the reference judge needs at least 10 non-best human answers in the "
                                 f"evaluation split to set its scale; it has {len(texts)}")
        raw = np.asarray(self._raw(qs, texts))
        logw = np.log1p([words(t) for t in texts])
        if length_neutral and logw.std() > 0:
            self.slope, self.center = float(np.polyfit(logw, raw, 1)[0]), float(logw.mean())
            raw = raw - self.slope * (logw - self.center)
        self.mean, self.std = float(raw.mean()), max(float(raw.std()), 1e-6)

    def knows(self, question: dict) -> bool:
        """Whether the question has a human answer to judge against (an unanswered rl question has none)."""
        return (question["site"], int(question["qid"])) in self.references

    def reference_of(self, question: dict) -> str:
        key = (question["site"], int(question["qid"]))
        if key not in self.references:
            raise StackRLHFError(f"the reference judge knows no human answer of {key[0]} question {key[1]}: judge "
                                 "questions of the data build given with --data (its rl or evaluation split)")
        return self.references[key]

    def _cosines(self, questions: list[dict], answers: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(cos(answer, best human answer), cos(answer, question)) of each answer."""
        refs = [self.reference_of(q) for q in questions]
        prompts = [q["prompt"] for q in questions]
        with self.lock:
            new = list(dict.fromkeys(t for t in refs + prompts if t not in self.cache))
            for text, e in zip(new, self._encode(new)):
                self.cache[text] = e
            a = self._encode(list(answers))
            r = np.stack([self.cache[t] for t in refs])
            q = np.stack([self.cache[t] for t in prompts])
        return (a * r).sum(1), (a * q).sum(1)

    def similarity(self, questions: list[dict], answers: list[str]) -> list[float]:
        return self._cosines(questions, answers)[0].tolist()

    def relevance(self, questions: list[dict], answers: list[str]) -> list[float]:
        return self._cosines(questions, answers)[1].tolist()

    def _raw(self, questions: list[dict], answers: list[str]) -> list[float]:
        similarity, relevance = self._cosines(questions, answers)
        return (similarity + self.relevance_weight * relevance).tolist()

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1))
        return self.encoder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)

    def score(self, questions: list[dict], answers: list[str]) -> list[float]:
        if not answers:
            return []
        raw = np.asarray(self._raw(questions, answers))
        if self.slope:
            raw = raw - self.slope * (np.log1p([words(t) for t in answers]) - self.center)
        return ((raw - self.mean) / self.std).tolist()


def paired_se(a: list[float], b: list[float]) -> float | None:
    """Standard error of mean(a - b) over paired items (the same questions); None for fewer than two."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None

