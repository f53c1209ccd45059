"""Does a loop turn's RM learn its labels? Offline, on a finished `benchmarks/loop_gain.py` run: train one RM per
setting on turn t's labels (what the loop's RM stage sees) and count how often each orders the held-out evaluation
answers of every turn (v0, the versions, best-of-n) as the judge does.

    python benchmarks/loop_rm_settings.py --run outputs/loop-gain [--turn 1] [--settings 5e-5x2,1e-4x6]

A setting is LEARNING_RATExEPOCHS; the other RM settings are the run's own (its `loop.yaml`).
Printed: a row per setting (train loss, reward std, agreement over the pairs) and, last line,
``agreement_<setting>=<share> ...``. The judge scores come from the run's eval samples, so nothing is generated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loop_gain import pair_agreement  # noqa: E402
from stackrlhf.models.reward import RewardModel  # noqa: E402
from stackrlhf.train.config import RMConfig  # noqa: E402
from stackrlhf.train.reward import train_reward_model  # noqa: E402


def judged_answers(registry: Path) -> list[list[tuple[str, str, float]]]:
    """Per evaluation question of every turn: (prompt, answer, judge score) of each model's answer."""
    groups = []
    for samples in sorted(registry.glob("v*/eval/samples.jsonl")):
        for line in samples.read_text().splitlines():
            row = json.loads(line)
            groups.append([(row["prompt"], a["text"], a["judge"]) for a in row["answers"].values()])
    return groups


def agreement(rm: RewardModel, groups: list[list[tuple[str, str, float]]]) -> tuple[float, int]:
    flat = [a for g in groups for a in g]
    scores = iter(rm.score([p for p, _, _ in flat], [t for _, t, _ in flat]))
    return pair_agreement([[(judge, next(scores)) for _, _, judge in g] for g in groups])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="A loop_gain --out directory with finished turns.")
    p.add_argument("--turn", type=int, default=1, help="Train on the labels turn t's RM saw.")
    p.add_argument("--settings", default="5e-5x2,1e-4x6", help="LEARNING_RATExEPOCHS, comma-separated.")
    p.add_argument("--out", default="", help="Where the RMs go (default: RUN/rm-settings).")
    args = p.parse_args(argv)
    registry = Path(args.run) / "registry"
    feedback = registry / f"v{args.turn}" / "feedback"
    if not feedback.is_dir():
        sys.exit(f"{feedback} is missing: point --run at a loop_gain output whose turn {args.turn} finished")
    run_rm = yaml.safe_load((Path(args.run) / "loop.yaml").read_text())["rm"]  # the settings the run's RMs had
    groups = judged_answers(registry)
    out = Path(args.out or Path(args.run) / "rm-settings")
    results = {}
    print("setting | train loss | reward std | agreement with the judge | pairs | seconds")
    print("--- | --- | --- | --- | --- | ---")
    for setting in args.settings.split(","):
        lr, epochs = setting.split("x")
        t0 = time.perf_counter()
        rm_dir = out / f"v{args.turn}-{setting}"
        metrics = train_reward_model(RMConfig(**{"label_weight": -1, **run_rm, "data": [str(feedback)],
                                                 "out": str(rm_dir), "learning_rate": float(lr),
                                                 "num_train_epochs": float(epochs)}))
        share, pairs = agreement(RewardModel.from_pretrained(rm_dir), groups)
        results[setting] = share
        print(f"{setting} | {metrics['train_loss']:.4f} | {metrics['reward_std']:.3f} | {share:.3f} | {pairs} | "
              f"{time.perf_counter() - t0:.0f}", flush=True)
    print(" ".join(f"agreement_{s}={a:.4f}" for s, a in results.items()))


if __name__ == "__main__":
    main()
