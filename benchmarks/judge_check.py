"""How well does the `reference` judge order human answers, and does copying the question pay?

    python benchmarks/judge_check.py --data outputs/demo/data [--weights 0,0.25,0.5,1]

The reference judge scores an answer s = cos(answer, the question's best human answer) + w * cos(answer,
question), standardised on held-out human answers. For each relevance weight w it prints, on the evaluation
split of a data build:
- accuracy: on pairs of two human answers to the same question (neither the best one, which is the judge's own
  reference) with different vote scores, how often the judge prefers the higher-voted one; on all such pairs
  and on length-matched ones (word counts within a factor 1.25), so length alone cannot explain it;
- copy: the judge's score of the question's own text given as the answer, in units of the judge's scale (0 = a
  typical human answer): how much an answer gains by repeating the question;
- relevance alone: the same figures for cos(answer, question) alone.
Last line: ``accuracy_w=<...> accuracy_matched_w=<...> copy_w=<...>`` for the judge's current weight.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stackrlhf.data.load import load_split  # noqa: E402
from stackrlhf.stats import words  # noqa: E402
from stackrlhf.models.judge import RELEVANCE_WEIGHT, load_judge  # noqa: E402


def human_pairs(data: str, max_questions: int) -> tuple[list[dict], list[tuple[int, int, int]], list[str]]:
    """Questions, pairs (question index, answer i, answer j with more votes), and the answers' texts."""
    rows = [r for r in load_split(data, "evaluation", "test").to_list() if r["best_answer"]][:max_questions]
    questions, pairs, texts = [], [], []
    for row in rows:
        others = [a for a in row["answers"] if a["text"] != row["best_answer"]]
        if len(others) < 2:
            continue
        q = len(questions)
        questions.append(row)
        start = len(texts)
        texts += [a["text"] for a in others]
        for (i, a), (j, b) in itertools.combinations(enumerate(others), 2):
            if a["score"] != b["score"]:
                lo, hi = (i, j) if a["score"] < b["score"] else (j, i)
                pairs.append((q, start + lo, start + hi))
    return questions, pairs, texts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="A `stackrlhf data build` output.")
    p.add_argument("--weights", default="0,0.25,0.5,1", help="Relevance weights w to compare.")
    p.add_argument("--max-questions", type=int, default=400)
    args = p.parse_args(argv)
    questions, pairs, texts = human_pairs(args.data, args.max_questions)
    owner = {}
    for q, lo, hi in pairs:
        owner[lo] = owner[hi] = q
    judge = load_judge("reference", args.data)
    qrows = [questions[owner.get(i, 0)] for i in range(len(texts))]
    # the two cosines once; every weight combines them
    judge_q = [{"site": r["site"], "qid": r["qid"], "prompt": r["prompt"]} for r in qrows]
    sim = np.asarray(judge.similarity(judge_q, texts))
    rel = np.asarray(judge.relevance(judge_q, texts))
    copies_q = [{"site": r["site"], "qid": r["qid"], "prompt": r["prompt"]} for r in questions]
    copy_text = [r["question"] for r in questions]
    copy_sim = np.asarray(judge.similarity(copies_q, copy_text))
    copy_rel = np.asarray(judge.relevance(copies_q, copy_text))
    n_words = np.asarray([words(t) for t in texts], dtype=float)
    matched = [(q, lo, hi) for q, lo, hi in pairs
               if max(n_words[lo], n_words[hi]) <= 1.25 * max(min(n_words[lo], n_words[hi]), 1)]
    print(f"{len(questions)} questions, {len(pairs)} pairs of non-best human answers with different votes, "
          f"{len(matched)} of them length-matched")
    print("judge | accuracy (all) | accuracy (length-matched) | copying the question, judge units")
    print("--- | --- | --- | ---")
    results = {}
    variants = [(f"sim + {float(w):g} x rel", 1.0, float(w)) for w in args.weights.split(",")] + [("rel alone", 0.0, 1.0)]
    for name, a, w in variants:
        raw = a * sim + w * rel
        scale = raw.std() or 1.0  # the spread of human answers on this scale
        acc = float(np.mean([raw[hi] > raw[lo] for _, lo, hi in pairs]))
        acc_m = float(np.mean([raw[hi] > raw[lo] for _, lo, hi in matched])) if matched else float("nan")
        copy = float(np.mean((a * copy_sim + w * copy_rel - raw.mean()) / scale))
        results[(a, w)] = (acc, acc_m, copy)
        print(f"{name} | {acc:.3f} | {acc_m:.3f} | {copy:+.2f}")
    acc, acc_m, copy = results.get((1.0, RELEVANCE_WEIGHT), (float("nan"),) * 3)
    print(f"accuracy_w={acc:.4f} accuracy_matched_w={acc_m:.4f} copy_w={copy:.4f}")


if __name__ == "__main__":
    main()
