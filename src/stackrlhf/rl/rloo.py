"""RLOO: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"), the
critic-free online method. It runs in :class:`stackrlhf.rl.ppo.PPOTrainer` (``--algorithm rloo``), sharing its
rollout, reward, KL, clipped update and checkpoints; what differs is this one step, in place of GAE:

  for each prompt, k answers y_1..y_k; the sequence reward R_i = score_i - beta * sum_t KL_t (k1; with
  --kl-penalty mean, the default, - beta * mean length * mean_t KL_t)
  baseline_i = (sum_j R_j - R_i) / (k - 1)       (the mean reward of the other k - 1 answers)
  A_i = R_i - baseline_i, the same for every token of y_i; no value head
  normalised (optional) by the std of the A_i over sequences, never shifted: each prompt's A_i still sum to zero,
  and a long answer's tokens weigh what a short one's do
"""

from __future__ import annotations

import torch


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out advantages of sequence rewards laid out prompt-major: ``rewards[p * k + i]`` is answer i of
    prompt p. Each answer's baseline is the mean of the other k - 1 answers to the same prompt."""
    if k < 2:
        raise ValueError("RLOO needs k >= 2 answers per prompt")
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def normalise_sequence_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """Scale per-sequence advantages to unit std (over sequences, not tokens), without subtracting a mean: a
    token-level whitening would shift every token by the token-weighted mean, breaking the per-prompt zero sum
    and tying each answer's advantage to its length."""
    return advantages / (advantages.std() + 1e-8) if len(advantages) > 1 else advantages


def quantile_rewards(scores: torch.Tensor, k: int) -> torch.Tensor:
    """log of each answer's rank quantile among its prompt's k answers (rows prompt-major): log(rank / k), rank 1
    for the lowest score and k for the highest (0), ties sharing their mean rank. The reward of variational
    best-of-n (Amini et al. 2024) and BOND (Sessa et al. 2024): log F(r), F the prompt's empirical reward CDF, so
    only the order of the RM's scores counts, never their scale, and the optimum at beta = 1 / (k - 1) is best-of-k."""
    if k < 2:
        raise ValueError("quantile rewards need k >= 2 answers per prompt")
    grouped = scores.view(-1, k)
    below = (grouped[:, None, :] < grouped[:, :, None]).sum(-1).float()  # answers scored lower than each
    equal = (grouped[:, None, :] == grouped[:, :, None]).sum(-1).float()  # itself included
    rank = below + (equal + 1) / 2
    return torch.log(rank / k).reshape(-1)
