"""One generation helper for every stage (ask, eval, feedback queue, PPO rollouts): batched, left-padded,
KV cache, stops at EOS, at most ``max_new_tokens``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stackrlhf.prompts import fit_prompt_ids


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens to generate per answer."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (0: greedy)."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens (0: off)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass (1: off)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty for repeated tokens (1: off)."})
    max_prompt_tokens: int = field(default=384, metadata={"help": "Longer prompts are cut in the middle."})

    def generate_kwargs(self) -> dict:
        greedy = self.temperature <= 0
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": not greedy, "use_cache": True,
                  "repetition_penalty": self.repetition_penalty}
        if not greedy:
            kwargs.update(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p)
        return kwargs


@dataclass
class Generation:
    prompts: list[str]
    texts: list[str]  # decoded answers, without the prompt and the EOS token
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # generated ids, up to and including EOS when the answer ended
    finished: list[bool]  # the answer ended with EOS before max_new_tokens


def encode_prompts(tok: PreTrainedTokenizerBase, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    return [fit_prompt_ids(tok(p, add_special_tokens=False)["input_ids"], max_prompt_tokens) for p in prompts]


@torch.no_grad()
def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str],
             sampling: SamplingConfig = SamplingConfig(), batch_size: int = 8, seed: int | None = None,
             streamer=None, logits_processor=None) -> Generation:
    """Answer each prompt. With ``seed`` the output is reproducible for the same model and settings."""
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = tok.eos_token_id
    out = Generation(prompts=list(prompts), texts=[], prompt_ids=[], response_ids=[], finished=[])
    all_ids = encode_prompts(tok, prompts, sampling.max_prompt_tokens)
    for start in range(0, len(all_ids), batch_size):
        chunk = all_ids[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        generated = model.generate(input_ids=input_ids, attention_mask=attention, pad_token_id=pad,
                                   eos_token_id=eos, streamer=streamer, logits_processor=logits_processor,
                                   **sampling.generate_kwargs())
        for ids, row in zip(chunk, generated[:, width:].tolist()):
            response = []
            done = False
            for t in row:
                response.append(t)
                if t == eos:
                    done = True
                    break
            out.prompt_ids.append(ids)
            out.response_ids.append(response)
            out.finished.append(done)
            out.texts.append(tok.decode(response[:-1] if done else response, skip_special_tokens=True))
    if was_training:
        model.train()
    return out


def pack_sequences(prompt_ids: list[list[int]], response_ids: list[list[int]], pad: int, device=None) -> dict:
    """[left-padded prompt | right-padded response] with attention mask and position ids, for scoring
    generated answers in one forward pass. ``keep`` = R + 1: the last positions that predict the response."""
    P = max(len(p) for p in prompt_ids)
    R = max(max(len(r) for r in response_ids), 1)
    ids = torch.full((len(prompt_ids), P + R), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, P - len(p):P] = torch.tensor(p)
        attn[i, P - len(p):P] = 1
        if r:
            ids[i, P:P + len(r)] = torch.tensor(r)
            attn[i, P:P + len(r)] = 1
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "position_ids": position_ids.to(device),
            "responses": ids[:, P:].to(device), "response_mask": attn[:, P:].float().to(device), "keep": R + 1}
