"""Evaluation of trained models on held-out questions, and the HTML report."""
