"""ILQL on the randomwalks task: training speed and the optimality of decoded walks, beta = 0 vs beta > 0.

    python benchmarks/ilql.py [--steps 300] [--repeats 3] [--alpha 0.1 --sync-every 5]

Prints a table (median over repeats with different seeds) and a last machine-readable line
``optimality=<beta > 0> behaviour_optimality=<data mean>``. No peer column: trlx (the only other ILQL for
language models) is unmaintained and does not install beside transformers 5 / torch 2.13.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import sys
from pathlib import Path

import torch

from stackrlhf.rl.config import ILQLConfig
from stackrlhf.rl.ilql import ILQLTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the randomwalks task lives with the tests
from randomwalks import evaluate, generate_random_walks, walk_model, walk_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beta", type=float, default=10.0)
    parser.add_argument("--alpha", type=float, default=0.1, help="Polyak rate of the target Q heads")
    parser.add_argument("--sync-every", type=int, default=5, help="steps between target syncs")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    task = generate_random_walks()
    tok = walk_tokenizer(task.n_nodes)
    behaviour = task.behaviour_optimality()
    rows: dict[str, list[float]] = {"samples/s": [], "beta=0 sampled": [], "beta=0 greedy": [],
                                    f"beta={args.beta:g} sampled": [], f"beta={args.beta:g} greedy": []}
    for seed in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ILQLConfig(model="randomwalks", out=str(Path(tmp) / "ilql"), steps=args.steps, per_device_train_batch_size=100,
                             learning_rate=1e-3, warmup_steps=10, num_layers_unfrozen=-1, tau=0.8, alpha=args.alpha,
                             steps_for_target_q_sync=args.sync_every, cql_scale=0.1, report_to="none", progress=False,
                             save_every=0, seed=seed)
            trainer = ILQLTrainer(cfg, task.samples(tok), walk_model(tok, seed=seed), tok)
            metrics = trainer.train()
            model = trainer.model.eval()
            rows["samples/s"].append(metrics["samples_per_s"])
            for beta in (0.0, args.beta):
                rows[f"beta={beta:g} sampled"].append(evaluate(task, model, tok, beta, samples_per_start=20,
                                                               temperature=1.0, seed=seed))
                rows[f"beta={beta:g} greedy"].append(evaluate(task, model, tok, beta, seed=seed))
    print(f"randomwalks: 21 nodes, 1000 walks, behaviour data optimality {behaviour:.3f}; "
          f"{args.steps} steps x 100, median of {args.repeats} seeds; target sync alpha {args.alpha:g} "
          f"every {args.sync_every} steps")
    print(f"{'measure':24} {'median':>9} {'min':>9} {'max':>9}")
    for name, values in rows.items():
        print(f"{name:24} {statistics.median(values):9.3f} {min(values):9.3f} {max(values):9.3f}")
    print(f"optimality={statistics.median(rows[f'beta={args.beta:g} sampled']):.3f} "
          f"behaviour_optimality={behaviour:.3f}")


if __name__ == "__main__":
    main()
