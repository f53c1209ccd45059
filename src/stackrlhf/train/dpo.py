"""``stackrlhf dpo``: direct preference optimisation from answer pairs, with TRL's ``DPOTrainer``.

Every vote pair (``reward/train`` of a data build) and every human-label pair (a ``feedback export``) is a DPO
pair; no reward model is trained. The loss, for the policy pi and the frozen reference pi_ref:

    sigmoid (DPO):    -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])
    ipo:              ([(..)/|y_w| - (..)/|y_l|] - 1 / (2 beta))^2              (per-token averaged log-ratios)
    sigmoid_norm:     DPO on per-token averaged log-ratios (a longer answer gains nothing by its length alone)

With ``--precompute-ref-log-probs`` (the default) the reference scores every pair once before training, so only
the policy is in memory while it trains. Questions are cut in the middle to ``max_prompt_tokens`` with the prompt
template's rule, as every other stage does; answers are cut at the end to fit ``max_length``. The pairs are
tokenized here exactly as SFT encodes its examples (prompt and answer apart), not by TRL.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
import torch

from stackrlhf.config import read_json, write_text_atomic
from stackrlhf.data.load import load_split
from stackrlhf.errors import StackRLHFError
from stackrlhf.models.answerer import Answerer, same_vocabulary, sample_kl
from stackrlhf.models.freezing import describe_trainable, freeze_bottom
from stackrlhf.models.loading import load_causal_lm
from stackrlhf.models.sampling import SamplingConfig
from stackrlhf.prompts import encode_prompt
from stackrlhf.train.common import (GuardCallback, final_model, forget_evaluation_prepare, last_checkpoint,
                                    logging_callbacks, save_stage, train_whole_run, training_settings)
from stackrlhf.train.config import DPOConfig
from stackrlhf.data.load import load_pairs, load_test_pairs
from stackrlhf.console import console



def answer_ids(tok, answer: str, budget: int) -> list[int]:
    """An answer's ids as SFT trains on them: tokenized alone, then EOS; cut at the end to ``budget``."""
    return (tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:max(budget, 1)]


def dpo_pairs(pairs: datasets.Dataset, tok, max_prompt_tokens: int, max_length: int = 0) -> datasets.Dataset:
    """``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, exactly as SFT encodes an example and the policy is
    asked at inference: the prompt by :func:`stackrlhf.prompts.encode_prompt` (its chat template when it has
    one, the question cut in the middle), each answer tokenized alone with EOS. TRL would tokenize prompt +
    answer as one string, and a prompt ending in a space would merge with the answer's first word."""
    rows: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        ids = encode_prompt(tok, prompt, max_prompt_tokens)
        budget = max_length - len(ids) if max_length else 1 << 30
        rows["prompt_ids"].append(ids)
        rows["chosen_ids"].append(answer_ids(tok, chosen, budget))
        rows["rejected_ids"].append(answer_ids(tok, rejected, budget))
    return datasets.Dataset.from_dict(rows)


def on_disk(dataset: datasets.Dataset, path: Path, args) -> datasets.Dataset:
    """``dataset`` saved under ``path`` by the main process and read back by every process: file-backed, so the
    processes share its cache files. TRL caches the reference's log-probs beside the dataset; for an in-memory
    one that is the main process's temp folder, which the others cannot open (2 processes failed so)."""
    import shutil

    with args.main_process_first(local=False, desc=f"writing {path.name}"):
        if args.process_index == 0:
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            dataset.save_to_disk(str(tmp))
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        return datasets.load_from_disk(str(path))


def _pretokenized_dpo_trainer():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's DPO on pairs tokenized by :func:`dpo_pairs` (its own preparation is skipped for them)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def dpo_arguments(cfg: DPOConfig, out: Path, has_eval: bool):
    """TRL's DPOConfig for a stage's settings."""
    from trl import DPOConfig as TRLDPOConfig

    settings = training_settings(cfg, out, has_eval=has_eval)
    settings.setdefault("gradient_checkpointing", False)  # TRL's configs turn it on by default; ours is opt-in
    settings["train_sampling_strategy"] = "random" if cfg.shuffle else "sequential"
    return TRLDPOConfig(**settings, beta=cfg.beta, loss_type=[cfg.loss], max_length=cfg.max_length,
                        precompute_ref_log_probs=cfg.precompute_ref_log_probs, disable_dropout=True)


def dpo_trainer(cfg: DPOConfig, model, tok, train_set, eval_set, out: Path, reference=None, args=None):
    from peft import LoraConfig

    args = args or dpo_arguments(cfg, out, has_eval=bool(eval_set))
    peft = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      task_type="CAUSAL_LM") if cfg.lora else None
    return _pretokenized_dpo_trainer()(model=model, ref_model=reference, args=args, train_dataset=train_set,
                      eval_dataset=eval_set,
                      processing_class=tok, peft_config=peft,
                      callbacks=[GuardCallback(cfg.max_minutes), *logging_callbacks(cfg, out)])


PAIR_KEYS = {"rewards/accuracies": "accuracy", "rewards/margins": "margin", "logps/chosen": "logp_chosen",
             "logps/rejected": "logp_rejected", "loss": "loss"}


def pair_metrics(trainer) -> dict:
    """TRL's implicit-reward figures on each evaluation set (``heldout``: reward/eval, ``test``: the evaluation
    questions' pairs): accuracy (the chosen answer's beta * log-ratio above the rejected's), margin, and the
    policy's log-probs of the chosen and rejected answers. One set at a time: TRL logs these figures without the
    set's name."""
    sets, out = trainer.eval_dataset or {}, {}
    try:
        for name, prepared in sets.items():
            trainer.eval_dataset = prepared  # already tokenized and scored by the reference at init
            loss = trainer.evaluate()["eval_loss"]
            logged = next(h for h in reversed(trainer.state.log_history) if "eval_rewards/accuracies" in h)
            out[f"{name}_loss"] = float(loss)
            out.update({f"{name}_{short}": float(logged[f"eval_{k}"]) for k, short in PAIR_KEYS.items()
                        if k != "loss" and f"eval_{k}" in logged})
    finally:
        trainer.eval_dataset = sets or None
    return out


def dpo(cfg: DPOConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model, tok = load_causal_lm(cfg.model, "float32", int8_trunk=False)  # fp32 master weights; bf16 runs under autocast
    reference = None
    if cfg.reference and cfg.reference != cfg.model:
        reference, ref_tok = load_causal_lm(cfg.reference, "float32")
        if not same_vocabulary(tok, ref_tok):
            raise StackRLHFError(f"--reference {cfg.reference} has another tokenizer than --model {cfg.model}: DPO "
                                 "compares their log-probs of the same tokens; use the policy's own starting point")
    train_pairs = load_pairs(cfg.data, "train", cfg.max_train_pairs, cfg.seed, cfg.pairs_half)
    if not len(train_pairs):
        raise StackRLHFError(f"no training pairs in {', '.join(cfg.data)} (reward/train): give a `data build` output "
                             "or a `feedback export` with labels")
    eval_pairs = load_pairs(cfg.data, "eval", cfg.max_eval_pairs, cfg.seed, cfg.pairs_half)
    test_pairs = load_test_pairs(cfg.data, cfg.max_eval_pairs, cfg.seed)
    if not cfg.lora:
        freeze_bottom(model, cfg.num_layers_unfrozen)
    pairs_dir = out / "checkpoints" / "pairs"
    pairs_dir.mkdir(parents=True, exist_ok=True)
    args = dpo_arguments(cfg, out, has_eval=bool(len(eval_pairs) or len(test_pairs)))
    train_set = on_disk(dpo_pairs(train_pairs, tok, cfg.max_prompt_tokens, cfg.max_length), pairs_dir / "train", args)
    eval_sets = {name: on_disk(dpo_pairs(p, tok, cfg.max_prompt_tokens, cfg.max_length), pairs_dir / name, args)
                 for name, p in (("heldout", eval_pairs), ("test", test_pairs)) if len(p)}
    trainer = dpo_trainer(cfg, model, tok, train_set, eval_sets or None, out, reference, args)
    console.print(f"DPO ({cfg.loss}, beta {cfg.beta}) on {len(train_set)} pairs from {', '.join(cfg.data)}; "
                  f"{len(eval_pairs)} held out; {describe_trainable(trainer.model)}")
    metrics: dict = {"loss_type": cfg.loss, "beta": cfg.beta, "train_pairs": len(train_set)}
    resume_from = last_checkpoint(out, cfg.resume)
    start_file = out / "checkpoints" / "run_start.json"  # the reference's figures before any step, kept for resume
    if eval_sets and resume_from is None:
        start = pair_metrics(trainer)
        forget_evaluation_prepare(trainer)  # else train() would skip the DDP wrap (each process alone)
        metrics.update({f"{k}_start": v for k, v in start.items()})
        write_text_atomic(start_file, json.dumps(metrics))
    elif resume_from is not None:
        metrics.update(read_json(start_file) or {})
    _, whole = train_whole_run(trainer, resume_from)
    metrics.update(whole)
    metrics.update(pair_metrics(trainer))
    final = final_model(trainer.model, out, cfg.lora)
    if cfg.kl_prompts:
        metrics.update(kl_to_reference(final, tok, cfg))
    save_stage(out, final, tok, cfg, metrics)
    get = lambda key: metrics.get(key, math.nan)  # noqa: E731
    console.print(f"[green]wrote {out}[/]: held-out pair accuracy {get('heldout_accuracy_start'):.3f} -> "
                  f"{get('heldout_accuracy'):.3f}, margin {get('heldout_margin'):+.3f}, KL to the reference "
                  f"{get('kl_to_reference'):.2f} nats")
    return metrics


@torch.no_grad()
def kl_to_reference(policy, tok, cfg: DPOConfig) -> dict:
    """KL(policy || reference) per answer on held-out questions (``evaluation`` split of the first data build with
    one), sampled at ``kl_temperature`` (as eval and the RL stages measure theirs) without top-k/top-p, so the
    estimate is unbiased for the KL between the two tempered distributions."""
    data = next((d for d in cfg.data if list((Path(d) / "evaluation").glob("test-*.parquet"))), None)
    if data is None:
        return {}
    rows = load_split(data, "evaluation", "test")
    prompts = list(rows["prompt"])[: cfg.kl_prompts]
    ref_lm, ref_tok = load_causal_lm(cfg.reference or cfg.model, "float32", device=next(policy.parameters()).device)
    mine, ref = Answerer.from_model(policy.eval(), tok), Answerer.from_model(ref_lm.eval(), ref_tok)
    sampling = SamplingConfig(max_new_tokens=min(128, cfg.max_length), temperature=cfg.kl_temperature, top_p=1.0,
                              max_prompt_tokens=cfg.max_prompt_tokens)
    kl = sample_kl(mine, ref, prompts, sampling, batch_size=cfg.per_device_eval_batch_size, seed=cfg.seed)
    return {"kl_to_reference": float(np.mean(kl)), "kl_to_reference_se": float(np.std(kl) / math.sqrt(len(kl))),
            "kl_prompts": len(kl)}

