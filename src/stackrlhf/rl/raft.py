"""RAFT: reward-ranked fine-tuning (Dong et al. 2023), also called online rejection-sampling fine-tuning or expert
iteration: learn to say what the reward model would pick from your own samples. It runs in
:class:`stackrlhf.rl.ppo.PPOTrainer` (``--algorithm raft``), sharing its rollout, reward, KL, clipped update and
checkpoints; what differs is this one step, in place of GAE:

  for each prompt, k answers y_1..y_k; the sequence reward R_i = score_i - beta * KL_i (as RLOO's)
  A_i = 1 for the answer with the highest R_i, 0 for the others, the same for every token of y_i; no value head
  so the clipped surrogate raises the likelihood of each prompt's best answer (at most 1 + cliprange per epoch),
  and leaves the others alone

Why beside RLOO: best-of-k under the RM is what gains judge score at the least KL in the loop (its KL is at most
log k - (k-1)/k); RAFT moves the policy toward that distribution. Its update uses only the ranking of the k
answers, not the size of the RM's score differences, which a weak RM (a few hundred labels) gets least right.
"""

from __future__ import annotations

import torch


def best_of_group(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 for the highest of each prompt's k sequence rewards (laid out prompt-major, ``rewards[p * k + i]``),
    0.0 for the rest; a tie goes to the first."""
    if k < 2:
        raise ValueError("RAFT needs k >= 2 answers per prompt to pick one")
    grouped = rewards.view(-1, k)
    best = torch.zeros_like(grouped)
    best[torch.arange(len(grouped)), grouped.argmax(1)] = 1.0
    return best.reshape(-1)
