"""Reinforcement learning on language: the on-policy trainer of PPO, RLOO and RAFT (a reward model + a KL
penalty to the reference, :mod:`stackrlhf.rl.ppo`, its advantage estimators in :mod:`stackrlhf.rl.estimators`) and
ILQL (offline, from scored answers, :mod:`stackrlhf.rl.ilql`)."""
