"""How good a reward model is, on held-out and test pairs: accuracy beside the baselines votes follow (the
longer answer wins, the earlier one wins, a coin), with question-bootstrap intervals, per site and by margin;
and whether it knows anything that length and posting time do not. `stackrlhf rm`, `stackrlhf rm-ensemble`
and `benchmarks/rm_baselines.py` report through these functions."""

from __future__ import annotations

import math
from collections import defaultdict

import datasets
import numpy as np
from rich.table import Table

from stackrlhf.stats import (CONFOUNDERS, fit_bradley_terry, hours_after, pair_differences,
                                          pair_log_loss, spearman, words)
from stackrlhf.console import console

CALIBRATION_EDGES = (0.0, 0.25, 0.5, 1.0, 2.0, math.inf)


def pair_scores(rm, pairs: datasets.Dataset, batch_size: int, normalize: bool = False,
                progress: str = "") -> np.ndarray:
    """(pairs, 2): the reward of each pair's chosen and rejected answer."""
    scores = rm.score(list(pairs["prompt"]) * 2, list(pairs["chosen"]) + list(pairs["rejected"]), batch_size,
                      normalize=normalize, progress=progress)
    return np.array(scores).reshape(2, -1).T


def _win_rate(flags: list[float]) -> float | None:
    """Mean of the flags; None (JSON null) when there are none."""
    return float(np.mean(flags)) if flags else None


def question_bootstrap_ci(values: np.ndarray, groups: list, samples: int = 2000, seed: int = 0) -> list[float] | None:
    """95% interval of the mean of per-pair ``values``, resampling whole questions: pairs of one question share
    answers, so treating them as independent would make the interval too narrow."""
    if len(values) == 0:
        return None
    _, gid = np.unique(np.array([str(g) for g in groups]), return_inverse=True)
    sums, counts = np.bincount(gid, weights=values), np.bincount(gid)
    draw = np.random.default_rng(seed).integers(0, len(sums), size=(samples, len(sums)))
    means = sums[draw].sum(1) / counts[draw].sum(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def evaluation_report(pairs: datasets.Dataset, rewards: np.ndarray) -> dict:
    """Held-out accuracy beside the baselines, on the shorter-is-better pairs, per site, and calibration."""
    chosen_len = np.array([len(c) for c in pairs["chosen"]])
    rejected_len = np.array([len(r) for r in pairs["rejected"]])
    correct = rewards[:, 0] > rewards[:, 1]
    longer = np.where(chosen_len == rejected_len, 0.5, (chosen_len > rejected_len).astype(float))
    dates_j, dates_k = pairs["date_j"], pairs["date_k"]
    earlier = [0.5 if (dj or "") == (dk or "") else float((dj or "") < (dk or "")) for dj, dk in zip(dates_j, dates_k)]
    shorter_better = chosen_len < rejected_len
    rm_picks_longer = (rewards[:, 0] > rewards[:, 1]) == (chosen_len > rejected_len)
    per_site: dict[str, list[bool]] = defaultdict(list)
    for site, ok in zip(pairs["site"], correct):
        per_site[site].append(bool(ok))
    questions = list(zip(pairs["site"], pairs["qid"]))
    margins = np.abs(rewards[:, 0] - rewards[:, 1])
    calibration = []
    for lo, hi in zip(CALIBRATION_EDGES, CALIBRATION_EDGES[1:]):
        sel = (margins >= lo) & (margins < hi)
        calibration.append({"margin_from": lo, "margin_to": hi if math.isfinite(hi) else None,
                            "pairs": int(sel.sum()), "accuracy": _win_rate(correct[sel].tolist())})
    return {
        "eval_pairs": len(pairs), "accuracy": _win_rate(correct.tolist()),
        "baseline_longer_wins": _win_rate(longer.tolist()), "baseline_earlier_wins": _win_rate(earlier),
        "baseline_random": 0.5,
        "eval_questions": len(set(questions)),
        "accuracy_ci95": question_bootstrap_ci(correct.astype(float), questions),
        "accuracy_minus_longer_wins_ci95": question_bootstrap_ci(correct - longer, questions),
        "accuracy_minus_earlier_wins_ci95": question_bootstrap_ci(correct - np.array(earlier), questions),
        "shorter_better_pairs": int(shorter_better.sum()),
        "accuracy_shorter_better": _win_rate(correct[shorter_better].tolist()),
        "agreement_with_longer_wins": _win_rate(rm_picks_longer[chosen_len != rejected_len].tolist()),
        "per_site_accuracy": {s: {"pairs": len(v), "accuracy": _win_rate(v)} for s, v in sorted(per_site.items())},
        "calibration": calibration,
    }


def lookup_pair_scores(scores: dict, pairs: datasets.Dataset) -> np.ndarray:
    """(pairs, 2) rewards of chosen and rejected, from :func:`answer_scores`."""
    return np.array([[scores[(r["prompt"], r["chosen"])], scores[(r["prompt"], r["rejected"])]] for r in pairs])


def confounder_report(fit_pairs: datasets.Dataset, fit_rewards: np.ndarray, pairs: datasets.Dataset,
                      rewards: np.ndarray, fit_on: str = "held-out") -> dict:
    """Does the RM know anything that length and time do not? On ``pairs`` (the test pairs):

    - the covariates-only model (log words, log hours after the question): accuracy and log-loss;
    - ``incremental_log_loss_gain``: its log-loss minus that of covariates + the RM's score difference, both
      fitted on ``fit_pairs`` (the held-out pairs; the RM trained on its training pairs, so its scores there are
      overconfident), in nats per pair, with the question-bootstrap 95 % interval; > 0: the RM adds knowledge;
    - ``length_spearman``: rank correlation of the reward with answer words over the distinct answers, and
      ``length_spearman_per_site`` the same within each site (a pooled figure can hide opposite site trends);
    - accuracy on length-matched pairs (word counts within 20 %) and on pairs posted within 24 h of each other.
    """
    x_fit, x = pair_differences(fit_pairs), pair_differences(pairs)
    w_cov = fit_bradley_terry(x_fit)
    w_full = fit_bradley_terry(np.c_[x_fit, fit_rewards[:, 0] - fit_rewards[:, 1]])
    cov_margin = x @ w_cov
    full_margin = np.c_[x, rewards[:, 0] - rewards[:, 1]] @ w_full
    gain = pair_log_loss(cov_margin) - pair_log_loss(full_margin)
    questions = list(zip(pairs["site"], pairs["qid"]))
    correct = (rewards[:, 0] > rewards[:, 1]).astype(float)
    wj, wk = np.array([words(c) for c in pairs["chosen"]]), np.array([words(r) for r in pairs["rejected"]])
    matched = np.minimum(wj, wk) >= 0.8 * np.maximum(wj, wk)
    qdates = pairs["date"] if "date" in pairs.column_names else [None] * len(pairs)
    hj = np.array([hours_after(q, d) for q, d in zip(qdates, pairs["date_j"])])
    hk = np.array([hours_after(q, d) for q, d in zip(qdates, pairs["date_k"])])
    with np.errstate(invalid="ignore"):
        close = np.abs(hj - hk) <= 24.0
    distinct, site_of = {}, {}
    for site, prompt, chosen, rejected, (pj, pk) in zip(pairs["site"], pairs["prompt"], pairs["chosen"],
                                                         pairs["rejected"], rewards):
        distinct[(prompt, chosen)], distinct[(prompt, rejected)] = pj, pk
        site_of[(prompt, chosen)] = site_of[(prompt, rejected)] = site
    per_site = {}
    for site in sorted(set(site_of.values())):
        keys = [k for k in distinct if site_of[k] == site]
        per_site[site] = {"spearman": spearman([words(a) for _, a in keys], [distinct[k] for k in keys]),
                          "answers": len(keys)}
    subsets = {}
    for key, sel in (("length_matched", matched), ("close_in_time", close)):
        subsets[f"{key}_pairs"] = int(sel.sum())
        subsets[f"{key}_accuracy"] = _win_rate(correct[sel].tolist())
        subsets[f"{key}_accuracy_ci95"] = question_bootstrap_ci(correct[sel], [q for q, s in zip(questions, sel) if s])
    return {
        "covariates": list(CONFOUNDERS), "covariates_fit_on": fit_on, "covariates_weights": w_cov.tolist(),
        "covariates_accuracy": float(np.mean(np.where(cov_margin == 0, 0.5, cov_margin > 0))),
        "covariates_log_loss": float(pair_log_loss(cov_margin).mean()),
        "covariates_plus_rm_log_loss": float(pair_log_loss(full_margin).mean()),
        "rm_weight_beside_covariates": float(w_full[-1]),
        "incremental_log_loss_gain": float(gain.mean()),
        "incremental_log_loss_gain_ci95": question_bootstrap_ci(gain, questions),
        "length_spearman": spearman([words(a) for _, a in distinct], list(distinct.values())),
        "length_spearman_answers": len(distinct),
        "length_spearman_per_site": per_site,
        **subsets,
    }


def print_report(m: dict) -> None:
    """The accuracies beside the baselines: on the held-out pairs (which chose the epoch) and on the test pairs."""
    sets = [(f"held-out ({m['eval_pairs']} pairs)", m)] if "accuracy" in m else []
    if "test" in m:
        sets.append((f"test ({m['test']['eval_pairs']} pairs)", m["test"]))
    if not sets:
        return
    table = Table(title="pairwise accuracy")
    for col in ("", *(name for name, _ in sets)):
        table.add_column(col)
    for name, key in (("reward model", "accuracy"), ("longer answer wins", "baseline_longer_wins"),
                      ("earlier answer wins", "baseline_earlier_wins"), ("random", "baseline_random"),
                      ("reward model, shorter-is-better pairs", "accuracy_shorter_better")):
        table.add_row(name, *("n/a" if r[key] is None else f"{r[key]:.3f}" for _, r in sets))
    console.print(table)
    for name, r in sets:
        if r.get("accuracy_ci95"):
            (lo, hi), (dl, dh) = r["accuracy_ci95"], r["accuracy_minus_longer_wins_ci95"]
            console.print(f"{name}: 95% interval over {r['eval_questions']} questions: accuracy {lo:.3f}-{hi:.3f}, "
                          f"minus longer-wins {dl:+.3f} to {dh:+.3f}")
    if m.get("confounder_weights"):
        console.print("learnt confounder weights: " + ", ".join(f"{k} {v:+.3f}" for k, v in m["confounder_weights"].items()))
    t = m.get("test", {})
    if "incremental_log_loss_gain" in t:
        console.print(confounder_lines(t))


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _fmt_ci(ci) -> str:
    return "" if not ci else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def confounder_lines(t: dict) -> str:
    """What the RM knows beyond length and time, on the test pairs, as a few lines of text."""
    return "\n".join([
        f"test, beyond length and time: covariates-only model (fit on the {t['covariates_fit_on']} pairs) accuracy "
        f"{t['covariates_accuracy']:.3f}, log-loss {t['covariates_log_loss']:.4f}; adding the RM's score gains "
        f"{t['incremental_log_loss_gain']:+.4f} nats/pair{_fmt_ci(t['incremental_log_loss_gain_ci95'])}",
        f"test: reward vs answer length Spearman {_fmt(t['length_spearman'], '+.3f')} over "
        f"{t['length_spearman_answers']} answers; accuracy on length-matched pairs {_fmt(t['length_matched_accuracy'])} "
        f"({t['length_matched_pairs']}), on pairs posted within 24 h {_fmt(t['close_in_time_accuracy'])} "
        f"({t['close_in_time_pairs']})",
        *([("test: length Spearman per site: " + ", ".join(
            f"{site} {_fmt(v['spearman'], '+.3f')} ({v['answers']})" for site, v in t["length_spearman_per_site"].items()))]
          if len(t.get("length_spearman_per_site") or {}) > 1 else [])])
