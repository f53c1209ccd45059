"""Reward models beside the baselines a vote-trained RM must beat, on the held-out and the test pairs.

Baselines: the longer answer wins, the earlier-posted answer wins, the covariates-only model (a Bradley-Terry
fit on log words and log hours after the question: what length and time explain together), and two linear
models fitted on the training pairs (scikit-learn, a Bradley-Terry logistic regression on feature differences):
TF-IDF of the whole answers, and answer structure (code, links, list items, paragraphs, maths) without length.
Each ``--rm`` directory is scored on the same pairs. The last columns answer "does it know anything length and
time don't?": the test log-loss of covariates + the model's score against covariates alone (both fitted on the
held-out pairs), in nats per pair with a question-bootstrap 95 % interval, and the reward's Spearman correlation
with answer length.

    pip install -e ".[bench,rm]"
    python benchmarks/rm_baselines.py --data outputs/data-all --rm outputs/rm-256 --rm outputs/rm-ensemble
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from stackrlhf.models.reward import RewardModel
from stackrlhf.data.load import load_pairs, load_test_pairs
from stackrlhf.evaluate.reward_report import confounder_report, evaluation_report, pair_scores
from stackrlhf.train.reward import answer_scores, residualize_length


def structure(text: str) -> list[float]:
    return [text.count("```") + text.count("\n    "), len(re.findall(r"https?://", text)),
            len(re.findall(r"^\s*(?:[-*]|\d+[.)])\s", text, re.M)), text.count("\n\n"), text.count("$")]


def fit_pairwise(diff_train) -> LogisticRegression:
    """Bradley-Terry as a logistic regression without intercept on (chosen - rejected), mirrored."""
    x = sp.vstack([sp.csr_matrix(diff_train), -sp.csr_matrix(diff_train)])
    y = np.r_[np.ones(diff_train.shape[0]), np.zeros(diff_train.shape[0])]
    return LogisticRegression(C=0.1, fit_intercept=False, max_iter=2000).fit(x, y)


def as_pair_scores(model: LogisticRegression, chosen, rejected) -> np.ndarray:
    return np.stack([np.asarray(sp.csr_matrix(m) @ model.coef_.ravel()).ravel() for m in (chosen, rejected)], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a `stackrlhf data build` output")
    parser.add_argument("--rm", action="append", default=[], help="a reward-model or ensemble directory")
    parser.add_argument("--residualize", action="store_true",
                        help="also score each --rm with its length trend over the training answers removed, as "
                             "`stackrlhf rm --residualize-length` would have saved it")
    args = parser.parse_args()
    train = load_pairs([args.data], "train")
    sets = {"held-out": load_pairs([args.data], "eval"), "test": load_test_pairs([args.data])}
    sets = {k: v for k, v in sets.items() if len(v)}
    tfidf = TfidfVectorizer(min_df=3, sublinear_tf=True, max_features=20000).fit(list(train["chosen"]) + list(train["rejected"]))
    scale = np.array([structure(a) for a in list(train["chosen"])]).std(0) + 1e-6
    feats = {"TF-IDF, whole answers": lambda texts: tfidf.transform(texts),
             "structure, no length": lambda texts: np.array([structure(a) for a in texts]) / scale}
    def probe(f):  # a linear model on feature differences, fitted once on the training pairs
        m = fit_pairwise(f(list(train["chosen"])) - f(list(train["rejected"])))
        return lambda pairs: as_pair_scores(m, f(list(pairs["chosen"])), f(list(pairs["rejected"])))

    scorers = {name: probe(f) for name, f in feats.items()}
    for path in args.rm:
        rm = RewardModel.from_pretrained(path)
        scorers[path] = lambda pairs, rm=rm: pair_scores(rm, pairs, 32, progress="scoring")
        if args.residualize and not getattr(rm, "length_slope", 0.0):
            flat = RewardModel.from_pretrained(path)
            residualize_length(flat, answer_scores(flat, train, 32, progress="scoring the training answers"))
            print(f"{path}: length slope over the training answers {flat.length_slope:+.4f}")
            scorers[f"{path}, length residualized"] = lambda pairs, rm=flat: pair_scores(rm, pairs, 32, progress="scoring")
    rows = {}
    for key, pairs in sets.items():
        first = evaluation_report(pairs, np.zeros((len(pairs), 2)))
        rows.setdefault("longer answer wins", {})[key] = (first["baseline_longer_wins"], None, 0.0)
        rows.setdefault("earlier answer wins", {})[key] = (first["baseline_earlier_wins"], None, None)
        for name, score in scorers.items():
            r = evaluation_report(pairs, score(pairs))
            rows.setdefault(name, {})[key] = (r["accuracy"], r["accuracy_ci95"], r["accuracy_shorter_better"])
        print(f"{key}: {len(pairs)} pairs, {first['eval_questions']} questions, "
              f"{first['shorter_better_pairs']} with the shorter answer better")
    beyond = {}
    if "test" in sets:  # what each scorer adds to length and time on the test pairs
        fit = sets.get("held-out", train)
        for name, score in scorers.items():
            beyond[name] = confounder_report(fit, score(fit), sets["test"], score(sets["test"]),
                                             fit_on="held-out" if "held-out" in sets else "train")
        covariates = next(iter(beyond.values()), None) or confounder_report(
            fit, np.zeros((len(fit), 2)), sets["test"], np.zeros((len(sets["test"]), 2)))
        rows = {"length + time (covariates-only BT)": {"test": (covariates["covariates_accuracy"], None, None)},
                **rows}
        print(f"covariates-only model on test: accuracy {covariates['covariates_accuracy']:.3f}, log-loss "
              f"{covariates['covariates_log_loss']:.4f} (fit on the {covariates['covariates_fit_on']} pairs)")
    sites = sorted({s for b in beyond.values() for s in b["length_spearman_per_site"]})
    extra = (["test: log-loss gain beyond length+time [95% CI]", "test: reward~length Spearman"]
             + [f"Spearman, {site}" for site in sites]) if beyond else []
    print(f"\n| model | {' | '.join(f'{k} accuracy [95% CI] | {k}, shorter-is-better' for k in sets)} |"
          + "".join(f" {c} |" for c in extra))
    print("|---|" + "---|---|" * len(sets) + "---|" * len(extra))
    for name, cells in rows.items():
        out = []
        for key in sets:
            acc, ci, shorter = cells.get(key, (None, None, None))
            out.append("" if acc is None else f"{acc:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            out.append("" if shorter is None else f"{shorter:.3f}")
        if extra:
            b = beyond.get(name)
            gain_ci = (b or {}).get("incremental_log_loss_gain_ci95") or [0.0, 0.0]
            out.append("" if b is None else f"{b['incremental_log_loss_gain']:+.4f} [{gain_ci[0]:+.4f}, {gain_ci[1]:+.4f}]")
            out.append("" if b is None or b["length_spearman"] is None else f"{b['length_spearman']:+.3f}")
            for site in sites:
                v = (b or {}).get("length_spearman_per_site", {}).get(site, {}).get("spearman")
                out.append("" if v is None else f"{v:+.3f}")
        print(f"| {name} | {' | '.join(out)} |")


if __name__ == "__main__":
    main()
