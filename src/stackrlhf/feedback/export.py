"""From labels to training data and to numbers: preference pairs in the data pipeline's pair schema (so
``stackrlhf rm --data votes_dir --data feedback_dir`` trains on both), the raw ratings, and agreement."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stackrlhf.data.schema import PAIRS, shard_file
from stackrlhf.feedback.store import ANNOTATOR_KINDS, FeedbackStore

TIE = "tie"


def preference(label, positions: dict[int, int]) -> str | None:
    """A label's preference as a category: the better answer's position ("0", "1", ...) or "tie"; None if skipped."""
    if label.skipped:
        return None
    return TIE if label.best_candidate_id is None else str(positions[label.best_candidate_id])


def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Agreement of two annotators on the same items beyond chance: (p_o - p_e) / (1 - p_e)."""
    n = len(a)
    if n == 0:
        return float("nan")
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / n**2
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def krippendorff_alpha(units: list[list[str]]) -> float:
    """Krippendorff's alpha for nominal data: any number of annotators, missing values allowed.
    ``units``: per item, the categories its annotators gave (items with fewer than two are not pairable)."""
    coincidence: dict[tuple[str, str], float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    coincidence[(c, k)] += 1.0 / (m - 1)
    n_c: dict[str, float] = defaultdict(float)
    for (c, _), v in coincidence.items():
        n_c[c] += v
    n = sum(n_c.values())
    if n <= 1:
        return float("nan")
    observed = sum(v for (c, k), v in coincidence.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n - 1)
    return 1.0 if expected == 0 else 1.0 - observed / expected


def label_statistics(labels: list, tasks: dict, names: dict) -> dict:
    """Agreement on the preference (Krippendorff's alpha, pairwise Cohen's kappa) and ratings by model, over
    ``labels`` (one kind of annotator: people's and simulated labels are never pooled)."""
    positions = {c.id: c.position for t in tasks.values() for c in t.candidates}
    prefs: dict[int, dict[int, str]] = defaultdict(dict)
    for label in labels:
        p = preference(label, positions)
        if p is not None:
            prefs[label.task_id][label.annotator_id] = p
    annotators = sorted({a for v in prefs.values() for a in v})
    kappas = {}
    for x, y in combinations(annotators, 2):
        shared = [t for t, v in prefs.items() if x in v and y in v]
        if shared:
            kappas[f"{names[x]}~{names[y]}"] = {"items": len(shared), "kappa": cohen_kappa(
                [prefs[t][x] for t in shared], [prefs[t][y] for t in shared])}
    ratings: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"usefulness": [], "accuracy": []})
    wins: Counter = Counter()
    shown: Counter = Counter()
    candidates = {c.id: c for t in tasks.values() for c in t.candidates}
    for label in labels:
        if label.skipped:
            continue
        for cid, r in label.ratings.items():
            who = candidates[int(cid)].model or "human answer"
            ratings[who]["usefulness"].append(r["usefulness"])
            ratings[who]["accuracy"].append(r["accuracy"])
            shown[who] += 1
        if label.best_candidate_id is not None:
            wins[candidates[label.best_candidate_id].model or "human answer"] += 1
    by_model = {m: {"ratings": len(r["usefulness"]), "usefulness": float(np.mean(r["usefulness"])),
                    "accuracy": float(np.mean(r["accuracy"])), "chosen_best": wins[m] / max(shown[m], 1)}
                for m, r in ratings.items()}
    distribution = {kind: {m: dict(sorted(Counter(r[kind]).items())) for m, r in ratings.items()}
                    for kind in ("usefulness", "accuracy")}
    return {"labels": len(labels), "items_with_two_or_more_labels": sum(len(v) >= 2 for v in prefs.values()),
            "krippendorff_alpha": krippendorff_alpha([list(v.values()) for v in prefs.values()]),
            "cohen_kappa": kappas, "by_model": by_model, "rating_distribution": distribution}


def feedback_stats(store: FeedbackStore, replication: int = 2) -> dict:
    """Counts, and each kind of annotator's statistics apart (``by_kind``). The top-level agreement and
    ratings are people's when there are any, else the simulated annotators' (``statistics_of`` says which)."""
    tasks = {t.id: t for t in store.all_tasks()}
    annotators = store.annotators()
    names = {a.id: a.name for a in annotators}
    kinds = {a.id: a.kind or "human" for a in annotators}
    labels = store.all_labels()
    by_kind = {kind: label_statistics([lb for lb in labels if kinds[lb.annotator_id] == kind], tasks, names)
               for kind in ANNOTATOR_KINDS if any(kinds[lb.annotator_id] == kind for lb in labels)}
    main = "human" if "human" in by_kind or not by_kind else "simulated"
    top = by_kind.get(main) or label_statistics([], tasks, names)
    return {**store.counts(), "skipped": sum(label.skipped for label in labels), **store.skipped_tasks(replication),
            "labels_per_annotator": dict(Counter(names[label.annotator_id] for label in labels)),
            "labels_by_kind": dict(Counter(kinds[label.annotator_id] for label in labels)),
            **{k: v for k, v in top.items() if k != "labels"}, "statistics_of": main, "by_kind": by_kind}


def rating_score(label, candidate) -> int:
    """A pair's score for one answer: the annotator's usefulness + accuracy (2 .. 10)."""
    r = label.ratings.get(str(candidate.id), {})
    return int(r.get("usefulness", 0) + r.get("accuracy", 0))


def author_of(candidate) -> str:
    return candidate.author if candidate.source == "human" else f"model:{candidate.model}"


def label_pairs_of(label, best, others, mode: str) -> list[tuple]:
    """The (preferred, other) answers a label says. ``one``: the pick against the lowest-rated other answer.
    ``all``: the pick against every other answer, and of the other answers each pair whose ratings differ, the
    higher-rated first: the whole K-way choice and the ratings. The reward model weighs each label's pairs so
    that they sum to one pair's weight (``stackrlhf.train.reward.label_groups``): a label counts once whatever K."""
    ranked = sorted(others, key=lambda c: (rating_score(label, c), c.position))
    if mode == "one":
        return [(best, ranked[0])] if ranked else []
    pairs = [(best, other) for other in ranked]
    for i, low in enumerate(ranked):
        pairs += [(high, low) for high in ranked[i + 1:] if rating_score(label, high) > rating_score(label, low)]
    return pairs


def export_feedback(store: FeedbackStore, out: str | Path, include_evaluation: bool = False,
                    label_pairs: str = "one") -> dict:
    """``OUT/reward/train-00000-of-00001.parquet`` (the pairs each label says, :func:`label_pairs_of`: ``one`` by
    default, the chosen answer against the lowest-rated other, or ``all`` of them; ties and skips give none) and
    ``OUT/ratings.parquet`` (every rating, with its task's split), written to a temp folder and renamed when
    complete.

    Labels of tasks queued from the ``evaluation`` split give no pairs unless ``include_evaluation``: a reward
    model trained on them would have seen the questions ``eval`` scores. ``stats.json`` counts what was left out
    (``pairs_left_out_evaluation``)."""
    out = Path(out)
    tasks = {t.id: t for t in store.all_tasks()}
    names = {a.id: a.name for a in store.annotators()}
    kinds = {a.id: a.kind or "human" for a in store.annotators()}
    candidates = {c.id: c for t in tasks.values() for c in t.candidates}
    pairs, ratings = [], []
    left_out = 0
    for label in store.all_labels():
        task = tasks[label.task_id]
        for cid, r in label.ratings.items():
            c = candidates[int(cid)]
            ratings.append({"task_id": task.id, "site": task.site, "qid": task.qid, "annotator": names[label.annotator_id],
                            "annotator_kind": kinds[label.annotator_id],
                            "candidate_id": c.id, "source": c.source, "model": c.model, "usefulness": r["usefulness"],
                            "accuracy": r["accuracy"], "best": label.best_candidate_id == c.id,
                            "tie": label.best_candidate_id is None, "comment": label.comment,
                            "question_link": task.question_link, "license": task.license,
                            "split": task.split or ""})
        if label.skipped or label.best_candidate_id is None:
            continue
        if task.split == "evaluation" and not include_evaluation:
            left_out += 1
            continue
        pick = candidates[label.best_candidate_id]
        others = [c for c in task.candidates if c.id != pick.id]
        for best, other in label_pairs_of(label, pick, others, label_pairs):
            pairs.append({
                "qid": task.qid, "question": task.question, "date": label.created.isoformat(), "metadata": [
                    task.question_link], "response_j": best.text, "response_k": other.text, "prompt": task.prompt,
                "chosen": best.text, "rejected": other.text,
                "score_j": rating_score(label, best), "score_k": rating_score(label, other),
                "answer_id_j": best.id, "answer_id_k": other.id, "date_j": None, "date_k": None, "site": task.site,
                "title": task.title, "question_link": task.question_link, "answer_link_j": best.answer_link,
                "answer_link_k": other.answer_link, "question_author": task.question_author,
                "author_j": author_of(best), "author_k": author_of(other), "license": task.license,
                # simulated annotators' pairs say so: feedback-simulated:NAME
                "source": f"{'feedback' if kinds[label.annotator_id] == 'human' else 'feedback-simulated'}:"
                          f"{names[label.annotator_id]}"})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        (tmp / "reward").mkdir()
        pq.write_table(pa.Table.from_pylist(pairs, schema=PAIRS), tmp / "reward" / shard_file("train"))
        pq.write_table(pa.Table.from_pylist(ratings) if ratings else pa.table({"task_id": pa.array([], pa.int64())}),
                       tmp / "ratings.parquet")
        summary = {"pairs": len(pairs), "ratings": len(ratings), "label_pairs": label_pairs, "source": store.url.split("@")[-1],
                   "pairs_simulated": sum(p["source"].startswith("feedback-simulated:") for p in pairs),
                   "pairs_left_out_evaluation": left_out, "include_evaluation": include_evaluation}
        (tmp / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
