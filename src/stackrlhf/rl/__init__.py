"""Reinforcement learning on language: PPO (online, reward model + KL penalty)."""
