"""Every training stage on the Llama architecture with a chat template (the shape of SmolLM2-135M-Instruct, the
default base): SFT, PPO and RLOO (hydra reference, trunk cache), ILQL (heads on the hidden size) and DPO, each
asked through the template; their outputs keep the template and answer through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import tiny_chat_llama
from stackrlhf.models.loading import load_causal_lm
from stackrlhf.prompts import encode_prompt


@pytest.fixture(scope="module")
def chat_llama(site_data, tmp_path_factory) -> Path:
    from stackrlhf.data.load import load_split

    texts = list(load_split(site_data, "finetune", "train")["completion"])[:300]
    model, tok = tiny_chat_llama(texts, vocab_size=400)
    out = tmp_path_factory.mktemp("chat-llama") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def changed(before: Path, after: Path) -> float:
    """Share of the parameter tensors that differ between two saved models."""
    a, _ = load_causal_lm(str(before))
    b, _ = load_causal_lm(str(after))
    pairs = list(zip(a.state_dict().values(), b.state_dict().values()))
    return sum(not torch.equal(x, y) for x, y in pairs) / len(pairs)


def test_sft_then_ppo_rloo_ilql_and_dpo_train_a_chat_llama(chat_llama, site_data, tmp_path):
    from stackrlhf.models.answerer import Answerer, ModelSpec
    from stackrlhf.models.ilql import ILQLModel
    from stackrlhf.models.sampling import SamplingConfig
    from stackrlhf.rl.config import ILQLConfig, PPOConfig
    from stackrlhf.rl.ilql import train_ilql
    from stackrlhf.rl.ppo import train_ppo
    from stackrlhf.train.config import DPOConfig, SFTConfig
    from stackrlhf.train.dpo import dpo
    from stackrlhf.train.sft import sft

    quiet = dict(report_to="none")
    sft(SFTConfig(model=str(chat_llama), data=str(site_data), out=str(tmp_path / "sft"), max_steps=3,
                  max_length=128, max_prompt_tokens=96, max_train_samples=24, max_eval_samples=8,
                  learning_rate=1e-3, **quiet))
    assert changed(chat_llama, tmp_path / "sft") > 0.5
    _, tok = load_causal_lm(str(tmp_path / "sft"))
    assert tok.chat_template and tok.eos_token == "<|im_end|>"

    def length_reward(questions, answers):  # a synthetic reward: longer answers
        return [len(a) / 100 for a in answers]

    for algorithm in ("ppo", "rloo"):
        metrics = train_ppo(PPOConfig(model=str(tmp_path / "sft"), data=str(site_data), out=str(tmp_path / algorithm),
                                      algorithm=algorithm, steps=2, prompts_per_step=8 if algorithm == "ppo" else 4,
                                      mini_batch_size=4, min_new_tokens=8, max_new_tokens=8, max_prompt_tokens=96,
                                      num_layers_unfrozen=1, learning_rate=1e-3, sample_every=0, save_every=0,
                                      progress=False, **quiet), scorer=length_reward)
        assert metrics["steps"] == 2 and abs(metrics["kl_last"]) < 50
        assert changed(tmp_path / "sft", tmp_path / algorithm) > 0

    train_ilql(ILQLConfig(model=str(tmp_path / "sft"), data=str(site_data), out=str(tmp_path / "ilql"), steps=2,
                          per_device_train_batch_size=4, max_samples=16, max_prompt_tokens=96, max_answer_tokens=32, save_every=0,
                          progress=False, **quiet))
    ilql, ilql_tok, _ = ILQLModel.from_pretrained(tmp_path / "ilql")
    head = ilql.heads.q_heads[0]
    assert head.fc.in_features == 32 and head.out.out_features == ilql.lm.config.vocab_size  # hidden in, vocab out

    dpo(DPOConfig(model=str(tmp_path / "sft"), data=[str(site_data)], out=str(tmp_path / "dpo"), max_steps=2,
                  max_train_pairs=8, max_eval_pairs=4, max_length=128, max_prompt_tokens=96, kl_prompts=0,
                  learning_rate=1e-3, precompute_ref_log_probs=False, **quiet))
    assert changed(tmp_path / "sft", tmp_path / "dpo") > 0

    # every output answers through the template: the prompt ids are the templated ones
    prompt = "Question: Which yeast for a stout?\n\nI want a dry finish.\n\nAnswer: "
    for name in ("ppo", "rloo", "dpo", "ilql"):
        answerer = Answerer(ModelSpec(name, str(tmp_path / name)), "cpu")
        gen = answerer.generate([prompt], SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1.0), seed=0)
        assert gen.prompt_ids[0] == encode_prompt(answerer.tok, prompt, 384)
        assert answerer.tok.decode(gen.prompt_ids[0]).endswith("<|im_start|>assistant\n")


def test_dpo_pairs_carry_the_templated_prompt(chat_llama, site_data):
    from stackrlhf.train.dpo import dpo_pairs
    from stackrlhf.data.load import load_pairs

    _, tok = load_causal_lm(str(chat_llama))
    pairs = load_pairs([str(site_data)], "train", 4, 0)
    rows = dpo_pairs(pairs, tok, 64)
    for row, plain in zip(rows, pairs["prompt"]):
        assert row["prompt_ids"] == encode_prompt(tok, plain, 64)  # as the policy is asked at inference
        text = tok.decode(row["prompt_ids"])
        assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
        assert row["chosen_ids"][-1] == tok.eos_token_id
