"""Reward models beside the baselines a vote-trained RM must beat, on the held-out and the test pairs.

Baselines: the longer answer wins, the earlier-posted answer wins, and two linear models fitted on the same
training pairs (scikit-learn, a Bradley-Terry logistic regression on feature differences): TF-IDF of the whole
answers, and answer structure (code, links, list items, paragraphs, maths) without length. They show how much
of the votes any text model can explain on a given dump. Each ``--rm`` directory is scored on the same pairs.

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
from stackrlhf.train.reward import evaluation_report, load_pairs, load_test_pairs, pair_scores


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
    args = parser.parse_args()
    train = load_pairs([args.data], "train")
    sets = {"held-out": load_pairs([args.data], "eval"), "test": load_test_pairs([args.data])}
    sets = {k: v for k, v in sets.items() if len(v)}
    tfidf = TfidfVectorizer(min_df=3, sublinear_tf=True, max_features=20000).fit(list(train["chosen"]) + list(train["rejected"]))
    scale = np.array([structure(a) for a in list(train["chosen"])]).std(0) + 1e-6
    feats = {"TF-IDF, whole answers": lambda texts: tfidf.transform(texts),
             "structure, no length": lambda texts: np.array([structure(a) for a in texts]) / scale}
    scorers = {name: (lambda pairs, f=f, m=fit_pairwise(f(list(train["chosen"])) - f(list(train["rejected"]))):
                      as_pair_scores(m, f(list(pairs["chosen"])), f(list(pairs["rejected"])))) for name, f in feats.items()}
    for path in args.rm:
        rm = RewardModel.from_pretrained(path)
        scorers[path] = lambda pairs, rm=rm: pair_scores(rm, pairs, 32, progress="scoring")
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
    print(f"\n| model | {' | '.join(f'{k} accuracy [95% CI] | {k}, shorter-is-better' for k in sets)} |")
    print("|---|" + "---|---|" * len(sets))
    for name, cells in rows.items():
        out = []
        for key in sets:
            acc, ci, shorter = cells[key]
            out.append(f"{acc:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            out.append("" if shorter is None else f"{shorter:.3f}")
        print(f"| {name} | {' | '.join(out)} |")


if __name__ == "__main__":
    main()
