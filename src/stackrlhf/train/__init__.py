"""Supervised stages on transformers' Trainer: pretrain (offline base), sft, and the reward model."""
