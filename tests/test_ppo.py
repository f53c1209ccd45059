"""PPO: reference modes, learning on a synthetic reward, the KL leash, resume equality, the NaN guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stackrlhf.data.load import load_split
from stackrlhf.errors import StackRLHFError
from stackrlhf.models.freezing import apply_lora
from stackrlhf.models.policy import PolicyWithValue
from stackrlhf.models.loading import load_causal_lm
from stackrlhf.rl.config import PPOConfig
from stackrlhf.rl.ppo import PPOTrainer, clipped_policy_loss, gae, kl_per_token, train_ppo

from helpers import save_tiny_lm

TARGET = "e"


@pytest.fixture(scope="module")
def tiny_policy(site_data, tmp_path_factory) -> Path:
    """A randomly initialised tiny GPT-2 (2 layers) with a small BPE vocabulary from the beer prompts."""
    texts = list(load_split(site_data, "rl", "train")["prompt"]) * 3
    return save_tiny_lm(texts, tmp_path_factory.mktemp("policy") / "tiny")


def target_fraction(tok=None):
    """The synthetic reward, computed from the decoded text: the share of its characters that are TARGET."""

    def scorer(questions, answers):
        return [a.count(TARGET) / max(len(a), 1) for a in answers]

    return scorer


def config(tiny_policy, site_data, out, **kw) -> PPOConfig:
    base = dict(model=str(tiny_policy), data=str(site_data), out=str(out), prompts_per_step=16, mini_batch_size=8,
                ppo_epochs=2, min_new_tokens=12, max_new_tokens=12, learning_rate=3e-3, num_layers_unfrozen=1,
                report_to="none", progress=False, sample_every=0, save_every=0, init_kl_coef=0.01,
                adaptive_kl=False, seed=0, temperature=1.0)  # the thresholds below were measured at 1.0
    base.update(kw)
    return PPOConfig(**base)


@pytest.mark.parametrize("mode", ["hydra", "lora", "copy"])
def test_reference_equals_policy_at_step_0(tiny_policy, mode):
    lm, tok = load_causal_lm(str(tiny_policy))
    if mode == "lora":
        lm = apply_lora(lm, r=4)
    policy = PolicyWithValue(lm, num_layers_unfrozen={"hydra": 1, "lora": -1, "copy": -1}[mode], lora=mode == "lora")
    assert policy.mode == mode
    batch = tok(["Question: is it hoppy?\n\nAnswer: yes", "Question: what?\n\nAnswer: no idea at all"],
                return_tensors="pt", padding=True)
    logits, values, ref = policy(batch["input_ids"], batch["attention_mask"], with_reference=True)
    assert torch.equal(logits, ref)
    assert values.shape == batch["input_ids"].shape
    with torch.no_grad():  # as in a rollout: only the positions that predict the response
        kept, kept_values, kept_ref = policy(batch["input_ids"], batch["attention_mask"], with_reference=True, keep=3)
    # (bit-identical over the full sequence; on the kept slice, equal to float32 rounding: BLAS may block the
    # two heads' (non-contiguous) inputs differently)
    assert torch.allclose(kept, kept_ref, atol=1e-5) and torch.allclose(kept, logits[:, -3:], atol=1e-5)
    assert torch.allclose(kept_values, values[:, -3:], atol=1e-5)
    if mode == "hydra":  # only the top block, head and value head train
        trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith(("lm.transformer.h.1.", "lm.transformer.ln_f.", "lm.lm_head.",
                                               "value_head.")) for n in trainable)


def test_hydra_reference_stays_frozen_after_updates(tiny_policy):
    lm, tok = load_causal_lm(str(tiny_policy))
    policy = PolicyWithValue(lm, num_layers_unfrozen=1)
    batch = tok(["Question: x\n\nAnswer: y"], return_tensors="pt")
    _, _, ref_before = policy(batch["input_ids"], batch["attention_mask"], with_reference=True)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    logits, _, _ = policy(batch["input_ids"], batch["attention_mask"])
    logits.sum().backward()
    opt.step()
    logits, _, ref_after = policy(batch["input_ids"], batch["attention_mask"], with_reference=True)
    assert torch.equal(ref_before, ref_after) and not torch.equal(logits, ref_after)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_fused_token_log_prob_matches_log_softmax_and_its_gradient(temperature):
    """logprobs_of's one-pass forward and backward equal log_softmax + gather and autograd's gradient."""
    from stackrlhf.rl.ppo import logprobs_of

    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 101) * 4).requires_grad_()
    tokens = torch.randint(0, 101, (3, 5))
    weights = torch.randn(3, 5)
    ours = logprobs_of(logits, tokens, temperature)
    (ours * weights).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    theirs = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (theirs * weights).sum().backward()
    assert ours.detach() == pytest.approx(theirs.detach(), abs=1e-5)
    assert grad == pytest.approx(logits.grad, rel=1e-5, abs=1e-6)
    from stackrlhf.rl.ppo import logprobs_and_entropy

    same, entropy = logprobs_and_entropy(logits, tokens, temperature)  # the rollout's: bit for bit the update's
    assert torch.equal(same, ours.detach())
    p = torch.softmax(logits.detach() / temperature, -1)
    assert entropy == pytest.approx(-(p * p.log()).sum(-1), abs=1e-4)


def test_gae_and_kl_estimators():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.5, 0.5, 0.0]]))  # Monte Carlo return 1 minus value 0.5
    assert torch.allclose(ret[:, :3], torch.ones(1, 3))
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(kl_per_token(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    assert (kl_per_token(logp, ref, "k3") >= 0).all()


def test_ppo_raises_a_synthetic_reward_and_keeps_kl_bounded(tiny_policy, site_data, tmp_path):
    _, tok = load_causal_lm(str(tiny_policy))
    metrics = train_ppo(config(tiny_policy, site_data, tmp_path / "ppo", steps=30, learning_rate=1e-3),
                        scorer=target_fraction(tok))
    history = [json.loads(line) for line in (tmp_path / "ppo" / "history.jsonl").read_text().splitlines()]
    start = sum(h["reward/score_mean"] for h in history[:3]) / 3
    end = sum(h["reward/score_mean"] for h in history[-3:]) / 3
    assert end > 2 * start and end > start + 0.1, (start, end)
    assert 0 < history[-1]["kl/mean"] < 40  # nats per response; beta is only 0.01 here
    assert metrics["steps"] == 30 and (tmp_path / "ppo" / "model.safetensors").is_file()
    assert (tmp_path / "ppo" / "value_head.safetensors").is_file()
    for key in ("reward/score_mean", "reward/score_std", "kl/mean", "kl/beta", "policy/entropy", "loss/policy",
                "loss/value", "policy/clipfrac", "policy/approx_kl", "response/length", "time/tokens_per_s"):
        assert key in history[-1]


def test_large_fixed_beta_keeps_the_policy_close(tiny_policy, site_data, tmp_path):
    _, tok = load_causal_lm(str(tiny_policy))
    # At this learning rate the same run with beta=0.01 drifts to several nats; beta=5 holds it near the reference.
    train_ppo(config(tiny_policy, site_data, tmp_path / "leash", steps=14, init_kl_coef=5.0, learning_rate=3e-4),
              scorer=target_fraction(tok))
    history = [json.loads(line) for line in (tmp_path / "leash" / "history.jsonl").read_text().splitlines()]
    start = sum(h["reward/score_mean"] for h in history[:3]) / 3
    end = sum(h["reward/score_mean"] for h in history[-3:]) / 3
    assert end < start + 0.05
    assert max(abs(h["kl/mean"]) for h in history) < 1.5
    # and not because nothing trained: the policy loss was live and the top block's weights moved
    trained, _ = load_causal_lm(str(tmp_path / "leash"))
    start_lm, _ = load_causal_lm(str(tiny_policy))
    moved = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), start_lm.parameters()))
    assert moved > 1e-4, moved
    assert any(abs(h["loss/policy"]) > 0 for h in history)


def test_resume_gives_the_same_next_step(tiny_policy, site_data, tmp_path):
    _, tok = load_causal_lm(str(tiny_policy))
    scorer = target_fraction(tok)
    straight = PPOTrainer(config(tiny_policy, site_data, tmp_path / "a", steps=3), scorer).train()
    assert straight["steps"] == 3
    PPOTrainer(config(tiny_policy, site_data, tmp_path / "b", steps=2, save_every=2), scorer).train()
    resumed = PPOTrainer(config(tiny_policy, site_data, tmp_path / "b", steps=3, save_every=2), scorer)
    resumed.maybe_resume()
    assert resumed.step_index == 2
    resumed.train()
    a = [json.loads(x) for x in (tmp_path / "a" / "history.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "history.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3
    for key in a[2]:
        if not key.startswith("time/"):
            assert a[2][key] == pytest.approx(b[2][key], rel=1e-5, abs=1e-6), key


def test_nan_reward_stops_with_a_clear_error(tiny_policy, site_data, tmp_path):
    calls = {"n": 0}

    def scorer(questions, answers):
        calls["n"] += 1
        return [float("nan") if calls["n"] > 2 else 0.1] * len(answers)

    with pytest.raises(StackRLHFError, match="NaN"):
        train_ppo(config(tiny_policy, site_data, tmp_path / "nan", steps=5, save_every=1), scorer=scorer)
    assert (tmp_path / "nan" / "checkpoints" / "step-2" / "state.pt").is_file()


def test_clip_fraction_counts_only_the_active_clipped_branch():
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    losses, clipped = clipped_policy_loss(adv, ratio, 0.2)
    assert clipped.tolist() == [True, False, True, False, False]
    assert torch.allclose(losses, torch.tensor([-1.2, 1.5, 0.8, -0.5, -1.1]))


# ---------------------------------------------------------------- RLOO (--algorithm rloo), in the same trainer

def test_rloo_advantages_are_leave_one_out():
    from stackrlhf.rl.rloo import rloo_advantages

    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, -1.0, 4.0])  # two prompts, k = 3
    got = rloo_advantages(rewards, 3)
    expected = []
    for p in range(2):
        group = rewards[3 * p:3 * p + 3].tolist()
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1:]
            expected.append(r - sum(others) / len(others))
    assert torch.allclose(got, torch.tensor(expected))
    assert torch.allclose(got.view(2, 3).sum(1), torch.zeros(2))  # each prompt's advantages: (k/(k-1)) x centred
    with pytest.raises(ValueError):
        rloo_advantages(rewards, 1)


def test_rloo_raises_a_synthetic_reward_without_a_value_head(tiny_policy, site_data, tmp_path):
    _, tok = load_causal_lm(str(tiny_policy))
    metrics = train_ppo(config(tiny_policy, site_data, tmp_path / "rloo", steps=30, learning_rate=1e-3,
                               algorithm="rloo", rloo_k=2, prompts_per_step=8), scorer=target_fraction(tok))
    history = [json.loads(line) for line in (tmp_path / "rloo" / "history.jsonl").read_text().splitlines()]
    start = sum(h["reward/score_mean"] for h in history[:3]) / 3
    end = sum(h["reward/score_mean"] for h in history[-3:]) / 3
    assert end > 2 * start and end > start + 0.1, (start, end)
    assert metrics["algorithm"] == "rloo" and len(history[0]["reward/score_each"]) == 16  # 8 prompts x k = 2
    assert "loss/value" not in history[-1] and not (tmp_path / "rloo" / "value_head.safetensors").exists()
    with pytest.raises(ValueError, match="rloo-k"):
        config(tiny_policy, site_data, tmp_path / "x", algorithm="rloo", rloo_k=1)


def test_raft_advantage_is_one_on_each_prompts_best_answer_only(tiny_policy, site_data, tmp_path):
    trainer = PPOTrainer(config(tiny_policy, site_data, tmp_path / "r", algorithm="raft", rloo_k=3, prompts_per_step=8),
                         scorer=target_fraction())
    # two prompts, three answers each; prompt 1's best is short, and its KL penalty decides between equal scores
    lengths, scores = [4, 2, 5, 3, 6, 6], [0.2, 0.9, 0.1, 0.0, 0.5, 0.5]
    mask, rewards = torch.zeros(6, 6), torch.zeros(6, 6)
    for i, (n, s) in enumerate(zip(lengths, scores)):
        mask[i, :n] = 1
        rewards[i, n - 1] = s
    rewards[5, 0] -= 0.1  # answer 5 paid more KL than answer 4
    advantages, _ = trainer.advantages(rewards, torch.zeros(6, 6), mask)
    assert torch.equal(advantages, torch.stack([mask[i] * float(i in (1, 4)) for i in range(6)]))
    with pytest.raises(ValueError, match="rloo-k"):
        config(tiny_policy, site_data, tmp_path / "x", algorithm="raft", rloo_k=1)


def test_raft_raises_a_synthetic_reward_without_a_value_head(tiny_policy, site_data, tmp_path):
    _, tok = load_causal_lm(str(tiny_policy))
    metrics = train_ppo(config(tiny_policy, site_data, tmp_path / "raft", steps=16, learning_rate=1e-3,
                               algorithm="raft", rloo_k=4, prompts_per_step=4), scorer=target_fraction(tok))
    history = [json.loads(line) for line in (tmp_path / "raft" / "history.jsonl").read_text().splitlines()]
    start = sum(h["reward/score_mean"] for h in history[:3]) / 3
    end = sum(h["reward/score_mean"] for h in history[-3:]) / 3
    assert end > 2 * start and end > start + 0.1, (start, end)
    assert metrics["algorithm"] == "raft" and len(history[0]["reward/score_each"]) == 16  # 4 prompts x k = 4
    assert "loss/value" not in history[-1] and not (tmp_path / "raft" / "value_head.safetensors").exists()


# ---------------------------------------------------------------- best-of-n methods: vbon (quantile RLOO), bonbon

def test_quantile_rewards_read_only_the_order_of_a_prompts_scores():
    from stackrlhf.rl.rloo import quantile_rewards

    scores = torch.tensor([0.3, 2.0, -1.0, 0.5, 7.0, 7.0, 7.0, 1.0])
    got = quantile_rewards(scores, 4)
    # prompt 0: ranks 2, 4, 1, 3 of 4; prompt 1: three tied at the top share ranks 2..4 (mean 3), one lowest
    assert torch.allclose(got, torch.log(torch.tensor([2, 4, 1, 3, 3, 3, 3, 1]) / 4.0))
    assert torch.equal(quantile_rewards(10 * scores.exp() + 3, 4), got)  # any increasing map of the scores
    with pytest.raises(ValueError):
        quantile_rewards(scores, 1)


def test_bonbon_gap_is_best_of_ks_own_log_ratio_gap():
    """Under best-of-k of p the log-ratio log p_bon(y)/p(y) is log k + (k - 1) log F(r(y)); drawn by Monte Carlo
    (F uniform), the best of k exceeds the worst by (k - 1) H_{k-1} on average, the IPO target."""
    from stackrlhf.rl.bonbon import best_of_n_kl, bonbon_gap

    for k in (2, 4, 8):
        u = torch.rand(200_000, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        def log_ratio(x, k=k):
            return math.log(k) + (k - 1) * torch.log(x)

        measured = float((log_ratio(u.max(1).values) - log_ratio(u.min(1).values)).mean())
        assert measured == pytest.approx(bonbon_gap(k), rel=0.02)
        # and best-of-k's KL to p is the mean log-ratio of its own draws
        assert float(log_ratio(u.max(1).values).mean()) == pytest.approx(best_of_n_kl(k), abs=0.01)


def test_bonbon_roles_rank_by_score_and_the_ipo_term_rests_at_the_gap():
    from stackrlhf.rl.bonbon import best_and_worst, bonbon_gap, bonbon_loss
    from stackrlhf.rl.estimators import ESTIMATORS, Step

    scores = torch.tensor([0.2, 0.9, 0.1, 0.4, 0.5, 0.5, 0.5, 0.5])
    assert best_and_worst(scores, 4).tolist() == [0, 1, -1, 0, 1, 0, 0, -1]  # ties: the first best, the last worst
    mask = torch.ones(8, 3)
    rewards = torch.zeros(8, 3)
    rewards[2, 2] = 5.0  # the KL-penalised reward would rank answer 2 first: bonbon ranks by the RM's score
    roles, _ = ESTIMATORS["bonbon"](Step(rewards, torch.zeros(8, 3), mask, k=4, scores=scores))
    assert roles[:, 0].tolist() == [0, 1, -1, 0, 1, 0, 0, -1]
    # IPO term: zero when best exceeds worst by the target gap (relative to the reference), positive otherwise
    ref = torch.zeros(2, 3)
    at_gap = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0 - bonbon_gap(4)]])
    _, ipo, _, gap = bonbon_loss(at_gap, ref, torch.ones(2, 3), 4, 0.5)
    assert float(ipo) == pytest.approx(0.0, abs=1e-9) and float(gap) == pytest.approx(bonbon_gap(4))
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    loss, ipo, sft, _ = bonbon_loss(logp, ref, torch.ones(2, 3), 4, 0.5)
    loss.backward()
    assert float(ipo.detach()) == pytest.approx(bonbon_gap(4) ** 2) and float(sft.detach()) == pytest.approx(1.0)
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()  # descent raises the best, lowers the worst


def test_bonbon_raises_a_synthetic_reward_and_updates_only_on_best_and_worst(tiny_policy, site_data, tmp_path):
    _, tok = load_causal_lm(str(tiny_policy))
    metrics = train_ppo(config(tiny_policy, site_data, tmp_path / "bonbon", steps=16, learning_rate=1e-3,
                               algorithm="bonbon", rloo_k=4, prompts_per_step=4, bonbon_alpha=0.5),
                        scorer=target_fraction(tok))
    history = [json.loads(line) for line in (tmp_path / "bonbon" / "history.jsonl").read_text().splitlines()]
    start = sum(h["reward/score_mean"] for h in history[:3]) / 3
    end = sum(h["reward/score_mean"] for h in history[-3:]) / 3
    assert end > 2 * start and end > start + 0.1, (start, end)
    assert metrics["algorithm"] == "bonbon" and len(history[0]["reward/score_each"]) == 16
    # 4 prompts: 4 (best, worst) pairs = 8 of the 16 answers, one minibatch of 8 rows an epoch, 2 epochs
    assert history[0]["policy/minibatches"] == 2 and "loss/ipo" in history[0]
    # the best answers of a step are likelier, relative to the reference, than the worst
    assert sum(h["bonbon/gap"] for h in history) / len(history) > 1.0


def test_vbon_is_rloo_on_rank_quantiles_so_the_scores_scale_does_not_matter(tiny_policy, tmp_path):
    prompts = [f"Question: is beer number {i} hoppy?\n\nAnswer:" for i in range(6)]

    def trained(name, scorer):
        cfg = PPOConfig(model=str(tiny_policy), out=str(tmp_path / name), algorithm="vbon", rloo_k=4,
                        prompts_per_step=2, mini_batch_size=4, ppo_epochs=1, min_new_tokens=6, max_new_tokens=6,
                        learning_rate=3e-3, num_layers_unfrozen=1, report_to="none", progress=False,
                        sample_every=0, save_every=0, temperature=1.0, init_kl_coef=0.0, adaptive_kl=False)
        trainer = PPOTrainer(cfg, scorer, prompts)
        trainer.step()
        return {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}

    plain = target_fraction()
    scaled = lambda q, a: [100 * s - 7 for s in plain(q, a)]  # noqa: E731
    a, b = trained("a", plain), trained("b", scaled)
    assert all(torch.equal(a[n], b[n]) for n in a)
    rloo = PPOTrainer(PPOConfig(model=str(tiny_policy), out=str(tmp_path / "r"), algorithm="rloo", rloo_k=4,
                                prompts_per_step=2, mini_batch_size=4, min_new_tokens=6, max_new_tokens=6,
                                report_to="none", progress=False), plain, prompts)
    assert rloo.algorithm.reward == "score"


def test_the_kl_budget_stops_a_run_without_updating_on_the_step_over_it(tiny_policy, site_data, tmp_path):
    cfg = config(tiny_policy, site_data, tmp_path / "budget", steps=6, algorithm="rloo", rloo_k=2,
                 prompts_per_step=4, learning_rate=3e-3, kl_budget=1e-6)
    metrics = train_ppo(cfg, scorer=target_fraction())
    history = [json.loads(line) for line in (tmp_path / "budget" / "history.jsonl").read_text().splitlines()]
    # step 1 samples the reference itself (KL 0) and updates; step 2's KL is over the budget: no update, the end
    assert len(history) == 2 and metrics["stopped_at_kl_budget"] and metrics["steps"] == 2
    assert history[0]["policy/minibatches"] > 0 and history[1]["policy/minibatches"] == 0
    assert abs(history[0]["kl/mean"]) < 1e-6 < history[1]["kl/mean"]


def test_the_adaptive_beta_has_a_floor():
    from stackrlhf.rl.ppo import AdaptiveKLController

    ctl = AdaptiveKLController(0.05, target=6.0, horizon=16, floor=0.01)
    for _ in range(50):  # KL far below target: beta falls 20 % a step, to the floor and no lower
        ctl.update(0.1, 16)
    assert ctl.value == 0.01
    ctl.update(60.0, 16)
    assert ctl.value == pytest.approx(0.012)
    assert PPOConfig(model="m").min_kl_coef > 0


def test_each_algorithm_names_its_estimator_and_the_kl_stop_is_per_minibatch(tiny_policy, tmp_path):
    """The trainer as a library: prompts and a reward function passed in, no data build. Each algorithm's
    advantage estimator comes from one table; with --max-approx-kl the update stops after the first minibatch
    whose approximate KL to the rollout policy exceeds it (the first minibatch, before any step, has KL 0)."""
    from dataclasses import replace

    from stackrlhf.rl.config import ALGORITHMS
    from stackrlhf.rl.estimators import ESTIMATORS

    assert {a: s.estimator for a, s in ALGORITHMS.items()} == {"ppo": "gae", "rloo": "rloo", "raft": "raft",
                                                                "vbon": "rloo", "bonbon": "bonbon"}
    assert all(s.estimator in ESTIMATORS for s in ALGORITHMS.values())
    prompts = [f"Question: is beer number {i} hoppy?\n\nAnswer:" for i in range(6)]
    cfg = PPOConfig(model=str(tiny_policy), out=str(tmp_path / "a"), algorithm="rloo", rloo_k=2, prompts_per_step=4,
                    mini_batch_size=2, ppo_epochs=3, min_new_tokens=6, max_new_tokens=6, learning_rate=3e-3,
                    num_layers_unfrozen=1, report_to="none", progress=False, sample_every=0, save_every=0,
                    temperature=1.0, max_approx_kl=1e-9)
    stopped = PPOTrainer(cfg, target_fraction(), prompts).step()
    assert (stopped["policy/minibatches"], stopped["policy/epochs"]) == (2, 1)
    whole = PPOTrainer(replace(cfg, out=str(tmp_path / "b"), max_approx_kl=0.0), target_fraction(), prompts).step()
    assert (whole["policy/minibatches"], whole["policy/epochs"]) == (12, 3)
    assert sorted(whole["reward/score_each"]) == pytest.approx(sorted(stopped["reward/score_each"]))
    with pytest.raises(StackRLHFError, match="--data is required"):
        PPOTrainer(replace(cfg, data=""))


def test_a_reward_model_below_chance_is_refused_and_the_report_says_so(tiny_policy, tmp_path):
    from stackrlhf.evaluate.config import ReportConfig
    from stackrlhf.evaluate.report import write_report
    from stackrlhf.stats import below_chance

    weak = {"accuracy": 0.35, "accuracy_ci95": [0.25, 0.46], "eval_pairs": 80, "baseline_longer_wins": 0.73}
    fine = {"accuracy": 0.45, "accuracy_ci95": [0.35, 0.55], "eval_pairs": 80}
    assert "below chance" in below_chance(weak) and below_chance(fine) == "" and below_chance({}) == ""
    # the evaluation questions' pairs (never used to pick the epoch) decide when the RM was scored on them
    assert below_chance({**weak, "test": fine}) == "" and "evaluation questions" in below_chance({**fine, "test": weak})
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "metrics.json").write_text(json.dumps(weak))
    prompts = ["Question: is it hoppy?\n\nAnswer:"] * 4
    cfg = dict(model=str(tiny_policy), reward=str(rm), out=str(tmp_path / "p"), prompts_per_step=4,
               mini_batch_size=4, report_to="none", progress=False)
    with pytest.raises(StackRLHFError, match=r"0\.35 \[0\.25, 0\.46\].*--allow-below-chance-reward"):
        PPOTrainer(PPOConfig(**cfg), None, prompts)
    assert not (tmp_path / "p" / "checkpoints").exists()
    page = write_report(ReportConfig(reward=str(rm), out=str(tmp_path / "report.html"))).read_text()
    head = page[:page.index("<h2>")]  # before the first section: the first thing a reader sees
    assert "below chance" in head and "0.35 [0.25, 0.46]" in head


def test_sft_data_adds_the_preferred_answers_nll_and_nothing_else_moves_the_weights(tiny_policy, site_data, tmp_path):
    """--sft-data: under a reward that ranks nothing, RLOO's advantages are zero, so the supervised term is the only
    gradient: the policy's NLL of the preferred answers falls; without it no trained weight moves."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = list(load_split(site_data, "rl", "train")["prompt"])[:6]
    picks = tmp_path / "picks"
    (picks / "reward").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": prompts + prompts[:2], "chosen": ["eee eee eee eee"] * 8,
                             "rejected": ["no"] * 8}), picks / "reward" / "train-00000-of-00001.parquet")

    def run(name, **kw):
        trainer = PPOTrainer(config(tiny_policy, site_data, tmp_path / name, algorithm="rloo", rloo_k=2,
                                    prompts_per_step=4, mini_batch_size=4, ppo_epochs=1, learning_rate=3e-3, **kw),
                             scorer=lambda q, a: [0.5] * len(a))
        before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
        history = [trainer.step() for _ in range(3)]
        moved = max(float((p.detach() - before[n]).abs().max()) for n, p in trainer.policy.named_parameters() if n in before)
        return trainer, history, moved

    _, history, moved = run("plain")
    assert moved == 0.0 and "loss/sft_data" not in history[-1]
    trainer, history, moved = run("mixed", sft_data=str(picks), sft_coef=1.0, sft_batch=4)
    assert len(trainer.demonstrations[0]) == 6  # each (prompt, answer) once
    assert moved > 0
    nll = [h["loss/sft_data"] for h in history]
    assert nll[-1] < 0.8 * nll[0], nll
    with pytest.raises(ValueError, match="go together"):
        config(tiny_policy, site_data, tmp_path / "x", sft_data=str(picks))
