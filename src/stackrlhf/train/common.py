"""What every Trainer-based stage shares: TrainingArguments from a config, resume, the NaN guard,
a time budget, token counting, and the artifact directory (model, config.yaml, metrics.json)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from stackrlhf.config import read_json, report_targets, save_config, write_text_atomic
from stackrlhf.errors import StackRLHFError
from stackrlhf.train.config import TrainConfig
from stackrlhf.console import console



def training_arguments(cfg: TrainConfig, out: Path, has_eval: bool, **extra) -> TrainingArguments:
    return TrainingArguments(**training_settings(cfg, out, has_eval, **extra))


def training_settings(cfg: TrainConfig, out: Path, has_eval: bool, **extra) -> dict:
    """The TrainingArguments of a stage, as a dict (a TRL trainer's own config class takes the same)."""
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and torch.cuda.is_available()
                                         and torch.cuda.is_bf16_supported())
    eval_strategy = ("steps" if cfg.eval_steps else "epoch") if has_eval else "no"
    settings = dict(
        output_dir=str(out / "checkpoints"),
        report_to=[r for r in report_targets(cfg.report_to) if r != "tensorboard"],  # ours: logging_callbacks
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,  # autocast over float32 weights (the stages load them in float32): mixed precision
        use_cpu=bf16 and not torch.cuda.is_available(),  # CPU bf16 autocast (transformers refuses it otherwise)
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",
    )
    if cfg.gradient_checkpointing:  # named only when on: transformers warns about the name on every use
        settings.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    settings.update(extra)  # a stage may override any of the above (the RM saves per epoch, say)
    return settings


def logging_callbacks(cfg: TrainConfig, out: Path) -> list:
    """TensorBoard into ``OUT/runs`` (the Trainer's own choice of folder is not configurable in v5)."""
    if "tensorboard" not in report_targets(cfg.report_to):
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(SummaryWriter(log_dir=str(out / "runs")))]


WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def checkpoint_complete(folder: Path) -> bool:
    """A Trainer checkpoint that a kill -9 did not interrupt: weights, optimizer, scheduler and the trainer
    state (written last) are all there and non-empty (under FSDP, weights and optimizer are sharded folders)."""
    def ok(name: str) -> bool:
        return (folder / name).is_file() and (folder / name).stat().st_size > 0

    def sharded(name: str) -> bool:  # FSDP's sharded checkpoint (torch.distributed.checkpoint: .metadata last)
        return ok(f"{name}/.metadata")

    return (ok("trainer_state.json") and (any(ok(w) for w in WEIGHT_FILES) or sharded("pytorch_model_fsdp_0"))
            and (ok("optimizer.pt") or sharded("optimizer_0")) and ok("scheduler.pt"))


def last_checkpoint(out: Path, resume: bool) -> str | None:
    """The newest complete ``checkpoint-N`` in ``OUT/checkpoints`` (incomplete ones, from a run killed while
    saving, are named and passed over), or None to start afresh."""
    folder = out / "checkpoints"
    if not resume or not folder.is_dir():
        return None
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for candidate in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if checkpoint_complete(candidate):
            console.print(f"resuming from {candidate}")
            return str(candidate)
        console.print(f"[yellow]skipping {candidate}: incomplete (the run was stopped while saving it)[/]")
    return None


class GuardCallback(TrainerCallback):
    """Stops on a NaN / inf loss with a clear message (the last checkpoint stays good), and stops
    cleanly, with a checkpoint, once ``max_minutes`` of training time are spent."""

    def __init__(self, max_minutes: float = 0.0):
        self.max_seconds = max_minutes * 60
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise StackRLHFError(
                    f"training diverged: {key} is {value} at step {state.global_step}; lower the learning rate. "
                    f"The last good checkpoint is kept in {args.output_dir}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.max_seconds and self.start is not None and time.monotonic() - self.start > self.max_seconds:
            control.should_training_stop = True
            control.should_save = True
        return control


def throughput(trainer, runtime_s: float, tokens_before: int = 0) -> dict:
    """Real (non-padding) training tokens of the whole run (a resumed run included) and tokens per second of
    this run (its tokens past ``tokens_before``, the count at the checkpoint it resumed from, over its runtime)."""
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"train_tokens": tokens, "train_tokens_per_second": (tokens - tokens_before) / max(runtime_s, 1e-9)}


def train_whole_run(trainer, resume_from: str | None) -> tuple:
    """``trainer.train()`` from ``resume_from`` (None: afresh), and figures of the whole run even when it resumed:
    ``train_loss`` averages every logged loss since step 0 (the Trainer's own covers the resumed part only),
    ``train_tokens`` counts from step 0, tokens/s is this process's tokens over its own time, and
    ``resumed_from`` names the checkpoint."""
    tokens_before = 0
    if resume_from:
        tokens_before = (read_json(Path(resume_from) / "trainer_state.json") or {}).get("num_input_tokens_seen", 0)
    result = trainer.train(resume_from_checkpoint=resume_from)
    runtime = result.metrics["train_runtime"]
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {"train_loss": float(sum(logged) / len(logged)) if resume_from and logged else result.training_loss,
               "train_runtime_s": runtime, "steps": trainer.state.global_step,
               **throughput(trainer, runtime, tokens_before)}
    if resume_from:
        metrics["resumed_from"] = Path(resume_from).name
    return result, metrics


def write_metrics(out: Path, metrics: dict) -> None:
    clean = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    write_text_atomic(out / "metrics.json", json.dumps(clean, indent=2) + "\n")


def save_stage(out: Path, model, tokenizer, cfg, metrics: dict, accelerator=None) -> None:
    """The artifact: ``save_pretrained`` model + tokenizer, the exact config, and metrics.json last
    (its presence marks a finished stage). Written by the main process alone under ``accelerate launch``; under
    FSDP every process first hands its shards to it (``accelerator``: the trainer's)."""
    from accelerate import PartialState

    state = PartialState()
    state_dict = full_state_dict(accelerator, model)
    if state.is_main_process:
        model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(str(out))
        save_config(cfg, out / "config.yaml")
        write_metrics(out, metrics)
    state.wait_for_everyone()


def full_state_dict(accelerator, model) -> dict | None:
    """The whole model's weights on the main process when FSDP shards them (a collective: every process calls
    it); None otherwise, and ``save_pretrained`` reads the model itself."""
    from accelerate.utils import DistributedType

    if accelerator is None or accelerator.distributed_type != DistributedType.FSDP:
        return None
    return accelerator.get_state_dict(model)


def unsharded_on_main(trainer, build_model):
    """Under FSDP: the trained weights gathered into ``build_model()`` (a fresh, unsharded copy) on the main
    process, for the work after training (scoring, saving) that would otherwise need every process in step;
    None on the other processes."""
    state = full_state_dict(trainer.accelerator, trainer.model)  # a collective
    if not trainer.is_world_process_zero():
        return None
    model = build_model()
    model.load_state_dict(state)
    return model


def final_model(model, out: Path, lora: bool):
    """The trained model as the stage saves it: LoRA adapters kept in ``OUT/adapter`` and merged into the weights;
    every parameter trainable again, as a fresh ``from_pretrained`` would be."""
    if lora:
        model.save_pretrained(str(out / "adapter"))
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def evaluate_before_training(trainer, on_result) -> None:
    """``on_result(trainer.evaluate())`` before training, without breaking multi-process training: accelerate's
    evaluation-mode prepare marks the bare model as prepared, so ``train()`` would then skip the DDP wrap and each
    process would silently train on its own gradients (found by the 2-process test; accelerate 1.15). Under FSDP
    the model can only be prepared with its optimizer, so the evaluation runs at the start of ``train()``, on
    the sharded model, before the first step."""
    if is_fsdp(trainer):
        trainer.add_callback(_EvaluateAtTrainBegin(trainer, on_result))
        return
    metrics = trainer.evaluate()
    forget_evaluation_prepare(trainer)
    on_result(metrics)


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was asked for FSDP (before any trainer exists)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_fsdp(trainer) -> bool:
    from accelerate.utils import DistributedType

    return trainer.accelerator.distributed_type == DistributedType.FSDP


def fsdp_units_around_embeddings(trainer) -> None:
    """Under FSDP, keep the input embedding out of the per-block units. accelerate (1.15) makes an FSDP unit of
    every ``_no_split_modules`` block and then one of the input embedding; when a block holds the embedding
    (BERT's ``BertEmbeddings``: the RM backbone) the embedding's weight is sharded twice and ``fully_shard``
    fails ("Invariant encountered: value was None"). Such blocks are dropped from the wrap list."""
    if not is_fsdp(trainer):
        return
    model = trainer.model
    embedding = model.get_input_embeddings()
    holders = {type(m).__name__ for m in model.modules() if m is not embedding and
               any(sub is embedding for sub in m.modules()) and m is not model}
    names = getattr(model, "_no_split_modules", None) or []
    model._no_split_modules = type(names)(n for n in names if n not in holders)


class _EvaluateAtTrainBegin(TrainerCallback):
    def __init__(self, trainer, on_result):
        self.trainer, self.on_result = trainer, on_result

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.on_result(self.trainer.evaluate())


def forget_evaluation_prepare(trainer) -> None:
    """Undo what an evaluation before training leaves behind: the bare model marked as prepared (see
    :func:`evaluate_before_training`)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
    trainer.model_wrapped = trainer.model

