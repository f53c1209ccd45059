"""``stackrlhf eval``: every model answers the same held-out questions; the answers are judged.

Per model: mean reward by the proxy RM (the one RL optimised) and by a gold RM trained on disjoint questions
(a proxy gain the gold RM does not share is over-optimisation, Gao et al. 2022), win rates against the
baseline by both, KL to the reference on the model's own samples, perplexity of the held-out human answers,
mean answer length and distinct-2. ILQL models are judged as they decode: with their beta shift; best-of-n
(`bon:N@POLICY`) keeps the proxy RM's best of N samples, its KL the analytic log N - (N-1)/N plus the policy's own.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from tqdm.auto import tqdm

from stackrlhf.config import write_text_atomic
from stackrlhf.data.load import load_split
from stackrlhf.errors import StackRLHFError
from stackrlhf.evaluate.config import EvalConfig
from stackrlhf.models.answerer import (Answerer, ModelSpec, best_of_n_kl, cached, parse_model_spec, same_vocabulary,
                                      weights_stamp)
from stackrlhf.stats import gain_text, length_adjusted_gains, question_overlap, words
from stackrlhf.models.generation import SamplingConfig
from stackrlhf.models.ilql import is_ilql_model
from stackrlhf.models.judge import load_judge, paired_se
from stackrlhf.console import console



def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams over all n-grams of all answers (a diversity measure; 0 when there are none)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """Share of questions where the model's answer scores above the baseline's (ties count half)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline)]
    return float(np.mean(wins)) if wins else math.nan


def evaluate_models(cfg: EvalConfig) -> dict:
    """``stackrlhf eval``: every model answers the same held-out questions with the same seeds; each answer is
    scored by every judge; the models are compared with the baseline; ``eval.json`` and ``samples.jsonl``."""
    from stackrlhf.models.reward import RewardModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    specs, baseline = model_specs(cfg)
    questions = select_questions(cfg)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p, max_prompt_tokens=cfg.max_prompt_tokens,
                              sampler_precision=cfg.sampler_precision)
    judges = {"proxy": RewardModel.from_pretrained(cfg.reward, device=device)} if cfg.reward else {}
    if cfg.gold_reward:
        judges["gold"] = RewardModel.from_pretrained(cfg.gold_reward, device=device)
    if cfg.judge:
        judges["judge"] = load_judge(cfg.judge, cfg.data, cfg.judge_length_neutral, device)
    reference_path = cfg.reference or next(s.path for s in specs if s.name == baseline)
    reference = Answerer(ModelSpec("reference", reference_path, 0.0 if is_ilql_model(reference_path) else None), device)
    proxy = judges.get("proxy")

    def pick_best(prompts, answers):  # one scorer object: best-of-n specs of one policy share their samples
        return proxy.score(prompts, answers, normalize=True)

    if proxy is None and any(s.best_of > 1 for s in specs):
        raise StackRLHFError("best-of-n (bon:N@POLICY) picks with the proxy reward model: give --reward")

    answers: dict[str, list[str]] = {}
    per_answer: dict[str, dict[str, list[float]]] = {}
    results: dict[str, dict] = {}
    human_nll: dict[tuple, float] = {}  # per distribution: best-of-n of v0 shares v0's perplexity of the human answers
    for spec in tqdm(specs, desc="models", disable=not cfg.progress):
        answers[spec.name], per_answer[spec.name], results[spec.name] = answer_and_score(
            Answerer(spec, device, scorer=pick_best, cache=cfg.answer_cache or None), questions, sampling, judges, reference,
            cfg, human_nll)
    per_question = {name: {k: question_means(v, len(questions)) for k, v in values.items()}
                    for name, values in per_answer.items()}
    compare_with_baseline(results, per_question, list(judges), baseline)
    report = {"questions": len(questions), "split": cfg.split, "samples_per_question": cfg.samples_per_question,
              "baseline": baseline,
              "reference": reference_path,
              "judges": {k: v for k, v in (("proxy", cfg.reward), ("gold", cfg.gold_reward), ("judge", cfg.judge)) if v},
              "sampling": asdict(sampling), "models": results, "config": asdict(cfg)}
    write_evaluation(Path(cfg.out), report, questions, answers, per_answer)
    print_table(report)
    return report


def model_specs(cfg: EvalConfig) -> tuple[list[ModelSpec], str]:
    """The models to answer (every best-of-n of one policy picks from one pool of max(n) samples per question,
    drawn and scored once) and the baseline's name."""
    specs = [parse_model_spec(m) for m in cfg.model]
    pools = {s.path: max(t.best_of for t in specs if t.path == s.path) for s in specs if s.best_of > 1}
    specs = [replace(s, pool=pools[s.path]) if s.best_of > 1 else s for s in specs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise StackRLHFError(f"model names must differ: {names}")
    baseline = cfg.baseline or names[0]
    if baseline not in names:
        raise StackRLHFError(f"--baseline {baseline} is not one of the models ({', '.join(names)})")
    return specs, baseline


def select_questions(cfg: EvalConfig) -> list[dict]:
    """``--questions`` questions of ``--split`` (all when 0), drawn with ``--seed``, in their dataset order."""
    if cfg.split == "rl":
        rows = load_split(cfg.data, "rl", "train").filter(lambda r: bool(r["reference_answer"]))
        rows = rows.map(lambda r: {"best_answer": r["reference_answer"]})
    else:
        rows = load_split(cfg.data, "evaluation", "test")
    order = np.random.RandomState(cfg.seed).permutation(len(rows))
    return rows.select(sorted(order[: cfg.questions] if cfg.questions else order)).to_list()


def question_means(values: list[float], n_questions: int) -> list[float]:
    """Per question, the mean of its answers' values (answer j of question i sits at j * n_questions + i)."""
    return np.asarray(values, dtype=float).reshape(-1, n_questions).mean(0).tolist()


def importance_weighted(kl: list[float], log_w: list[float], k1_per_token: list[float]) -> dict:
    """KL of int8-sampled answers weighted back to the float32 model (self-normalised importance sampling:
    sum w_i KL_i / sum w_i, w_i = p_float32(y_i) / p_int8(y_i)); the sampler's mismatch, mean log p_int8 -
    log p_float32 per token (k1 on its own samples, an estimate of KL(int8 || float32)); and the effective
    sample size of the weights as a share of the answers (1: no mismatch)."""
    log_w = np.asarray(log_w, dtype=float)
    if not np.isfinite(log_w).any():  # no answer the float32 model could have drawn: no weighting possible
        log_w = np.zeros_like(log_w)
    w = np.exp(log_w - log_w[np.isfinite(log_w)].max())
    ess = float(w.sum() ** 2 / (w ** 2).sum() / len(w))
    return {"kl_weighted": float((w * np.asarray(kl)).sum() / w.sum()), "k1_per_token": float(np.mean(k1_per_token)),
            "ess": ess}


def distribution_key(model: Answerer) -> tuple:
    """What fixes the distribution a model samples from before best-of-n picks: its weights and its ILQL shift.
    Two answerers with one key have a per-token log-ratio of exactly 0."""
    return str(Path(model.spec.path).resolve()), model.ilql is None, model.beta


def answer_and_score(model: Answerer, questions: list[dict], sampling: SamplingConfig, judges: dict,
                     reference: Answerer, cfg: EvalConfig, human_nll: dict | None = None
                     ) -> tuple[list[str], dict, dict]:
    """One model's answers, each scored by every judge, with its KL to the reference and the perplexity of the
    human answers: (answers, per-answer values, the model's summary). With ``cfg.samples_per_question`` = m > 1 a
    model (not best-of-n) answers every question m times: answer j of question i is item j * len(questions) + i,
    so the first len(questions) are the answers of m = 1. ``human_nll`` keeps the perplexity per distribution
    across the models of one evaluation."""
    prompts = [q["prompt"] for q in questions]
    sampling = model.resolve(sampling)  # the precision it really samples at: part of every cache key
    m = 1 if model.spec.best_of > 1 else cfg.samples_per_question
    asked, asked_questions = prompts * m, questions * m
    t0 = time.perf_counter()
    cache = Path(cfg.answer_cache) if cfg.answer_cache else None
    # best-of-n's picks (and so its answers and their KL) follow this evaluation's reward model: only its pool is kept
    answers_cache = None if model.spec.best_of > 1 else cache
    identity = (distribution_key(model), weights_stamp(model.spec.path), tuple(prompts), repr(sampling), cfg.seed)
    more = (m,) if m > 1 else ()  # m = 1 keeps the key it had before samples_per_question existed
    gen = cached(answers_cache, ("answers", *identity, *more),
                 lambda: model.generate(asked, sampling, cfg.generation_batch_size, cfg.seed))
    t_gen = time.perf_counter() - t0
    # KL between the tempered distributions the models sample from (the temperature is part of the policy). The
    # reference itself and best-of-n from it need no forward pass: their policy's log-ratio is 0 on every token.
    kl = None
    mismatch: dict = {}
    int8 = sampling.sampler_precision == "int8" and bool(gen.sampler_logprobs)
    # answers drawn with top-k or top-p (ILQL's saved top-k): their distribution is the truncated, renormalised
    # one, so the model's side of the KL is its log-prob under that rule, not under the full softmax
    rule = model.sampling_rule(sampling)
    truncated = bool(rule.top_k) or rule.top_p < 1
    if same_vocabulary(model.tok, reference.tok):
        if distribution_key(model) == distribution_key(reference):
            kl = [0.0] * len(gen.response_ids)
        else:
            def log_ratios() -> dict:
                """Per answer, log p_model - log p_ref; for int8 samples also log w, the answer's importance
                weight back to the float32 model's sampling distribution (its log-prob under the sampling rule
                minus the int8 sampler's)."""
                got = model.logprobs_of(gen.prompt_ids, gen.response_ids, cfg.generation_batch_size, cfg.temperature,
                                        rule if int8 or truncated else None)
                logp, under_rule = got if int8 or truncated else (got, None)
                ref = reference.logprobs_of(gen.prompt_ids, gen.response_ids, cfg.generation_batch_size, cfg.temperature)
                mine = under_rule if truncated else logp
                out = {"kl": [float((a - b).sum()) for a, b in zip(mine, ref)]}
                if int8:
                    gaps = [torch.tensor(s) - r for r, s in zip(under_rule, gen.sampler_logprobs)]  # log q - log p
                    out["log_w"] = [float(-g.sum()) for g in gaps]
                    out["k1_per_token"] = [float(g.mean()) if len(g) else 0.0 for g in gaps]
                return out

            reference_identity = (distribution_key(reference), weights_stamp(reference.spec.path), cfg.temperature)
            ratios = cached(answers_cache, ("kl", *identity, *reference_identity, *more,
                                            *(("truncated", repr(rule)) if truncated else ())), log_ratios)
            if isinstance(ratios, list):  # a cache entry written before int8 sampling
                ratios = {"kl": ratios}
            kl = ratios["kl"]
            if "log_w" in ratios:
                mismatch = importance_weighted(kl, ratios["log_w"], ratios["k1_per_token"])
        if model.spec.best_of > 1:  # KL(bon || ref) = KL(bon || policy) (analytic) + E_bon[log policy - log ref]
            kl = [best_of_n_kl(model.spec.best_of) + v for v in kl]
            if mismatch:
                mismatch["kl_weighted"] += best_of_n_kl(model.spec.best_of)
    # perplexity of the held-out human answers (the best one per question), once per distribution
    key = distribution_key(model)
    human_nll = {} if human_nll is None else human_nll
    if key not in human_nll and cfg.perplexity:
        def nll_of_human_answers() -> float:
            human = [model.tok(q["best_answer"], add_special_tokens=False)["input_ids"][: cfg.max_new_tokens]
                     + [model.tok.eos_token_id] for q in questions]
            prompt_ids = gen.prompt_ids[:len(questions)]
            return -float(torch.cat(model.logprobs_of(prompt_ids, human, cfg.generation_batch_size)).mean())

        human_nll[key] = cached(cache, ("human_nll", *identity[:-1], cfg.max_new_tokens), nll_of_human_answers)
    nll = human_nll.get(key)
    scores = {name: (judge.score(asked_questions, gen.texts) if name == "judge"
                     else judge.score(asked, gen.texts, normalize=True)) for name, judge in judges.items()}
    per_answer = {**scores, "length": [float(len(r)) for r in gen.response_ids],
                  "words": [float(words(t)) for t in gen.texts], **({"kl": kl} if kl is not None else {})}
    summary = {
        "path": model.spec.path, "beta": model.beta, "best_of": model.spec.best_of or None, "samples_per_question": m,
        "top_k": cfg.top_k or model.top_k,
        **{f"reward_{name}": float(np.mean(s)) for name, s in scores.items()},
        **{f"reward_{name}_std": float(np.std(s)) for name, s in scores.items()},
        "kl_to_reference": (mismatch["kl_weighted"] if mismatch else float(np.mean(kl))) if kl is not None else None,
        "sampler_precision": sampling.sampler_precision,
        **({"kl_to_reference_unweighted": float(np.mean(kl)), "sampler_k1_per_token": mismatch["k1_per_token"],
            "sampler_ess": mismatch["ess"]} if mismatch else {}),
        "kl_to_reference_se": (float(np.std(question_means(kl, len(questions))) / math.sqrt(len(questions)))
                               if kl else None),
        "human_answer_perplexity": None if nll is None else float(math.exp(min(nll, 50.0))),
        "length_tokens": float(np.mean([len(r) for r in gen.response_ids])),
        "length_words": float(np.mean([words(t) for t in gen.texts])),
        "question_overlap": float(np.mean([question_overlap(t, q.get("question") or q["prompt"])
                                           for t, q in zip(gen.texts, asked_questions)])),
        "ended": float(np.mean(gen.finished)), "distinct_2": distinct_n(gen.texts, 2),
        "generate_s": t_gen,
    }
    return gen.texts, per_answer, summary


def compare_with_baseline(results: dict, per_answer: dict, judge_names: list[str], baseline: str) -> None:
    """Each model's win rate and gain over the baseline by every judge, paired over the same questions, and how
    much of the gain is its answers' length (one slope of reward on log words over every model's answers)."""
    names = list(results)
    for judge in judge_names:
        gains = length_adjusted_gains({n: per_answer[n][judge] for n in names},
                                      {n: per_answer[n]["words"] for n in names}, baseline)
        for name in names:
            mine, base = per_answer[name][judge], per_answer[baseline][judge]
            results[name][f"win_rate_{judge}_vs_{baseline}"] = win_rate(mine, base)
            results[name][f"gain_{judge}_vs_{baseline}"] = gains[name]["gain"]
            results[name][f"gain_{judge}_vs_{baseline}_se"] = paired_se(mine, base)
            results[name][f"gain_{judge}_vs_{baseline}_length_adjusted"] = gains[name]["gain_length_adjusted"]
            results[name][f"reward_{judge}_per_log_word"] = gains[name]["reward_per_log_word"]


def write_evaluation(out: Path, report: dict, questions: list[dict], answers: dict, per_answer: dict) -> None:
    """``eval.json`` and ``samples.jsonl`` (every answer with its scores and the question's link, author and
    licence; a model's first answer to the question, its others under ``more``), each written whole."""
    out.mkdir(parents=True, exist_ok=True)
    n_q = len(questions)

    def answer(name: str, i: int) -> dict:
        return {"text": answers[name][i], **{k: v[i] for k, v in per_answer[name].items()}}

    lines = [json.dumps({
        "site": q["site"], "qid": q["qid"], "title": q["title"], "question_link": q["question_link"],
        "question_author": q["question_author"], "license": q["license"], "prompt": q["prompt"],
        "best_answer": q["best_answer"],
        "answers": {n: {**answer(n, i), **({"more": [answer(n, j) for j in range(i + n_q, len(answers[n]), n_q)]}
                                           if len(answers[n]) > n_q else {})} for n in answers}})
        for i, q in enumerate(questions)]
    write_text_atomic(out / "samples.jsonl", "\n".join(lines) + "\n")
    write_text_atomic(out / "eval.json", json.dumps(report, indent=2) + "\n")


def print_table(report: dict) -> None:
    base = report["baseline"]
    judges = list(report["judges"])
    m = report.get("samples_per_question", 1)
    table = Table(title=f"held-out evaluation: {report['questions']} questions"
                        f"{f' x {m} answers (best-of-n: 1)' if m > 1 else ''}, win rates vs {base}")
    cols = ["model"] + [f"{j} reward" for j in judges] + [f"{j} win" for j in judges] + [
        f"{j} gain, length-adjusted" for j in judges] + ["KL", "human ppl", "length", "distinct-2"]
    for c in cols:
        table.add_column(c, justify="right" if c != "model" else "left")
    for name, m in report["models"].items():
        kl = m["kl_to_reference"]
        table.add_row(name, *[f"{m[f'reward_{j}']:+.3f}" for j in judges],
                      *[f"{m[f'win_rate_{j}_vs_{base}']:.2f}" for j in judges],
                      *[gain_text(m, j, base) for j in judges],
                      "-" if kl is None else f"{kl:.2f}",
                      "-" if m["human_answer_perplexity"] is None else f"{m['human_answer_perplexity']:.1f}",
                      f"{m['length_tokens']:.1f}", f"{m['distinct_2']:.3f}")
    console.print(table)
