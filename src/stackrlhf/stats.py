"""What votes follow besides answer quality, and the linear preference model of those confounders alone.

On Stack Exchange a longer answer and an earlier-posted answer collect more votes whatever they say (the
shared dumps: log length and log hours after the question predict 0.79 of the held-out test pairs, more than
any text model trained on them). This module owns the two covariates, per answer:

- ``length``: log(1 + words of the answer);
- ``time``: log(1 + hours between the question and the answer); unknown (NaN) when either date is missing,
  as in human-label pairs from ``feedback export``.

and a Bradley-Terry model on them, ``P(j beats k) = sigmoid(w . (z_j - z_k))`` (a logistic regression without
intercept on covariate differences), which the reward model's adjusted training starts from and every RM
report compares against: an RM is only worth its compute for what it knows beyond this model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime

import numpy as np

from stackrlhf.errors import StackRLHFError

CONFOUNDERS = ("length", "time")


def parse_confounders(names: Iterable[str]) -> list[str]:
    """``["length,time"]`` / ``["length", "time"]`` -> ``["length", "time"]``; ``none`` (or nothing) -> ``[]``.
    Unknown names are refused with the valid ones."""
    out: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name or name == "none":
                continue
            if name not in CONFOUNDERS:
                raise StackRLHFError(f"unknown confounder {name!r} in --adjust: use {', '.join(CONFOUNDERS)} "
                                     "(comma-separated), or none")
            if name not in out:
                out.append(name)
    return [n for n in CONFOUNDERS if n in out]  # a fixed order, so weights line up with names


def words(text: str) -> int:
    return len(text.split())


def question_overlap(answer: str, question: str, n: int = 3) -> float:
    """Share of the answer's word n-grams (lower case) that appear in the question: how much of an answer is
    the question repeated (a judge that rewards relevance pays for copying it)."""
    def grams(text: str) -> list[tuple[str, ...]]:
        w = text.lower().split()
        return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]

    mine = grams(answer)
    if not mine:
        return 0.0
    theirs = set(grams(question))
    return sum(g in theirs for g in mine) / len(mine)


def _parse_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).rstrip("Z")).replace(tzinfo=None)
    except ValueError:
        return None


def hours_after(question_date: str | None, answer_date: str | None) -> float:
    """Hours from the question to the answer (>= 0); NaN when a date is missing or unreadable."""
    q, a = _parse_date(question_date), _parse_date(answer_date)
    if q is None or a is None:
        return math.nan
    return max((a - q).total_seconds() / 3600.0, 0.0)


def answer_covariates(text: str, question_date: str | None, answer_date: str | None,
                      names: Sequence[str] = CONFOUNDERS) -> list[float]:
    """One answer's covariates, in the order of ``names`` (NaN where unknown)."""
    values = {"length": math.log1p(words(text)), "time": math.log1p(hours_after(question_date, answer_date))}
    return [values[n] for n in names]


def pair_covariates(pairs, names: Sequence[str] = CONFOUNDERS) -> tuple[np.ndarray, np.ndarray]:
    """(z_chosen, z_rejected), each (pairs, len(names)), NaN where unknown, from pair rows (a dataset or a list
    of dicts) with ``chosen``, ``rejected``, ``date`` (the question's), ``date_j`` and ``date_k``."""
    rows = pairs if isinstance(pairs, list) else pairs.to_list()
    zj = [answer_covariates(r["chosen"], r.get("date"), r.get("date_j"), names) for r in rows]
    zk = [answer_covariates(r["rejected"], r.get("date"), r.get("date_k"), names) for r in rows]
    shape = (len(pairs), len(names))
    return np.array(zj, dtype=float).reshape(shape), np.array(zk, dtype=float).reshape(shape)


def pair_differences(pairs, names: Sequence[str] = CONFOUNDERS) -> np.ndarray:
    """z_chosen - z_rejected per pair, 0 where a covariate is unknown for either answer (no evidence either way)."""
    zj, zk = pair_covariates(pairs, names)
    return np.nan_to_num(zj - zk, nan=0.0)


def fit_bradley_terry(x: np.ndarray, l2: float = 1e-3, iterations: int = 50) -> np.ndarray:
    """Weights w maximising sum log sigmoid(x @ w) (+ a small L2 penalty), by Newton's method: x holds
    chosen-minus-rejected features, so this is the mirrored logistic regression without intercept."""
    x = np.asarray(x, dtype=float)
    w = np.zeros(x.shape[1])
    if not len(x):
        return w
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (1.0 - p) - l2 * w
        hess = (x * (p * (1.0 - p))[:, None]).T @ x + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-9:
            break
    return w


def pair_log_loss(margins: np.ndarray) -> np.ndarray:
    """Per pair -log sigmoid(margin), where margin is the model's chosen-minus-rejected logit."""
    return np.logaddexp(0.0, -np.asarray(margins, dtype=float))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with fewer than 3 points or a constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    sorted_v = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def length_explained_gain(early_words: Sequence[float], early_scores: Sequence[float], late_words: Sequence[float],
                          late_scores: Sequence[float], bins: int = 4) -> dict:
    """How much of a reward gain (late minus early answers) is answers getting longer (Singhal et al. 2023,
    "A Long Way to Go"): the answers are put in ``bins`` length bins (quantiles of log words over both sets);
    the gain within bins (late minus early mean per bin, weighted by the bin's answers) is the gain at equal
    length. ``length_explained_share`` = 1 - within / overall: near 0, length explains nothing; near 1, all."""
    ew, es, lw, ls = (np.asarray(v, dtype=float) for v in (early_words, early_scores, late_words, late_scores))
    out = {"words_early": _mean(ew), "words_late": _mean(lw), "reward_gain": None,
           "reward_gain_within_length_bins": None, "length_explained_share": None}
    if not len(ew) or not len(lw):
        return out
    overall = float(ls.mean() - es.mean())
    edges = np.quantile(np.log1p(np.r_[ew, lw]), np.linspace(0, 1, bins + 1)[1:-1])
    eb, lb = np.digitize(np.log1p(ew), edges), np.digitize(np.log1p(lw), edges)
    gains, weights = [], []
    for b in range(bins):
        e, la = es[eb == b], ls[lb == b]
        if len(e) and len(la):
            gains.append(la.mean() - e.mean())
            weights.append(len(e) + len(la))
    within = float(np.average(gains, weights=weights)) if gains else None
    out.update(reward_gain=overall, reward_gain_within_length_bins=within)
    if within is not None and abs(overall) > 1e-9:
        out["length_explained_share"] = float(1.0 - within / overall)
    return out


def history_length_analysis(history: list[dict]) -> dict:
    """The rollout reward's gain from the first to the last quarter of the steps, and the share of it that
    longer answers explain (:func:`length_explained_gain`); PPO's metrics and the report both read it."""
    quarter = max(len(history) // 4, 1)
    early, late = history[:quarter], history[-quarter:]
    pick = lambda rows, key: [v for h in rows for v in h.get(key, [])]  # noqa: E731
    return {"steps_compared": quarter, **length_explained_gain(
        pick(early, "response/words_each"), pick(early, "reward/score_each"),
        pick(late, "response/words_each"), pick(late, "reward/score_each"))}


def length_adjusted_gains(scores: dict[str, Sequence[float]], lengths: dict[str, Sequence[float]],
                          baseline: str) -> dict[str, dict]:
    """Each model's mean reward gain over ``baseline`` before and after regressing out length: one slope of
    reward on log(1 + words), fitted on every model's answers together, times the model's change in mean log
    words is the part of the gain that length alone predicts."""
    x = np.concatenate([np.log1p(np.asarray(lengths[m], dtype=float)) for m in scores])
    y = np.concatenate([np.asarray(scores[m], dtype=float) for m in scores])
    slope = float(np.polyfit(x, y, 1)[0]) if len(x) > 2 and x.std() > 0 else 0.0
    base_x, base_y = np.log1p(np.asarray(lengths[baseline], dtype=float)).mean(), np.mean(scores[baseline])
    out = {}
    for m in scores:
        gain = float(np.mean(scores[m]) - base_y)
        from_length = slope * float(np.log1p(np.asarray(lengths[m], dtype=float)).mean() - base_x)
        out[m] = {"gain": gain, "gain_length_adjusted": gain - from_length, "reward_per_log_word": slope}
    return out


def gain_text(m: dict, judge: str, base: str, missing: str = "-") -> str:
    """A judge's gain over the baseline and the same with length regressed out, "+0.120 / +0.080"."""
    adjusted = m.get(f"gain_{judge}_vs_{base}_length_adjusted")
    return missing if adjusted is None else f"{m[f'gain_{judge}_vs_{base}']:+.3f} / {adjusted:+.3f}"


def _mean(v: np.ndarray) -> float | None:
    return float(v.mean()) if len(v) else None


def below_chance(metrics: dict | None) -> str:
    """Why optimising this reward model would move a policy against the preferences it was measured on: the
    upper end of the 95% interval of its held-out pairwise accuracy (the evaluation questions' pairs when it was
    scored on them, else its eval split) is below 0.5. Empty when it is not, or when it has no held-out pairs."""
    metrics = metrics or {}
    for where, m in (("the evaluation questions' pairs", metrics.get("test") or {}), ("its eval pairs", metrics)):
        ci = m.get("accuracy_ci95")
        if ci and m.get("accuracy") is not None:
            if ci[1] < 0.5:
                return (f"held-out accuracy {m['accuracy']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] on {where} "
                        f"({m.get('eval_pairs', '?')} pairs), below chance; the longer answer wins "
                        f"{m.get('baseline_longer_wins') or float('nan'):.2f} of them")
            return ""
    return ""
