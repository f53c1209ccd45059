"""``stackrlhf rm``: a reward model learnt from answer pairs with the Bradley-Terry loss
``-log sigmoid(r_j - r_k [- margin * (s_j - s_k)])``, on transformers' Trainer.

With ``--adjust length,time`` the loss is ``-log sigmoid(r_j - r_k + w . (z_j - z_k))``: the votes' confounders
z (:mod:`stackrlhf.stats`) get their own linear term with weights w learnt jointly, and a
decorrelation penalty ``lambda * cov(r, z / std z)^2`` on each batch keeps the length/time effect in w rather than in
r (ODIN, Chen et al. 2024). Only r is saved as the reward; w goes to ``metrics.json``.

Trains on any mix of pair datasets (vote pairs from ``data build``, human labels from ``feedback
export``), evaluates held-out accuracy every epoch, keeps the best epoch, and reports it beside the
baselines votes are known to follow: the longer answer wins, the earlier answer wins, a coin.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import EvalPrediction, Trainer

from stackrlhf.data.load import load_pairs, load_test_pairs
from stackrlhf.evaluate.reward_report import (confounder_report, evaluation_report, lookup_pair_scores, pair_scores,
                                              print_report)
from stackrlhf.stats import (fit_bradley_terry, pair_covariates,
                                          words)
from stackrlhf.models.freezing import apply_lora, describe_trainable, freeze_bottom
from stackrlhf.models.padding import pad
from stackrlhf.models.reward import RewardModel, default_backbone, encode_pair, load_backbone
from stackrlhf.config import save_config
from stackrlhf.errors import StackRLHFError
from stackrlhf.train.common import (GuardCallback, fsdp_requested, fsdp_units_around_embeddings, is_fsdp, last_checkpoint,
                                    unsharded_on_main, logging_callbacks, train_whole_run,
                                    training_arguments, write_metrics)
from stackrlhf.train.config import RMConfig
from stackrlhf.console import console

HEAD_NAMES = ("classifier", "score", "pooler")


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


def is_label(row: dict) -> bool:
    """A human (or simulated) label's pair, from `feedback export`, not a vote pair."""
    return str(row.get("source") or "").startswith("feedback")


def label_groups(pairs: datasets.Dataset) -> list[int]:
    """Per pair, how many pairs its label gave (1 for a vote pair): a label is one annotator's verdict on one task
    at one time, its pairs share (source, question, date). A label's loss weight is spread over its pairs."""
    def key(i: int, r: dict):
        if not is_label(r):
            return None
        ids = tuple(r.get(c) for c in ("source", "site", "qid", "date"))
        return ids if ids[-1] is not None else ("pair", i)  # no label date (an older export): a pair per label

    keys = [key(i, r) for i, r in enumerate(pairs)]
    counts = Counter(keys)
    return [1 if k is None else counts[k] for k in keys]


def label_loss_weight(pairs: datasets.Dataset, setting: float) -> float:
    """Each label's loss weight (spread over its pairs): ``setting``, or with -1 the vote pairs per label (equal
    total weight; 1 when either kind is missing)."""
    if setting != -1:
        return setting
    labels = sum(1.0 / n for r, n in zip(pairs, label_groups(pairs)) if is_label(r))
    votes = sum(not is_label(r) for r in pairs)
    return max(1.0, votes / labels) if labels else 1.0


class PairDataset(Dataset):
    """Tokenised pairs with their vote margin, loss weight and (with ``--adjust``) both answers' covariates."""

    def __init__(self, tok, pairs: datasets.Dataset, cfg: RMConfig, label_weight: float = 1.0):
        zj, zk = pair_covariates(pairs, cfg.adjust)
        sites: dict[str, int] = {}
        shares = label_groups(pairs)
        self.items = [
            {"chosen": encode_pair(tok, r["prompt"], r["chosen"], cfg.max_length, cfg.max_prompt_tokens),
             "rejected": encode_pair(tok, r["prompt"], r["rejected"], cfg.max_length, cfg.max_prompt_tokens),
             "margin": float((r["score_j"] or 0) - (r["score_k"] or 0)),
             "weight": (1.0 + (cfg.debias_weight if against_bias(r) else 0.0))
                       * (label_weight / shares[i] if is_label(r) else 1.0),
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


def _unfreeze_head(model) -> None:
    for name, p in model.named_parameters():
        if any(part in HEAD_NAMES for part in name.split(".")):
            p.requires_grad_(True)


def train_reward_model(cfg: RMConfig) -> dict:
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    backbone = cfg.model or default_backbone()
    if fsdp_requested() and not torch.cuda.is_available():
        # measured: 2 of 5 four-step runs on 2 CPU processes hung after training, the others ended 8e-4 away
        # from one process's weights; see docs/distributed.md
        raise StackRLHFError("the reward model under FSDP is not supported on CPU processes (runs hung); "
                             "use configs/accelerate/cpu-2proc.yaml (DDP)")
    train_pairs = load_pairs(cfg.data, "train", cfg.max_train_pairs, cfg.seed, cfg.pairs_half)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are there: a bad --data leaves nothing behind
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
    label_w = label_loss_weight(train_pairs, cfg.label_weight)
    train_set, eval_set = PairDataset(tok, train_pairs, cfg, label_w), PairDataset(tok, eval_pairs, cfg)
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
    fsdp_units_around_embeddings(trainer)
    if cfg.lora and is_fsdp(trainer):
        raise StackRLHFError("--lora is not supported under FSDP; train the RM with DDP (ddp.yaml) or without --lora")
    _, whole = train_whole_run(trainer, last_checkpoint(out, cfg.resume))
    final = trainer.model.merge_and_unload() if cfg.lora else trainer.model
    if is_fsdp(trainer):  # the report and the artifact come from the whole model, on the main process
        final = unsharded_on_main(trainer, lambda: _fresh_backbone(backbone, start_weights))
        if final is None:
            trainer.accelerator.wait_for_everyone()
            return {}
    w = confounder_param(final)
    learnt = w.detach().float().tolist() if w is not None else []
    if w is not None:  # the reward is r alone
        owner = next(m for m in final.modules() if CONFOUNDER_PARAM in m._parameters)
        del owner._parameters[CONFOUNDER_PARAM]
    for p in final.parameters():
        p.requires_grad_(True)
    rm = RewardModel(final, tok, cfg.max_length, cfg.max_prompt_tokens)
    rm.adjusted_for = dict(zip(cfg.adjust, learnt))
    metrics = {**whole, "train_pairs": len(train_set),
               "train_pairs_against_bias": sum(against_bias(r) for r in train_pairs),
               "train_pairs_dropped_time_only": dropped, "adjust": list(cfg.adjust),
               "train_label_pairs": sum(is_label(r) for r in train_pairs), "label_weight": label_w,
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


def _fresh_backbone(backbone: str, start_weights: list[float]):
    """An untrained copy of the RM's model (with its covariate weights, if any), for trained weights to load into."""
    model, _ = load_backbone(backbone)
    if start_weights:
        model.register_parameter(CONFOUNDER_PARAM, torch.nn.Parameter(torch.tensor(start_weights, dtype=torch.float)))
    return model


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
    """Set ``rm``'s length correction: the least-squares slope of its scores on log(1 + words) within questions
    (both centred on their question's mean) over the training answers, and their mean log words; returns those
    scores with the trend removed, as ``rm.score`` now gives. Within, not across, questions: a reward compares
    answers to the same question (pairs, best-of-n, RLOO's k answers), and a slope fitted across questions
    would take off the trend between them (questions with long answers scoring higher), which, subtracted within
    a question, makes the reward prefer the shorter answer. Without a question of two answers: the global slope."""
    x = np.array([np.log1p(words(a)) for _, a in scores])
    y = np.array(list(scores.values()))
    prompts = [p for p, _ in scores]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    xc, yc = x.copy(), y.copy()
    for idx in groups.values():
        xc[idx] -= x[idx].mean()
        yc[idx] -= y[idx].mean()
    if any(len(idx) > 1 for idx in groups.values()) and (xc ** 2).sum() > 0:
        slope = float((xc * yc).sum() / (xc ** 2).sum())
    else:
        slope = float(np.polyfit(x, y, 1)[0]) if len(x) > 2 and x.std() > 0 else 0.0
    rm.length_slope, rm.length_center = slope, float(x.mean()) if len(x) else 0.0
    return {k: v - slope * (xi - rm.length_center) for (k, v), xi in zip(scores.items(), x)}


def score_stats(scores: dict) -> dict:
    """Mean and std of the scores of every distinct training answer: what the RL stages normalise rewards by."""
    values = np.array(list(scores.values()))
    return {"mean": float(values.mean()), "std": float(values.std()), "answers": len(values)}
