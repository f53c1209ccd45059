"""Does feedback make the model better? T turns of `stackrlhf loop`, labelled by simulated annotators with a
known judge, each version scored by that judge on held-out questions (Gao et al. 2022's gold-judge setup).

    python benchmarks/loop_gain.py [--dump SITE_OR_DIR ...] [--out outputs/loop-gain]

From a data build and an SFT model it makes itself (`stackrlhf run` stages data, sft of the demo's base,
SmolLM2-135M-Instruct, or of the offline pretrain with --base pretrain), it runs the real
loop: queue the current version's answers to rl questions, let `feedback simulate` label them through the app (the
`reference` judge by default: MiniLM similarity to the question's best human answer + relevance, its length trend
taken off), retrain the RM on the labels, RLOO (``--algorithm``: ppo, raft), evaluate, register. Every turn's
evaluation scores v0, the new version and best-of-n from v0 under that turn's RM (KL log n - (n-1)/n) on the same
held-out questions with the same sampling seeds. After the last turn, v0, v_T and best-of-n from v0 under v_T's RM
are evaluated once more on those questions with ``--final-samples`` answers per question (best-of-n: one pick), into
OUT/final: a turn's evaluation draws one answer per question, and the sampling noise of one answer is most of its
paired SE. Printed: a row per version and per best-of-n of every turn (judge score, its gain over v0 with a paired
standard error, judge win rate vs v0, KL to v0, mean words, the proxy RM's agreement with the judge on the
evaluation answers), the final evaluation's rows and, last line, from the final evaluation,
``judge_gain=<v_T - v0> judge_gain_se=<se> kl=<KL of v_T to v0> length_ratio=<mean words v_T / v0>``.
Rerunning with the same --out resumes: finished stages and turns are kept; once T turns are done, a rerun neither
builds the data nor trains v0 again (dumps copied afresh would rebuild the data), it only prints (and makes the final
evaluation if it is missing).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stackrlhf.evaluate.config import EvalConfig  # noqa: E402
from stackrlhf.evaluate.report import judge_of, judged_row, loop_versions  # noqa: E402
from stackrlhf.feedback.config import SimulateConfig  # noqa: E402
from stackrlhf.feedback.simulate import simulate  # noqa: E402
from stackrlhf.loop import loop_turn  # noqa: E402
from stackrlhf.pipeline import run_pipeline  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dump", action="append", default=[], help="A site name, dump folder, .7z or URL (repeatable; "
                                                               "default: every dump `stackrlhf data build` finds).")
    p.add_argument("--out", default="outputs/loop-gain", help="Working directory (kept; a rerun resumes).")
    p.add_argument("--turns", type=int, default=3, help="Loop turns T.")
    p.add_argument("--questions", type=int, default=96, help="rl questions queued per turn (tasks).")
    p.add_argument("--answers-per-question", type=int, default=4, help="Candidates per task (K).")
    p.add_argument("--annotators", type=int, default=3, help="Simulated annotators.")
    p.add_argument("--replication", type=int, default=1, help="Annotators per task.")
    p.add_argument("--noise", type=float, default=0.5, help="Bradley-Terry temperature of the preferences.")
    p.add_argument("--rating-noise", type=float, default=0.5, help="Noise on the 1-5 ratings.")
    p.add_argument("--judge", default="reference", help="reference or rm:DIR.")
    p.add_argument("--no-length-neutral", action="store_true", help="Keep the judge's trend in length.")
    p.add_argument("--rm-votes", action="store_true", help="Train each turn's RM on the vote pairs too.")
    p.add_argument("--eval-questions", type=int, default=64, help="Held-out questions each turn's evaluation answers "
                                                                 "(no perplexity).")
    p.add_argument("--final-questions", type=int, default=128, help="Held-out questions of the final evaluation.")
    p.add_argument("--best-of", default="4,16", help="Best-of-n from v0 under each turn's RM (comma-separated).")
    p.add_argument("--final-samples", type=int, default=4, help="Answers per question of v0 and v_T in the final "
                                                                "evaluation (0: none; the last line from turn T's).")
    p.add_argument("--algorithm", default="rloo", choices=("ppo", "rloo", "raft", "vbon", "bonbon"),
                   help="The RL step of each turn.")
    p.add_argument("--rloo-k", type=int, default=4, help="Answers per prompt with every --algorithm but ppo.")
    p.add_argument("--ppo-steps", type=int, default=12, help="PPO steps per turn.")
    p.add_argument("--ppo-learning-rate", type=float, default=5e-5, help="PPO learning rate.")
    p.add_argument("--ppo-answers", type=int, default=64, help="Answers per RL step (every --algorithm but ppo: this "
                                                               "/ k prompts x k answers; PPO: this many prompts).")
    p.add_argument("--ppo-epochs", type=int, default=1, help="Passes of the update over each step's answers.")
    p.add_argument("--ppo-mini-batch-size", type=int, default=16, help="Answers per optimiser step.")
    p.add_argument("--bonbon-alpha", type=float, default=0.05, help="bonbon: weight of the SFT term.")
    p.add_argument("--picks-coef", type=float, default=0.0, help="The RL step also imitates the annotators' picks "
                                                                 "so far, at this weight (the loop's picks_coef).")
    p.add_argument("--label-pairs", default="one", choices=("one", "all"),
                   help="The pairs each label gives the RM (the loop's label_pairs).")
    # a turn's RM learns from about 100 labels: 2 epochs at 5e-5 (12 steps) left it a coin (train loss 0.692, agreement
    # with the judge 0.55); 6 at 1e-4 learns them (0.641, 0.60), measured on turn 1's labels of 2026-12-02
    p.add_argument("--rm-epochs", type=float, default=6.0, help="RM epochs per turn.")
    p.add_argument("--rm-learning-rate", type=float, default=1e-4, help="RM learning rate.")
    p.add_argument("--base", default="auto", help="The base model: auto (SmolLM2-135M-Instruct, as the demo), a "
                                                    "directory or hub id, or pretrain (the offline 7.4 M model).")
    p.add_argument("--temperature", type=float, default=0.7, help="The policy's sampling temperature (queue, PPO, "
                                                                  "eval), as the demo's.")
    p.add_argument("--pretrain-minutes", type=float, default=3.0, help="Budget of the offline base (--base pretrain).")
    p.add_argument("--sft-minutes", type=float, default=2.0, help="Budget of the SFT model.")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def setup(args, out: Path) -> tuple[str, str]:
    """The data build and the SFT model (version 0): pipeline stages, so a rerun skips them."""
    offline = args.base == "pretrain"
    spec = {
        "out": str(out / "run"), "base": args.base,
        "data": {"dump": args.dump} if args.dump else {},
        "pretrain": {"size": "tiny", "max_minutes": args.pretrain_minutes, "learning_rate": 1e-3},
        # the offline model learns from scratch; an instruction-tuned base needs a light touch (the demo's SFT)
        "sft": ({"max_length": 256, "max_prompt_tokens": 128, "num_train_epochs": 2, "learning_rate": 3e-4}
                if offline else {"max_length": 320, "max_prompt_tokens": 128, "num_layers_unfrozen": 6,
                                 "num_train_epochs": 1, "learning_rate": 2e-5, "max_eval_samples": 32})
               | {"max_minutes": args.sft_minutes},
        "rm": {},  # planned, never run (until sft): each loop turn trains its own RM on the labels
    }
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_pipeline(path, out / "run", until="sft")
    return result["stages"]["data"]["out"], result["stages"]["sft"]["out"]


def loop_settings(args, data: str, out: Path) -> Path:
    best_of = [int(n) for n in args.best_of.split(",") if n.strip()]
    grouped = args.algorithm != "ppo"  # k answers per prompt
    settings = {
        "data": data, "db": f"sqlite:///{out / 'feedback.db'}", "judge": args.judge,
        "judge_length_neutral": not args.no_length_neutral, "rm_votes": args.rm_votes, "best_of": best_of,
        "questions": args.questions, "answers_per_question": args.answers_per_question,
        # the queue, the RL step and the evaluation see the same inputs: 48-token answers to prompts cut at 128
        "min_labels": max(1, args.questions * args.replication // 2), "max_new_tokens": 48, "max_prompt_tokens": 128,
        "temperature": args.temperature, "top_p": 1.0, "label_pairs": args.label_pairs,
        "picks_coef": args.picks_coef,
        "rm": {"num_train_epochs": args.rm_epochs, "max_length": 160, "max_prompt_tokens": 64,
               "learning_rate": args.rm_learning_rate, "report_to": "none", "seed": args.seed},
        # the methods sampling-matched: --ppo-answers (64) answers a step (grouped: 64 / k prompts, k answers each)
        "ppo": {"algorithm": args.algorithm, **({"rloo_k": args.rloo_k} if grouped else {}),
                "steps": args.ppo_steps, "prompts_per_step": args.ppo_answers // args.rloo_k if grouped else args.ppo_answers,
                "mini_batch_size": args.ppo_mini_batch_size, "ppo_epochs": args.ppo_epochs,
                **({"bonbon_alpha": args.bonbon_alpha} if args.algorithm == "bonbon" else {}),
                "temperature": args.temperature, "learning_rate": args.ppo_learning_rate, "save_every": 4,
                "report_to": "none", "seed": args.seed},
        # 64 answers a batch (best-of-n: 4 questions x 16 samples): 1.3x the tokens/s of 16; the answers do not change
        "eval": {"questions": args.eval_questions, "generation_batch_size": 64, "perplexity": False,
                 "temperature": args.temperature, "seed": args.seed},
    }
    path = out / "loop.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def run_turns(args, data: str, sft: str, out: Path) -> dict:
    registry = out / "registry"
    settings = loop_settings(args, data, out)
    reg_file = registry / "registry.json"
    first = not reg_file.is_file()
    while True:
        versions = json.loads(reg_file.read_text())["versions"] if reg_file.is_file() else []
        if len(versions) > args.turns:
            return json.loads(reg_file.read_text())
        t0 = time.perf_counter()
        result = loop_turn(registry, policy=sft if first else "", config_file=str(settings))
        first = False
        if result["action"] in ("queued", "waiting"):
            made = simulate(SimulateConfig(
                db=f"sqlite:///{out / 'feedback.db'}", judge=args.judge, data=data, annotators=args.annotators,
                noise=args.noise, rating_noise=args.rating_noise, replication=args.replication,
                judge_length_neutral=not args.no_length_neutral, seed=args.seed * 100 + len(versions)))
            print(f"batch {result['batch']}: {result['action']}; simulated annotators made "
                  f"{made['labels']} labels ({time.perf_counter() - t0:.0f} s)", flush=True)
        else:
            print(f"registered v{result['version']} ({time.perf_counter() - t0:.0f} s)", flush=True)


def pair_agreement(groups: list[list[tuple[float, float]]]) -> tuple[float, int]:
    """Share of same-group pairs of (judge, score) that the score orders as the judge does (ties left out), and
    how many pairs were counted."""
    agree = total = 0
    for group in groups:
        for (ja, sa), (jb, sb) in itertools.combinations(group, 2):
            if ja != jb and sa != sb:
                total += 1
                agree += (ja > jb) == (sa > sb)
    return (agree / total if total else math.nan), total


def agreement(samples: Path) -> float:
    """Share of same-question answer pairs (all evaluated models) the proxy RM orders as the judge does."""
    rows = [json.loads(line)["answers"].values() for line in samples.read_text().splitlines()]
    return pair_agreement([[(a["judge"], a["proxy"]) for a in answers] for answers in rows])[0]


def table(out: Path, agreements: dict[int, float]) -> list[dict]:
    """The report's rows of the loop's versions (``loop_versions``) with each turn's RM-judge agreement."""
    rows = loop_versions(out / "registry")
    for r in rows:
        r["agreement"] = math.nan if r["name"] == "v0" else agreements[r["turn"]]
    return rows


def diagnostics(reg: dict, agreements: dict[int, float]) -> list[dict]:
    """Per turn, what could hold the judge's gain back: how often the labels agree with the judge (pairs), how
    well the turn's RM orders the evaluation answers as the judge does, and what the RL step did with it."""
    rows = []
    for v in reg["versions"][1:]:
        n, m = v["version"], v["metrics"]
        ppo = m.get("rl", m.get("ppo", {}))  # the RL step's metrics (older registries: "ppo")
        rows.append({"turn": n, "labels": v["labels"], "pairs": v.get("feedback_pairs"),
                     "agreement": agreements[n],
                     "ppo_reward_first": ppo.get("reward_first"), "ppo_reward_last": ppo.get("reward_last"),
                     "ppo_kl_last": ppo.get("kl_last"), "proxy_gain": m.get("gain_proxy_vs_v0"),
                     "proxy_gain_se": m.get("gain_proxy_vs_v0_se")})
    return rows


def print_diagnostics(rows: list[dict]) -> None:
    head = ("turn", "labels", "pairs so far", "RM-judge agreement", "PPO proxy reward first -> last", "PPO KL last",
            "proxy gain vs v0 ± SE")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join([str(r["turn"]), str(r["labels"]), str(r["pairs"]), f"{r['agreement']:.3f}",
                          f"{r['ppo_reward_first']:+.3f} -> {r['ppo_reward_last']:+.3f}", f"{r['ppo_kl_last']:.2f}",
                          f"{r['proxy_gain']:+.3f} ± {r['proxy_gain_se']:.3f}"]))


def print_table(rows: list[dict]) -> None:
    head = ("model", "labels", "judge ± SE", "gain vs v0 ± SE", "gain, length-adj.", "judge win vs v0",
            "KL to v0", "words", "proxy-judge agreement")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join([r["name"], str(r["labels"]), f"{r['score']:+.3f} ± {r['se']:.3f}",
                          f"{r['gain']:+.3f} ± {r['gain_se'] or 0.0:.3f}", f"{r['gain_length_adjusted']:+.3f}",
                          f"{r['win']:.2f}", f"{r['kl']:.2f} ± {r['kl_se'] or 0.0:.2f}", f"{r['words']:.1f}",
                          "" if math.isnan(r["agreement"]) else f"{r['agreement']:.2f}"]))


def final_evaluation(args, out: Path, reg: dict) -> dict | None:
    """v0, v_T and best-of-n from v0 (under v_T's RM) on the turns' held-out questions, v0 and v_T answering each
    ``--final-samples`` times. With one answer per question the paired SE of a gain is mostly sampling noise (the
    judge's spread within a question is about 1 SD, so about 0.11 on 128 questions): N answers cut that part by
    sqrt(N), with the same questions. The registry's eval cache keeps the answers; a rerun reads OUT/final."""
    if args.final_samples < 1:
        return None
    from stackrlhf.evaluate.metrics import evaluate_models

    settings = yaml.safe_load((out / "loop.yaml").read_text())
    v0, last = reg["versions"][0]["model"], reg["versions"][args.turns]
    cfg = EvalConfig(**{
        **settings["eval"], "questions": args.final_questions, "max_new_tokens": settings["max_new_tokens"],
        "max_prompt_tokens": settings["max_prompt_tokens"], "model": [f"v0={v0}", f"v{args.turns}={last['model']}",
                                      *[f"bon{k}=bon:{k}@{v0}" for k in settings["best_of"]]],
        "baseline": "v0", "reference": v0, "data": settings["data"], "reward": last["rm"], "judge": args.judge,
        "judge_length_neutral": not args.no_length_neutral, "samples_per_question": args.final_samples,
        "answer_cache": str(out / "registry" / "eval-cache"), "out": str(out / "final")})
    done = out / "final" / "eval.json"
    kept = json.loads(done.read_text()) if done.is_file() else {}
    if kept.get("config") == json.loads(json.dumps(dataclasses.asdict(cfg))):
        return kept
    return evaluate_models(cfg)


def final_rows(ev: dict) -> list[dict]:
    """The final evaluation's models as rows of the loop's table (the judge, else the gold or proxy RM)."""
    judge = judge_of(ev)
    return [{"name": name, "labels": "", **judged_row(m, judge, ev["questions"]), "agreement": math.nan,
             "answers": m.get("samples_per_question", 1)} for name, m in ev["models"].items()]


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reg_file = out / "registry" / "registry.json"
    reg = json.loads(reg_file.read_text()) if reg_file.is_file() else {"versions": []}
    t_setup = 0.0
    if len(reg["versions"]) <= args.turns:  # a finished loop is not set up again: its data and v0 stay as they were
        data, sft = setup(args, out)
        t_setup = time.perf_counter() - t0
        reg = run_turns(args, data, sft, out)
    agreements = {v["version"]: agreement(out / "registry" / f"v{v['version']}" / "eval" / "samples.jsonl")
                  for v in reg["versions"][1:]}
    rows, diag = table(out, agreements), diagnostics(reg, agreements)
    v0 = next(r for r in rows if r["name"] == "v0")
    last = next(r for r in rows if r["name"] == f"v{args.turns}")
    final = final_evaluation(args, out, reg)
    finals = final_rows(final) if final else []
    if finals:
        v0, last = finals[0], finals[1]
    (out / "loop_gain.json").write_text(json.dumps({"args": vars(args), "rows": rows, "final": finals,
                                                    "diagnostics": diag, "setup_s": t_setup,
                                                    "seconds": time.perf_counter() - t0}, indent=2) + "\n")
    print(f"\nloop_gain: {args.turns} turns, {args.questions} tasks x {args.answers_per_question} answers per turn, "
          f"judge {args.judge}{'' if args.no_length_neutral else ' (length-neutral)'}, "
          f"{time.perf_counter() - t0:.0f} s ({t_setup:.0f} s data + SFT)\n")
    print_diagnostics(diag)
    print()
    print_table(rows)
    if finals:
        print(f"\nfinal evaluation ({final['questions']} questions; v0 and v{args.turns}: {args.final_samples} answers "
              "each, best-of-n: one pick)\n")
        print_table(finals)
    models = (final or json.loads((out / "registry" / f"v{args.turns}" / "eval" / "eval.json").read_text()))["models"]
    bon4 = next((r for r in (finals or rows) if r["name"] == "bon4"), None)
    overlap = models[last["name"]]["question_overlap"] - models["v0"]["question_overlap"]
    print(f"judge_gain={last['gain']:.4f} judge_gain_se={last['gain_se']:.4f} kl={last['kl']:.4f} "
          f"length_ratio={last['words'] / max(v0['words'], 1e-9):.4f} "
          f"bon4_judge_gain={math.nan if bon4 is None else bon4['gain']:.4f} overlap_delta={overlap:.4f}")


if __name__ == "__main__":
    main()
