"""Load any Hugging Face causal LM with its tokenizer, ready for training and batched generation."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from stackrlhf.errors import StackRLHFError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | None) -> torch.dtype:
    """``auto``: bfloat16 on a CUDA device that supports it, else float32."""
    if name in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise StackRLHFError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_source(path_or_id: str) -> None:
    """Fail at once on a path that is not a model directory, instead of after the hub's retries. A name is a local
    path when it starts with . / ~, exists, has more than one slash, or its first part is a local folder
    (``outputs/sft`` beside an ``outputs/`` folder)."""
    path = Path(path_or_id).expanduser()
    first = path_or_id.split("/", 1)[0]
    looks_local = (path_or_id.startswith((".", "/", "~")) or path.exists() or path_or_id.count("/") > 1
                   or ("/" in path_or_id and Path(first).is_dir()))
    if looks_local and not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "is not a model directory (no config.json)"
        raise StackRLHFError(f"{path_or_id}: {what}; give a directory written by save_pretrained (or `stackrlhf "
                             f"models fetch`) or a hub id like gpt2")


def load_tokenizer(path_or_id: str, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (EOS when it has none) and left padding for generation."""
    _check_source(path_or_id)
    try:
        tok = AutoTokenizer.from_pretrained(path_or_id)
    except OSError as exc:
        raise StackRLHFError(f"{path_or_id}: cannot load its tokenizer ({exc})".replace("\n", " ")) from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise StackRLHFError(f"{path_or_id}: the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(path_or_id: str, dtype: str | None = "auto", device: str | torch.device | None = None,
                   int8_trunk: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local ``save_pretrained`` directory or a hub id. A model trained with
    an int8 trunk (``int8_trunk_blocks`` in its config.json, :func:`stackrlhf.models.quant.quantize_trunk`) runs
    it again; ``int8_trunk=False`` (a stage that trains the lower blocks) loads it all in float32 and drops the
    record, so what it saves is a float32 model."""
    tok = load_tokenizer(path_or_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as exc:
        hint = " (the hub is unreachable offline: use a local directory, e.g. from `stackrlhf pretrain`)" \
            if os.environ.get("HF_HUB_OFFLINE") else ""
        raise StackRLHFError(f"{path_or_id}: cannot load the model ({exc}){hint}".replace("\n", " ")) from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    from stackrlhf.models.quant import quantize_trunk, trunk_blocks

    if trunk_blocks(model) and not int8_trunk:
        model.config.int8_trunk_blocks = 0
    elif trunk_blocks(model):  # trained with an int8 trunk (config.json says how many blocks): run it the same way
        quantize_trunk(model, tok, trunk_blocks(model))
    return model, tok
