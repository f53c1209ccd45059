"""The one prepared GPU check: SFT, RM, PPO, RLOO, DPO and ILQL a few steps each on a GPT-2-small-sized model built from
config (no hub), in bf16 autocast over float32 master weights, with and without gradient checkpointing.

Per stage it prints: throughput (tokens/s or episodes/s), peak GPU memory, the share of trainable tensors that
changed (1.0 expected: with pure-bf16 weights most small updates round away), and whether the loss fell (PPO:
whether the reward rose; a few PPO steps are noise, so its check is a finite KL and every tensor changed). It runs
on a CPU too, with a tiny model (``--tiny``; CPU autocast supports bf16),
which is how the test suite checks it. On a GPU, within about 8 minutes:

    python benchmarks/gpu_smoke.py --out /tmp/smoke              # builds its data from the shared beer dump
    python benchmarks/gpu_smoke.py --data outputs/data --out /tmp/smoke
    python benchmarks/gpu_smoke.py --tiny --steps 3 --out /tmp/smoke-cpu

The last line is ``all_checks=True|False``; ``smoke.json`` in ``--out`` has every row.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024)
TINY = dict(n_layer=2, n_embd=64, n_head=2, n_positions=512)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def trainable_snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def changed_share(before: dict, after: dict) -> float:
    """The share of ``before``'s tensors whose values differ in ``after`` (matched by name)."""
    names = [n for n in before if n in after]
    return sum(not torch.equal(before[n], after[n].detach().float().cpu()) for n in names) / max(len(names), 1)


def build_base(data: str, out: Path, shape: dict) -> Path:
    """A freshly initialised GPT-2 (GPT-2 small's shape unless --tiny) with a BPE vocabulary from the data."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from stackrlhf.data.load import load_split
    from stackrlhf.models.offline_base import train_tokenizer

    texts = list(load_split(data, "finetune", "train")["completion"])[:2000]
    tok = train_tokenizer(texts, vocab_size=8000 if shape is GPT2_SMALL else 500)
    config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def stage_sft(base: Path, data: str, out: Path, steps: int, dtype: str, gc: bool, tiny: bool) -> dict:
    from stackrlhf.models.loading import load_causal_lm
    from stackrlhf.train.config import SFTConfig
    from stackrlhf.train.sft import sft

    start, _ = load_causal_lm(str(base), dtype="float32")
    before = trainable_snapshot(start)
    m = sft(SFTConfig(model=str(base), data=data, out=str(out), max_steps=steps, dtype=dtype, gradient_checkpointing=gc,
                      per_device_train_batch_size=4 if tiny else 16, max_length=128 if tiny else 512,
                      max_eval_samples=16, learning_rate=1e-4, save_steps=10**6, report_to="none",
                      warmup_ratio=0.0))
    after, _ = load_causal_lm(str(out), dtype="float32")
    return {"throughput": m["train_tokens_per_second"], "unit": "tokens/s",
            "changed": changed_share(before, dict(after.named_parameters())),
            "improved": m.get("eval_loss", math.inf) < m.get("eval_loss_start", -math.inf),
            "detail": f"held-out loss {m.get('eval_loss_start', math.nan):.3f} -> {m.get('eval_loss', math.nan):.3f}"}


def stage_rm(base: Path, data: str, out: Path, steps: int, dtype: str, gc: bool, tiny: bool) -> dict:
    """The RM head on the causal LM (StackLLaMA's choice); the loss falls below a fresh head's log 2."""
    from stackrlhf.models.reward import RewardModel
    from stackrlhf.train.config import RMConfig
    from stackrlhf.train.reward import train_reward_model

    m = train_reward_model(RMConfig(model=str(base), data=[data], out=str(out), max_steps=steps, dtype=dtype,
                                    gradient_checkpointing=gc, per_device_train_batch_size=4 if tiny else 16,
                                    max_length=128 if tiny else 256, max_prompt_tokens=32, learning_rate=1e-4,
                                    max_eval_pairs=32, report_to="none", warmup_ratio=0.0,
                                    adjust=["length,time"]))
    from stackrlhf.models.reward import load_backbone

    fresh, _ = load_backbone(str(base))
    trained = RewardModel.from_pretrained(out).model
    body = {n: p for n, p in trainable_snapshot(fresh).items() if not n.startswith("score")}  # the head is new
    return {"throughput": m["train_tokens_per_second"], "unit": "tokens/s",
            "changed": changed_share(body, dict(trained.named_parameters())),
            "improved": m["train_loss"] < math.log(2), "detail": f"mean train loss {m['train_loss']:.3f} (log 2 = 0.693)"}


def stage_ppo(base: Path, data: str, out: Path, steps: int, dtype: str, gc: bool, tiny: bool,
              algorithm: str = "ppo") -> dict:
    """Hydra reference (top 2 blocks trained); a synthetic text reward (the share of the letter e)."""
    from stackrlhf.rl.config import PPOConfig
    from stackrlhf.rl.ppo import PPOTrainer

    prompts = (8 if tiny else 64) // (2 if algorithm == "rloo" else 1)  # RLOO: half the prompts, 2 answers each
    cfg = PPOConfig(model=str(base), data=data, out=str(out), steps=steps, prompts_per_step=prompts,
                    algorithm=algorithm,
                    mini_batch_size=4 if tiny else 16, ppo_epochs=2, min_new_tokens=16 if tiny else 64,
                    max_new_tokens=16 if tiny else 96, learning_rate=1e-4, num_layers_unfrozen=2, dtype=dtype,
                    gradient_checkpointing=gc, report_to="none", progress=False, sample_every=0, save_every=0)
    trainer = PPOTrainer(cfg, scorer=lambda qs, answers: [a.count("e") / max(len(a), 1) * 10 for a in answers])
    before = trainable_snapshot(trainer.policy)
    m = trainer.train()
    return {"throughput": m["episodes_per_s"], "unit": "episodes/s",
            "changed": changed_share(before, dict(trainer.policy.named_parameters())),
            "improved": m["reward_last"] > m["reward_first"], "check": math.isfinite(m["kl_last"]),
            "detail": f"reward {m['reward_first']:.3f} -> {m['reward_last']:.3f}, KL {m['kl_last']:.3f}"}


def stage_rloo(base: Path, data: str, out: Path, steps: int, dtype: str, gc: bool, tiny: bool) -> dict:
    return stage_ppo(base, data, out, steps, dtype, gc, tiny, algorithm="rloo")


def stage_dpo(base: Path, data: str, out: Path, steps: int, dtype: str, gc: bool, tiny: bool) -> dict:
    """TRL's DPOTrainer on the vote pairs; the reference's log-probs precomputed (one model in memory). A few steps
    are noise for the loss, as for PPO's reward: the check is a finite loss and every tensor changed."""
    from stackrlhf.models.loading import load_causal_lm
    from stackrlhf.train.config import DPOConfig
    from stackrlhf.train.dpo import dpo

    fresh, _ = load_causal_lm(str(base), "float32")
    cfg = DPOConfig(model=str(base), data=[data], out=str(out), max_steps=steps, dtype=dtype,
                    gradient_checkpointing=gc,
                    per_device_train_batch_size=4 if tiny else 8, max_length=128 if tiny else 512,
                    max_prompt_tokens=64 if tiny else 256, max_train_pairs=64 if tiny else 512, max_eval_pairs=16,
                    learning_rate=1e-4, kl_prompts=0, report_to="none", save_steps=10_000)
    m = dpo(cfg)
    trained, _ = load_causal_lm(str(out), "float32")
    return {"throughput": m["train_tokens_per_second"], "unit": "tokens/s",
            "changed": changed_share(trainable_snapshot(fresh), dict(trained.named_parameters())),
            "improved": m["train_loss"] < math.log(2), "check": math.isfinite(m["train_loss"]),
            "detail": f"mean train loss {m['train_loss']:.3f} (log 2 = 0.693), held-out margin "
                      f"{m.get('heldout_margin', math.nan):+.3f}"}


def stage_ilql(base: Path, data: str, out: Path, steps: int, dtype: str, gc: bool, tiny: bool) -> dict:
    from stackrlhf.rl.config import ILQLConfig
    from stackrlhf.rl.ilql import ILQLTrainer

    cfg = ILQLConfig(model=str(base), data=data, out=str(out), steps=steps, per_device_train_batch_size=8 if tiny else 32,
                     max_samples=256, learning_rate=1e-4, warmup_steps=0, dtype=dtype, gradient_checkpointing=gc,
                     report_to="none", progress=False, save_every=0)
    trainer = ILQLTrainer(cfg)
    before = trainable_snapshot(trainer.model)
    m = trainer.train()
    tokens = sum(h["tokens"] for h in trainer.history)
    seconds = sum(cfg.per_device_train_batch_size / h["time/samples_per_s"] for h in trainer.history)
    return {"throughput": tokens / max(seconds, 1e-9), "unit": "tokens/s",
            "changed": changed_share(before, dict(trainer.model.named_parameters())),
            "improved": m["loss_last"] < m["loss_first"],
            "detail": f"loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}"}


STAGES = {"sft": stage_sft, "rm": stage_rm, "ppo": stage_ppo, "rloo": stage_rloo, "dpo": stage_dpo,
          "ilql": stage_ilql}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="a `stackrlhf data build` output (default: build the beer dump)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model (for a CPU)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if not data:
        from stackrlhf.data.build import build_dataset
        from stackrlhf.data.config import DataConfig

        data = str(out / "data")
        if not (out / "data" / "stats.json").is_file():
            build_dataset(DataConfig(dump=["beer"], out=data, progress=False))
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "dtype": args.dtype, "model": "tiny" if args.tiny else "gpt2-small shape", "steps": args.steps}
    print(json.dumps(info))
    base = build_base(data, out / "base", TINY if args.tiny else GPT2_SMALL)
    rows = []
    for gc in (False, True):
        for name in args.stages.split(","):
            reset_peak()
            t0 = time.perf_counter()
            try:
                row = STAGES[name](base, data, out / f"{name}-gc{int(gc)}", args.steps, args.dtype, gc, args.tiny)
            except Exception as exc:  # a smoke test reports every stage, even after one fails
                import traceback

                traceback.print_exc()
                row = {"throughput": None, "unit": "", "changed": 0.0, "improved": False,
                       "detail": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append({"stage": name, "grad_ckpt": gc, "seconds": time.perf_counter() - t0, "peak_gib": peak_gib(),
                         **row, "ok": row["changed"] == 1.0 and bool(row.get("check", row["improved"]))})
    print("\n| stage | grad. ckpt | seconds | throughput | peak GPU GiB | trainable tensors changed | "
          "loss fell / reward rose | detail |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tp = "n/a" if r["throughput"] is None else f"{r['throughput']:.1f} {r['unit']}"
        print(f"| {r['stage']} | {'on' if r['grad_ckpt'] else 'off'} | {r['seconds']:.1f} | {tp} | "
              f"{r['peak_gib']:.2f} | {r['changed']:.2f} | {r['improved']} | {r['detail']} |")
    (out / "smoke.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2, default=str))
    ok = all(r["ok"] for r in rows)
    print(f"all_checks={ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
