"""Which parameters train: the top ``num_layers_unfrozen`` transformer blocks and the head, or LoRA adapters.

The block list is found by shape, not by architecture name: the ``nn.ModuleList`` whose length is the
config's number of layers (GPT-2 ``transformer.h``, Llama/Qwen ``model.layers``, GPT-NeoX ``gpt_neox.layers``).
"""

from __future__ import annotations

import torch
from torch import nn

from stackrlhf.errors import StackRLHFError


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not candidates:
        raise StackRLHFError(f"cannot find the {n} transformer blocks of {type(model).__name__}")
    return candidates[0]


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last block (``ln_f``, ``norm``, ``final_layer_norm``), if any."""
    base = getattr(model, "base_model", model)
    base = getattr(base, base.base_model_prefix, base) if hasattr(base, "base_model_prefix") else base
    for name in ("ln_f", "norm", "final_layer_norm", "final_layernorm"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def head_is_tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def freeze_bottom(model: nn.Module, num_layers_unfrozen: int) -> None:
    """Train only the top ``num_layers_unfrozen`` blocks, the final norm and the LM head (-1: everything).

    A head tied to the input embeddings stays frozen: training it would change the frozen trunk's input.
    """
    if num_layers_unfrozen < 0:
        for p in model.parameters():
            p.requires_grad_(True)
        return
    blocks = transformer_blocks(model)
    if num_layers_unfrozen > len(blocks):
        raise StackRLHFError(f"num_layers_unfrozen={num_layers_unfrozen} but the model has {len(blocks)} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[len(blocks) - num_layers_unfrozen:]:
        for p in block.parameters():
            p.requires_grad_(True)
    if num_layers_unfrozen > 0:
        norm = final_norm(model)
        if norm is not None:
            for p in norm.parameters():
                p.requires_grad_(True)
    if not head_is_tied(model) and model.get_output_embeddings() is not None:
        for p in model.get_output_embeddings().parameters():
            p.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"


def apply_lora(model: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.05,
               target_modules: list[str] | None = None, task_type: str = "CAUSAL_LM",
               modules_to_save: list[str] | None = None) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on its attention / MLP projections; only adapters (and
    ``modules_to_save``, e.g. a reward head) train."""
    from peft import LoraConfig, get_peft_model

    if not target_modules:
        names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear,)) or
                 type(m).__name__ == "Conv1D"}
        preferred = ["c_attn", "c_proj", "c_fc", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
        target_modules = [n for n in preferred if n in names] or sorted(names - {"lm_head", "classifier", "score"})
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())  # GPT-2 stores its weights transposed
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type=task_type, bias="none", modules_to_save=modules_to_save, fan_in_fan_out=conv1d)
    return get_peft_model(model, config)


@torch.no_grad()
def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, to see which ones a step changed (used by tests and sanity checks)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}
