"""int8 sampling on a CPU: a quantised copy of a model's matrix products for the decode engine.

Each Linear of the transformer blocks (q/k/v fused into one product, gate/up into another, the attention output,
the MLP's down projection) and the LM head becomes an :class:`Int8Linear`: int8 weights with one scale per
output channel, and activations quantised to int8 per token (one scale per row, so a row's result never depends
on the rows batched with it), multiplied by ``torch._int_mm`` (int8 x int8 -> int32, VNNI / AVX-512 / AVX2
kernels through oneDNN) and rescaled. Small LMs have a few activation channels far larger than the rest, which
per-token scales would crush; two measures keep them:

- SmoothQuant (Xiao et al. 2023): each input channel k of a product is divided by s_k = max|X_k|^a / max|W_k|^(1-a)
  and its weight column multiplied by it, moving the range from activations to weights (the product is
  unchanged in exact arithmetic). The maxima come from a fixed calibration text, so the quantised model is a
  pure function of the weights.
- the ``outliers`` input channels still largest after smoothing are multiplied in float32 (LLM.int8(),
  Dettmers et al. 2022, with the channels fixed by calibration rather than found per batch).
- the MLP's down projection reads silu(gate) * up, heavy-tailed in every channel, where neither helps: its input
  is rotated first by a block-diagonal Hadamard matrix with random signs (QuaRot, Ashkboos et al. 2024), and its
  weight columns by the same orthogonal matrix, so each token's range is spread over its 128-channel blocks.
  On SmolLM2 this halves the mismatch (KL per token about 0.011 -> 0.006, ``benchmarks/rollout_speed.py``).

Only the sampler reads this copy: log-probs, KL and perplexity stay the float32 model's. The embedding is
shared with the float model (a lookup, not a product). :func:`int8_available` says whether this torch and CPU
run ``torch._int_mm``; where they do not, :func:`quantize_for_sampling` returns None with one warning and the
engine samples in float32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "int8", "float32")
ALPHA = 0.5  # SmoothQuant's migration strength
OUTLIERS = 8  # input channels per product kept in float32
ROTATION_BLOCK = 128  # the down projection's Hadamard blocks
CALIBRATION = [  # a fixed text: the quantised weights depend on nothing else
    ("How long does an opened bottle of beer keep in the fridge?",
     "An opened bottle loses its carbonation within a day or two. Cap it tightly and keep it cold; it will be "
     "drinkable for about two days, but the flavour fades quickly as the hop aroma oxidises."),
    ("What is the difference between a qubit and a classical bit?",
     "A classical bit is either 0 or 1. A qubit is a unit vector in a two-dimensional complex space, a "
     "superposition a|0> + b|1> with |a|^2 + |b|^2 = 1; measuring it gives 0 with probability |a|^2."),
    ("How do I stake ADA without giving up custody of my coins?",
     "Delegate your stake key to a pool from your own wallet. The coins never leave your address, rewards are "
     "paid every epoch (five days), and you can redelegate or spend at any time."),
    ("How can I help students who freeze during timed math tests?",
     "Give short low-stakes quizzes often so the format becomes familiar, teach them to skip and return to hard "
     "items, and let them first write down what they know. Anxiety drops as the routine becomes normal."),
]
_warned = False


def resolve_precision(precision: str, device) -> str:
    """``auto``: int8 on a CPU, float32 (the model's own dtype) on a GPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"--sampler-precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "int8" if torch.device(device).type == "cpu" else "float32"
    return precision


def int8_available() -> bool:
    """Whether ``torch._int_mm`` runs here, with this torch on the CPU at hand (checked once on a small product)."""
    global _INT8_OK
    if _INT8_OK is None:
        try:
            a = torch.ones(2, 32, dtype=torch.int8)
            _INT8_OK = bool((torch._int_mm(a, a.t().contiguous()) == 32).all())
        except (RuntimeError, AttributeError, NotImplementedError):
            _INT8_OK = False
    return _INT8_OK


_INT8_OK: bool | None = None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (values, scales) with x ~ values * scales (|values| <= 127: each row's largest
    entry maps to 127)."""
    scale = x.abs().amax(-1, keepdim=True).clamp_(min=1e-12).div_(127.0)
    return (x / scale).round_().to(torch.int8), scale


def hadamard(n: int) -> torch.Tensor:
    """The n x n orthonormal Hadamard matrix (Sylvester's construction; n a power of 2)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


class Int8Linear:
    """y = x @ W.T + b with W in int8 per output channel and x in int8 per row (after the smoothing divisor
    and without its float32 outlier channels; or, with ``rotate``, after a block-Hadamard rotation)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_max: torch.Tensor | None,
                 alpha: float = ALPHA, outliers: int = OUTLIERS, rotate: int = 0):
        weight = weight.detach().float()
        out_features, in_features = weight.shape
        self.rotation = None
        if rotate and in_features % rotate == 0:  # x R and W R with R = diag(signs) blockdiag(H): x W^T unchanged
            signs = torch.randint(0, 2, (in_features,), generator=torch.Generator().manual_seed(in_features))
            self.signs, self.block = signs.float() * 2 - 1, rotate
            self.rotation = hadamard(rotate)
            weight = self._rotate(weight)
            act_max, outliers = None, 0  # the rotation spreads the range: no smoothing, no outlier channels
        smooth = torch.ones(in_features)
        if act_max is not None and alpha > 0:
            w_max = weight.abs().amax(0).clamp(min=1e-5)
            smooth = (act_max.clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)
        weight = weight * smooth  # column k times s_k; the input is divided by s_k
        self.inv_smooth = (1.0 / smooth).contiguous()
        self.outliers = None
        if act_max is not None and outliers:
            self.outliers = (act_max / smooth).topk(min(outliers, in_features)).indices.sort().values
            # their columns read the raw input (the divisor folded in) and leave the int8 product (a 0 divisor)
            self.outlier_weight = (weight[:, self.outliers] * self.inv_smooth[self.outliers]).t().contiguous()
            weight[:, self.outliers] = 0
            self.inv_smooth[self.outliers] = 0.0
        q, scale = quantize_rows(weight)
        self.weight = q.t().contiguous()  # [in, out]: _int_mm's right operand
        self.scale = scale.squeeze(1).contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.out_features = out_features

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x R, R = diag(signs) blockdiag(H, ..., H): one product of every row's blocks with H."""
        return ((x * self.signs).reshape(-1, self.block) @ self.rotation).view(x.shape[0], -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        kept = x[:, self.outliers] if self.outliers is not None else None
        x = self._rotate(x) if self.rotation is not None else x * self.inv_smooth
        q, scale = quantize_rows(x)
        y = torch._int_mm(q, self.weight).mul(scale).mul_(self.scale)  # int32 x float32 -> float32
        if kept is not None:
            y.addmm_(kept, self.outlier_weight)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features)


@dataclass
class Int8Block:
    qkv: Int8Linear
    q_size: int
    kv_size: int
    o: Int8Linear
    gate_up: Int8Linear
    intermediate: int
    down: Int8Linear
    act: object  # the MLP's activation (SiLU for SmolLM2)


@dataclass
class Int8Model:
    """The quantised products of a Llama-layout model, in block order, and its head; None where a block (or the
    head) runs in float32."""
    blocks: list[Int8Block | None]
    head: Int8Linear | None
    alpha: float
    outliers: int

    def describe(self) -> dict:
        return {"sampler_precision": "int8", "smoothquant_alpha": self.alpha, "float32_outlier_channels": self.outliers,
                "down_proj_hadamard_block": ROTATION_BLOCK}


@torch.no_grad()
def calibration_maxima(model, tok) -> dict[torch.nn.Module, torch.Tensor]:
    """Per Linear of the model (and its head), the largest |input| per channel over the calibration text."""
    from stackrlhf.prompts import encode_prompt

    maxima: dict[torch.nn.Module, torch.Tensor] = {}

    def hook(module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
        maxima[module] = torch.maximum(maxima[module], x) if module in maxima else x

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        for question, answer in CALIBRATION:
            prompt = encode_prompt(tok, question, 256)
            ids = prompt + tok(answer, add_special_tokens=False)["input_ids"]
            model(input_ids=torch.tensor([ids], device=next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return maxima


def _fused(linears: list[torch.nn.Linear], maxima: dict, alpha: float, outliers: int) -> Int8Linear:
    """One product for linears that read the same input (q/k/v; gate/up): their weights stacked by rows."""
    weight = torch.cat([m.weight for m in linears])
    biases = [m.bias for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, linears)])
    return Int8Linear(weight, bias, maxima.get(linears[0]), alpha, outliers)


@torch.no_grad()
def quantize_llama(model, tok, alpha: float = ALPHA, outliers: int = OUTLIERS, blocks: range | None = None,
                   head: bool = True, maxima: dict | None = None) -> Int8Model:
    """The int8 copy of ``blocks`` (default: all) and of the head. A block whose products already run in int8 (a
    quantised trunk, :func:`quantize_trunk`) keeps that copy, so every reader of the trunk reads the same one.
    ``maxima``: :func:`calibration_maxima` of the float32 model, when the caller keeps them."""
    maxima = calibration_maxima(model, tok) if maxima is None else maxima
    chosen = range(len(model.model.layers)) if blocks is None else blocks
    out: list[Int8Block | None] = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(layer, "int8_block", None) is not None or i not in chosen:
            out.append(getattr(layer, "int8_block", None))
            continue
        out.append(Int8Block(
            qkv=_fused([attn.q_proj, attn.k_proj, attn.v_proj], maxima, alpha, outliers),
            q_size=attn.q_proj.out_features, kv_size=attn.k_proj.out_features,
            o=Int8Linear(attn.o_proj.weight, attn.o_proj.bias, maxima.get(attn.o_proj), alpha, outliers),
            gate_up=_fused([mlp.gate_proj, mlp.up_proj], maxima, alpha, outliers),
            intermediate=mlp.gate_proj.out_features,
            down=Int8Linear(mlp.down_proj.weight, mlp.down_proj.bias, maxima.get(mlp.down_proj), alpha, outliers,
                            rotate=ROTATION_BLOCK),
            act=mlp.act_fn))
    lm_head = model.get_output_embeddings()
    return Int8Model(out, Int8Linear(lm_head.weight, lm_head.bias, maxima.get(lm_head), alpha, outliers) if head
                     else None, alpha, outliers)


def trunk_blocks(model) -> int:
    """How many bottom blocks of ``model`` run in int8 as part of the model (0: none)."""
    return int(getattr(model.config, "int8_trunk_blocks", 0) or 0)


@torch.no_grad()
def quantize_trunk(model, tok, n_blocks: int, alpha: float = ALPHA, outliers: int = OUTLIERS) -> bool:
    """Make the bottom ``n_blocks`` blocks of a Llama-layout float32 CPU model run in int8 for every reader: the
    model's own forward, the decode engine, a hydra reference that shares the trunk. Their Linear layers keep
    their float32 weights (``save_pretrained`` writes those) and get an int8 ``forward``; the copy is a pure
    function of the weights (calibrated on the float32 model), and ``config.int8_trunk_blocks`` records it, so
    :func:`stackrlhf.models.loading.load_causal_lm` rebuilds the same trunk when the model is loaded again.
    Returns False (with one warning, the model left in float32) where no int8 kernel runs."""
    from stackrlhf.models.engine import _layout, _Llama

    if n_blocks <= 0:
        return False
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not isinstance(_layout(model), _Llama):
        _warn_once(f"an int8 trunk needs a Llama-layout float32 model on a CPU ({type(model).__name__} on "
                   f"{weight.device.type}, {weight.dtype}): its trunk stays float32")
        return False
    if not int8_available():
        _warn_once("no int8 matrix kernel on this machine (torch._int_mm): the model's trunk runs in float32, so its "
                   "outputs differ slightly from the int8 trunk it was trained with")
        return False
    layers = model.model.layers
    n_blocks = min(n_blocks, len(layers))
    if trunk_blocks(model) == n_blocks and all(getattr(layers[i], "int8_block", None) for i in range(n_blocks)):
        return True
    copy = quantize_llama(model, tok, alpha, outliers, blocks=range(n_blocks), head=False)
    for i in range(n_blocks):
        _run_in_int8(layers[i], copy.blocks[i])
    model.config.int8_trunk_blocks = n_blocks
    return True


def _run_in_int8(layer, block: Int8Block) -> None:
    """The layer's Linear layers compute through ``block``: q/k/v as one product (q_proj computes it, k_proj and
    v_proj read their parts when called on the same input, the last one read lets it go), gate/up likewise."""
    attn, mlp = layer.self_attn, layer.mlp
    last: dict[str, tuple] = {}

    def fused(name, product, sizes):
        def part(index):
            def forward(x):
                seen = last.get(name)
                if seen is None or seen[0] is not x:
                    seen = last[name] = (x, product(x).split(sizes, dim=-1))
                if index == len(sizes) - 1:
                    del last[name]
                return seen[1][index]
            return forward
        return part

    qkv = fused("qkv", block.qkv, [block.q_size, block.kv_size, block.kv_size])
    attn.q_proj.forward, attn.k_proj.forward, attn.v_proj.forward = qkv(0), qkv(1), qkv(2)
    attn.o_proj.forward = block.o
    gate_up = fused("gate_up", block.gate_up, [block.intermediate, block.intermediate])
    mlp.gate_proj.forward, mlp.up_proj.forward = gate_up(0), gate_up(1)
    mlp.down_proj.forward = block.down
    layer.int8_block = block


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        warnings.warn(message, stacklevel=3)
        _warned = True


def int8_usable(model, precision: str = "auto") -> bool:
    """Whether ``precision`` means int8 products for ``model`` here: it resolves to int8, the model is of the
    Llama layout in float32 on a CPU, and this machine has an int8 kernel (where it has none: False, with one
    warning)."""
    from stackrlhf.models.engine import _layout, _Llama

    device = next(model.parameters()).device
    if resolve_precision(precision, device) != "int8":
        return False
    if device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
        return False
    if not isinstance(_layout(model), _Llama):
        return False
    if not int8_available():
        _warn_once("no int8 matrix kernel on this machine (torch._int_mm): sampling in float32")
        return False
    return True


def quantize_for_sampling(model, tok, precision: str = "auto", alpha: float = ALPHA,
                          outliers: int = OUTLIERS) -> Int8Model | None:
    """The int8 copy the engine samples with, or None to sample in float32: when ``precision`` resolves to
    float32, when the model is not on a CPU in float32 or not of the Llama layout, or when this machine has no
    int8 kernel (then with one warning)."""
    return quantize_llama(model, tok, alpha, outliers) if int8_usable(model, precision) else None
