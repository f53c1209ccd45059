"""How a model samples its answers: one dataclass (torch-free, so the CLI can build options from it) that
``ask``, ``feedback queue``, ``eval`` and the PPO rollouts all hand to :func:`stackrlhf.models.generation.generate`."""

from __future__ import annotations

from dataclasses import dataclass, field

SAMPLER_PRECISIONS = ("auto", "int8", "float32")
SAMPLER_PRECISION_HELP = (
    "The matrix products the sampler runs: int8 (per-channel int8 weights, per-token int8 activations, about 2x "
    "faster on a CPU; log-probs, KL and perplexity stay float32, and KL is importance-weighted back to the float32 "
    "model), float32 (exact), or auto: int8 on a CPU, the model's own dtype on a GPU.")


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens to generate per answer."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (0: greedy)."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens (0: off)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass (1: off)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty for repeated tokens (1: off)."})
    max_prompt_tokens: int = field(default=384, metadata={"help": "Longer prompts are cut in the middle."})
    sampler_precision: str = field(default="auto", metadata={"help": SAMPLER_PRECISION_HELP})

    def __post_init__(self) -> None:
        if self.sampler_precision not in SAMPLER_PRECISIONS:
            raise ValueError(f"--sampler-precision {self.sampler_precision!r}: choose one of "
                             f"{', '.join(SAMPLER_PRECISIONS)}")

    def generate_kwargs(self) -> dict:
        greedy = self.temperature <= 0
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": not greedy, "use_cache": True,
                  "repetition_penalty": self.repetition_penalty}
        if not greedy:
            kwargs.update(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p)
        return kwargs
