"""``stackrlhf rm-ensemble``: several trained reward models as one directory that works wherever a reward model
does (Coste et al. 2023: a policy that exploits one member's mistake gains less from the ensemble)."""

from __future__ import annotations

from pathlib import Path


from stackrlhf.data.load import load_pairs, load_test_pairs
from stackrlhf.errors import StackRLHFError
from stackrlhf.evaluate.reward_report import (confounder_report, evaluation_report, lookup_pair_scores, pair_scores,
                                              print_report)
from stackrlhf.models.reward import RewardEnsemble
from stackrlhf.train.common import write_metrics
from stackrlhf.train.reward import answer_scores, score_stats
from stackrlhf.console import console



def build_reward_ensemble(members: list[str], out: str, data: list[str], combine: str = "mean",
                          batch_size: int = 32) -> dict:
    """``stackrlhf rm-ensemble``: several trained reward models as one directory. It measures the combined
    score's mean/std on the training answers of ``data`` (for normalising, as ``stackrlhf rm`` does) and, when
    ``data`` has held-out (and test) pairs, the same report as ``stackrlhf rm``, with each member's accuracy."""
    if len(members) < 2:
        raise StackRLHFError("an ensemble needs two or more reward models")
    ensemble = RewardEnsemble(RewardEnsemble.load_members(members), combine, paths=members)
    train_pairs, eval_pairs = load_pairs(data, "train"), load_pairs(data, "eval")
    if not len(train_pairs):
        raise StackRLHFError(f"{', '.join(data)}: no training pairs to measure the ensemble's scores on")
    train_scores = answer_scores(ensemble, train_pairs, batch_size, "training answers, member")
    ensemble.stats = score_stats(train_scores)
    metrics = {"members": len(members), "combine": combine, "reward_mean": ensemble.stats["mean"],
               "reward_std": ensemble.stats["std"]}
    fit = (train_pairs, lookup_pair_scores(train_scores, train_pairs), "train")
    for key, pairs in (("", eval_pairs), ("test", load_test_pairs(data))):
        if not len(pairs):
            continue
        each = [pair_scores(m, pairs, batch_size, normalize=True, progress=f"{key or 'held-out'} pairs, member {i + 1}")
                for i, m in enumerate(ensemble.members)]
        combined = ensemble.combine_scores([e.T.reshape(-1).tolist() for e in each]).numpy().reshape(2, -1).T
        report = {**evaluation_report(pairs, combined),
                  "member_accuracy": {p: evaluation_report(pairs, e)["accuracy"] for p, e in zip(members, each)}}
        if key:
            metrics[key] = {**report, **confounder_report(fit[0], fit[1], pairs, combined, fit_on=fit[2])}
        else:
            metrics.update(report)
            fit = (pairs, combined, "held-out")
    ensemble.save_pretrained(out)
    write_metrics(Path(out), metrics)
    print_report(metrics)
    console.print(f"[green]wrote {out}[/]")
    return metrics
