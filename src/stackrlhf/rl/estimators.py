"""Advantage estimators of the on-policy trainer (:class:`stackrlhf.rl.ppo.PPOTrainer`), one small function each,
chosen once by name from :data:`ESTIMATORS` (``--algorithm`` picks the row of :data:`stackrlhf.rl.config.ALGORITHMS`
that names one). Every estimator reads the same step and returns (advantages per token, returns per token):

  rewards   [B, T]  -beta * KL_t on every response token, + the RM score on the last one
  values    [B, T]  the value head's estimates (used by ``gae`` alone)
  mask      [B, T]  1 on response tokens
  k                 answers per prompt (grouped estimators: rows laid out prompt-major, row p * k + i)

| name | advantage | critic |
|---|---|---|
| ``gae`` | GAE(gamma, lambda) over tokens, whitened per token over the rollout (PPO) | the value head |
| ``rloo`` | sequence reward minus the mean of the prompt's other k - 1, scaled per sequence (RLOO) | none |
| ``raft`` | 1 on every token of the prompt's best answer, 0 elsewhere (reward-ranked fine-tuning) | none |
| ``bonbon`` | +1 on the best answer of the prompt by RM score, -1 on its worst, 0 elsewhere (see ``rl.bonbon``) | none |

An algorithm may also change the reward the estimator reads (``vbon``: RLOO on log rank-quantile rewards,
:func:`stackrlhf.rl.rloo.quantile_rewards`) or the loss the update minimises (``bonbon``).

A new method is a function here and a row in both tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stackrlhf.rl.bonbon import best_and_worst
from stackrlhf.rl.raft import best_of_group
from stackrlhf.rl.rloo import normalise_sequence_advantages, rloo_advantages


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens; positions after the end have no value."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


@dataclass(frozen=True)
class Step:
    """What an estimator reads: one rollout's per-token rewards, values and mask, and the settings it uses."""
    rewards: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    k: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    scores: torch.Tensor | None = None  # [B] the RM's scores (bonbon ranks by them, not by score - KL)


def gae_estimate(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    advantages, returns = gae(step.rewards, step.values, step.mask, step.gamma, step.lam)
    if step.whiten:
        advantages = masked_whiten(advantages, step.mask)
    return advantages * step.mask, returns


def rloo_estimate(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    per_sequence = rloo_advantages(step.rewards.sum(1), step.k)
    if step.whiten:
        per_sequence = normalise_sequence_advantages(per_sequence)
    return per_sequence[:, None] * step.mask, step.values


def raft_estimate(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    return best_of_group(step.rewards.sum(1), step.k)[:, None] * step.mask, step.values


def bonbon_roles(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    scores = step.scores if step.scores is not None else step.rewards.sum(1)
    return best_and_worst(scores, step.k)[:, None] * step.mask, step.values


ESTIMATORS: dict[str, Callable[[Step], tuple[torch.Tensor, torch.Tensor]]] = {
    "gae": gae_estimate,
    "rloo": rloo_estimate,
    "raft": raft_estimate,
    "bonbon": bonbon_roles,
}
