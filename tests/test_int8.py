"""int8 sampling (models/quant.py): close to the float32 model, each row's answer its own whatever its batch mates,
the sampler's log-probs those of the distribution it drew from, a float32 fallback with one warning where no
int8 kernel runs, and KL weighted back to the float32 model in the evaluation."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import tiny_chat_llama

from stackrlhf.models import engine, quant
from stackrlhf.models.answerer import Answerer
from stackrlhf.models.generation import generate, pack_sequences
from stackrlhf.models.sampling import SamplingConfig

TEXTS = ["How long should a lager ferment before bottling?", "What does a qubit measure in the end?",
         "Which hops give a beer a citrus aroma and why?", "Is it safe to drink beer that froze?"] * 20
PROMPTS = [[7, 8, 9, 10, 20, 21, 22], [7, 8, 9, 10, 30], [40, 41, 42, 43, 44, 45, 46, 47], [7, 8, 9, 10, 50, 51]]

pytestmark = pytest.mark.skipif(not quant.int8_available(), reason="no int8 matrix kernel (torch._int_mm) here")


@pytest.fixture(scope="module")
def lm():
    model, tok = tiny_chat_llama(TEXTS, seed=1)
    with torch.no_grad():  # logits large enough that quantisation error would show in the samples
        model.lm_head.weight.mul_(20)
    return model, tok


def forward_logits(model, prompts, responses):
    batch = pack_sequences(prompts, responses, 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=batch["keep"]).logits
    return logits[:, :batch["responses"].shape[1]], batch


def test_an_int8_row_s_answer_does_not_depend_on_its_batch_mates(lm):
    model, tok = lm
    int8 = quant.quantize_for_sampling(model, tok, "int8")
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95)
    together = engine.decode(model, PROMPTS, sampling, eos=None, pad=0, seed=5, int8=int8)
    reordered = engine.decode(model, PROMPTS[::-1] + [[60, 61]], sampling, eos=None, pad=0, seed=5,
                              row_ids=[3, 2, 1, 0, 9], int8=int8)
    for i, prompt in enumerate(PROMPTS):
        alone = engine.decode(model, [prompt], sampling, eos=None, pad=0, seed=5, row_ids=[i], int8=int8)
        assert alone.response_ids[0] == together.response_ids[i] == reordered.response_ids[3 - i]
        assert alone.logprobs[0] == pytest.approx(together.logprobs[i], abs=1e-4)


def test_int8_samples_are_close_to_the_float32_model_s(lm):
    """The sampler's log-probs of its own tokens against the float32 model's under the same rule: the mean
    log-ratio per token (k1, an estimate of KL(int8 || float32)) is small, and every weight is near 1."""
    model, tok = lm
    int8 = quant.quantize_for_sampling(model, tok, "int8")
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=1.0)
    prompts = [[7 + i, 8, 9 + 2 * i, 10] for i in range(16)]
    out = engine.decode(model, prompts, sampling, eos=None, pad=0, seed=2, int8=int8)
    logits, batch = forward_logits(model, prompts, out.response_ids)
    float_logp = torch.log_softmax(logits.float(), -1).gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1)
    log_ratio = torch.tensor(out.logprobs) - float_logp
    assert float(log_ratio.std()) > 0  # the int8 products really ran (they are not the float32 ones)
    assert abs(float(log_ratio.mean())) < 0.01 and float(log_ratio.abs().max()) < 0.2
    unsmoothed = quant.quantize_llama(model, tok, alpha=0.0, outliers=0)  # what the smoothing and outliers save
    rough = engine.decode(model, prompts, sampling, eos=None, pad=0, seed=2, int8=unsmoothed)
    assert rough.response_ids != out.response_ids or rough.logprobs != out.logprobs


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.8), (20, 0.9)])
def test_the_sampler_s_log_probs_are_those_of_the_distribution_it_drew_from(lm, top_k, top_p):
    """float32 sampling: each token's log-prob the engine returns equals :func:`engine.sampling_logprobs` on the
    model's own logits (temperature, top-k, top-p, renormalised), and no token lies outside the kept set."""
    model, tok = lm
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=top_k, top_p=top_p)
    out = engine.decode(model, PROMPTS, sampling, eos=None, pad=0, seed=4)
    logits, batch = forward_logits(model, PROMPTS, out.response_ids)
    want = engine.sampling_logprobs(logits.reshape(-1, logits.shape[-1]), batch["responses"].reshape(-1),
                                    sampling).view(len(PROMPTS), -1)
    assert torch.isfinite(want).all()
    assert torch.allclose(torch.tensor(out.logprobs), want, atol=1e-4)
    if top_p < 1:  # a token outside the nucleus has no probability under the rule
        worst = logits[:, 0].argmin(-1)
        assert torch.isinf(engine.sampling_logprobs(logits[:, 0], worst, sampling)).all()


def test_without_an_int8_kernel_it_samples_in_float32_with_one_warning(lm, monkeypatch):
    model, tok = lm
    monkeypatch.setattr(quant, "_INT8_OK", False)
    monkeypatch.setattr(quant, "_warned", False)
    with pytest.warns(UserWarning, match="no int8 matrix kernel"):
        assert quant.quantize_for_sampling(model, tok, "auto") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quant.quantize_for_sampling(model, tok, "int8") is None  # said once
        answerer = Answerer.from_model(model, tok)
        assert answerer.resolve(SamplingConfig(sampler_precision="auto")).sampler_precision == "float32"


def test_precision_is_chosen_by_name_and_recorded(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="sampler-precision"):
        SamplingConfig(sampler_precision="int4")
    answerer = Answerer.from_model(model, tok)
    assert answerer.resolve(SamplingConfig(sampler_precision="auto")).sampler_precision == "int8"  # a CPU
    assert answerer.resolve(SamplingConfig(sampler_precision="float32")).sampler_precision == "float32"
    prompts = ["How long should a lager ferment?", "Is frozen beer safe?"]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1.0)
    exact = answerer.generate(prompts, replace(sampling, sampler_precision="float32"), seed=0)
    fast = answerer.generate(prompts, replace(sampling, sampler_precision="int8"), seed=0)
    direct = generate(model, tok, prompts, sampling, seed=0)
    assert exact.response_ids == direct.response_ids and exact.sampler_logprobs == direct.sampler_logprobs
    assert fast.sampler_logprobs != exact.sampler_logprobs  # another sampler ran


def test_kl_of_int8_answers_is_weighted_back_to_the_float32_model():
    """Self-normalised importance weights: equal weights give the plain mean (effective sample size 1); a
    weight of 0 (an answer the float32 model could not draw) drops that answer."""
    from stackrlhf.evaluate.metrics import importance_weighted

    flat = importance_weighted([1.0, 3.0], [0.2, 0.2], [0.01, 0.03])
    assert flat["kl_weighted"] == pytest.approx(2.0) and flat["ess"] == pytest.approx(1.0)
    assert flat["k1_per_token"] == pytest.approx(0.02)
    tilted = importance_weighted([1.0, 3.0], [0.0, float(np.log(3.0))], [0.0, 0.0])
    assert tilted["kl_weighted"] == pytest.approx(2.5) and tilted["ess"] == pytest.approx(0.8)
    dropped = importance_weighted([1.0, 3.0], [float("-inf"), 0.0], [0.0, 0.0])
    assert dropped["kl_weighted"] == pytest.approx(3.0)
