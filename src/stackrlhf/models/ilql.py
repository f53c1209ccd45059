"""The ILQL model (Snell et al. 2022): a causal LM with Q heads, their Polyak-averaged targets and a V head on
its final hidden state, saved beside the LM; and its steered decoding, log_softmax(logits) + beta * (min Qtarget
- V), then top-k and temperature. The loss and the trainer are in :mod:`stackrlhf.rl.ilql`."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LogitsProcessor

from stackrlhf.errors import StackRLHFError
from stackrlhf.models.generation import generate
from stackrlhf.models.loading import load_causal_lm

HEADS_FILE = "ilql_heads.safetensors"
SETTINGS_FILE = "ilql.json"


# ---------------------------------------------------------------- heads

class MLPHead(nn.Module):
    """hidden -> 2*hidden -> out (trlx's head shape). :meth:`gathered` computes only the chosen outputs."""

    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(2 * hidden, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(h)))

    def gathered(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``forward(h).gather(-1, index)`` without the vocabulary-wide product."""
        z = F.relu(self.fc(h))
        return (z * self.out.weight[index]).sum(-1) + self.out.bias[index]


class ILQLHeads(nn.Module):
    """Q heads (one or two), their target copies (never trained by gradient), and the V head.

    Each Q head's output layer starts at zero, so Q(s, .) = 0 for every token until training moves it: the
    decoding shift beta * (min Qtarget - V) is then the same for every token of a state, and an untrained (or
    barely trained) model decodes exactly as its LM. Random output layers would make the shift a random
    projection of the hidden state, and the target heads, Polyak copies that follow the online ones by 1 % a step,
    would keep it for hundreds of steps."""

    def __init__(self, hidden: int, vocab: int, two_qs: bool = True):
        super().__init__()
        self.q_heads = nn.ModuleList(MLPHead(hidden, vocab) for _ in range(2 if two_qs else 1))
        for head in self.q_heads:
            nn.init.zeros_(head.out.weight)
            nn.init.zeros_(head.out.bias)
        self.target_q_heads = copy.deepcopy(self.q_heads)
        for p in self.target_q_heads.parameters():
            p.requires_grad_(False)
        self.v_head = MLPHead(hidden, 1)

    @torch.no_grad()
    def sync_target(self, alpha: float) -> None:
        """Polyak averaging: target <- alpha * online + (1 - alpha) * target."""
        for target, online in zip(self.target_q_heads.parameters(), self.q_heads.parameters()):
            target.mul_(1 - alpha).add_(online, alpha=alpha)

    def advantage(self, h: torch.Tensor) -> torch.Tensor:
        """min_i Qtarget_i(s, .) - V(s): the decoding shift, for every token of the vocabulary."""
        q = torch.stack([head(h) for head in self.target_q_heads]).amin(0)
        return q - self.v_head(h)


class ILQLModel(nn.Module):
    """A causal LM and the ILQL heads on its final hidden state."""

    def __init__(self, lm: nn.Module, heads: ILQLHeads):
        super().__init__()
        self.lm = lm
        self.heads = heads

    @classmethod
    def create(cls, lm: nn.Module, two_qs: bool = True) -> ILQLModel:
        head = lm.get_output_embeddings()
        heads = ILQLHeads(head.weight.shape[1], head.weight.shape[0], two_qs)
        p = next(lm.parameters())
        return cls(lm, heads.to(p.device, dtype=p.dtype))

    def hidden_states(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """Final hidden states (after the last norm: what the LM head reads), without computing any logits."""
        trunk = getattr(self.lm, self.lm.base_model_prefix)  # GPT2Model, LlamaModel ... (ends with the final norm)
        return trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state

    def shifted_logprobs(self, logits: torch.Tensor, h: torch.Tensor, beta: float) -> torch.Tensor:
        """The decoding distribution's scores: log_softmax(logits) + beta * (min Qtarget - V)."""
        logp = F.log_softmax(logits.float(), dim=-1)
        if not beta:
            return logp
        return logp + beta * self.heads.advantage(h).float()[..., : logp.shape[-1]]

    def save_pretrained(self, out: Path) -> None:
        from safetensors.torch import save_file

        self.lm.save_pretrained(str(out), safe_serialization=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}, str(out / HEADS_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype: str | None = "auto"):
        """(model, tokenizer, saved decoding settings) of a ``stackrlhf ilql`` output."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / HEADS_FILE).is_file():
            raise StackRLHFError(f"{path}: not an ILQL model (no {HEADS_FILE}); train one with `stackrlhf ilql`")
        lm, tok = load_causal_lm(str(path), dtype=dtype, device=device)
        settings = json.loads((path / SETTINGS_FILE).read_text()) if (path / SETTINGS_FILE).is_file() else {}
        model = cls.create(lm, two_qs=settings.get("two_qs", True))
        model.heads.load_state_dict(load_file(str(path / HEADS_FILE), device=str(next(lm.parameters()).device)))
        return model.eval(), tok, settings


def is_ilql_model(path: str | Path) -> bool:
    return (Path(path) / HEADS_FILE).is_file()


# ---------------------------------------------------------------- decoding

class ILQLLogitsProcessor(LogitsProcessor):
    """Shift each next-token distribution by beta * (min Qtarget - V) of the current state.

    It reads the final hidden state that the LM head has just consumed (a forward pre-hook), so it works
    inside ``model.generate`` with its KV cache; the sampler's temperature / top-k / top-p apply after it."""

    def __init__(self, model: ILQLModel, beta: float):
        self.model, self.beta = model, beta
        self._hidden = None
        self._hook = model.lm.get_output_embeddings().register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        self._hidden = args[0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.model.shifted_logprobs(scores, self._hidden[:, -1], self.beta)

    def close(self) -> None:
        self._hook.remove()


def ilql_generate(model: ILQLModel, tok, prompts: Sequence[str], sampling, beta: float, batch_size: int = 8,
                  seed: int | None = None, streamer=None, progress: str | None = None):
    """:func:`stackrlhf.models.generation.generate` with the ILQL shift."""
    processor = ILQLLogitsProcessor(model, beta)
    try:
        return generate(model.lm, tok, list(prompts), sampling, batch_size=batch_size, seed=seed, streamer=streamer,
                        logits_processor=[processor], progress=progress)
    finally:
        processor.close()
