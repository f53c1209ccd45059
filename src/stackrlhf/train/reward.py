"""``stackrlhf rm``: a reward model learnt from answer pairs with the Bradley-Terry loss
``-log sigmoid(r_j - r_k [- margin * (s_j - s_k)])``, on transformers' Trainer.

With ``--adjust length,time`` the loss is ``-log sigmoid(r_j - r_k + w . (z_j - z_k))``: the votes' confounders
z (:mod:`stackrlhf.models.confounders`) get their own linear term with weights w learnt jointly, and a
decorrelation penalty ``lambda * cov(r, z / std z)^2`` on each batch keeps the length/time effect in w rather than in
r (ODIN, Chen et al. 2024). Only r is saved as the reward; w goes to ``metrics.json``.

Trains on any mix of pair datasets (vote pairs from ``data build``, human labels from ``feedback
export``), evaluates held-out accuracy every epoch, keeps the best epoch, and reports it beside the
baselines votes are known to follow: the longer answer wins, the earlier answer wins, a coin.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.data import Dataset
from transformers import EvalPrediction, Trainer

from stackrlhf.data.load import load_split
from stackrlhf.data.splits import EVALUATION_PAIRS, pair_half
from stackrlhf.models.confounders import (CONFOUNDERS, fit_bradley_terry, hours_after, pair_covariates,
                                          pair_differences, pair_log_loss, spearman, words)
from stackrlhf.models.freezing import apply_lora, describe_trainable, freeze_bottom
from stackrlhf.models.padding import pad
from stackrlhf.models.reward import RewardEnsemble, RewardModel, default_backbone, encode_pair, load_backbone
from stackrlhf.config import save_config
from stackrlhf.errors import StackRLHFError
from stackrlhf.train.common import (GuardCallback, last_checkpoint, logging_callbacks, train_whole_run,
                                    training_arguments, write_metrics)
from stackrlhf.train.config import RMConfig

console = Console(stderr=True)
HEAD_NAMES = ("classifier", "score", "pooler")
CALIBRATION_EDGES = (0.0, 0.25, 0.5, 1.0, 2.0, math.inf)
PAIR_COLUMNS = ["site", "qid", "date", "prompt", "chosen", "rejected", "score_j", "score_k", "date_j", "date_k"]


def load_pairs(dirs: list[str], split: str, limit: int = 0, seed: int = 0, half: str = "all",
               dataset: str = "reward") -> datasets.Dataset:
    """The ``<dataset>/<split>`` pairs of every directory, concatenated. Every directory must have training
    pairs; one without held-out pairs (a small feedback export, say) adds none to ``eval`` or ``test``.
    ``half`` (``proxy`` / ``gold``) keeps the vote pairs of one half of the questions only
    (:func:`stackrlhf.data.splits.pair_half`); labelled pairs (a `feedback export`, source ``feedback...``) are
    always kept: no gold RM learns from them."""
    parts = []
    for d in dirs:
        if split != "train" and not list((Path(d) / dataset).glob(f"{split}-*.parquet")):
            continue
        part = load_split(d, dataset, split)
        if half != "all":
            sources = part["source"] if "source" in part.column_names else [""] * len(part)
            keep = [i for i, (site, qid, source) in enumerate(zip(part["site"], part["qid"], sources))
                    if (source or "").startswith("feedback") or pair_half(site, qid) == half]
            part = part.select(keep)
        parts.append(part.select_columns(PAIR_COLUMNS))
    if not parts:
        return datasets.Dataset.from_dict({c: [] for c in PAIR_COLUMNS})
    pairs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if limit and len(pairs) > limit:
        pairs = pairs.shuffle(seed=seed).select(range(limit))
    return pairs


def load_test_pairs(dirs: list[str], limit: int = 0, seed: int = 0) -> datasets.Dataset:
    """The pairs of the ``evaluation`` questions (``evaluation_pairs/test``): no reward model trains on them or
    picks its epoch on them, so they measure it without the optimism of choosing the best epoch."""
    return load_pairs(dirs, EVALUATION_PAIRS[1], limit, seed, dataset=EVALUATION_PAIRS[0])


def pair_scores(rm, pairs: datasets.Dataset, batch_size: int, normalize: bool = False,
                progress: str = "") -> np.ndarray:
    """(pairs, 2): the reward of each pair's chosen and rejected answer."""
    scores = rm.score(list(pairs["prompt"]) * 2, list(pairs["chosen"]) + list(pairs["rejected"]), batch_size,
                      normalize=normalize, progress=progress)
    return np.array(scores).reshape(2, -1).T


def against_bias(row: dict) -> bool:
    """The better answer is the shorter one or the later-posted one: a pair where the votes' two known biases
    (length, time) point the wrong way, so its preference must come from the content."""
    later = bool(row["date_j"] and row["date_k"] and row["date_j"] > row["date_k"])
    return len(row["chosen"]) < len(row["rejected"]) or later


def time_only(row: dict) -> bool:
    """The better answer was posted earlier and wins by a single point: a pair the earlier answer's longer
    exposure to voters explains on its own (``--drop-time-only-pairs``)."""
    earlier = bool(row["date_j"] and row["date_k"] and row["date_j"] < row["date_k"])
    return earlier and (row["score_j"] or 0) - (row["score_k"] or 0) <= 1


class PairDataset(Dataset):
    """Tokenised pairs with their vote margin, loss weight and (with ``--adjust``) both answers' covariates."""

    def __init__(self, tok, pairs: datasets.Dataset, cfg: RMConfig):
        zj, zk = pair_covariates(pairs, cfg.adjust)
        sites: dict[str, int] = {}
        self.items = [
            {"chosen": encode_pair(tok, r["prompt"], r["chosen"], cfg.max_length, cfg.max_question_tokens),
             "rejected": encode_pair(tok, r["prompt"], r["rejected"], cfg.max_length, cfg.max_question_tokens),
             "margin": float((r["score_j"] or 0) - (r["score_k"] or 0)),
             "weight": 1.0 + (cfg.debias_weight if against_bias(r) else 0.0),
             "z": np.concatenate([zj[i], zk[i]]).tolist(), "site": sites.setdefault(r.get("site") or "", len(sites))}
            for i, r in enumerate(pairs)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PairCollator:
    """One forward pass per batch: the chosen answers, then the rejected ones, right-padded together."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        ids, mask = pad([b["chosen"] for b in batch] + [b["rejected"] for b in batch], self.pad_id)
        k = len(batch[0]["z"]) // 2
        z = torch.tensor([b["z"] for b in batch], dtype=torch.float).reshape(len(batch), 2, k)
        return {"input_ids": ids, "attention_mask": mask,
                "margin": torch.tensor([b["margin"] for b in batch], dtype=torch.float),
                "weight": torch.tensor([b["weight"] for b in batch], dtype=torch.float),
                "covariates": torch.cat([z[:, 0], z[:, 1]]),  # (2 * pairs, k) in the order of input_ids
                "sites": torch.tensor([b["site"] for b in batch] * 2)}  # the decorrelation is within sites


CONFOUNDER_PARAM = "confounder_weights"


def confounder_param(model) -> torch.nn.Parameter | None:
    """The covariate weights w, wherever a wrapper (DDP, peft) has put the model's parameter names."""
    return next((p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == CONFOUNDER_PARAM), None)


def batch_covariance(r: torch.Tensor, z: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Covariance of r with each standardised column of z over the rows where that column is known (k,):
    corr(r, z_k) * std(r). Unlike the correlation its gradient stays bounded when r's spread is small (as
    at the start, where a correlation penalty's 1/std(r) gradient would swamp the preference loss). With
    ``groups`` (a site id per row) r and z are centred within each group first: the covariance within sites,
    which a pooled one can hide when sites differ in both length and reward."""
    out = []
    for col in z.T:
        known = ~torch.isnan(col)
        if known.sum() < 3 or col[known].std() == 0:
            out.append(r.new_zeros(()))
            continue
        a, b = r[known], col[known]
        if groups is None:
            a, b = a - a.mean(), b - b.mean()
        else:
            g = groups[known]
            for gid in g.unique():
                sel = g == gid
                a = torch.where(sel, a - a[sel].mean(), a)
                b = torch.where(sel, b - b[sel].mean(), b)
        if b.std() == 0:
            out.append(r.new_zeros(()))
            continue
        out.append((a * b).mean() / b.std(unbiased=False))
    return torch.stack(out)


class RewardTrainer(Trainer):
    """transformers' Trainer with the pairwise loss; predictions are (r_chosen, r_rejected) per pair.

    With confounders (the model carries ``confounder_weights``, one per covariate) the pair logit gains
    ``w . (z_j - z_k)`` and the loss ``decorrelation * sum_k cov(r, z_k / std z_k)^2`` over the batch's answers."""

    def __init__(self, *args, margin_scale: float = 0.0, decorrelation: float = 0.0, confounder_lr: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.margin_scale, self.decorrelation, self.confounder_lr = margin_scale, decorrelation, confounder_lr

    def create_optimizer(self, model=None):
        """The covariate weights get their own learning rate (and no weight decay): they start from the
        covariates-only fit and must keep up with r, which moves at the backbone's small learning rate."""
        model = model or self.model
        w = confounder_param(model)
        if self.optimizer is None and w is not None:
            decay = set(self.get_decay_parameter_names(model))
            rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p is not w]
            groups = [{"params": [p for n, p in rest if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in rest if n not in decay], "weight_decay": 0.0},
                      {"params": [w], "weight_decay": 0.0, "lr": self.confounder_lr}]
            optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(groups, **kwargs)
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        margin, weight, z = inputs.pop("margin"), inputs.pop("weight"), inputs.pop("covariates")
        groups = inputs.pop("sites")
        rewards = model(**inputs).logits[:, 0]
        r_j, r_k = rewards.chunk(2)
        logit = r_j - r_k - self.margin_scale * margin
        w = confounder_param(model)
        if w is not None:
            z_j, z_k = z.chunk(2)
            logit = logit + torch.nan_to_num(z_j - z_k, nan=0.0) @ w
        loss = (weight * -F.logsigmoid(logit)).sum() / weight.sum()
        if w is not None and self.decorrelation and model.training:
            loss = loss + self.decorrelation * batch_covariance(rewards.float(), z, groups).square().sum()
        return (loss, torch.stack([r_j, r_k], dim=1)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, pair_rewards = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), pair_rewards.detach(), torch.zeros(len(pair_rewards), device=pair_rewards.device)


def pair_accuracy(pred: EvalPrediction) -> dict:
    rewards = pred.predictions
    return {"accuracy": float(np.mean(rewards[:, 0] > rewards[:, 1]))}


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


def _unfreeze_head(model) -> None:
    for name, p in model.named_parameters():
        if any(part in HEAD_NAMES for part in name.split(".")):
            p.requires_grad_(True)


def train_reward_model(cfg: RMConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    backbone = cfg.backbone or default_backbone()
    train_pairs = load_pairs(cfg.data, "train", cfg.max_train_pairs, cfg.seed, cfg.pairs_half)
    dropped = 0
    if cfg.drop_time_only_pairs:
        keep = [i for i, r in enumerate(train_pairs) if not time_only(r)]
        dropped = len(train_pairs) - len(keep)
        train_pairs = train_pairs.select(keep)
        if not len(train_pairs):
            raise StackRLHFError("--drop-time-only-pairs left no training pairs; train without it")
    start_weights = covariates_start(train_pairs, cfg.adjust)
    model, tok = load_backbone(backbone)
    eval_pairs = load_pairs(cfg.data, "eval", cfg.max_eval_pairs, cfg.seed, cfg.pairs_half)
    train_set, eval_set = PairDataset(tok, train_pairs, cfg), PairDataset(tok, eval_pairs, cfg)
    if cfg.lora:
        heads = sorted({n.split(".")[0] for n, _ in model.named_parameters() if n.split(".")[0] in HEAD_NAMES})
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, task_type="SEQ_CLS",
                           modules_to_save=heads)
    elif cfg.num_layers_unfrozen >= 0:
        freeze_bottom(model, cfg.num_layers_unfrozen)
        _unfreeze_head(model)
    if cfg.adjust:  # w lives on the model, so checkpoints, resume and the best-epoch reload carry it
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.register_parameter(CONFOUNDER_PARAM, torch.nn.Parameter(torch.tensor(start_weights, dtype=torch.float)))
        console.print("adjusting for " + ", ".join(f"{n} (start w {w:+.3f})" for n, w in zip(cfg.adjust, start_weights)))
    console.print(f"reward model on {type(model).__name__} from {backbone}; {describe_trainable(model)}")
    console.print(f"{len(train_set)} training pairs from {', '.join(cfg.data)}; {len(eval_set)} held out")
    has_eval = len(eval_set) > 0
    extra = {"save_strategy": "epoch", "load_best_model_at_end": True, "metric_for_best_model": "accuracy",
             "greater_is_better": True} if has_eval and not cfg.eval_steps else {}
    args = training_arguments(cfg, out, has_eval=has_eval, **extra)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set if has_eval else None,
                            data_collator=PairCollator(tok.pad_token_id), compute_metrics=pair_accuracy,
                            callbacks=[GuardCallback(cfg.max_minutes), *logging_callbacks(cfg, out)],
                            margin_scale=cfg.margin, decorrelation=cfg.decorrelation,
                            confounder_lr=cfg.confounder_learning_rate)
    _, whole = train_whole_run(trainer, last_checkpoint(out, cfg.resume))
    final = trainer.model.merge_and_unload() if cfg.lora else trainer.model
    w = confounder_param(final)
    learnt = w.detach().float().tolist() if w is not None else []
    if w is not None:  # the reward is r alone
        owner = next(m for m in final.modules() if CONFOUNDER_PARAM in m._parameters)
        del owner._parameters[CONFOUNDER_PARAM]
    for p in final.parameters():
        p.requires_grad_(True)
    rm = RewardModel(final, tok, cfg.max_length, cfg.max_question_tokens)
    rm.adjusted_for = dict(zip(cfg.adjust, learnt))
    metrics = {**whole, "train_pairs": len(train_set),
               "train_pairs_against_bias": sum(against_bias(r) for r in train_pairs),
               "train_pairs_dropped_time_only": dropped, "adjust": list(cfg.adjust),
               "confounder_weights": rm.adjusted_for,
               "confounder_weights_start": dict(zip(cfg.adjust, start_weights))}
    train_scores = answer_scores(rm, train_pairs, cfg.per_device_eval_batch_size, "scoring the training answers")
    if cfg.residualize_length:
        train_scores = residualize_length(rm, train_scores)
        metrics.update(length_slope=rm.length_slope, length_center=rm.length_center)
    rm.stats = score_stats(train_scores)
    metrics.update(reward_mean=rm.stats["mean"], reward_std=rm.stats["std"])
    eval_rewards = None
    if has_eval:
        eval_rewards = pair_scores(rm, eval_pairs, cfg.per_device_eval_batch_size)
        metrics.update(evaluation_report(eval_pairs, eval_rewards))
        metrics["best_epoch_accuracy"] = trainer.state.best_metric
    test_pairs = load_test_pairs(cfg.data, cfg.max_eval_pairs, cfg.seed)
    if len(test_pairs):
        test_rewards = pair_scores(rm, test_pairs, cfg.per_device_eval_batch_size, progress="scoring the test pairs")
        fit = (eval_pairs, eval_rewards) if has_eval else (train_pairs, lookup_pair_scores(train_scores, train_pairs))
        metrics["test"] = {**evaluation_report(test_pairs, test_rewards),
                           **confounder_report(*fit, test_pairs, test_rewards, fit_on="held-out" if has_eval else "train")}
    if trainer.is_world_process_zero():  # one writer under `accelerate launch`
        rm.save_pretrained(out)
        save_config(cfg, out / "config.yaml")
        write_metrics(out, metrics)
        print_report(metrics)
        console.print(f"[green]wrote {out}[/]")
    trainer.accelerator.wait_for_everyone()
    return metrics


def covariates_start(train_pairs: datasets.Dataset, names: list[str]) -> list[float]:
    """The covariates-only Bradley-Terry fit on the training pairs: where the adjusted RM's w starts. Refuses
    a confounder that no training pair has for both answers (a time adjustment on human labels only, say)."""
    if not names:
        return []
    zj, zk = pair_covariates(train_pairs, names)
    for i, name in enumerate(names):
        if not np.isfinite(zj[:, i] - zk[:, i]).any():
            raise StackRLHFError(f"--adjust {name}: none of the {len(train_pairs)} training pairs has it for both "
                                 "answers (pairs from `feedback export` carry no answer dates); leave it out")
    return fit_bradley_terry(np.nan_to_num(zj - zk, nan=0.0)).tolist()


def answer_scores(rm, pairs: datasets.Dataset, batch_size: int, progress: str) -> dict[tuple[str, str], float]:
    """The score of every distinct (prompt, answer) of ``pairs``."""
    answers = sorted({(r["prompt"], a) for r in pairs for a in (r["chosen"], r["rejected"])})
    questions, texts = (list(x) for x in zip(*answers)) if answers else ([], [])
    return dict(zip(answers, rm.score(questions, texts, batch_size, progress=progress)))


def residualize_length(rm, scores: dict) -> dict:
    """Set ``rm``'s length correction: the least-squares slope of its scores on log(1 + words) over the training
    answers (and their mean log words); returns those scores with the trend removed, as ``rm.score`` now gives."""
    x = np.array([np.log1p(words(a)) for _, a in scores])
    y = np.array(list(scores.values()))
    slope = float(np.polyfit(x, y, 1)[0]) if len(x) > 2 and x.std() > 0 else 0.0
    rm.length_slope, rm.length_center = slope, float(x.mean()) if len(x) else 0.0
    return {k: v - slope * (xi - rm.length_center) for (k, v), xi in zip(scores.items(), x)}


def score_stats(scores: dict) -> dict:
    """Mean and std of the scores of every distinct training answer: what the RL stages normalise rewards by."""
    values = np.array(list(scores.values()))
    return {"mean": float(values.mean()), "std": float(values.std()), "answers": len(values)}


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
