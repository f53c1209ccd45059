"""stackrlhf eval: judged answers of several models (plain and ILQL), gold/proxy halves, the small metrics."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stackrlhf.cli import cli
from stackrlhf.data.splits import pair_half
from stackrlhf.errors import StackRLHFError
from stackrlhf.evaluate.metrics import distinct_n, win_rate
from stackrlhf.models.answerer import best_of_n_kl, parse_model_spec
from stackrlhf.models.loading import load_causal_lm
from stackrlhf.models.reward import RewardModel, default_backbone, load_backbone
from stackrlhf.models.ilql import ILQLModel
from stackrlhf.data.load import load_pairs, load_split
from helpers import randomised_q_heads, site_dump


def test_small_metrics():
    assert win_rate([1.0, 0.0, 2.0, 3.0], [0.0, 1.0, 2.0, 1.0]) == pytest.approx(0.625)
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # (a b), (b a) of 4 bigrams
    assert distinct_n(["one"], 2) == 0.0
    spec = parse_model_spec("ilql=out/ilql@2.5")
    assert (spec.name, spec.path, spec.beta) == ("ilql", "out/ilql", 2.5)
    assert parse_model_spec("outputs/sft/").name == "sft"
    with pytest.raises(StackRLHFError, match="beta"):
        parse_model_spec("x=out@high")
    bon = parse_model_spec("b4=bon:4@out/sft")
    assert (bon.name, bon.path, bon.best_of, bon.beta) == ("b4", "out/sft", 4, None)
    assert parse_model_spec("bon:16@out/sft").name == "bon-16"
    with pytest.raises(StackRLHFError, match="bon:N@POLICY"):
        parse_model_spec("b=bon:x@out/sft")
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_best_of_n_keeps_the_scorers_best(tiny_lm, monkeypatch):
    from stackrlhf.models.answerer import Answerer, ModelSpec
    from stackrlhf.models.sampling import SamplingConfig

    def count_e(questions, answers):
        return [a.count("e") for a in answers]

    prompts = ["Question: which hops?\n\nAnswer: ", "Question: why foam?\n\nAnswer: "]
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0)
    plain = Answerer(ModelSpec("p", str(tiny_lm)), "cpu")
    many = plain.generate([p for p in prompts for _ in range(4)], sampling, batch_size=8, seed=5)
    bon = Answerer(ModelSpec("b", str(tiny_lm), best_of=4), "cpu", scorer=count_e)
    got = bon.generate(prompts, sampling, batch_size=8, seed=5)  # the same 8 samples, the best of each 4 kept
    for i, text in enumerate(got.texts):
        assert text.count("e") == max(t.count("e") for t in many.texts[4 * i:4 * i + 4])
        assert text in many.texts[4 * i:4 * i + 4]
    with pytest.raises(StackRLHFError, match="reward model"):
        Answerer(ModelSpec("b", str(tiny_lm), best_of=4), "cpu")
    # best-of-2 and best-of-4 from one pool of 4 samples per prompt: each picks among the first n, scored once
    calls = []

    def counting(questions, answers):
        calls.append(len(answers))
        return count_e(questions, answers)

    bon2 = Answerer(ModelSpec("b2", str(tiny_lm), best_of=2, pool=4), "cpu", scorer=counting)
    bon4 = Answerer(ModelSpec("b4", str(tiny_lm), best_of=4, pool=4), "cpu", scorer=counting)
    two = bon2.generate(prompts, sampling, batch_size=8, seed=5)  # not the pool `bon` drew: another scorer
    four = bon4.generate(prompts, sampling, batch_size=8, seed=5)
    assert calls == [8]  # the pool was sampled and scored once, for both
    # another scorer (the next loop turn's RM) rescores the same samples: nothing is sampled again
    sampled = []
    import stackrlhf.models.answerer as answerer_module

    real_generate = answerer_module.generate
    monkeypatch.setattr(answerer_module, "generate", lambda *a, **k: sampled.append(1) or real_generate(*a, **k))

    def fewer_e(questions, answers):
        calls.append(len(answers))
        return [-a.count("e") for a in answers]

    rescored = Answerer(ModelSpec("b4", str(tiny_lm), best_of=4, pool=4), "cpu", scorer=fewer_e)
    least = rescored.generate(prompts, sampling, batch_size=8, seed=5)
    assert sampled == [] and calls == [8, 8]
    for i, text in enumerate(least.texts):
        assert text.count("e") == min(t.count("e") for t in many.texts[4 * i:4 * i + 4])
    # rewritten weights are a new policy: sampled again
    weights = next(Path(tiny_lm).glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    rescored.generate(prompts, sampling, batch_size=8, seed=5)
    assert sampled == [1]
    assert four.texts == got.texts
    for i, text in enumerate(two.texts):
        assert text.count("e") == max(t.count("e") for t in many.texts[4 * i:4 * i + 2])
        assert text in many.texts[4 * i:4 * i + 2]


def test_gold_and_proxy_halves_split_the_pairs_by_question(site_data):
    every = load_pairs([str(site_data)], "train")
    proxy = load_pairs([str(site_data)], "train", half="proxy")
    gold = load_pairs([str(site_data)], "train", half="gold")
    assert len(proxy) + len(gold) == len(every) and len(proxy) > 0 and len(gold) > 0
    q_proxy = set(zip(proxy["site"], proxy["qid"]))
    q_gold = set(zip(gold["site"], gold["qid"]))
    assert not q_proxy & q_gold
    assert all(pair_half(s, q) == "gold" for s, q in q_gold)


@pytest.fixture(scope="module")
def judges(tmp_path_factory) -> tuple[Path, Path]:
    """Two untrained MiniLM reward models (different head seeds): enough to exercise the judging."""
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, tok = load_backbone(default_backbone())
        out = tmp_path_factory.mktemp(f"judge{seed}")
        RewardModel(model, tok, max_length=64, max_question_tokens=16).save_pretrained(out)
        dirs.append(out)
    return dirs[0], dirs[1]


def test_eval_judges_plain_and_ilql_models(tiny_lm, site_data, judges, tmp_path):
    ilql_dir = tmp_path / "ilql"
    lm, tok = load_causal_lm(str(tiny_lm))
    torch.manual_seed(3)
    model = randomised_q_heads(ILQLModel.create(lm))  # as a trained model's: a shift that differs by token
    model.save_pretrained(ilql_dir)
    tok.save_pretrained(str(ilql_dir))
    topk_dir = tmp_path / "ilql-topk"  # the same model, saved to decode with top-k 3 (as `ilql` saves its --top-k)
    shutil.copytree(ilql_dir, topk_dir)
    (topk_dir / "ilql.json").write_text(json.dumps({"beta": 0.0, "top_k": 3}))
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli, [
        "eval", "--model", f"sft={tiny_lm}", "--model", f"ilql0={ilql_dir}@0", "--model", f"ilql={ilql_dir}@5",
        "--model", f"topk={topk_dir}@0",
        "--model", f"bon4=bon:4@{tiny_lm}",
        "--reward", str(judges[0]), "--gold-reward", str(judges[1]), "--data", str(site_data), "--out", str(out),
        "--questions", "6", "--max-new-tokens", "10", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["questions"] == 6 and report["baseline"] == "sft"
    sft, ilql0, ilql = (report["models"][k] for k in ("sft", "ilql0", "ilql"))
    assert sft["win_rate_proxy_vs_sft"] == 0.5 and sft["win_rate_gold_vs_sft"] == 0.5
    assert sft["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)  # the reference is the baseline itself
    # beta = 0 decodes with the same LM: the same answers, the same rewards, no KL
    assert ilql0["reward_proxy"] == pytest.approx(sft["reward_proxy"], abs=1e-5)
    assert ilql0["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
    # beta = 5 shifts decoding: other answers, a positive KL
    assert ilql["kl_to_reference"] > 0.1
    # top-k 3 at beta 0: the answers come from the truncated LM, KL E[-log (mass of the top 3)] a token, not 0
    topk = report["models"]["topk"]
    assert topk["top_k"] == 3 and topk["kl_to_reference"] > 0.05 * topk["length_tokens"]
    assert 0.0 <= ilql["win_rate_gold_vs_sft"] <= 1.0 and ilql["human_answer_perplexity"] > 1.0
    # best-of-4 from the reference itself: the analytic KL; the proxy's pick of 4 outscores one sample (fixed seeds)
    bon = report["models"]["bon4"]
    assert bon["kl_to_reference"] == pytest.approx(math.log(4) - 0.75, abs=1e-4) and bon["best_of"] == 4
    assert bon["reward_proxy"] >= sft["reward_proxy"] - 1e-6
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert all(r["question_link"].startswith(f"https://{site_dump().name}/") and r["license"] for r in rows)
    assert set(rows[0]["answers"]) == {"sft", "ilql0", "ilql", "topk", "bon4"} and "proxy" in rows[0]["answers"]["ilql"]


def test_eval_skips_the_passes_whose_answer_it_knows(tiny_lm, site_data, judges, tmp_path, monkeypatch):
    """The reference and best-of-n from it have a log-ratio of 0 (no forward pass), and best-of-n shares its
    policy's perplexity of the human answers: 1 pass for sft and 0 for its best-of-n, against 3 for a copy of
    the same weights in another directory, whose full passes give the same figures."""
    import shutil

    from stackrlhf.models.answerer import Answerer

    copy = tmp_path / "copy"
    shutil.copytree(tiny_lm, copy)
    passes = []
    original = Answerer.logprobs_of

    def counted(self, *args, **kwargs):
        passes.append(self.spec.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Answerer, "logprobs_of", counted)
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli, [
        "eval", "--model", f"sft={tiny_lm}", "--model", f"bon4=bon:4@{tiny_lm}", "--model", f"bon2=bon:2@{tiny_lm}",
        "--model", f"copy={copy}", "--reward", str(judges[0]), "--data", str(site_data), "--out", str(out),
        "--questions", "5", "--max-new-tokens", "8", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert sorted(passes) == ["copy", "copy", "reference", "sft"]
    models = json.loads((out / "eval.json").read_text())["models"]
    assert models["sft"]["kl_to_reference"] == 0.0
    assert models["bon2"]["kl_to_reference"] == pytest.approx(math.log(2) - 0.5)
    assert models["copy"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)  # measured, not assumed
    for name in ("bon4", "bon2", "copy"):
        assert models[name]["human_answer_perplexity"] == pytest.approx(models["sft"]["human_answer_perplexity"],
                                                                        rel=1e-5)


def test_eval_with_a_cache_samples_and_scores_each_model_once(tiny_lm, site_data, judges, tmp_path, monkeypatch):
    """The loop evaluates v0, the parent and v0's best-of-n pool again in every turn, each turn in a new process.
    With --answer-cache a second evaluation reads their answers, KL and perplexity: no sampling, no log-prob pass, the
    same figures; best-of-n picks from its kept pool with the new reward model; a model whose weights were
    rewritten is sampled again."""
    import shutil

    from stackrlhf.models import answerer

    copy = tmp_path / "copy"
    shutil.copytree(tiny_lm, copy)
    sampled, passes = [], []
    real_generate, real_logprobs = answerer.generate, answerer.Answerer.logprobs_of

    def counted_generate(lm, tok, prompts, *args, **kwargs):
        sampled.append(len(prompts))
        return real_generate(lm, tok, prompts, *args, **kwargs)

    def counted_logprobs(self, *args, **kwargs):
        passes.append(self.spec.name)
        return real_logprobs(self, *args, **kwargs)

    monkeypatch.setattr(answerer, "generate", counted_generate)
    monkeypatch.setattr(answerer.Answerer, "logprobs_of", counted_logprobs)

    def evaluate(out: str, reward: Path) -> dict:
        answerer.Answerer._samples.clear()  # a new process: nothing kept in memory
        answerer.Answerer._scores.clear()
        sampled.clear()
        passes.clear()
        result = CliRunner().invoke(cli, [
            "eval", "--model", f"sft={tiny_lm}", "--model", f"copy={copy}", "--model", f"bon4=bon:4@{tiny_lm}",
            "--reward", str(reward), "--data", str(site_data), "--out", str(tmp_path / out), "--questions", "5",
            "--max-new-tokens", "8", "--answer-cache", str(tmp_path / "cache"), "--no-progress"])
        assert result.exit_code == 0, result.output
        models = json.loads((tmp_path / out / "eval.json").read_text())["models"]
        return {name: {k: v for k, v in m.items() if k != "generate_s"} for name, m in models.items()}

    first = evaluate("e1", judges[0])
    assert sorted(sampled) == [5, 5, 20] and sorted(passes) == ["copy", "copy", "reference", "sft"]
    again = evaluate("e2", judges[0])
    assert sampled == [] and passes == []
    assert again == first

    other_rm = evaluate("e3", judges[1])  # the next turn's reward model: the same pool, picked from again
    assert sampled == [] and passes == []
    assert other_rm["copy"]["kl_to_reference"] == first["copy"]["kl_to_reference"]
    assert other_rm["bon4"]["reward_proxy"] != first["bon4"]["reward_proxy"]

    weights = copy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    evaluate("e4", judges[0])
    assert sampled == [5] and sorted(passes) == ["copy", "copy", "reference"]


def test_eval_with_several_samples_per_question_averages_each_question_before_comparing(
        tiny_lm, site_data, judges, tmp_path):
    """--samples-per-question 3: a model answers each question 3 times (its first answers are the ones of 1
    sample), best-of-n still picks once; gains, win rates and their SE compare the per-question means."""
    import shutil

    from stackrlhf.models.judge import paired_se

    copy = tmp_path / "copy"
    shutil.copytree(tiny_lm, copy)

    def evaluate(out: str, samples: int) -> tuple[dict, list[dict]]:
        result = CliRunner().invoke(cli, [
            "eval", "--model", f"sft={tiny_lm}", "--model", f"copy={copy}", "--model", f"bon4=bon:4@{tiny_lm}",
            "--reward", str(judges[0]), "--gold-reward", str(judges[1]), "--data", str(site_data),
            "--out", str(tmp_path / out), "--questions", "5", "--max-new-tokens", "8", "--temperature", "1.5",
            "--samples-per-question", str(samples), "--no-progress"])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in (tmp_path / out / "samples.jsonl").read_text().splitlines()]
        return json.loads((tmp_path / out / "eval.json").read_text()), rows

    one, one_rows = evaluate("e1", 1)
    three, rows = evaluate("e3", 3)
    assert three["samples_per_question"] == 3 and three["models"]["sft"]["samples_per_question"] == 3
    assert three["models"]["bon4"]["samples_per_question"] == 1 and all("more" not in r["answers"]["bon4"] for r in rows)
    assert all(len(r["answers"]["copy"]["more"]) == 2 for r in rows) and "more" not in one_rows[0]["answers"]["sft"]
    # the first answer of each question is the one a single sample gives (the same random numbers)
    assert [r["answers"]["copy"]["text"] for r in rows] == [r["answers"]["copy"]["text"] for r in one_rows]
    assert len({a["text"] for r in rows for a in [r["answers"]["copy"], *r["answers"]["copy"]["more"]]}) > 5

    def means(name: str, judge: str) -> list[float]:
        return [sum(a[judge] for a in [r["answers"][name], *r["answers"][name].get("more", [])])
                / (1 + len(r["answers"][name].get("more", []))) for r in rows]

    copy_m = three["models"]["copy"]
    for judge in ("proxy", "gold"):
        mine, base = means("copy", judge), means("sft", judge)
        assert copy_m[f"reward_{judge}"] == pytest.approx(sum(mine) / 5, abs=1e-5)
        assert copy_m[f"gain_{judge}_vs_sft"] == pytest.approx((sum(mine) - sum(base)) / 5, abs=1e-5)
        assert copy_m[f"gain_{judge}_vs_sft_se"] == pytest.approx(paired_se(mine, base), abs=1e-6)
        assert copy_m[f"win_rate_{judge}_vs_sft"] == pytest.approx(
            sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, base)) / 5)
        assert len([a for r in rows for a in [r["answers"]["copy"], *r["answers"]["copy"]["more"]]]) == 15
    bon = three["models"]["bon4"]
    assert bon["gain_proxy_vs_sft"] == pytest.approx(
        sum(r["answers"]["bon4"]["proxy"] for r in rows) / 5 - sum(means("sft", "proxy")) / 5, abs=1e-5)
    bad = CliRunner().invoke(cli, ["eval", "--model", f"sft={tiny_lm}", "--reward", str(judges[0]), "--data",
                                   str(site_data), "--samples-per-question", "0"])
    assert bad.exit_code != 0 and "--samples-per-question must be at least 1" in bad.output


def test_eval_rejects_an_unknown_baseline(tiny_lm, site_data, judges, tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--model", f"sft={tiny_lm}", "--baseline", "ppo", "--reward",
                                      str(judges[0]), "--data", str(site_data), "--out", str(tmp_path / "e")])
    assert result.exit_code == 1 and "--baseline ppo is not one of the models" in result.output


def test_eval_with_a_judge_alone_samples_in_int8_and_weights_its_kl_back(site_data, tmp_path):
    """No reward model: the `reference` judge scores. A Llama-layout model on a CPU samples with the int8 sampler by
    default; its KL to the baseline is importance-weighted back to float32 and the mismatch recorded;
    --sampler-precision float32 samples exactly. Best-of-n without a reward model to pick with is refused."""
    from helpers import tiny_chat_llama

    from stackrlhf.models import quant

    if not quant.int8_available():
        pytest.skip("no int8 matrix kernel here")
    texts = list(load_split(site_data, "finetune", "train")["completion"])[:200]
    paths = {}
    for name, seed in (("base", 0), ("other", 1)):
        model, tok = tiny_chat_llama(texts, vocab_size=400, seed=0)
        if seed:
            with torch.no_grad():
                torch.manual_seed(seed)
                for p in model.model.layers[-1].parameters():
                    p.add_(0.05 * torch.randn_like(p))
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    common = ["eval", "--model", f"base={paths['base']}", "--model", f"other={paths['other']}", "--judge",
              "reference", "--data", str(site_data), "--questions", "4", "--max-new-tokens", "8", "--no-progress"]
    fast = CliRunner().invoke(cli, common + ["--out", str(tmp_path / "int8")])
    assert fast.exit_code == 0, fast.output
    report = json.loads((tmp_path / "int8" / "eval.json").read_text())
    other = report["models"]["other"]
    assert set(report["judges"]) == {"judge"} and "reward_proxy" not in other and "reward_judge" in other
    assert other["sampler_precision"] == "int8" and 0 < other["sampler_ess"] <= 1
    assert math.isfinite(other["kl_to_reference"]) and math.isfinite(other["sampler_k1_per_token"])
    exact = CliRunner().invoke(cli, common + ["--out", str(tmp_path / "f32"), "--sampler-precision", "float32"])
    assert exact.exit_code == 0, exact.output
    other32 = json.loads((tmp_path / "f32" / "eval.json").read_text())["models"]["other"]
    assert other32["sampler_precision"] == "float32" and "sampler_ess" not in other32
    refused = CliRunner().invoke(cli, common + ["--out", str(tmp_path / "bon"), "--model", f"bon4=bon:4@{paths['base']}"])
    assert refused.exit_code != 0 and "give --reward" in refused.output
    assert not (tmp_path / "bon").exists()


def test_eval_on_the_rl_prompts_takes_their_reference_answers(site_data):
    """`--split rl` asks the RL stages' own prompts (to tell a gain that carries to new questions from one on
    the training prompts); each question's reference answer stands as its best human answer."""
    from stackrlhf.data.load import load_split
    from stackrlhf.evaluate.config import EvalConfig
    from stackrlhf.evaluate.metrics import select_questions

    rl = {(r["site"], r["qid"]): r for r in load_split(site_data, "rl", "train").to_list()}
    held_out = {(r["site"], r["qid"]) for r in load_split(site_data, "evaluation", "test").to_list()}
    picked = select_questions(EvalConfig(model=["m=x"], judge="reference", data=str(site_data), questions=5, split="rl"))
    assert len(picked) == 5
    for q in picked:
        assert (q["site"], q["qid"]) in rl and (q["site"], q["qid"]) not in held_out
        assert q["best_answer"] == rl[(q["site"], q["qid"])]["reference_answer"] != ""
    assert {(q["site"], q["qid"]) for q in select_questions(EvalConfig(model=["m=x"], judge="reference", data=str(site_data),
                                                                       questions=5))} <= held_out
    with pytest.raises(ValueError, match="--split train"):
        EvalConfig(model=["m=x"], judge="reference", data=str(site_data), split="train")
