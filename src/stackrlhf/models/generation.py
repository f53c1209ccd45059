"""One generation helper for every stage (ask, eval, feedback queue, PPO rollouts): batched, left-padded,
KV cache, stops at EOS, at most ``max_new_tokens``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stackrlhf.models.padding import pad
from stackrlhf.models.sampling import SamplingConfig
from stackrlhf.prompts import encode_prompt


@dataclass
class Generation:
    prompts: list[str]
    texts: list[str]  # decoded answers, without the prompt and the EOS token
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # generated ids, up to and including EOS when the answer ended
    finished: list[bool]  # the answer ended with EOS before max_new_tokens


def encode_prompts(tok: PreTrainedTokenizerBase, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Each plain prompt as the model is asked it (its chat template when it has one), cut to ``max_prompt_tokens``."""
    return [encode_prompt(tok, p, max_prompt_tokens) for p in prompts]


@torch.no_grad()
def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str],
             sampling: SamplingConfig | None = None, batch_size: int = 8, seed: int | None = None,
             streamer=None, logits_processor=None, progress: str | None = None) -> Generation:
    """Answer each prompt. With ``seed`` the output is reproducible for the same model and settings: the chunk of
    prompts starting at row i samples with seed + i, so it does not depend on the chunks before it. ``progress``
    names a progress bar over the batches (none when None)."""
    sampling = sampling or SamplingConfig()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = tok.eos_token_id
    out = Generation(prompts=list(prompts), texts=[], prompt_ids=[], response_ids=[], finished=[])
    all_ids = encode_prompts(tok, prompts, sampling.max_prompt_tokens)
    starts = range(0, len(all_ids), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None or len(starts) < 2):
        chunk = all_ids[start:start + batch_size]
        if seed is not None:
            torch.manual_seed(seed + start)
        input_ids, attention = (t.to(device) for t in pad(chunk, tok.pad_token_id, side="left"))
        width = input_ids.shape[1]
        generated = model.generate(input_ids=input_ids, attention_mask=attention, pad_token_id=tok.pad_token_id,
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
