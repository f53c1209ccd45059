"""PPO's update runs only the trained top blocks on the frozen trunk's output, computed once per rollout: the
losses and gradients must equal a full forward's (GPT-2 and Llama, whose blocks take rotary cos/sin and a 4-D
mask as arguments)."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_chat_llama
from stackrlhf.models.generation import pack_sequences
from stackrlhf.models.policy import PolicyWithValue, select_rows

TEXTS = ["How do I brew a stout at home? Use roasted barley and a clean kettle."] * 30


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=128, n_embd=32, n_layer=4, n_head=4)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_the_trunk_cache_gives_the_full_forwards_losses_and_gradients(arch, k):
    lm = tiny_gpt2() if arch == "gpt2" else tiny_chat_llama(TEXTS)[0]
    policy = PolicyWithValue(lm, num_layers_unfrozen=k)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 250, (n,), generator=g).tolist() for n in (7, 12, 4, 9)]  # ragged: left padding
    responses = [torch.randint(5, 250, (n,), generator=g).tolist() for n in (5, 3, 6, 1)]
    batch = pack_sequences(prompts, responses, pad=0)
    with torch.no_grad():
        logits, values, _ = policy(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                   with_reference=True, keep=batch["keep"])
    trunk = policy.frozen_trunk()
    idx = torch.tensor([2, 0])  # a minibatch, out of order

    def loss_and_grads(use_trunk: bool):
        policy.zero_grad()
        if use_trunk:
            out_logits, out_values, _ = policy(None, None, None, keep=batch["keep"], trunk=select_rows(trunk, idx, 4))
        else:
            out_logits, out_values, _ = policy(batch["input_ids"][idx], batch["attention_mask"][idx],
                                               batch["position_ids"][idx], keep=batch["keep"])
        m = batch["response_mask"][idx]
        R = batch["responses"].shape[1]
        logp = torch.log_softmax(out_logits[:, :R], -1).gather(-1, batch["responses"][idx].unsqueeze(-1)).squeeze(-1)
        loss = -(logp * m).sum() / m.sum() + ((out_values[:, :R] - 1.0) ** 2 * m).sum() / m.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad and p.grad is not None}
        return out_logits.detach(), out_values.detach(), loss.detach(), grads

    full = loss_and_grads(False)
    cached = loss_and_grads(True)
    assert torch.allclose(full[0], logits[idx], atol=1e-5)  # the minibatch's full forward = the rollout's rows
    assert torch.allclose(cached[0], full[0], atol=1e-5) and torch.allclose(cached[1], full[1], atol=1e-5)
    assert abs(float(cached[2] - full[2])) < 1e-5
    assert full[3].keys() == cached[3].keys() and len(full[3]) >= 2  # the value head, and the top blocks when k > 0
    for name, grad in full[3].items():
        assert torch.allclose(cached[3][name], grad, atol=1e-5), name
    assert any(n.startswith("value_head") for n in full[3])
    assert any(".layers." in n or ".h." in n for n in full[3]) == (k > 0)
