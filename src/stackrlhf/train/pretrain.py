"""``stackrlhf pretrain``: the offline base model. A byte-level BPE tokenizer and a GPT-2-style LM
trained from scratch (causal LM loss, packed blocks) on the dump text of a ``data build`` output.

Only training splits are read (finetune/train, reward/train, rl/train): held-out questions and answers
stay unseen, so later held-out perplexities and rewards are honest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import AutoTokenizer, GPT2LMHeadModel, Trainer

from stackrlhf.data.load import load_split
from stackrlhf.errors import StackRLHFError
from stackrlhf.models.freezing import count_parameters
from stackrlhf.models.offline_base import make_model, train_tokenizer
from stackrlhf.models.sizes import SIZES
from stackrlhf.train.common import (GuardCallback, last_checkpoint, logging_callbacks, save_stage, train_whole_run,
                                    training_arguments)
from stackrlhf.train.config import PretrainConfig
from stackrlhf.console import console



def documents(data_dir: Path, splits: list[tuple[str, str]]) -> Iterator[str]:
    """Each question once (with its answer when it has one in the split), each answer once."""
    seen: set[tuple[str, int]] = set()
    for dataset, split in splits:
        for row in load_split(data_dir, dataset, split):
            if dataset == "finetune":
                yield row["prompt"] + row["completion"]
            elif dataset == "rl":
                yield row["prompt"]
            else:
                for side in ("j", "k"):
                    key = (row["site"], row[f"answer_id_{side}"])
                    if key not in seen:
                        seen.add(key)
                        yield row["prompt"] + row[f"response_{side}"]


TRAIN_SPLITS = [("finetune", "train"), ("reward", "train"), ("rl", "train")]
HELDOUT_SPLITS = [("finetune", "eval")]


class PackedBlocks(Dataset):
    """Documents tokenized, joined with EOS, cut into equal blocks (the LM loss is on every token)."""

    def __init__(self, tok, texts: Iterator[str], block_size: int):
        ids: list[int] = []
        for text in texts:
            ids.extend(tok(text, add_special_tokens=False)["input_ids"])
            ids.append(tok.eos_token_id)
        n = len(ids) // block_size
        self.tokens = len(ids)
        self.blocks = torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        block = self.blocks[i]
        return {"input_ids": block, "labels": block, "attention_mask": torch.ones_like(block)}


def steps_for_budget(model, cfg: PretrainConfig, blocks: int) -> int:
    """Steps that fit in ``max_minutes`` on this machine (timed on two real steps), at most the epochs asked
    for: the cosine schedule then ends when the time does, instead of being cut off half-way."""
    batch = cfg.per_device_train_batch_size
    x = torch.randint(0, model.config.vocab_size, (batch, cfg.block_size))
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    model.load_state_dict(state)
    per_step = min(times[1:]) * cfg.gradient_accumulation_steps
    budget = int(cfg.max_minutes * 60 * 0.85 / per_step)  # leave room for evaluation and saving
    per_epoch = max(1, blocks // (batch * cfg.gradient_accumulation_steps))
    steps = max(1, min(budget, int(per_epoch * cfg.num_train_epochs)))
    console.print(f"{per_step:.1f}s per step here: {steps} steps fit in {cfg.max_minutes:g} minutes "
                  f"({steps / per_epoch:.2f} epochs)")
    return steps


def pretrain(cfg: PretrainConfig) -> dict:
    data, out = Path(cfg.data), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    vocab = cfg.vocab_size or SIZES[cfg.size][4]
    if (out / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(out))  # resuming: the vocabulary must not change
    else:
        t0 = time.perf_counter()
        tok = train_tokenizer(documents(data, TRAIN_SPLITS), vocab)
        tok.save_pretrained(str(out))
        console.print(f"tokenizer: {len(tok)} tokens, trained in {time.perf_counter() - t0:.1f}s")
    train_set = PackedBlocks(tok, documents(data, TRAIN_SPLITS), cfg.block_size)
    eval_set = PackedBlocks(tok, documents(data, HELDOUT_SPLITS), cfg.block_size)
    if len(train_set) == 0:
        raise StackRLHFError(f"{data}: no training text (need finetune/reward/rl rows)")
    console.print(f"pretraining {cfg.size} on {train_set.tokens:,} tokens ({len(train_set)} blocks of "
                  f"{cfg.block_size}); held out: {eval_set.tokens:,} tokens")
    model: GPT2LMHeadModel = make_model(cfg.size, tok)
    trainable, total = count_parameters(model)
    console.print(f"model: {model.config.n_layer} layers x {model.config.n_embd}, {total:,} parameters")
    resume_from = last_checkpoint(out, cfg.resume)
    if cfg.max_steps < 0 and cfg.max_minutes > 0 and resume_from is None:
        cfg.max_steps = steps_for_budget(model, cfg, len(train_set))
    args = training_arguments(cfg, out, has_eval=len(eval_set) > 0)
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      eval_dataset=eval_set if len(eval_set) else None,
                      callbacks=[GuardCallback(cfg.max_minutes), *logging_callbacks(cfg, out)])
    _, metrics = train_whole_run(trainer, resume_from)
    metrics.update({"parameters": total, "vocab_size": len(tok), "train_corpus_tokens": train_set.tokens})
    if len(eval_set):
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50))
    save_stage(out, trainer.model, tok, cfg, metrics)
    console.print(f"[green]wrote {out}[/]: eval loss {metrics.get('eval_loss', float('nan')):.3f}, "
                  f"{metrics['train_tokens_per_second']:.0f} tokens/s")
    return metrics
