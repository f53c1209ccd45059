"""``stackrlhf rm``: a reward model learnt from answer pairs with the Bradley-Terry loss
``-log sigmoid(r_j - r_k [- margin * (s_j - s_k)])``, on transformers' Trainer.

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
from stackrlhf.data.splits import pair_half
from stackrlhf.models.freezing import apply_lora, describe_trainable, freeze_bottom
from stackrlhf.models.reward import RewardModel, default_backbone, encode_pair, load_backbone
from stackrlhf.config import save_config
from stackrlhf.train.common import (GuardCallback, last_checkpoint, logging_callbacks, throughput, training_arguments,
                                    write_metrics)
from stackrlhf.train.config import RMConfig

console = Console(stderr=True)
HEAD_NAMES = ("classifier", "score", "pooler")
CALIBRATION_EDGES = (0.0, 0.25, 0.5, 1.0, 2.0, math.inf)
PAIR_COLUMNS = ["site", "qid", "prompt", "chosen", "rejected", "score_j", "score_k", "date_j", "date_k"]


def load_pairs(dirs: list[str], split: str, limit: int = 0, seed: int = 0, half: str = "all") -> datasets.Dataset:
    """The ``reward/<split>`` pairs of every directory, concatenated. Every directory must have training
    pairs; one without held-out pairs (a small feedback export, say) adds none to ``eval``. ``half``
    (``proxy`` / ``gold``) keeps the questions of one half only (:func:`stackrlhf.data.splits.pair_half`)."""
    parts = []
    for d in dirs:
        if split == "eval" and not list((Path(d) / "reward").glob("eval-*.parquet")):
            continue
        parts.append(load_split(d, "reward", split).select_columns(PAIR_COLUMNS))
    if not parts:
        return datasets.Dataset.from_dict({c: [] for c in PAIR_COLUMNS})
    pairs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if half != "all":
        keep = [i for i, (site, qid) in enumerate(zip(pairs["site"], pairs["qid"])) if pair_half(site, qid) == half]
        pairs = pairs.select(keep)
    if limit and len(pairs) > limit:
        pairs = pairs.shuffle(seed=seed).select(range(limit))
    return pairs


def against_bias(row: dict) -> bool:
    """The better answer is the shorter one or the later-posted one: a pair where the votes' two known biases
    (length, time) point the wrong way, so its preference must come from the content."""
    later = bool(row["date_j"] and row["date_k"] and row["date_j"] > row["date_k"])
    return len(row["chosen"]) < len(row["rejected"]) or later


class PairDataset(Dataset):
    def __init__(self, tok, pairs: datasets.Dataset, cfg: RMConfig):
        self.items = [
            {"chosen": encode_pair(tok, r["prompt"], r["chosen"], cfg.max_length, cfg.max_question_tokens),
             "rejected": encode_pair(tok, r["prompt"], r["rejected"], cfg.max_length, cfg.max_question_tokens),
             "margin": float((r["score_j"] or 0) - (r["score_k"] or 0)),
             "weight": 1.0 + (cfg.debias_weight if against_bias(r) else 0.0)}
            for r in pairs]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PairCollator:
    """One forward pass per batch: the chosen answers, then the rejected ones, right-padded together."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        seqs = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "margin": torch.tensor([b["margin"] for b in batch], dtype=torch.float),
                "weight": torch.tensor([b["weight"] for b in batch], dtype=torch.float)}


class RewardTrainer(Trainer):
    """transformers' Trainer with the pairwise loss; predictions are (r_chosen, r_rejected) per pair."""

    def __init__(self, *args, margin_scale: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin_scale = margin_scale

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        margin, weight = inputs.pop("margin"), inputs.pop("weight")
        rewards = model(**inputs).logits[:, 0]
        r_j, r_k = rewards.chunk(2)
        loss = (weight * -F.logsigmoid(r_j - r_k - self.margin_scale * margin)).sum() / weight.sum()
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
    model, tok = load_backbone(backbone)
    train_pairs = load_pairs(cfg.data, "train", cfg.max_train_pairs, cfg.seed, cfg.pairs_half)
    eval_pairs = load_pairs(cfg.data, "eval", cfg.max_eval_pairs, cfg.seed, cfg.pairs_half)
    train_set, eval_set = PairDataset(tok, train_pairs, cfg), PairDataset(tok, eval_pairs, cfg)
    if cfg.lora:
        heads = sorted({n.split(".")[0] for n, _ in model.named_parameters() if n.split(".")[0] in HEAD_NAMES})
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, task_type="SEQ_CLS",
                           modules_to_save=heads)
    elif cfg.num_layers_unfrozen >= 0:
        freeze_bottom(model, cfg.num_layers_unfrozen)
        _unfreeze_head(model)
    console.print(f"reward model on {type(model).__name__} from {backbone}; {describe_trainable(model)}")
    console.print(f"{len(train_set)} training pairs from {', '.join(cfg.data)}; {len(eval_set)} held out")
    has_eval = len(eval_set) > 0
    extra = {"save_strategy": "epoch", "load_best_model_at_end": True, "metric_for_best_model": "accuracy",
             "greater_is_better": True} if has_eval and not cfg.eval_steps else {}
    args = training_arguments(cfg, out, has_eval=has_eval, **extra)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set if has_eval else None,
                            data_collator=PairCollator(tok.pad_token_id), compute_metrics=pair_accuracy,
                            callbacks=[GuardCallback(cfg.max_minutes), *logging_callbacks(cfg, out)],
                            margin_scale=cfg.margin)
    result = trainer.train(resume_from_checkpoint=last_checkpoint(out, cfg.resume))
    final = trainer.model.merge_and_unload() if cfg.lora else trainer.model
    for p in final.parameters():
        p.requires_grad_(True)
    rm = RewardModel(final, tok, cfg.max_length, cfg.max_question_tokens)
    metrics = {"train_loss": result.training_loss, "train_runtime_s": result.metrics["train_runtime"],
               "steps": trainer.state.global_step, "train_pairs": len(train_set),
               "train_pairs_against_bias": sum(against_bias(r) for r in train_pairs),
               **throughput(trainer, result.metrics["train_runtime"])}
    answers = {(r["prompt"], a) for r in train_pairs for a in (r["chosen"], r["rejected"])}
    questions, texts = zip(*sorted(answers)) if answers else ((), ())
    scores = np.array(rm.score(list(questions), list(texts), batch_size=cfg.per_device_eval_batch_size))
    rm.stats = {"mean": float(scores.mean()), "std": float(scores.std()), "answers": len(scores)}
    metrics.update(reward_mean=rm.stats["mean"], reward_std=rm.stats["std"])
    if has_eval:
        rewards = np.array(rm.score(list(eval_pairs["prompt"]) * 2, list(eval_pairs["chosen"]) +
                                    list(eval_pairs["rejected"]), batch_size=cfg.per_device_eval_batch_size))
        metrics.update(evaluation_report(eval_pairs, rewards.reshape(2, -1).T))
        metrics["best_epoch_accuracy"] = trainer.state.best_metric
    if trainer.is_world_process_zero():  # one writer under `accelerate launch`
        rm.save_pretrained(out)
        save_config(cfg, out / "config.yaml")
        write_metrics(out, metrics)
        print_report(metrics)
        console.print(f"[green]wrote {out}[/]")
    trainer.accelerator.wait_for_everyone()
    return metrics


def print_report(m: dict) -> None:
    if "accuracy" not in m:
        return
    table = Table(title="held-out pairs")
    for col in ("", "accuracy"):
        table.add_column(col)
    for name, key in (("reward model", "accuracy"), ("longer answer wins", "baseline_longer_wins"),
                      ("earlier answer wins", "baseline_earlier_wins"), ("random", "baseline_random"),
                      ("reward model, shorter-is-better pairs", "accuracy_shorter_better")):
        table.add_row(name, "n/a" if m[key] is None else f"{m[key]:.3f}")
    console.print(table)
