"""BoNBoN: best-of-n distillation (Gui, Garbacea and Veitch 2024, "BoNBoN Alignment"). It runs in
:class:`stackrlhf.rl.ppo.PPOTrainer` (``--algorithm bonbon``), sharing its rollout, reward, KL and checkpoints; what
differs is the update, in place of the clipped surrogate:

  for each prompt, k answers y_1..y_k from the current policy, scored by the RM
  y_w = the best by score, y_l = the worst
  delta(y) = log pi(y | x) - log pi_ref(y | x)                     (sequence sums; pi_ref: the frozen reference)
  T = (k - 1) * H_{k-1}                                            (the expected gap in delta between the best and
                                                                    the worst of k under best-of-k itself)
  L_IPO = mean over prompts of (delta(y_w) - delta(y_l) - T)^2     (IPO towards best-of-k's own gap)
  L_SFT = mean over prompts of -log pi(y_w | x) / |y_w|            (imitate the best answer, per token)
  L = alpha * L_SFT + (1 - alpha) * L_IPO / T^2

The IPO term is zero once the best answer is T nats likelier (relative to the reference) than the worst, as it is
under best-of-k: the policy is pulled toward best-of-k, not past it. Its KL to the reference is best-of-k's,
log k - (k - 1) / k per turn; k^n after n turns of distilling the last turn's best-of-k (``kl_budget`` stops a run
at such a bound). Only the best and the worst answer of each prompt take part in the update.
"""

from __future__ import annotations

import math

import torch


def bonbon_gap(k: int) -> float:
    """E[log p_bon(y_best)/p(y_best) - log p_bon(y_worst)/p(y_worst)] under best-of-k of p (continuous rewards):
    the log-ratio of best-of-k is log k + (k - 1) log F(r), and E log F is -1/k for the best of k uniforms and -H_k
    for the worst, so the gap is (k - 1)(H_k - 1/k) = (k - 1) H_{k-1}."""
    if k < 2:
        raise ValueError("best-of-k distillation needs k >= 2 answers per prompt")
    return (k - 1) * sum(1.0 / j for j in range(1, k))


def best_of_n_kl(n: float) -> float:
    """KL(best-of-n || the sampler) for continuous rewards: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def best_and_worst(scores: torch.Tensor, k: int) -> torch.Tensor:
    """+1 for each prompt's highest score, -1 for its lowest, 0 for the others (rows prompt-major,
    ``scores[p * k + i]``); of equal scores the first is the best and the last the worst."""
    if k < 2:
        raise ValueError("best-of-k distillation needs k >= 2 answers per prompt")
    grouped = scores.view(-1, k)
    roles = torch.zeros_like(grouped)
    rows = torch.arange(len(grouped))
    roles[rows, grouped.argmax(1)] = 1.0
    roles[rows, k - 1 - grouped.flip(1).argmin(1)] = -1.0
    return roles.reshape(-1)


def bonbon_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, k: int, alpha: float):
    """The loss of rows laid out as (best, worst) pairs, ``logp``/``ref_logp``/``mask`` [2P, T] (row 2p the best of
    prompt p, row 2p + 1 its worst); returns (loss, the IPO term, the SFT term, the mean gap in delta)."""
    target = bonbon_gap(k)
    delta = ((logp - ref_logp) * mask).sum(1).view(-1, 2)
    gap = delta[:, 0] - delta[:, 1]
    ipo = ((gap - target) ** 2).mean()
    best = slice(0, None, 2)
    sft = (-(logp[best] * mask[best]).sum(1) / mask[best].sum(1).clamp(min=1)).mean()
    return alpha * sft + (1 - alpha) * ipo / target ** 2, ipo, sft, gap.mean()
