"""Benchmark: training tokens per second of `stackrlhf sft` beside a plain `transformers.Trainer` loop on
the same model (a tiny GPT-2), data (finetune split of the shared dumps), batch size, steps and learning rate.

Both count real (non-padding) tokens with the Trainer's own counter. The plain loop is what a user would
write: prompt + answer as one text, DataCollatorForLanguageModeling, random batches. Runs alternate in
one process; medians are reported. Last line: ``tokens_per_s_ratio=<ours / plain Trainer>``.

    python benchmarks/sft_throughput.py [--steps 30] [--repeats 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from stackrlhf.data.build import build_dataset
from stackrlhf.data.config import DataConfig
from stackrlhf.data.load import load_split
from stackrlhf.models.offline_base import make_model, train_tokenizer
from stackrlhf.train.config import SFTConfig
from stackrlhf.train.sft import sft


def plain_trainer(model_dir: Path, data_dir: Path, out: Path, steps: int, batch: int, max_length: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    rows = load_split(data_dir, "finetune", "train")
    ds = rows.map(lambda r: tok(r["prompt"] + r["completion"] + tok.eos_token, truncation=True,
                                max_length=max_length), remove_columns=rows.column_names)
    tok.padding_side = "right"
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0.05, report_to=[],
                             save_strategy="no", logging_steps=10, seed=0, dataloader_pin_memory=False,
                             include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    result = trainer.train()
    return trainer.state.num_input_tokens_seen / result.metrics["train_runtime"]


def ours(model_dir: Path, data_dir: Path, out: Path, steps: int, batch: int, max_length: int, packing: bool) -> float:
    metrics = sft(SFTConfig(model=str(model_dir), data=str(data_dir), out=str(out), max_steps=steps,
                            per_device_train_batch_size=batch, max_length=max_length, packing=packing,
                            report_to="none", save_steps=10**6, max_eval_samples=1, resume=False))
    return metrics["train_tokens_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        build_dataset(DataConfig(out=str(data), progress=False))
        texts = (r["prompt"] + r["completion"] for r in load_split(data, "finetune", "train"))
        tok = train_tokenizer(texts, 8000)
        model_dir = tmp / "tiny"
        make_model("tiny", tok).save_pretrained(str(model_dir))
        tok.save_pretrained(str(model_dir))
        runs: dict[str, list[float]] = {"plain Trainer": [], "stackrlhf sft": [], "stackrlhf sft --packing": []}
        for i in range(args.repeats):
            runs["plain Trainer"].append(plain_trainer(model_dir, data, tmp / f"p{i}", args.steps, args.batch,
                                                       args.max_length))
            runs["stackrlhf sft"].append(ours(model_dir, data, tmp / f"o{i}", args.steps, args.batch,
                                              args.max_length, packing=False))
            runs["stackrlhf sft --packing"].append(ours(model_dir, data, tmp / f"k{i}", args.steps, args.batch,
                                                        args.max_length, packing=True))
    base = statistics.median(runs["plain Trainer"])
    print(f"SFT throughput, tiny GPT-2 (4x256), batch {args.batch}, max length {args.max_length}, {args.steps} steps,"
          f" median of {args.repeats}")
    print(f"{'trainer':<26} {'real tokens/s':>14} {'ratio':>7}")
    for name, values in runs.items():
        med = statistics.median(values)
        print(f"{name:<26} {med:14.0f} {med / base:7.2f}")
    print(f"tokens_per_s_ratio={statistics.median(runs['stackrlhf sft']) / base:.2f}")


if __name__ == "__main__":
    main()
