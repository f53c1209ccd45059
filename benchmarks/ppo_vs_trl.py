"""Benchmark: our PPO beside TRL 1.12.0's `trl.experimental.ppo.PPOTrainer` (TRL's last release with PPO), on
the same tiny GPT-2 (4 layers x 256, vocabulary 8000), reward model, prompts (the beer dump's rl split),
32 prompts x 64 new tokens per step, 4 PPO epochs, minibatches of 8, learning rate 1e-5.

Beside them, our RLOO (`stackrlhf ppo --algorithm rloo`) and TRL's current `RLOOTrainer` (TRL 1.16.0; the
trainer TRL points PPO users to): the same policy, reward model and prompts, 32 completions per rollout
(16 prompts x k = 2, RLOO's leave-one-out baseline needs k >= 2), minibatches of 8 (TRL: steps_per_generation
= 4), 4 passes over each rollout (num_iterations = 4), 64 new tokens, KL beta 0.05 against a reference model.
Ours runs with every block trained and a full frozen reference copy (TRL's setting) and with its default
hydra reference (the top 2 blocks trained).

Each run is a fresh process (peak RSS is its own: os.wait4); each TRL runs in its own virtual environment,
which this script creates on first use in benchmarks/.venvs/ (pip install torch==2.13.0 trl==...). Last line:
``episodes_per_s_ratio=<ours / TRL PPO> peak_rss_ratio=<ours / TRL PPO> rloo_episodes_per_s_ratio=<our PPO / TRL
RLOO> our_rloo_episodes_per_s_ratio=<our RLOO / TRL RLOO> our_rloo_peak_rss_ratio=<our RLOO / TRL RLOO>``, our
RLOO in TRL's setting (full model, full reference copy).

    python benchmarks/ppo_vs_trl.py [--steps 4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH, MINI, EPOCHS, NEW_TOKENS, LR = 32, 8, 4, 64, 1e-5
TRL_PPO, TRL_RLOO = "1.12.0", "1.16.0"


def ensure_trl_venv(version: str) -> Path:
    venv = HERE / ".venvs" / f"trl-{version}"
    python = venv / "bin" / "python"
    if not (venv / "done").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={version}", "psutil"], check=True)
        (venv / "done").write_text("")
    return python


def prepare(root: Path) -> dict:
    """The shared inputs: data (beer), a tiny GPT-2 policy and a tiny GPT-2 reward model, same tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from stackrlhf.data.build import build_dataset
    from stackrlhf.data.config import DataConfig
    from stackrlhf.data.load import load_split
    from stackrlhf.models.offline_base import make_model, train_tokenizer

    data = root / "data"
    build_dataset(DataConfig(dump=["beer"], out=str(data), progress=False))
    prompts = list(load_split(data, "rl", "train")["prompt"])
    tok = train_tokenizer(prompts * 4 + list(load_split(data, "finetune", "train")["completion"]), 8000)
    torch.manual_seed(0)
    policy = make_model("tiny", tok)
    policy.save_pretrained(str(root / "policy"))
    tok.save_pretrained(str(root / "policy"))
    cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=256, n_layer=4, n_head=4, num_labels=1,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    rm = GPT2ForSequenceClassification(cfg)
    rm.save_pretrained(str(root / "rm"))
    tok.save_pretrained(str(root / "rm"))
    (root / "prompts.json").write_text(json.dumps(prompts))
    return {"root": str(root)}


def worker_ours(root: Path, steps: int, k: int, algorithm: str = "ppo") -> dict:
    from stackrlhf.models.reward import RewardModel
    from stackrlhf.rl.config import PPOConfig
    from stackrlhf.rl.ppo import PPOTrainer

    rm = RewardModel.from_pretrained(root / "rm")
    cfg = PPOConfig(model=str(root / "policy"), data=str(root / "data"), out=str(root / f"ours-{k}-{time.time()}"),
                    steps=steps, prompts_per_step=BATCH if algorithm == "ppo" else BATCH // 2, algorithm=algorithm,
                    rloo_k=2, mini_batch_size=MINI, ppo_epochs=EPOCHS, learning_rate=LR,
                    min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, num_layers_unfrozen=k, report_to="none",
                    progress=False, sample_every=0, save_every=0, temperature=1.0)
    trainer = PPOTrainer(cfg, scorer=lambda q, a: rm.score(list(q), list(a)))
    start = time.perf_counter()
    trainer.train()
    return {"episodes_per_s": steps * BATCH / (time.perf_counter() - start)}


def worker_trl(root: Path, steps: int) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(str(root / "policy"))
    tok.padding_side = "left"
    prompts = json.loads((root / "prompts.json").read_text())
    ds = datasets.Dataset.from_dict({"input_ids": [tok(p, add_special_tokens=False)["input_ids"][-256:]
                                                   for p in prompts]})
    args = PPOConfig(output_dir=str(root / f"trl-{time.time()}"), per_device_train_batch_size=MINI,
                     gradient_accumulation_steps=BATCH // MINI, num_mini_batches=BATCH // MINI,
                     num_ppo_epochs=EPOCHS, learning_rate=LR, response_length=NEW_TOKENS, total_episodes=steps * BATCH,
                     local_rollout_forward_batch_size=BATCH, temperature=1.0, report_to=[], save_strategy="no",
                     num_sample_generations=0, stop_token="eos", seed=0, use_cpu=True, bf16=False)
    trainer = PPOTrainer(args=args, processing_class=tok,
                         model=AutoModelForCausalLM.from_pretrained(str(root / "policy")),
                         ref_model=AutoModelForCausalLM.from_pretrained(str(root / "policy")),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(str(root / "rm"), num_labels=1),
                         value_model=AutoModelForSequenceClassification.from_pretrained(str(root / "rm"), num_labels=1),
                         train_dataset=ds)
    start = time.perf_counter()
    trainer.train()
    return {"episodes_per_s": steps * BATCH / (time.perf_counter() - start)}


def worker_rloo(root: Path, steps: int) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    tok = AutoTokenizer.from_pretrained(str(root / "policy"))
    tok.padding_side = "left"
    prompts = json.loads((root / "prompts.json").read_text())
    ds = datasets.Dataset.from_dict({"prompt": [tok.decode(tok(p, add_special_tokens=False)["input_ids"][-256:])
                                                for p in prompts]})
    per_rollout = BATCH // MINI  # optimizer steps per rollout and pass
    args = RLOOConfig(output_dir=str(root / f"rloo-{time.time()}"), per_device_train_batch_size=MINI,
                      steps_per_generation=per_rollout, num_generations=2, num_iterations=EPOCHS, learning_rate=LR,
                      max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=0.05,
                      max_steps=steps * per_rollout * EPOCHS, report_to=[], save_strategy="no", logging_steps=1000,
                      seed=0, use_cpu=True, bf16=False, gradient_checkpointing=False)
    rm = AutoModelForSequenceClassification.from_pretrained(str(root / "rm"), num_labels=1).eval()
    rm_tok = AutoTokenizer.from_pretrained(str(root / "rm"))
    episodes = []

    def reward(prompts, completions, **_):  # the reward model on prompt + completion, counting the episodes
        episodes.append(len(completions))
        enc = rm_tok([p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True,
                     truncation=True, max_length=512)
        with torch.no_grad():
            return rm(**enc).logits[:, 0].tolist()

    trainer = RLOOTrainer(model=AutoModelForCausalLM.from_pretrained(str(root / "policy")), reward_funcs=reward,
                          args=args, train_dataset=ds, processing_class=tok)
    start = time.perf_counter()
    trainer.train()
    return {"episodes_per_s": sum(episodes) / (time.perf_counter() - start), "episodes": sum(episodes)}


def run(python: str, args: list[str]) -> dict:
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    proc = subprocess.Popen([python, __file__, *args, "--result", out], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"worker {args} failed:\n{proc.stderr.read().decode()[-3000:]}")
    result = json.loads(Path(out).read_text())
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", choices=["ours", "ours-rloo", "trl", "rloo"])
    ap.add_argument("--root")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.manual_seed(0)
        worker = {"ours": lambda: worker_ours(Path(args.root), args.steps, args.k),
                  "ours-rloo": lambda: worker_ours(Path(args.root), args.steps, args.k, "rloo"),
                  "trl": lambda: worker_trl(Path(args.root), args.steps),
                  "rloo": lambda: worker_rloo(Path(args.root), args.steps)}[args.worker]
        result = worker()
        Path(args.result).write_text(json.dumps(result))
        return
    trl_python, rloo_python = str(ensure_trl_venv(TRL_PPO)), str(ensure_trl_venv(TRL_RLOO))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        runs: dict[str, list[dict]] = {"TRL 1.12 PPOTrainer": [], "TRL 1.16 RLOOTrainer (k=2)": [],
                                       "ours, num_layers_unfrozen=2 (hydra)": [],
                                       "ours, num_layers_unfrozen=-1 (full copy)": [],
                                       "our RLOO (k=2), full model + full copy": [],
                                       "our RLOO (k=2), num_layers_unfrozen=2 (hydra)": []}
        for _ in range(args.repeats):
            common = ["--root", str(root), "--steps", str(args.steps)]
            runs["TRL 1.12 PPOTrainer"].append(run(trl_python, ["--worker", "trl", *common]))
            runs["TRL 1.16 RLOOTrainer (k=2)"].append(run(rloo_python, ["--worker", "rloo", *common]))
            runs["ours, num_layers_unfrozen=2 (hydra)"].append(run(sys.executable, ["--worker", "ours", "--k", "2", *common]))
            runs["ours, num_layers_unfrozen=-1 (full copy)"].append(
                run(sys.executable, ["--worker", "ours", "--k", "-1", *common]))
            runs["our RLOO (k=2), full model + full copy"].append(
                run(sys.executable, ["--worker", "ours-rloo", "--k", "-1", *common]))
            runs["our RLOO (k=2), num_layers_unfrozen=2 (hydra)"].append(
                run(sys.executable, ["--worker", "ours-rloo", "--k", "2", *common]))
    med = {name: (statistics.median(r["episodes_per_s"] for r in rs), max(r["peak_rss_mib"] for r in rs))
           for name, rs in runs.items()}
    base_eps, base_rss = med["TRL 1.12 PPOTrainer"]
    print(f"PPO, tiny GPT-2 4x256 (vocab 8000), {BATCH} prompts x {NEW_TOKENS} tokens/step, {EPOCHS} epochs, "
          f"minibatch {MINI}, {args.steps} steps, median of {args.repeats}")
    print(f"{'trainer':<42} {'episodes/s':>11} {'ratio':>7} {'peak RSS MiB':>13} {'ratio':>7}")
    for name, (eps, rss) in med.items():
        print(f"{name:<42} {eps:11.2f} {eps / base_eps:7.2f} {rss:13.0f} {rss / base_rss:7.2f}")
    ours_eps, ours_rss = med["ours, num_layers_unfrozen=2 (hydra)"]
    rloo_eps, rloo_rss = med["TRL 1.16 RLOOTrainer (k=2)"]
    our_rloo_eps, our_rloo_rss = med["our RLOO (k=2), full model + full copy"]
    print(f"episodes_per_s_ratio={ours_eps / base_eps:.2f} peak_rss_ratio={ours_rss / base_rss:.2f} "
          f"rloo_episodes_per_s_ratio={ours_eps / rloo_eps:.2f} our_rloo_episodes_per_s_ratio="
          f"{our_rloo_eps / rloo_eps:.2f} our_rloo_peak_rss_ratio={our_rloo_rss / rloo_rss:.2f}")


if __name__ == "__main__":
    main()
