"""One generation helper for every stage (ask, eval, best-of-n, feedback queue, PPO/RLOO rollouts, the loop):
prompt strings in; prompt ids, answer ids, texts and finished flags out. Stops at EOS, at most
``max_new_tokens``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stackrlhf.models import engine
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
    trunk: list | None = None  # with capture_layer: per row, that block's input at every position the model read
    sampler_logprobs: list[list[float]] | None = None  # the sampler's log-prob of each answer token (engine only)


def encode_prompts(tok: PreTrainedTokenizerBase, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Each plain prompt as the model is asked it (its chat template when it has one), cut to ``max_prompt_tokens``."""
    return [encode_prompt(tok, p, max_prompt_tokens) for p in prompts]


@torch.no_grad()
def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str],
             sampling: SamplingConfig | None = None, batch_size: int = 8, seed: int | None = None,
             streamer=None, logits_processor=None, progress: str | None = None,
             capture_layer: int | None = None, first_row: int = 0, int8=None) -> Generation:
    """Answer each prompt, ``batch_size`` rows at a time (longest prompts first, so a batch's prompts are of
    similar length and identical prompts share one prefill). With ``seed`` the output is reproducible: row i's
    random numbers are a function of (seed, first_row + i, step) alone, whatever the batch size or the other rows
    (so process p of a distributed run passes ``first_row`` = the rows of the processes before it).
    ``progress`` names a progress bar over the batches (none when None). ``capture_layer=j`` also returns each
    row's input to block j at every position (``Generation.trunk``; the decode engine's models only). ``int8``
    (:func:`stackrlhf.models.quant.quantize_for_sampling`'s copy of ``model``) samples with int8 products.

    The decode engine (:mod:`stackrlhf.models.engine`) runs Llama- and GPT-2-layout models; any other model
    samples through ``model.generate`` with the same settings."""
    sampling = sampling or SamplingConfig()
    was_training = model.training
    model.eval()
    all_ids = encode_prompts(tok, prompts, sampling.max_prompt_tokens)
    if not engine.supports(model):
        if int8 is not None:
            raise ValueError(f"int8 sampling needs the decode engine, which does not run {type(model).__name__}")
        if capture_layer is not None:
            raise ValueError(f"capture_layer needs the decode engine, which does not run {type(model).__name__}")
        out = _transformers_generate(model, tok, prompts, all_ids, sampling, batch_size,
                                     None if seed is None else seed + first_row, streamer,
                                     logits_processor, progress)
    else:
        if seed is None:
            seed = int(torch.randint(2 ** 62, ()))
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        order = sorted(range(len(all_ids)), key=lambda i: (-len(all_ids[i]), all_ids[i]))
        results: list = [None] * len(all_ids)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=progress, unit="batch", leave=False,
                          disable=progress is None or len(starts) < 2):
            rows = order[start:start + batch_size]
            decoded = engine.decode(model, [all_ids[i] for i in rows], sampling, tok.eos_token_id, pad_id, seed=seed,
                                    row_ids=[first_row + i for i in rows], logits_processor=logits_processor, streamer=streamer,
                                    capture_layer=capture_layer, int8=int8)
            for j, i in enumerate(rows):
                results[i] = (decoded.response_ids[j], decoded.finished[j],
                              decoded.hidden[j] if decoded.hidden is not None else None, decoded.logprobs[j])
        out = Generation(prompts=list(prompts), texts=[], prompt_ids=all_ids, response_ids=[], finished=[],
                         trunk=[] if capture_layer is not None else None, sampler_logprobs=[])
        for response, done, hidden, logprobs in results:
            out.response_ids.append(response)
            out.finished.append(done)
            out.sampler_logprobs.append(logprobs)
            out.texts.append(tok.decode(response[:-1] if done else response, skip_special_tokens=True))
            if out.trunk is not None:
                out.trunk.append(hidden)
    if was_training:
        model.train()
    return out


def _transformers_generate(model, tok, prompts, all_ids, sampling, batch_size, seed, streamer, logits_processor,
                           progress) -> Generation:
    """``model.generate`` in batches, for models the decode engine does not run: the chunk of prompts starting at
    row i samples with torch seed + i."""
    device = next(model.parameters()).device
    eos = tok.eos_token_id
    out = Generation(prompts=list(prompts), texts=[], prompt_ids=[], response_ids=[], finished=[])
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
