"""Smoke test of the CUDA path (bf16): generation, SFT, PPO (hydra and LoRA references) and ILQL, timed.

Not part of the suite (CI has no GPU). Run it on a GPU machine with a small SFT model and a data build:

    python benchmarks/gpu_smoke.py --model outputs/sft --data outputs/data --out /tmp/smoke

It prints a table (phase, seconds, throughput, peak GPU memory, a check) and writes smoke.json to --out.
The PPO phases use a synthetic, text-only reward (the share of the letter "e"), so no reward-model weights
are needed; what is checked is that the CUDA/bf16 path runs, stays finite, and how fast it goes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from stackrlhf.data.load import load_split
    from stackrlhf.models.generation import SamplingConfig, generate
    from stackrlhf.models.loading import load_causal_lm, resolve_dtype

    rows: list[dict] = []
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "dtype": str(resolve_dtype("auto"))}
    print(json.dumps(info))

    # 1. batched generation with the KV cache, bf16
    reset_peak()
    lm, tok = load_causal_lm(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
    prompts = list(load_split(args.data, "rl", "train")["prompt"])[: args.prompts]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, max_prompt_tokens=256)
    generate(lm, tok, prompts[:8], sampling, batch_size=8, seed=0)  # warm-up
    t0 = time.perf_counter()
    gen = generate(lm, tok, prompts, sampling, batch_size=len(prompts), seed=0)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    seconds = time.perf_counter() - t0
    new_tokens = sum(len(r) for r in gen.response_ids)
    rows.append({"phase": "generate (bf16, KV cache)", "seconds": seconds, "throughput": new_tokens / seconds,
                 "unit": "new tokens/s", "peak_gib": peak_gib(), "dtype": str(next(lm.parameters()).dtype),
                 "check": all(isinstance(t, str) for t in gen.texts) and new_tokens > 0})
    print("sample answer:", gen.texts[0][:200].replace("\n", " "))
    del lm

    def guarded(name, fn):
        try:
            fn()
        except Exception as exc:  # a smoke test reports every phase, even after one fails
            import traceback

            traceback.print_exc()
            rows.append({"phase": name, "seconds": 0.0, "throughput": None, "unit": "", "peak_gib": peak_gib(),
                         "check": False, "error": f"{type(exc).__name__}: {exc}"[:300]})

    guarded("sft", lambda: phase_sft(args, out, rows))
    guarded("ppo", lambda: phase_ppo(args, out, rows))
    guarded("ilql", lambda: phase_ilql(args, out, rows, prompts, sampling))
    report(rows, info, out)


def phase_sft(args, out, rows) -> None:
    """SFT with the transformers Trainer, bf16."""
    from stackrlhf.train.config import SFTConfig
    from stackrlhf.train.sft import sft

    reset_peak()
    t0 = time.perf_counter()
    m = sft(SFTConfig(model=args.model, data=args.data, out=str(out / "sft"), max_steps=30, report_to="none",
                      per_device_train_batch_size=16, max_length=512, save_steps=1000, logging_steps=10))
    seconds = time.perf_counter() - t0
    rows.append({"phase": "sft 30 steps x 16", "seconds": seconds, "throughput": m.get("train_tokens_per_second"),
                 "unit": "train tokens/s", "peak_gib": peak_gib(), "check": math.isfinite(m.get("train_loss", math.nan))})



def phase_ppo(args, out, rows) -> None:
    """PPO with the hydra reference and with the LoRA (adapters-off) reference."""
    from stackrlhf.rl.config import PPOConfig
    from stackrlhf.rl.ppo import train_ppo

    scorer = lambda qs, answers: [a.count("e") / max(len(a), 1) * 10 for a in answers]  # noqa: E731
    for mode, extra in (("hydra k=2", {"num_layers_unfrozen": 2}), ("lora", {"lora": True})):
        reset_peak()
        cfg = PPOConfig(policy=args.model, data=args.data, out=str(out / f"ppo-{mode.split()[0]}"), steps=4,
                        batch_size=64, mini_batch_size=16, ppo_epochs=2, min_new_tokens=64, max_new_tokens=96,
                        learning_rate=1e-5, report_to="none", progress=False, sample_every=0, save_every=0, **extra)
        t0 = time.perf_counter()
        m = train_ppo(cfg, scorer=scorer)
        seconds = time.perf_counter() - t0
        rows.append({"phase": f"ppo {mode}, 4 steps x 64", "seconds": seconds, "throughput": m["episodes_per_s"],
                     "unit": "episodes/s", "peak_gib": peak_gib(),
                     "check": all(math.isfinite(m[k]) for k in ("reward_last", "kl_last"))})



def phase_ilql(args, out, rows, prompts, sampling) -> None:
    """ILQL training, then decoding with beta."""
    from stackrlhf.rl.config import ILQLConfig
    from stackrlhf.rl.ilql import ILQLModel, ilql_generate, train_ilql

    reset_peak()
    cfg = ILQLConfig(model=args.model, data=args.data, out=str(out / "ilql"), steps=40, batch_size=32,
                     report_to="none", progress=False, save_every=0)
    t0 = time.perf_counter()
    m = train_ilql(cfg)
    seconds = time.perf_counter() - t0
    rows.append({"phase": "ilql 40 steps x 32", "seconds": seconds, "throughput": m["samples_per_s"],
                 "unit": "samples/s", "peak_gib": peak_gib(), "check": math.isfinite(m["loss_last"])})
    model, itok, _ = ILQLModel.from_pretrained(out / "ilql", device="cuda" if torch.cuda.is_available() else "cpu")
    reset_peak()
    t0 = time.perf_counter()
    gen = ilql_generate(model, itok, prompts, sampling, beta=1.0, batch_size=len(prompts), seed=0)
    seconds = time.perf_counter() - t0
    new_tokens = sum(len(r) for r in gen.response_ids)
    rows.append({"phase": "ilql decode beta=1", "seconds": seconds, "throughput": new_tokens / seconds,
                 "unit": "new tokens/s", "peak_gib": peak_gib(), "check": new_tokens > 0})


def report(rows, info, out) -> None:
    print(f"\n{'phase':32} {'seconds':>8} {'throughput':>12} {'unit':16} {'peak GiB':>8} check")
    for r in rows:
        print(f"{r['phase']:32} {r['seconds']:8.1f} {r['throughput'] or float('nan'):12.1f} {r['unit']:16} "
              f"{r['peak_gib']:8.2f} {r['check']}")
    (out / "smoke.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print("all_checks=" + str(all(r["check"] for r in rows)))


if __name__ == "__main__":
    main()
