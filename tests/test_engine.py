"""The decode engine (models/engine.py): its logits are the model's, its greedy answers are transformers', its
sampler draws from transformers' nucleus, its randomness belongs to each row, and the trunk it keeps is the one
PPO would compute."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_lm, tiny_chat_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, TopKLogitsWarper, TopPLogitsWarper

from stackrlhf.models import engine
from stackrlhf.models.generation import generate, pack_sequences
from stackrlhf.models.sampling import SamplingConfig

TEXTS = ["How long should a lager ferment before bottling?", "What does a qubit measure in the end?",
         "Which hops give a beer a citrus aroma and why?", "Is it safe to drink beer that froze?"] * 20
BASE = [7, 8, 9, 10, 11, 12]
# a shared prefix (as a chat template's system prompt gives), different lengths, and two identical prompts
PROMPTS = [BASE + [20, 21, 22, 23], BASE + [30], BASE + [20, 21, 22, 23], [40, 41, 42], BASE + [50, 51]]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tmp_path_factory):
    if request.param == "llama":
        model, tok = tiny_chat_llama(TEXTS)
    else:
        path = save_tiny_lm(TEXTS, tmp_path_factory.mktemp("gpt2"))
        model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    return model, tok


def full_logits(model, prompt_ids, response_ids):
    """The model's own forward over [prompt | response] (left-padded prompts, as PPO packs a rollout)."""
    batch = pack_sequences(prompt_ids, response_ids, 0)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"])
    width = batch["input_ids"].shape[1] - batch["responses"].shape[1]
    return out.logits, width


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_step_s_logits_equal_the_model_s_full_forward(lm, temperature):
    model, tok = lm
    seen = []  # (original rows still decoding, logits) per step, via a logits processor

    def record(input_ids, scores):
        seen.append((input_ids.clone(), scores.clone()))
        return scores

    sampling = SamplingConfig(max_new_tokens=6, temperature=temperature, top_p=0.9)
    out = engine.decode(model, PROMPTS, sampling, eos=None, pad=0, seed=3, logits_processor=[record])
    assert [len(r) for r in out.response_ids] == [6] * len(PROMPTS)
    logits, width = full_logits(model, PROMPTS, out.response_ids)
    for step, (_, scores) in enumerate(seen):
        want = logits[:, width - 1 + step]
        assert scores.shape == want.shape
        assert torch.allclose(scores, want, atol=1e-4, rtol=0), (step, (scores - want).abs().max())


def test_greedy_answers_are_transformers_generate_s(lm):
    model, tok = lm
    from stackrlhf.models.padding import pad

    ids, mask = pad(PROMPTS, 0, side="left")
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                          eos_token_id=tok.eos_token_id)[:, ids.shape[1]:].tolist()
    got = engine.decode(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0), eos=tok.eos_token_id,
                        pad=0).response_ids
    for g, w in zip(got, want):
        assert g == w[:len(g)]
        assert len(g) == 8 or g[-1] == tok.eos_token_id


def test_rows_that_end_leave_the_batch_and_the_others_go_on_exactly(lm):
    """A processor ends each row after its own number of steps (its last prompt token mod 8, plus one): rows end at
    different steps, so finished rows leave the batch; transformers' generate with the same processor gives the
    same answers."""
    model, tok = lm
    from transformers import LogitsProcessorList

    from stackrlhf.models.padding import pad

    eos = tok.eos_token_id

    def end_after_own_steps(input_ids, scores):
        scores = scores.clone()
        scores[input_ids.shape[1] - 3 > input_ids[:, 2] % 8, eos] = 1e4
        return scores

    prompts = [[7, 8, 10 + i] for i in range(12)]
    ids, mask = pad(prompts, 0, side="left")
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                          eos_token_id=eos, logits_processor=LogitsProcessorList([end_after_own_steps])
                          )[:, ids.shape[1]:].tolist()
    out = engine.decode(model, prompts, SamplingConfig(max_new_tokens=10, temperature=0), eos=eos, pad=0,
                        logits_processor=[end_after_own_steps])
    lengths = set()
    for g, w, done in zip(out.response_ids, want, out.finished):
        assert g == w[:len(g)]
        assert done == (g[-1] == eos)
        lengths.add(len(g))
    assert len(lengths) > 2  # rows ended at several different steps


def transformers_nucleus(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities transformers samples from after its top-k and top-p warpers."""
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)


# nucleus sizes (of 3000): about 10-30 (within the top 64), about 400 (the top 1024), about 1550 (sorted in full)
@pytest.mark.parametrize("spread", [3.0, 2.0, 1.0])
@pytest.mark.parametrize("top_k", [0, 500])
def test_the_sampler_draws_from_transformers_nucleus(spread, top_k):
    """With uniforms on a fine grid the draws are the distribution's quantiles: every token's share of the grid
    must be its probability after transformers' top-k and top-p warpers, and no other token may appear."""
    torch.manual_seed(0)
    logits = torch.randn(3, 3000) * spread
    want = transformers_nucleus(logits / 0.8, top_k, 0.9)
    grid = 6000
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, top_k=top_k)
    for row in range(3):
        drawn = engine.sample_tokens(logits[row].expand(grid, -1), sampling, u)
        share = torch.bincount(drawn, minlength=3000).double() / grid
        assert set(drawn.unique().tolist()) <= set(want[row].nonzero().squeeze(1).tolist())
        assert (share - want[row].double()).abs().max() < 2.0 / grid + 1e-6


def test_no_top_p_samples_the_softmax():
    torch.manual_seed(1)
    logits = torch.randn(1, 300) * 2
    grid = 30000
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    drawn = engine.sample_tokens(logits.expand(grid, -1), SamplingConfig(temperature=0.7, top_p=1.0), u)
    share = torch.bincount(drawn, minlength=300).double() / grid
    assert (share - torch.softmax(logits[0].double() / 0.7, -1)).abs().max() < 2.0 / grid + 1e-6


def test_uniforms_are_uniform_and_each_row_s_own():
    u = engine.uniforms(12345, torch.arange(20000), 7)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(engine.uniforms(12345, torch.tensor([5, 3]), 7), u[[5, 3]])
    assert not torch.equal(engine.uniforms(12346, torch.arange(100), 7), u[:100])
    assert not torch.equal(engine.uniforms(12345, torch.arange(100), 8), u[:100])


def test_a_seeded_answer_does_not_depend_on_batch_size_or_order(lm):
    model, tok = lm
    prompts = ["How long should a lager ferment?", "Why do hops smell of citrus?", "Is frozen beer safe?",
               "What is a qubit?", "How long should a lager ferment?"]
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.95)
    one = generate(model, tok, prompts, sampling, batch_size=1, seed=11)
    five = generate(model, tok, prompts, sampling, batch_size=5, seed=11)
    two = generate(model, tok, prompts, sampling, batch_size=2, seed=11)
    assert one.response_ids == five.response_ids == two.response_ids
    assert one.response_ids[0] != one.response_ids[4] or one.response_ids[0] == []  # same prompt, own randomness
    other = generate(model, tok, prompts, sampling, batch_size=5, seed=12)
    assert other.response_ids != five.response_ids


def test_the_captured_trunk_is_the_block_input_of_a_full_forward(lm):
    model, tok = lm
    layer = 1
    out = engine.decode(model, PROMPTS, SamplingConfig(max_new_tokens=5, temperature=1.0), eos=None, pad=0,
                        seed=0, capture_layer=layer)
    for prompt, answer, hidden in zip(PROMPTS, out.response_ids, out.hidden):
        seq = torch.tensor([prompt + answer])
        with torch.no_grad():
            states = model(input_ids=seq, output_hidden_states=True).hidden_states[layer][0]
        assert hidden.shape == (len(prompt) + len(answer) - 1, states.shape[-1])
        assert torch.allclose(hidden, states[:-1], atol=1e-5)


def test_models_the_engine_does_not_run_use_transformers_generate(lm):
    model, tok = lm

    class Wrapped(torch.nn.Module):  # not a PreTrainedModel: e.g. a PEFT or distributed wrapper
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def generate(self, **kwargs):
            return self.inner.generate(**kwargs)

    assert engine.supports(model)
    wrapped = Wrapped(model)
    assert not engine.supports(wrapped)
    greedy = SamplingConfig(max_new_tokens=5, temperature=0)
    prompts = ["How long should a lager ferment?", "What is a qubit?"]
    assert generate(wrapped, tok, prompts, greedy).response_ids == generate(model, tok, prompts, greedy).response_ids


def test_ppo_from_the_sampled_trunk_equals_the_full_forward_path(lm):
    """PPO's old log-probs, values and reference logits from the trunk the sampler kept, and the loss gradients
    of an update on it, equal those of a full forward (today's path) within 1e-5 (gradients: relative to each
    tensor's largest entry)."""
    from stackrlhf.models.freezing import transformer_blocks
    from stackrlhf.models.policy import PolicyWithValue, trunk_from_rollout
    from stackrlhf.rl.ppo import PPOTrainer

    import copy

    model, tok = copy.deepcopy(lm[0]), lm[1]  # the policy freezes blocks and hooks the model: a copy of its own
    policy = PolicyWithValue(model, num_layers_unfrozen=1)
    torch.nn.init.normal_(policy.value_head.weight, std=0.5)  # a non-zero critic, so values are compared
    layer = PPOTrainer.trunk_layer(policy)
    assert layer == len(transformer_blocks(model)) - 1
    prompts = ["How long should a lager ferment?", "Why do hops smell of citrus?", "What is a qubit?"]
    rollout = generate(model, tok, prompts, SamplingConfig(max_new_tokens=7, temperature=1.0, top_p=1.0), seed=2,
                       capture_layer=layer)
    batch = pack_sequences(rollout.prompt_ids, rollout.response_ids, tok.pad_token_id)
    keep, R = batch["keep"], batch["responses"].shape[1]
    mask = batch["response_mask"].bool()

    with torch.no_grad():
        full = policy(batch["input_ids"], batch["attention_mask"], batch["position_ids"], with_reference=True,
                      keep=keep)
        full_trunk = policy.frozen_trunk()
        sampled_trunk = trunk_from_rollout(model, batch, rollout.trunk)
        ours = policy.forward_from_trunk(sampled_trunk, keep, with_reference=True)
    for a, b in zip(full, ours):  # logits, values, reference logits at the positions that predict the answer
        assert torch.allclose(a[:, :R][mask], b[:, :R][mask], atol=1e-5), (a[:, :R][mask] - b[:, :R][mask]).abs().max()

    def grads(trunk):
        policy.zero_grad()
        logits, values, _ = policy(None, None, None, keep=keep, trunk=trunk)
        logp = torch.log_softmax(logits[:, :R], -1).gather(2, batch["responses"].unsqueeze(2)).squeeze(2)
        n = mask.sum()
        ((logp * mask).sum() / n + 0.1 * (values[:, :R] * mask).pow(2).sum() / n).backward()  # a PPO-like loss
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    want, got = grads(full_trunk), grads(sampled_trunk)
    assert want.keys() == got.keys() and len(want) > 2
    for name in want:
        assert (want[name] - got[name]).abs().max() <= 1e-5 * want[name].abs().max() + 1e-7, name


def test_the_head_s_hooks_see_every_row_as_the_logits_do(lm, monkeypatch):
    """ILQL's processor reads the hidden state the LM head last saw (a forward pre-hook): with several prefill
    groups and duplicated prompts it must still be the hidden state of exactly the rows being sampled."""
    model, tok = lm
    monkeypatch.setattr(engine, "PREFILL_TOKENS", 8)  # several prefill groups
    head = model.get_output_embeddings()
    seen = {}
    handle = head.register_forward_pre_hook(lambda module, args: seen.__setitem__("h", args[0]))
    checked = []

    def check(input_ids, scores):
        want = torch.nn.functional.linear(seen["h"][:, -1], head.weight, head.bias)
        assert torch.allclose(want, scores, atol=1e-4)
        checked.append(len(scores))
        return scores

    try:
        engine.decode(model, PROMPTS + PROMPTS[:2], SamplingConfig(max_new_tokens=3, temperature=1.0), eos=None,
                      pad=0, seed=0, logits_processor=[check])
    finally:
        handle.remove()
    assert checked == [len(PROMPTS) + 2] * 3
