"""The decode engine behind :func:`stackrlhf.models.generation.generate`: a preallocated (static) KV cache written in
place, one forward per new token for the rows still answering, and a sampler that never sorts the vocabulary.

Why not ``model.generate``: on a CPU its dynamic cache concatenates every layer's keys and values at every step, its
top-p sorts all 49k logits of every row and its multinomial draws one exponential per vocabulary entry; rows that
have ended keep being computed until the longest answer ends. Here the cache is written in place, top-p looks at
the top 64 tokens (more only when the nucleus is wider), one uniform number per row and step picks the token, and
finished rows leave the batch. Identical prompts (RLOO's k answers, best-of-n's n samples) are prefilled once.

Sampling randomness is a counter-based hash of (seed, row, step): a row's answer does not depend on the rows it
is batched with, the batch size or their order. The engine runs the model's own modules (their current weights,
so a policy being trained is always sampled as it is now) for two layouts: Llama (SmolLM2, Llama, the
rotary-embedding family) and GPT-2 (the offline base). :func:`supports` says which; other models fall back to
``model.generate``. A vLLM backend would slot in as a third implementation of :func:`decode`'s contract.

``capture_layer=j`` also returns, for every position the model read, the hidden state entering block j: PPO's
frozen trunk, so its update never runs the frozen blocks again (:mod:`stackrlhf.models.policy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stackrlhf.models.sampling import SamplingConfig

PREFILL_TOKENS = 4096  # prompt tokens (padding included) per prefill forward
CANDIDATES = (64, 1024)  # top-p looks at this many best tokens before sorting a row in full
_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def uniforms(seed: int, rows: torch.Tensor, step: int) -> torch.Tensor:
    """U[0, 1) per row, a pure function of (seed, row, step): splitmix64 of a counter, in int64 arithmetic that
    wraps."""
    z = rows.to(torch.int64) * _GOLDEN + _signed(seed * 0x2545F4914F6CDD1D + step * 0x632BE59BD9B4E019)
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() / float(1 << 53)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of unnormalised ``probs`` with its uniform ``u``."""
    cdf = probs.double().cumsum(-1)
    pick = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return pick.clamp_(max=probs.shape[1] - 1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the candidates (sorted best first) the nucleus keeps: those whose more likely tokens hold less than
    ``top_p`` of the probability (transformers' ``TopPLogitsWarper``), the best always."""
    keep = (probs.cumsum(-1) - probs) < top_p
    keep[:, 0] = True
    return keep


def _warp(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Scores after temperature and top-k, as transformers applies them (temperature > 0)."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = scores.topk(min(sampling.top_k, scores.shape[1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return scores


def _nucleus_pick(values: torch.Tensor, ids: torch.Tensor, log_z: torch.Tensor, top_p: float,
                  u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw from the nucleus among candidates sorted best first: the tokens transformers' ``TopPLogitsWarper``
    keeps are those whose more likely tokens hold less than ``top_p`` of the probability. Returns the tokens and
    their log-probabilities under the nucleus renormalised (the distribution drawn from)."""
    probs = (values - log_z).exp()
    keep = _nucleus(probs, top_p)
    kept = probs * keep
    pick = _inverse_cdf(kept, u).unsqueeze(1)
    logp = kept.gather(1, pick).squeeze(1).log() - kept.sum(-1).log()
    return ids.gather(1, pick).squeeze(1), logp


def sample_top_p(scores: torch.Tensor, top_p: float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p sampling without sorting the vocabulary when it can: the 64 best tokens of a row hold the nucleus
    whenever they hold ``top_p`` of the mass (most steps of a trained model), else the 1,024 best; only rows
    whose nucleus is wider still are sorted in full. Returns (tokens, their log-probs in the nucleus)."""
    log_z = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.empty(len(scores), dtype=torch.long, device=scores.device)
    out_logp = torch.empty(len(scores), dtype=torch.float, device=scores.device)
    todo = torch.arange(len(scores), device=scores.device)
    for k in CANDIDATES:
        if k >= scores.shape[1]:
            break
        values, ids = scores[todo].topk(k, dim=-1)
        covered = (values - log_z[todo]).exp().sum(-1) >= top_p
        done = todo[covered]
        if len(done):
            out[done], out_logp[done] = _nucleus_pick(values[covered], ids[covered], log_z[done], top_p, u[done])
        todo = todo[~covered]
        if not len(todo):
            return out, out_logp
    values, ids = scores[todo].sort(dim=-1, descending=True)
    out[todo], out_logp[todo] = _nucleus_pick(values, ids, log_z[todo], top_p, u[todo])
    return out, out_logp


def sample_tokens(logits: torch.Tensor, sampling: SamplingConfig, u: torch.Tensor | None,
                  with_logprobs: bool = False):
    """One token per row: greedy at temperature 0, else temperature, top-k and top-p as transformers applies them
    (in that order), drawn by inverse CDF with the row's uniform ``u``. With ``with_logprobs``, (tokens, the
    log-probability of each under the distribution it was drawn from: tempered, truncated and renormalised; 0
    for greedy picks)."""
    if sampling.temperature <= 0:
        tokens = logits.argmax(-1)
        return (tokens, torch.zeros(len(tokens), device=logits.device)) if with_logprobs else tokens
    scores = _warp(logits, sampling)
    if sampling.top_p < 1.0:
        tokens, logp = sample_top_p(scores, sampling.top_p, u.to(scores.device))
    else:
        probs = torch.softmax(scores, dim=-1)
        tokens = _inverse_cdf(probs, u.to(scores.device))
        logp = probs.gather(1, tokens.unsqueeze(1)).squeeze(1).log() if with_logprobs else None
    return (tokens, logp) if with_logprobs else tokens


def sampling_logprobs(logits: torch.Tensor, tokens: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """log-probability of ``tokens`` [N] under the distribution :func:`sample_tokens` draws from ``logits`` [N, V]
    (temperature, top-k, top-p, renormalised; -inf for a token outside the kept set): what another sampler's
    draws are weighted against (importance sampling)."""
    if sampling.temperature <= 0:
        return torch.where(logits.argmax(-1) == tokens, 0.0, float("-inf"))
    scores = _warp(logits, sampling)
    if sampling.top_p >= 1.0:
        return torch.log_softmax(scores, -1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    log_z = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.full((len(scores),), float("-inf"), device=scores.device)
    todo = torch.arange(len(scores), device=scores.device)
    for k in (*CANDIDATES, scores.shape[1]):
        k = min(k, scores.shape[1])
        values, ids = scores[todo].topk(k, dim=-1)
        probs = (values - log_z[todo]).exp()
        covered = (probs.sum(-1) >= sampling.top_p) | (k == scores.shape[1])
        keep = _nucleus(probs, sampling.top_p)
        kept = probs * keep
        hit = (ids == tokens[todo].unsqueeze(1)) & keep
        logp = torch.where(hit.any(-1), (kept * hit).sum(-1).log() - kept.sum(-1).log(),
                           torch.full((len(todo),), float("-inf"), device=scores.device))
        out[todo[covered]] = logp[covered]
        todo = todo[~covered]
        if not len(todo):
            break
    return out


# --------------------------------------------------------------------------- model layouts


class _Llama:
    """Pre-norm blocks with rotary position embeddings and grouped-query attention (transformers' Llama). With
    ``int8`` (:class:`stackrlhf.models.quant.Int8Model`) the blocks' products are its int8 ones."""

    def __init__(self, model, int8=None):
        self.model = model
        self.int8 = int8
        self.inner = model.model
        self.blocks = list(self.inner.layers)
        cfg = model.config
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.blocks[0].self_attn.scaling

    def embed(self, ids, positions):
        self._rope = self.inner.rotary_emb(self.inner.embed_tokens.weight[:1], positions)
        return self.inner.embed_tokens(ids)

    def qkv(self, i, x):
        attn = self.blocks[i].self_attn
        return self._heads(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))

    def _heads(self, q, k, v):
        """Projected queries, keys and values [rows, positions, heads * dim] as heads, the rotary embedding on q, k."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        shape = (*q.shape[:-1], -1, self.head_dim)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary_pos_emb(q, k, *self._rope)
        return q, k, v

    def block(self, i, h, attend):
        layer = self.blocks[i]
        if self.int8 is not None and self.int8.blocks[i] is not None:
            return self._int8_block(i, layer, h, attend)
        q, k, v = self.qkv(i, layer.input_layernorm(h))
        h = h + layer.self_attn.o_proj(attend(q, k, v, self.scale))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _int8_block(self, i, layer, h, attend):
        b = self.int8.blocks[i]
        q, k, v = self._heads(*b.qkv(layer.input_layernorm(h)).split([b.q_size, b.kv_size, b.kv_size], dim=-1))
        h = h + b.o(attend(q, k, v, self.scale))
        gate, up = b.gate_up(layer.post_attention_layernorm(h)).split(b.intermediate, dim=-1)
        return h + b.down(b.act(gate) * up)

    def final(self, h):
        return self.inner.norm(h)


class _GPT2:
    """Pre-norm blocks with learned position embeddings and one fused q/k/v projection (transformers' GPT-2)."""

    def __init__(self, model):
        self.model = model
        self.inner = model.transformer
        self.blocks = list(self.inner.h)
        cfg = model.config
        self.kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.inverse_layer_scale = cfg.scale_attn_by_inverse_layer_idx
        self.scale = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0

    def embed(self, ids, positions):
        return self.inner.wte(ids) + self.inner.wpe(positions)

    def block(self, i, h, attend):
        layer = self.blocks[i]
        q, k, v = layer.attn.c_attn(layer.ln_1(h)).split(layer.attn.split_size, dim=2)
        shape = (*q.shape[:-1], -1, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        scale = self.scale / (i + 1) if self.inverse_layer_scale else self.scale
        h = h + layer.attn.c_proj(attend(q, k, v, scale))
        return h + layer.mlp(layer.ln_2(h))

    def final(self, h):
        return self.inner.ln_f(h)


class _Head:
    """The LM head, its weight prepacked for oneDNN on a CPU (about 1.5x faster than ``F.linear`` for the
    49k-row vocabulary at decode batch sizes); packed per :func:`decode` call, so it is never stale. Forward
    pre-hooks on the head (the ILQL logits processor's, the PPO value head's) still see every input."""

    def __init__(self, model, int8=None):
        self.module = model.get_output_embeddings()
        self.int8 = int8
        weight = self.module.weight.detach()
        self.packed = None
        if (int8 is None and weight.device.type == "cpu" and weight.dtype == torch.float32
                and torch.backends.mkldnn.is_available()):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            except (RuntimeError, AttributeError):  # an unusual build: the plain product
                self.packed = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the last position of ``h`` [rows, positions, hidden] (the head's hooks see that position)."""
        h = h[:, -1:]
        packed = self.packed is not None and h.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type)
        if self.int8 is None and not packed:
            return self.module(h)[:, 0]
        for hook in self.module._forward_pre_hooks.values():  # what the module's own call would run
            hook(self.module, (h,))
        if self.int8 is not None:
            return self.int8(h[:, 0])
        return torch.ops.mkldnn._linear_pointwise(h[:, 0], self.packed, self.module.bias, "none", [], "")


def _layout(model, int8=None):
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # a PEFT or distributed wrapper: model.generate knows it
        return None
    kind = getattr(model.config, "model_type", None)
    if kind == "llama" and hasattr(model, "model") and not getattr(model.config, "sliding_window", None):
        return _Llama(model, int8)
    if kind == "gpt2" and hasattr(model, "transformer") and not getattr(model.config, "add_cross_attention", False):
        return _GPT2(model)
    return None


def supports(model) -> bool:
    """Whether the engine can run ``model`` (else :func:`generate` uses ``model.generate``)."""
    return _layout(model) is not None


# --------------------------------------------------------------------------- the decode loop


@dataclass
class Decoded:
    response_ids: list[list[int]]  # up to and including EOS when the answer ended
    finished: list[bool]
    hidden: list[torch.Tensor] | None  # capture_layer's input at every position read: prompt, then response[:-1]
    logprobs: list[list[float]] | None = None  # the sampler's log-prob of each answer token (sample_tokens')


class _StaticCache:
    """Keys and values of every layer, [layers, rows, kv_heads, capacity, head_dim], written in place."""

    def __init__(self, layers, rows, heads, capacity, dim, dtype, device):
        self.k = torch.zeros(layers, rows, heads, capacity, dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def keep(self, rows: torch.Tensor) -> None:
        self.k, self.v = self.k[:, rows], self.v[:, rows]


def _common_prefix(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(q) for q in seqs)
    for i in range(n):
        if any(q[i] != first[i] for q in seqs):
            return i
    return n


@torch.no_grad()
def decode(model, prompt_ids: list[list[int]], sampling: SamplingConfig, eos: int | None, pad: int,
           seed: int | None = None, row_ids: list[int] | None = None, logits_processor=None, streamer=None,
           capture_layer: int | None = None, int8=None) -> Decoded:
    """Answer a batch of prompts (token ids). ``row_ids`` (default 0..n-1) key each row's random numbers. With
    ``int8`` (:func:`stackrlhf.models.quant.quantize_for_sampling`'s copy of ``model``) the blocks' and the head's
    products are int8 ones; ``Decoded.logprobs`` are then that sampler's log-probs.

    The cache holds, per row, [the prefix all prompts share | the row's own rest | unused | the answer]: the
    shared prefix (a chat template's system prompt) is computed once, each distinct prompt's rest once (right-padded
    groups of rows, longest first), and every later step writes one column for all rows."""
    layout = _layout(model, int8)
    if layout is None:
        raise ValueError(f"the decode engine does not run {type(model).__name__}")
    if int8 is not None and not isinstance(layout, _Llama):
        raise ValueError("int8 sampling runs Llama-layout models only")
    if any(not p for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    n = len(prompt_ids)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rows = torch.as_tensor(row_ids if row_ids is not None else range(n), dtype=torch.long)
    seed = 0 if seed is None else int(seed)
    steps = sampling.max_new_tokens

    unique: dict[tuple, int] = {}
    source = torch.tensor([unique.setdefault(tuple(p), len(unique)) for p in prompt_ids], device=device)
    firsts = [list(p) for p in unique]
    shared = min(_common_prefix(firsts), min(len(p) for p in firsts) - 1)  # each row keeps one token of its own
    width = max(len(p) for p in firsts)
    n_layers = len(layout.blocks)
    head = _Head(model, None if int8 is None else int8.head)
    cache = _StaticCache(n_layers, len(firsts), layout.kv_heads, width + steps, layout.head_dim, dtype, device)
    hidden_size = layout.blocks[0].mlp.down_proj.out_features if isinstance(layout, _Llama) else model.config.n_embd
    hidden_out = (torch.zeros(len(firsts), width + steps, hidden_size, dtype=dtype, device=device)
                  if capture_layer is not None else None)

    def run(tokens, pos, cursor, allowed, cache_rows):
        """The blocks over ``tokens`` (written to cache columns [cursor, cursor + T) of ``cache_rows``, attending
        to every column before them that ``allowed`` allows). Returns (final hidden state, capture_layer's input)."""
        h = layout.embed(tokens, pos)
        T = tokens.shape[1]
        captured = None
        for i in range(n_layers):
            if i == capture_layer:
                captured = h

            def attend(q, k, v, scale, i=i):
                cache.k[i, cache_rows, :, cursor:cursor + T] = k
                cache.v[i, cache_rows, :, cursor:cursor + T] = v
                keys = cache.k[i, cache_rows, :, :cursor + T].to(q.dtype)  # a no-op unless under autocast
                values = cache.v[i, cache_rows, :, :cursor + T].to(q.dtype)
                if T == 1:  # one new token: each kv head's query group in one small product, no copies
                    B, H, _, D = q.shape
                    grouped = q.view(B, keys.shape[1], H // keys.shape[1], D)
                    weights = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(scale)
                    weights = weights.masked_fill_(~allowed, float("-inf")).softmax(-1)
                    return torch.matmul(weights, values).view(B, 1, H * D)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale,
                                                     enable_gqa=q.shape[1] != keys.shape[1])
                return out.transpose(1, 2).reshape(q.shape[0], T, -1)

            h = layout.block(i, h, attend)
        return layout.final(h), captured

    # prefill: the shared prefix once (its keys and values copied to every row), then each distinct prompt's rest
    if shared:
        prefix = torch.as_tensor(firsts[0][:shared], dtype=torch.long, device=device)[None]
        causal = torch.ones(shared, shared, dtype=torch.bool, device=device).tril()
        _, captured = run(prefix, torch.arange(shared, device=device)[None], 0, causal[None, None], slice(0, 1))
        cache.k[:, 1:, :, :shared] = cache.k[:, :1, :, :shared]
        cache.v[:, 1:, :, :shared] = cache.v[:, :1, :, :shared]
        if hidden_out is not None:
            hidden_out[:, :shared] = captured
    valid = torch.zeros((len(firsts), width + steps), dtype=torch.bool, device=device)
    last = []  # each distinct prompt's final hidden state at its last token
    rests = [len(p) - shared for p in firsts]
    start = 0
    while start < len(firsts):  # the rests in right-padded groups of at most PREFILL_TOKENS
        end = start + 1
        while end < len(firsts) and (end + 1 - start) * max(rests[start:end + 1]) <= PREFILL_TOKENS:
            end += 1
        lengths = torch.tensor(rests[start:end], device=device)
        T = int(lengths.max())
        rest = torch.full((end - start, T), pad, dtype=torch.long, device=device)
        for g, p in enumerate(firsts[start:end]):
            rest[g, :len(p) - shared] = torch.as_tensor(p[shared:], dtype=torch.long)
        own = torch.arange(T, device=device)[None] < lengths[:, None]
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        allowed = (causal[None] & own[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)[None]
        allowed = torch.cat([torch.ones(end - start, T, shared, dtype=torch.bool, device=device), allowed], dim=2)
        positions = (shared + torch.arange(T, device=device))[None].expand(end - start, T)
        h, captured = run(rest, positions, shared, allowed[:, None], slice(start, end))
        last.append(h[torch.arange(end - start, device=device), lengths - 1])
        for g, p in enumerate(firsts[start:end]):
            valid[start + g, :len(p)] = True
            if hidden_out is not None:
                hidden_out[start + g, shared:len(p)] = captured[g, :len(p) - shared]
        start = end

    # every answer row continues its prompt's row (the head once for all rows, so its hooks see them all)
    cache.keep(source)
    valid = valid[source]
    logits = head(torch.cat(last)[source][:, None])
    if hidden_out is not None:
        hidden_out = hidden_out[source]
    tokens = torch.full((n, width + steps), pad, dtype=torch.long, device=device)
    for r, p in enumerate(prompt_ids):
        tokens[r, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    if streamer is not None:
        streamer.put(tokens[:, :len(prompt_ids[0])].cpu())
    active = torch.arange(n, device=device)  # original row of each batch row
    next_pos = torch.tensor([len(p) for p in prompt_ids], device=device)
    lengths = torch.zeros(n, dtype=torch.long)
    token_logp = torch.zeros(n, steps)
    done = torch.zeros(n, dtype=torch.bool)  # per batch row: its answer has ended
    for step in range(steps):
        if logits_processor or sampling.repetition_penalty != 1.0:
            seen = _seen_tokens(tokens[active], next_pos, width, step, pad)
            for proc in logits_processor or []:
                logits = proc(seen, logits)
            if sampling.repetition_penalty != 1.0:
                from transformers import RepetitionPenaltyLogitsProcessor

                logits = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(seen, logits)
        cpu_active = active.cpu()
        u = uniforms(seed, rows[cpu_active], step) if sampling.temperature > 0 else None
        chosen, logp = sample_tokens(logits, sampling, u, with_logprobs=True)
        tokens[active, width + step] = chosen
        token_logp[cpu_active, step] = logp.float().cpu()
        lengths[cpu_active[~done]] += 1
        if streamer is not None:
            streamer.put(chosen.cpu())
        if eos is not None:
            done |= (chosen == eos).cpu()
        if step == steps - 1 or bool(done.all()):
            break
        # rows that ended leave the batch once a quarter of it has
        if int(done.sum()) * 4 >= len(active):
            keep = (~done).nonzero().squeeze(1).to(device)
            cache.keep(keep)
            active, valid, next_pos, chosen = active[keep], valid[keep], next_pos[keep], chosen[keep]
            done = done[keep.cpu()]
        column = width + step
        valid[:, column] = True
        h, captured = run(chosen[:, None], next_pos[:, None], column, valid[:, None, None, :column + 1],
                          slice(None))
        if hidden_out is not None:
            hidden_out[active, column] = captured[:, 0]
        next_pos = next_pos + 1
        logits = head(h)
    if streamer is not None:
        streamer.end()

    responses = [tokens[r, width:width + int(lengths[r])].tolist() for r in range(n)]
    hidden = None
    if hidden_out is not None:  # prompt positions, then the answer's tokens but its last
        hidden = [torch.cat([hidden_out[r, :len(p)], hidden_out[r, width:width + max(len(a) - 1, 0)]])
                  for r, (p, a) in enumerate(zip(prompt_ids, responses))]
    finished = [bool(eos is not None and a and a[-1] == eos) for a in responses]
    logprobs = [token_logp[r, :len(a)].tolist() for r, a in enumerate(responses)]
    return Decoded(response_ids=responses, finished=finished, hidden=hidden, logprobs=logprobs)


def _seen_tokens(tokens: torch.Tensor, next_pos: torch.Tensor, width: int, step: int, pad: int) -> torch.Tensor:
    """[prompt | answer so far] per row, left-padded: the ``input_ids`` a transformers logits processor reads."""
    out = torch.full((len(tokens), width + step), pad, dtype=torch.long, device=tokens.device)
    for r in range(len(tokens)):
        length = int(next_pos[r]) - step
        out[r, width - length:width + step] = torch.cat([tokens[r, :length], tokens[r, width:width + step]])
    return out
