"""``stackrlhf sft``: supervised fine-tuning on question -> answer, loss on the answer tokens only.

Built on transformers' Trainer: warm-up + cosine schedule, gradient accumulation and clipping, held-out
evaluation, checkpoints and resume, TensorBoard, and `accelerate launch` (DDP) unchanged.
``num_layers_unfrozen`` trains only the top blocks and the head; ``--lora`` trains peft adapters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from stackrlhf.config import read_json, write_text_atomic
from stackrlhf.data.load import load_split
from stackrlhf.errors import StackRLHFError
from stackrlhf.models.freezing import apply_lora, describe_trainable, freeze_bottom
from stackrlhf.models.loading import load_causal_lm
from stackrlhf.models.padding import pad
from stackrlhf.prompts import encode_prompt
from stackrlhf.train.config import SFTConfig
from stackrlhf.train.common import (GuardCallback, evaluate_before_training, final_model, last_checkpoint,
                                    logging_callbacks, save_stage, train_whole_run, training_arguments)
from stackrlhf.console import console

IGNORE = -100


def encode_example(tok, prompt: str, completion: str, max_length: int, max_prompt_length: int) -> dict:
    """Token ids and labels of one example: the prompt's labels are IGNORE, the answer's (and EOS) are kept.
    The prompt is encoded as the model is asked at inference (:func:`stackrlhf.prompts.encode_prompt`)."""
    p = encode_prompt(tok, prompt)
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(p) + len(c) > max_length:
        # the prompt keeps what the answer leaves, but at least min(max_prompt_length, half the length)
        p = encode_prompt(tok, prompt, min(len(p), max(max_length - len(c), min(max_prompt_length, max_length // 2))))
        c = c[: max_length - len(p)]
    return {"input_ids": p + c, "labels": [IGNORE] * len(p) + c}


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' LengthGroupedSampler draws its permutation from the global RNG, whose state at an epoch's
    start differs between an uninterrupted and a resumed run (so resumed losses drifted: 5.461 vs 5.488 at the
    next step). This one draws from ``seed + epoch`` (the Trainer calls ``set_epoch``): resume is exact."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class SFTTrainer(Trainer):
    """transformers' Trainer with a seeded length-grouped sampler (exact resume with ``--group-by-length``)."""

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler) and not isinstance(sampler, SeededLengthGroupedSampler):
            return SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, self.args.data_seed or self.args.seed)
        return sampler


class SFTDataset(Dataset):
    def __init__(self, tok, rows, cfg: SFTConfig, limit: int = 0):
        n = len(rows) if not limit else min(limit, len(rows))
        self.examples = [encode_example(tok, rows[i]["prompt"], rows[i]["completion"], cfg.max_length,
                                        cfg.max_prompt_tokens) for i in range(n)]
        if cfg.packing:
            self.examples = pack(self.examples, cfg.max_length)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    @property
    def tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Greedy packing in order: examples are concatenated until the next one would not fit."""
    packed, ids, labels = [], [], []
    for e in examples:
        if ids and len(ids) + len(e["input_ids"]) > max_length:
            packed.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        ids = ids + e["input_ids"]
        labels = labels + e["labels"]
    if ids:
        packed.append({"input_ids": ids, "labels": labels})
    return packed


class SFTCollator:
    """Right-pads a batch for training; padding has attention 0 and label IGNORE."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        ids, mask = pad([e["input_ids"] for e in batch], self.pad_id)
        labels, _ = pad([e["labels"] for e in batch], IGNORE)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def sft(cfg: SFTConfig) -> dict:
    cfg, chosen = cfg.resolved()  # the base's recommended layers and learning rate where none was given
    if chosen:
        console.print(chosen)
    data, out = Path(cfg.data), Path(cfg.out)
    torch.manual_seed(cfg.seed)
    # float32 weights whatever --dtype says: they are the optimizer's master copy; with bfloat16 the Trainer
    # runs the forward under autocast (TrainingArguments.bf16)
    model, tok = load_causal_lm(cfg.model, "float32", int8_trunk=False)
    train_rows = load_split(data, "finetune", "train")
    eval_rows = load_split(data, "finetune", "eval")
    out.mkdir(parents=True, exist_ok=True)  # only once the model and data are there: a bad input leaves nothing
    train_set = SFTDataset(tok, train_rows, cfg, cfg.max_train_samples)
    eval_set = SFTDataset(tok, eval_rows, SFTConfig(**{**vars(cfg), "packing": False}), cfg.max_eval_samples)
    if len(train_set) == 0:
        raise StackRLHFError(f"{data}: the finetune/train split is empty")
    if cfg.lora:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    else:
        freeze_bottom(model, cfg.num_layers_unfrozen)
    console.print(describe_trainable(model))
    console.print(f"SFT on {len(train_rows) if not cfg.max_train_samples else len(train_set)} examples "
                  f"({train_set.tokens:,} tokens{', packed' if cfg.packing else ''}), "
                  f"held out: {len(eval_set)} examples")
    strategy = "sequential" if not cfg.shuffle else (
        "group_by_length" if cfg.group_by_length and not cfg.packing else "random")
    sampling = {"train_sampling_strategy": strategy}
    trainer = SFTTrainer(model=model, args=training_arguments(cfg, out, has_eval=len(eval_set) > 0, **sampling),
                      train_dataset=train_set, eval_dataset=eval_set if len(eval_set) else None,
                      data_collator=SFTCollator(tok.pad_token_id),
                      callbacks=[GuardCallback(cfg.max_minutes), *logging_callbacks(cfg, out)])
    metrics: dict = {}
    resume_from = last_checkpoint(out, cfg.resume)
    start_file = out / "checkpoints" / "run_start.json"  # the first run's starting figures, kept for a resumed one
    if len(eval_set) and resume_from is None:
        def record_start(result: dict) -> None:
            metrics["eval_loss_start"] = result["eval_loss"]
            if trainer.is_world_process_zero():
                write_text_atomic(start_file, json.dumps(metrics))

        evaluate_before_training(trainer, record_start)
    elif resume_from is not None:
        metrics.update(read_json(start_file) or {})
    _, whole = train_whole_run(trainer, resume_from)
    metrics.update(whole)
    if len(eval_set):
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    final = final_model(trainer.model, out, cfg.lora)
    save_stage(out, final, tok, cfg, metrics, trainer.accelerator)
    console.print(f"[green]wrote {out}[/]: held-out answer loss {metrics.get('eval_loss_start', float('nan')):.3f}"
                  f" -> {metrics.get('eval_loss', float('nan')):.3f}, "
                  f"{metrics['train_tokens_per_second']:.0f} tokens/s")
    return metrics
