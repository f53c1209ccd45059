"""int8 in RL: a quantised frozen trunk that every reader of the policy shares and that the saved model carries
(eval and ask load it the same way), and the int8 rollout sampler whose draws truncated importance sampling
weights back to the policy: weights exactly 1 with the float32 sampler, capped at --is-cap, mismatch logged."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_chat_llama

from stackrlhf.models import engine, quant
from stackrlhf.models.generation import generate, pack_sequences
from stackrlhf.models.loading import load_causal_lm
from stackrlhf.models.sampling import SamplingConfig
from stackrlhf.rl.config import PPOConfig
from stackrlhf.rl.ppo import PPOTrainer

TEXTS = ["How long should a lager ferment before bottling?", "What does a qubit measure in the end?",
         "Which hops give a beer a citrus aroma and why?", "Is it safe to drink beer that froze?"] * 20
QUESTIONS = ["How cold should a lager ferment?", "Why do hops go bitter?", "What is a qubit?",
             "Can beer freeze in a car?", "How long does an open bottle keep?", "Which glass suits a stout?",
             "Is a measured qubit still quantum?", "Why is my beer flat?"]

pytestmark = pytest.mark.skipif(not quant.int8_available(), reason="no int8 matrix kernel (torch._int_mm) here")


def four_layer_llama(tmp_path):
    """The tiny chat Llama with 4 blocks and logits large enough that quantisation error shows, saved."""
    model, tok = tiny_chat_llama(TEXTS, seed=3)
    from transformers import LlamaForCausalLM

    config = model.config
    config.num_hidden_layers = 4
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def full_logits(model, prompts, responses):
    batch = pack_sequences(prompts, responses, 0)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], logits_to_keep=batch["keep"]).logits


def test_an_int8_trunk_is_what_every_reader_runs_and_the_saved_model_carries(tmp_path):
    base = four_layer_llama(tmp_path)
    model, tok = load_causal_lm(str(base))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [[7 + i, 8, 9 + 2 * i, 10] for i in range(6)]
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=1.0)
    drawn = engine.decode(model, prompts, sampling, eos=None, pad=0, seed=2).response_ids
    before = full_logits(model, prompts, drawn)

    assert quant.quantize_trunk(model, tok, 3) and quant.trunk_blocks(model) == 3
    after = full_logits(model, prompts, drawn)
    assert not torch.allclose(after, before, atol=1e-4)  # the trunk really runs in int8
    assert (after - before).abs().max() < 0.1 * before.abs().max()  # and stays close to float32
    # the decode engine reads the same trunk: its log-probs of its own draws are the model forward's
    out = engine.decode(model, prompts, sampling, eos=None, pad=0, seed=2)
    logits = full_logits(model, prompts, out.response_ids)[:, :10]
    forward = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.response_ids).unsqueeze(-1)).squeeze(-1)
    assert torch.tensor(out.logprobs) == pytest.approx(forward, abs=1e-4)
    # saved: the float32 weights and the trunk's size; loading rebuilds the same trunk
    model.save_pretrained(tmp_path / "trained")
    tok.save_pretrained(tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "config.json").read_text())["int8_trunk_blocks"] == 3
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    again, _ = load_causal_lm(str(tmp_path / "trained"))
    assert quant.trunk_blocks(again) == 3 and getattr(again.model.layers[2], "int8_block", None) is not None
    assert getattr(again.model.layers[3], "int8_block", None) is None
    assert torch.equal(full_logits(again, prompts, drawn), after)
    # a stage that trains the lower blocks (sft, dpo, ilql) loads it all in float32, and saves no int8 record
    plain, _ = load_causal_lm(str(tmp_path / "trained"), int8_trunk=False)
    assert quant.trunk_blocks(plain) == 0 and getattr(plain.model.layers[0], "int8_block", None) is None
    assert torch.equal(full_logits(plain, prompts, drawn), before)


def ppo_config(base, out, **kw) -> PPOConfig:
    settings = dict(model=str(base), out=str(out), prompts_per_step=4, mini_batch_size=4, ppo_epochs=1,
                    min_new_tokens=6, max_new_tokens=6, num_layers_unfrozen=1, learning_rate=1e-3,
                    temperature=1.0, report_to="none", progress=False, sample_every=0, save_every=0, seed=0)
    return PPOConfig(**{**settings, **kw})


def length_reward(questions, answers):
    return [len(a) / 20 for a in answers]


def test_ppo_with_an_int8_trunk_and_sampler_logs_the_mismatch_and_saves_the_trunk(tmp_path):
    base = four_layer_llama(tmp_path)
    trainer = PPOTrainer(ppo_config(base, tmp_path / "int8", trunk_precision="int8", sampler_precision="int8",
                                    steps=2), length_reward, QUESTIONS)
    assert trainer.int8_trunk_blocks == 3 and trainer.sampler_copy(trainer.policy) is not None
    metrics = trainer.train()
    history = trainer.history
    assert all(0 <= h["sampler/capped"] <= 1 and h["sampler/k3"] >= 0 for h in history)
    assert all(abs(h["sampler/k1"]) < 0.1 for h in history)  # the sampler is close to the policy
    assert metrics["int8_trunk_blocks"] == 3 and metrics["sampler_precision"] == "int8"
    saved = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert saved["int8_trunk_blocks"] == 3
    # eval and ask load a model through load_causal_lm: the trunk comes back in int8
    from stackrlhf.models.answerer import Answerer, parse_model_spec

    answerer = Answerer(parse_model_spec(f"v1={tmp_path / 'int8'}"), "cpu")
    assert quant.trunk_blocks(answerer.lm) == 3 and answerer.lm.model.layers[0].int8_block is not None
    # a run that would train a block of the int8 trunk is refused with what to do
    from stackrlhf.errors import StackRLHFError

    with pytest.raises(StackRLHFError, match="train at most its top 1 blocks"):
        PPOTrainer(ppo_config(tmp_path / "int8", tmp_path / "more", num_layers_unfrozen=2), length_reward, QUESTIONS)


def test_the_float32_sampler_gives_weights_of_exactly_one_and_today_s_losses(tmp_path):
    """With the float32 sampler the trainer passes no weights (the loss is today's), and weights of exactly 1
    change no loss and no gradient bit."""
    base = four_layer_llama(tmp_path)
    trainer = PPOTrainer(ppo_config(base, tmp_path / "f32", trunk_precision="float32",
                                    sampler_precision="float32"), length_reward, QUESTIONS)
    assert trainer.sampler_copy(trainer.policy) is None and trainer.int8_trunk_blocks == 0
    metrics = trainer.step()
    assert not any(k.startswith("sampler/") for k in metrics)

    def one_update(weights):
        torch.manual_seed(0)
        t = PPOTrainer(ppo_config(base, tmp_path / "u", trunk_precision="float32", sampler_precision="float32",
                                  algorithm="rloo"),
                       length_reward, QUESTIONS)
        batch = pack_sequences([[7, 8, 9], [7, 8], [10, 11, 12], [13]], [[20, 21, 22]] * 4, 0)
        mask = batch["response_mask"]
        old = torch.full(mask.shape, -2.0)
        advantages = torch.tensor([[1.0, -0.5, 0.2]] * 2 + [[-1.0, 0.3, 0.1]] * 2)
        stats = t.update(batch, old, torch.zeros(mask.shape), advantages, advantages, mask, None, weights)
        return stats, [p.detach().clone() for p in t.policy.trainable_parameters()]

    plain, plain_params = one_update(None)
    ones, ones_params = one_update(torch.ones(4, 3))
    assert plain["loss/policy"] == ones["loss/policy"]
    assert all(torch.equal(a, b) for a, b in zip(plain_params, ones_params))
    halved, _ = one_update(torch.full((4, 3), 0.5))
    assert halved["loss/policy"] == pytest.approx(plain["loss/policy"] * 0.5, rel=1e-5)


def test_an_update_without_signal_leaves_the_policy_where_it_is(tmp_path):
    """Zero advantages: no gradient, and no weight decay pulling the trained blocks toward zero either."""
    base = four_layer_llama(tmp_path)
    t = PPOTrainer(ppo_config(base, tmp_path / "z", algorithm="rloo", trunk_precision="float32",
                              sampler_precision="float32"), length_reward, QUESTIONS)
    before = [p.detach().clone() for p in t.policy.trainable_parameters()]
    batch = pack_sequences([[7, 8, 9], [7, 8], [10, 11, 12], [13]], [[20, 21, 22]] * 4, 0)
    mask = batch["response_mask"]
    zeros = torch.zeros(mask.shape)
    t.update(batch, torch.full(mask.shape, -2.0), zeros, zeros, zeros, mask)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, t.policy.trainable_parameters()))


def test_the_importance_weights_are_capped_and_the_mismatch_counted(tmp_path):
    base = four_layer_llama(tmp_path)
    trainer = PPOTrainer(ppo_config(base, tmp_path / "w", is_cap=2.0), length_reward, QUESTIONS)
    batch = pack_sequences([[7, 8], [9, 10]], [[20, 21, 22], [23, 24]], 0)
    mask = batch["response_mask"]
    policy = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.0]]).clamp(min=1e-9))
    sampler = [[torch.log(torch.tensor(p)).item() for p in row] for row in ([0.1, 0.5, 0.4], [0.5, 1.0])]
    rollout = SimpleNamespace(sampler_logprobs=sampler)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0)
    weights, mismatch = trainer.importance_weights(None, policy, batch, rollout, sampling, mask)
    assert weights[0].tolist() == pytest.approx([2.0, 1.0, 1.25])  # 0.5 / 0.1 = 5, capped at 2
    assert weights[1, :2].tolist() == pytest.approx([1.0, 0.5])
    assert mismatch["sampler/capped"] == pytest.approx(1 / 5)
    log_ratio = torch.log(torch.tensor([5.0, 1.0, 1.25, 1.0, 0.5]))
    assert mismatch["sampler/k1"] == pytest.approx(float(-log_ratio.mean()), rel=1e-5)
    assert mismatch["sampler/k3"] == pytest.approx(float((log_ratio.exp() - 1 - log_ratio).mean()), rel=1e-5)


def test_auto_precision_leaves_a_model_without_an_int8_path_in_float32(tmp_path):
    """The tests' GPT-2 models (not of the Llama layout) train as before under the defaults: no trunk change, no
    sampler copy, no warning."""
    import warnings

    from helpers import save_tiny_lm

    tiny = save_tiny_lm(TEXTS, tmp_path / "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = PPOTrainer(ppo_config(tiny, tmp_path / "g"), length_reward, QUESTIONS)
    assert trainer.int8_trunk_blocks == 0 and trainer.sampler_copy(trainer.policy) is None
    assert generate(trainer.policy.lm, trainer.tok, QUESTIONS[:2], SamplingConfig(max_new_tokens=3), seed=1).texts


def test_select_rows_keeps_what_is_not_per_row():
    """A captured block input's per-row tensors are indexed; a 1-d cache_position as long as the batch is not."""
    from stackrlhf.models.policy import select_rows

    hidden, positions, cache = torch.randn(4, 4, 8), torch.arange(16).view(4, 4), torch.arange(4)
    idx = torch.tensor([2, 0])
    (h,), kwargs = select_rows(((hidden,), {"position_ids": positions, "cache_position": cache, "scale": 0.5}), idx, 4)
    assert torch.equal(h, hidden[idx]) and torch.equal(kwargs["position_ids"], positions[idx])
    assert torch.equal(kwargs["cache_position"], cache) and kwargs["scale"] == 0.5
    # a rotary table shared by the batch, (T, d) with T equal to the batch size, is not a per-row tensor
    table, mask = torch.randn(4, 8), torch.randn(4, 1, 4, 6)
    _, kwargs = select_rows(((hidden,), {"position_embeddings": (table, table), "attention_mask": mask}), idx, 4)
    assert kwargs["position_embeddings"][0] is table and torch.equal(kwargs["attention_mask"], mask[idx])
