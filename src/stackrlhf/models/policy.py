"""The PPO policy: a causal LM with a value head on its trunk, and the frozen reference it is held to.

Three reference modes (``num_layers_unfrozen`` = k, ``lora``):
- k > 0 (trlx's "hydra"): frozen copies of only the top k blocks, the final norm and the LM head, run on the
  hidden state the shared (frozen) trunk already computed for the policy; no second model is held or run.
- LoRA: the same model with its adapters disabled.
- k = -1 without LoRA: a full frozen copy.
At step 0 the reference logits equal the policy's exactly in every mode.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from stackrlhf.models.freezing import final_norm, freeze_bottom, transformer_blocks


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def select_rows(captured: tuple, idx: torch.Tensor, n: int) -> tuple:
    """Rows ``idx`` of a captured block input (args, kwargs). A tensor is per row when it is laid out (batch,
    sequence, ...) as the hidden state (n, T, d) is: first dimension ``n`` and second ``T`` (position ids, rotary
    cos/sin of a batch), or a 4-d mask (n, heads or 1, T, keys). Anything else is kept: a 1-d ``cache_position``,
    a batch-shared rotary table (1, T, d) or (T, d), even when T equals n."""
    args, kwargs = captured
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] != n:
        raise ValueError(f"a captured block input starts with the hidden state (n={n}, T, d), not "
                         f"{None if hidden is None else tuple(hidden.shape)}")
    T = hidden.shape[1]

    def per_row(x: torch.Tensor) -> bool:
        return x.dim() > 1 and x.shape[0] == n and (x.shape[1] == T or (x.dim() == 4 and x.shape[2] == T))

    def pick(x):
        if isinstance(x, torch.Tensor) and per_row(x):
            return x[idx]
        if isinstance(x, tuple):
            return tuple(pick(y) for y in x)
        return x

    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}


def replay(blocks, norm: nn.Module | None, captured: tuple) -> torch.Tensor:
    """Run a captured block input (the trunk's hidden state and the block's mask / position arguments) through
    ``blocks`` and the final ``norm``: the same computation the model's own forward does from that block on."""
    args, kwargs = captured
    kwargs = dict(kwargs)
    if args:
        h, rest = args[0], list(args[1:])
    else:
        h, rest = kwargs.pop("hidden_states"), []
    if len(rest) >= 1:
        rest[0] = None  # no KV cache when replaying
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    kwargs["use_cache"] = False
    for block in blocks:
        h = _hidden(block(h, *rest, **kwargs))
    return norm(h) if norm is not None else h


class _BlockInputs(Exception):
    def __init__(self, args, kwargs):
        self.captured = (args, kwargs)


def block_arguments(lm: nn.Module, input_ids, attention_mask, position_ids) -> tuple:
    """The (args, kwargs) the model hands its first block for this batch (mask, rotary cos/sin, position ids):
    the model's forward runs only up to that block (the embeddings), so this costs almost nothing."""
    def stop(module, args, kwargs):
        raise _BlockInputs(args, kwargs)

    handle = transformer_blocks(lm)[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _BlockInputs as found:
        return found.captured
    finally:
        handle.remove()
    raise RuntimeError("the model's forward never reached its first block")


def trunk_from_rollout(lm: nn.Module, batch: dict, trunk_rows: list[torch.Tensor]) -> tuple:
    """The frozen trunk's output for a packed rollout batch (``generation.pack_sequences``), from the hidden states
    the decode engine captured while sampling it (``Generation.trunk``): the captured block input, laid out as the
    batch is ([left-padded prompt | answer]), with the batch's own mask and position arguments. Positions the
    sampler never read (padding, each answer's last token) are zeros: no kept output depends on them."""
    args, kwargs = block_arguments(lm, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    first = args[0] if args else kwargs["hidden_states"]
    hidden = torch.zeros_like(first)
    width = batch["input_ids"].shape[1] - batch["responses"].shape[1]
    prompt_lengths = (batch["attention_mask"][:, :width]).sum(1).tolist()
    for r, rows in enumerate(trunk_rows):
        start = width - int(prompt_lengths[r])
        hidden[r, start:start + len(rows)] = rows.to(hidden)
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class HydraReference(nn.Module):
    """Frozen copies of the top k blocks (+ final norm + head). A forward pre-hook on the first policy block
    of the branch captures its inputs (the trunk's hidden state and the block's mask / position arguments)
    during the policy's forward; :meth:`logits` replays them through the frozen copies."""

    def __init__(self, lm: nn.Module, k: int):
        super().__init__()
        blocks = transformer_blocks(lm)
        norm = final_norm(lm)
        head = lm.get_output_embeddings()
        self.k = k
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in list(blocks)[len(blocks) - k:])
        self.norm = copy.deepcopy(norm) if norm is not None else None
        self.head = copy.deepcopy(head)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        entry = blocks[len(blocks) - k] if k > 0 else (norm if norm is not None else head)
        entry.register_forward_pre_hook(self._capture, with_kwargs=True)
        self._captured = None
        self.last_input = None

    def _capture(self, module, args, kwargs):
        self._captured = self.last_input = (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                            dict(kwargs))

    @torch.no_grad()
    def logits(self, keep: int = 0) -> torch.Tensor:
        if self._captured is None:
            raise RuntimeError("run the policy forward first: the reference reuses its trunk")
        captured, self._captured = self._captured, None
        h = replay(self.blocks, self.norm, captured)
        if keep:  # after the norm, in the policy's order, so the two stay bit-identical
            h = h[:, -keep:]
        return self.head(h)


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


class PolicyWithValue(nn.Module):
    """``lm`` (trainable as ``num_layers_unfrozen`` / LoRA say) + a scalar value head on the final hidden state.

    By default the value loss trains the value head alone (its input is detached): letting it also move the
    shared top blocks couples the critic's large early errors into the policy, which then drifts however
    large beta is. ``value_grad_to_trunk=True`` restores the fully shared trunk (as trlx does)."""

    def __init__(self, lm: nn.Module, num_layers_unfrozen: int = -1, lora: bool = False,
                 value_grad_to_trunk: bool = False):
        super().__init__()
        self.lm = lm
        self.value_grad_to_trunk = value_grad_to_trunk
        self.mode = "lora" if lora else ("hydra" if num_layers_unfrozen >= 0 else "copy")
        for module in lm.modules():  # dropout would make the log-probs of a rollout differ from its update's
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        # the head reads the kept positions, a strided slice of the hidden states: as a strided 3-d input its
        # product runs as a batched product against the weight expanded per row (about 2x slower on a CPU); made
        # contiguous it is one matrix product. Registered first, so the value head's capture and the hydra
        # reference's copy of the head (deep-copied with its hooks) read the same tensor.
        lm.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
        if not lora:
            freeze_bottom(lm, num_layers_unfrozen)
        hidden = lm.get_output_embeddings().weight.shape[1]
        self.value_head = nn.Linear(hidden, 1)
        # zero: V starts at 0 (a neutral baseline), not at random values that would misdirect the first updates
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(lm.parameters()).device, dtype=next(lm.parameters()).dtype)
        self.hydra = HydraReference(lm, num_layers_unfrozen) if self.mode == "hydra" else None
        self.ref_copy = None
        if self.mode == "copy":
            self.ref_copy = copy.deepcopy(lm).eval()
            for p in self.ref_copy.parameters():
                p.requires_grad_(False)
        self._last_hidden = None
        lm.get_output_embeddings().register_forward_pre_hook(self._capture_hidden)

    def _capture_hidden(self, module, args):
        self._last_hidden = args[0]

    def forward(self, input_ids, attention_mask, position_ids=None, with_reference: bool = False, keep: int = 0,
                trunk: tuple | None = None):
        """(logits, values, reference logits or None) for the last ``keep`` positions (0: every position).

        PPO needs only the positions that predict the response: with a long prompt, computing the
        vocabulary-wide logits of the prompt positions is most of the memory of a step.

        ``trunk``: the frozen trunk's output for these rows (:meth:`frozen_trunk` of an earlier forward, rows picked
        with :func:`select_rows`): only the trained top blocks, the norm and the heads run (hydra mode)."""
        if trunk is not None:
            return self._forward_top(trunk, keep)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                      logits_to_keep=keep)
        hidden = self._last_hidden if self.value_grad_to_trunk else self._last_hidden.detach()
        values = self.value_head(hidden).squeeze(-1)
        self._last_hidden = None
        ref = self.reference_logits(input_ids, attention_mask, position_ids, keep) if with_reference else None
        if self.hydra is not None and not with_reference:
            self.hydra._captured = None
        return out.logits, values, ref

    def frozen_trunk(self) -> tuple | None:
        """The frozen trunk's output in the last forward: the input of the first trained block (hydra mode only;
        None otherwise). It does not change while only the top blocks train, so PPO computes it once a rollout."""
        return self.hydra.last_input if self.hydra is not None else None

    def forward_from_trunk(self, trunk: tuple, keep: int, with_reference: bool = False):
        """(logits, values, reference logits or None) from the frozen trunk's output alone (hydra mode): the top
        blocks, norm and heads of the policy, and those of the reference."""
        logits, values, _ = self._forward_top(trunk, keep)
        ref = None
        if with_reference:
            if self.ref_copy is not None:
                raise RuntimeError("a full reference copy needs the whole sequence, not the trunk")
            self.hydra._captured = trunk
            ref = self.hydra.logits(keep)
        return logits, values, ref

    def _forward_top(self, trunk: tuple, keep: int):
        blocks = transformer_blocks(self.lm)
        h = replay(list(blocks)[len(blocks) - self.hydra.k:], final_norm(self.lm), trunk)
        self.hydra._captured = None  # the entry block's hook saw these rows again; the reference does not need them
        if keep:
            h = h[:, -keep:]
        logits = self.lm.get_output_embeddings()(h)  # its pre-hook keeps h for the value head, as in forward
        hidden = self._last_hidden if self.value_grad_to_trunk else self._last_hidden.detach()
        self._last_hidden = None
        return logits, self.value_head(hidden).squeeze(-1), None

    def set_reference(self, ref_lm: nn.Module) -> str:
        """Measure KL against ``ref_lm`` (the loop's v0) instead of the policy's own starting point. When every
        frozen weight of the policy equals ``ref_lm``'s (both descend from it with the same top blocks trained),
        the hydra reference stays: the shared trunk plus ``ref_lm``'s own top blocks, norm and head. Otherwise
        ``ref_lm`` is kept whole as a frozen copy. Returns which."""
        theirs = dict(ref_lm.named_parameters())
        frozen = [(n, p) for n, p in self.lm.named_parameters() if not p.requires_grad]
        shared = (self.hydra is not None and frozen and all(n in theirs and theirs[n].shape == p.shape
                                                            and torch.equal(theirs[n].to(p), p) for n, p in frozen))
        if shared:
            blocks = transformer_blocks(ref_lm)
            for mine, src in zip(self.hydra.blocks, list(blocks)[len(blocks) - self.hydra.k:]):
                mine.load_state_dict(src.state_dict())
            if self.hydra.norm is not None:
                self.hydra.norm.load_state_dict(final_norm(ref_lm).state_dict())
            self.hydra.head.load_state_dict(ref_lm.get_output_embeddings().state_dict())
            return "hydra"
        self.ref_copy = ref_lm.eval()
        for p in self.ref_copy.parameters():
            p.requires_grad_(False)
        return "copy"

    @torch.no_grad()
    def reference_logits(self, input_ids, attention_mask, position_ids=None, keep: int = 0) -> torch.Tensor:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False, logits_to_keep=keep)
        if self.ref_copy is not None:  # a full reference (no hydra, or one set apart from the policy's trunk)
            if self.hydra is not None:
                self.hydra._captured = None
            return self.ref_copy(**kwargs).logits
        if self.mode == "hydra":
            return self.hydra.logits(keep)
        with self.lm.disable_adapter():  # lora: the same model with its adapters off
            return self.lm(**kwargs).logits

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
