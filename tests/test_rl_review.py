"""Traps of RL code and of a feedback loop, each checked: a cold random critic, RLOO's token-level
whitening, an inert KL controller, the same prompts every loop turn, a label counted K-1 times, DPO tokenized
unlike SFT, and the gold RM's half leaking into DPO, ILQL and the loop's RM."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from stackrlhf.data.splits import pair_half
from stackrlhf.models.loading import load_causal_lm
from stackrlhf.rl.ppo import AdaptiveKLController, PPOTrainer, kl_penalty

from test_ppo import config, target_fraction, tiny_policy  # noqa: F401 - the fixture


# ---------------------------------------------------------------- the critic

def test_the_value_head_starts_at_zero_and_a_parent_critic_is_loaded(tiny_policy, site_data, tmp_path):  # noqa: F811
    trainer = PPOTrainer(config(tiny_policy, site_data, tmp_path / "a"), scorer=target_fraction())
    assert trainer.policy.value_head.weight.abs().max() == 0 and trainer.policy.value_head.bias.abs().max() == 0
    parent = tmp_path / "parent"
    shutil.copytree(tiny_policy, parent)
    hidden = trainer.policy.value_head.in_features
    save_file({"weight": torch.full((1, hidden), 0.5), "bias": torch.tensor([0.25])}, str(parent / "value_head.safetensors"))
    child = PPOTrainer(config(parent, site_data, tmp_path / "b"), scorer=target_fraction())
    assert torch.all(child.policy.value_head.weight == 0.5) and float(child.policy.value_head.bias.detach()) == 0.25
    assert child.value_head_from.endswith("value_head.safetensors")


def test_the_policy_waits_while_the_critic_warms_up(tiny_policy, site_data, tmp_path):  # noqa: F811
    trainer = PPOTrainer(config(tiny_policy, site_data, tmp_path / "w", value_warmup_steps=1),
                         scorer=target_fraction())
    policy = trainer.policy
    lm_params = lambda: {n: p.detach().clone() for n, p in policy.lm.named_parameters() if p.requires_grad}  # noqa: E731
    before, head = lm_params(), policy.value_head.weight.detach().clone()
    trainer.step()
    after = lm_params()
    assert all(torch.equal(before[n], after[n]) for n in before)  # the policy did not move
    assert not torch.equal(head, policy.value_head.weight)  # the critic learned
    trainer.step()
    assert any(not torch.equal(after[n], p) for n, p in policy.lm.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------- RLOO's normalisation

def test_rloo_advantages_keep_each_prompts_zero_sum_and_do_not_depend_on_length(tiny_policy, site_data, tmp_path):  # noqa: F811
    trainer = PPOTrainer(config(tiny_policy, site_data, tmp_path / "r", algorithm="rloo", rloo_k=2, prompts_per_step=8),
                         scorer=target_fraction())
    lengths, scores = [2, 6, 6, 2], [1.0, 0.0, 1.0, 0.0]  # two prompts; a short and a long loser
    mask = torch.zeros(4, 6)
    rewards = torch.zeros(4, 6)
    for i, (n, s) in enumerate(zip(lengths, scores)):
        mask[i, :n] = 1
        rewards[i, n - 1] = s
    advantages, _ = trainer.advantages(rewards, torch.zeros(4, 6), mask)
    per_sequence = torch.stack([advantages[i, 0] for i in range(4)])
    for i, n in enumerate(lengths):  # the same advantage on every token of an answer, none after it
        assert torch.allclose(advantages[i, :n], per_sequence[i].expand(n)) and advantages[i, n:].abs().sum() == 0
    assert torch.allclose(per_sequence.view(2, 2).sum(1), torch.zeros(2), atol=1e-6)  # zero sum per prompt
    assert torch.isclose(per_sequence[1], per_sequence[3])  # the long and the short loser: the same
    assert per_sequence[1] < 0 < per_sequence[0]


# ---------------------------------------------------------------- the KL controller

def test_the_default_kl_horizon_holds_kl_near_the_target(tiny_policy, site_data, tmp_path):  # noqa: F811
    trainer = PPOTrainer(config(tiny_policy, site_data, tmp_path / "k", adaptive_kl=True, init_kl_coef=0.05,
                                target_kl=6.0), scorer=target_fraction())
    n = trainer.rollouts_per_step
    assert trainer.kl_ctl.horizon == n

    def run(controller) -> float:
        kl = 0.0
        for _ in range(12):  # a policy whose KL falls as its leash tightens: KL = 2 / beta (40 nats at the start)
            kl = 2 / controller.value
            controller.update(kl, n)
        return 2 / controller.value

    assert abs(run(trainer.kl_ctl) / 6.0 - 1) < 0.1  # held at the target within the run
    assert run(AdaptiveKLController(0.05, 6.0, 10_000)) > 30  # the old 10,000-episode horizon: beta barely moved


# ---------------------------------------------------------------- the length premium of a summed KL penalty

def test_the_default_kl_penalty_pays_no_answer_for_stopping_early(tiny_policy, site_data, tmp_path):  # noqa: F811
    lengths, per_token_kl, beta = [4, 12, 8], 0.5, 0.2
    mask = torch.zeros(3, 12)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    kl = torch.full((3, 12), per_token_kl)
    summed = kl_penalty(kl, mask, beta, "sum").sum(1)
    assert torch.allclose(summed, -beta * per_token_kl * torch.tensor(lengths, dtype=torch.float))  # 3x for 3x longer
    # mean: every answer pays beta x the mean length (8) x its mean KL per token, whatever its own length
    assert torch.allclose(kl_penalty(kl, mask, beta, "mean").sum(1), torch.full((3,), -beta * per_token_kl * 8))
    assert kl_penalty(kl, mask, beta, "mean")[0, 4:].abs().sum() == 0  # nothing after an answer's end
    # the default, through the trainer: with GAE at lambda = gamma = 1 and V = 0 the first token's advantage is the
    # answer's whole return, so a short and a long answer with the same score and per-token KL start equal
    cfg = config(tiny_policy, site_data, tmp_path / "m", whiten_advantages=False, lam=1.0)
    assert cfg.kl_penalty == "mean"
    trainer = PPOTrainer(cfg, scorer=target_fraction())
    rewards = kl_penalty(kl, mask, beta, cfg.kl_penalty)
    rewards[torch.arange(3), torch.tensor(lengths) - 1] += 1.0
    advantages, _ = trainer.advantages(rewards, torch.zeros(3, 12), mask)
    assert torch.allclose(advantages[:, 0], advantages[0, 0].expand(3))
    metrics = trainer.step()  # step 0: the policy is its reference, so both KL figures are zero
    assert metrics["kl/per_token"] == pytest.approx(0.0, abs=1e-6) and metrics["kl/mean"] == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------- the loop's turns

def test_each_loop_turn_draws_its_own_prompts_and_its_rm_keeps_the_gold_half_out(site_data, tmp_path):
    from stackrlhf.loop import LoopConfig, turn_stages

    reg = {"versions": [{"model": str(tmp_path / "v0")}]}
    seeds, halves = [], []
    for gold in ("", str(tmp_path / "gold")):
        cfg = LoopConfig(data=str(site_data), gold_reward=gold)
        for n in (1, 2, 3):
            current = {"model": str(tmp_path / f"v{n - 1}"), "version": n - 1}
            stages, _ = turn_stages(reg, cfg, current, n, tmp_path / f"v{n}", tmp_path / f"v{n}" / "feedback")
            by_name = {s.name: s.cfg for s in stages}
            seeds.append(by_name["rl"].seed)
            assert by_name["rl"].reference == str(tmp_path / "v0")  # KL to v0 in every turn
            assert by_name["rl"].out == str(tmp_path / f"v{n}" / "rloo")  # named by what runs
            assert by_name["rm"].label_weight == -1  # labels weigh as much as all the votes together
            halves.append(by_name["rm"].pairs_half)
    assert len(set(seeds[:3])) == 3  # each turn its own prompt order and sampling seeds
    assert halves == ["all"] * 3 + ["proxy"] * 3


def test_the_loops_rl_step_is_rloo_unless_its_settings_name_an_algorithm(site_data, tmp_path):
    """RLOO (k = 4) by default: measured ahead of PPO on the same answers; a named algorithm keeps its own
    settings (no RLOO batch forced on PPO)."""
    from stackrlhf.loop import LoopConfig, turn_stages

    reg = {"versions": [{"model": str(tmp_path / "v0")}]}
    current = {"model": str(tmp_path / "v0"), "version": 0}
    chosen = []
    for ppo in ({}, {"prompts_per_step": 2}, {"algorithm": "ppo"}, {"algorithm": "raft", "rloo_k": 3}):
        stages, _ = turn_stages(reg, LoopConfig(data=str(site_data), ppo=ppo), current, 1, tmp_path / "v1",
                                tmp_path / "v1" / "feedback")
        rl = {s.name: s.cfg for s in stages}["rl"]
        chosen.append((rl.algorithm, rl.rloo_k, rl.prompts_per_step, rl.mini_batch_size))
    # fewer prompts a step than the default: minibatches that divide the rollout
    assert chosen == [("rloo", 4, 16, 16), ("rloo", 4, 2, 8), ("ppo", 2, 32, 8), ("raft", 3, 32, 8)]


def test_the_proxy_half_keeps_every_label_and_drops_the_gold_votes(site_data, tmp_path):
    from test_feedback import candidates, question

    from stackrlhf.data.load import load_split
    from stackrlhf.feedback.export import export_feedback
    from stackrlhf.feedback.store import FeedbackStore
    from stackrlhf.data.load import load_pairs

    rows = load_split(site_data, "reward", "train")
    gold_qids = list(dict.fromkeys(q for s, q in zip(rows["site"], rows["qid"]) if pair_half(s, q) == "gold"))[:2]
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    for qid in gold_qids:  # labels on gold-half questions: still labels, never the gold RM's data
        tid = store.add_task(dict(question(qid), qid=qid), candidates(qid))
        token = store.add_annotator(f"a{qid}")
        who = store.annotator_by_token(token)
        assert store.next_task(who.id, 1) == tid
        task = store.get_task(tid)
        store.save_label(who.id, tid, f"client-{qid}", {c.id: {"usefulness": 4, "accuracy": 4} for c in task.candidates},
                         task.candidates[0].id, False, "")
    export_feedback(store, tmp_path / "export")
    proxy = load_pairs([str(site_data), str(tmp_path / "export")], "train", half="proxy")
    for site, qid in zip(proxy["site"], proxy["qid"]):
        assert qid in gold_qids or pair_half(site, qid) == "proxy"
    assert sorted(q for q in proxy["qid"] if q in gold_qids) == sorted(gold_qids)  # the two labels are kept


def test_dpo_and_ilql_learn_only_from_the_proxy_half_when_a_gold_rm_exists(site_data, tmp_path):
    from stackrlhf.pipeline import plan
    from stackrlhf.rl.ilql import scored_answers

    spec = {"data": {"dump": "x"}, "base": str(tmp_path / "base"), "sft": {}, "rm": {}, "dpo": {}, "ilql": {}}
    for gold, expected in ((None, "all"), ({}, "proxy")):
        stages = {s.name: s.cfg for s in plan({**spec, **({"gold_rm": gold} if gold is not None else {})},
                                              tmp_path / "run")}
        assert stages["dpo"].pairs_half == stages["ilql"].pairs_half == expected
        assert stages["rm"].pairs_half == ("proxy" if gold is not None else "all")
    everything = scored_answers(str(site_data))
    proxy, gold = scored_answers(str(site_data), "proxy"), scored_answers(str(site_data), "gold")
    assert len(proxy) + len(gold) == len(everything) and proxy and gold
    assert not {p for p, *_ in proxy} & {p for p, *_ in gold}  # no question on both sides


# ---------------------------------------------------------------- labels and DPO pairs

def test_a_k_way_choice_is_one_pair(tmp_path):
    from test_feedback import question

    from stackrlhf.feedback.export import export_feedback
    from stackrlhf.feedback.store import FeedbackStore

    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    answers = [{"text": f"answer {c}", "model": "sft"} for c in "abcd"]
    tid = store.add_task(question(0), answers)
    who = store.annotator_by_token(store.add_annotator("ann"))
    store.next_task(who.id, 1)
    task = store.get_task(tid)
    ratings = {c.id: {"usefulness": u, "accuracy": u} for c, u in zip(task.candidates, (5, 3, 1, 2))}
    store.save_label(who.id, tid, "client-0001", ratings, task.candidates[0].id, False, "")
    summary = export_feedback(store, tmp_path / "export")
    import pyarrow.parquet as pq

    pairs = pq.read_table(tmp_path / "export" / "reward" / "train-00000-of-00001.parquet").to_pylist()
    assert summary["pairs"] == 1 and len(pairs) == 1  # one label, one pair: not K - 1 = 3
    assert pairs[0]["chosen"] == "answer a" and pairs[0]["rejected"] == "answer c"  # against the lowest-rated


def test_the_loop_exports_the_label_pairs_its_settings_name(tmp_path):
    from stackrlhf.loop import LoopConfig

    assert LoopConfig(data="d").label_pairs == "one"
    with pytest.raises(ValueError, match="label_pairs 'two'"):
        LoopConfig(data="d", label_pairs="two")


def test_dpo_pairs_are_tokenized_exactly_as_sft_encodes_them(tiny_lm, site_data, tmp_path):
    from test_dpo import FAST, make_trainer

    from stackrlhf.train.dpo import dpo_pairs
    from stackrlhf.data.load import load_pairs
    from stackrlhf.train.sft import encode_example

    _, tok = load_causal_lm(str(tiny_lm))
    pairs = load_pairs([str(site_data)], "train", 8, 0)
    rows = dpo_pairs(pairs, tok, 10_000)
    for row, prompt, chosen, rejected in zip(rows, pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        for ids, answer in ((row["chosen_ids"], chosen), (row["rejected_ids"], rejected)):
            assert row["prompt_ids"] + ids == encode_example(tok, prompt, answer, 10**6, 10**6)["input_ids"]
    assert tok.decode(rows[0]["prompt_ids"]).endswith("Answer: ")  # the trailing space stays the prompt's
    trainer, _, _ = make_trainer(tiny_lm, site_data, tmp_path, pairs=8)  # TRL trains on these ids, untouched
    expected = dpo_pairs(pairs, tok, FAST["max_prompt_tokens"])
    assert [trainer.train_dataset[i] for i in range(8)] == [expected[i] for i in range(8)]


# ---------------------------------------------------------------- KL to v0 when the policy is a later version

def test_the_reference_can_be_another_version(tiny_policy, site_data, tmp_path):  # noqa: F811
    """v1 differs from v0 in its top block only: the hydra reference keeps the shared trunk and takes v0's top
    block, and its logits are v0's. A model whose bottom differs gets a full frozen copy, still v0's logits."""
    v0, _ = load_causal_lm(str(tiny_policy))
    for name, change in (("top", "transformer.h.1."), ("bottom", "transformer.h.0.")):
        changed, tok = load_causal_lm(str(tiny_policy))
        with torch.no_grad():
            for n, p in changed.named_parameters():
                if n.startswith(change):
                    p.add_(0.1 * torch.randn_like(p))
        path = tmp_path / name
        changed.save_pretrained(str(path))
        tok.save_pretrained(str(path))
        trainer = PPOTrainer(config(path, site_data, tmp_path / f"ppo-{name}", reference=str(tiny_policy)),
                             scorer=target_fraction())
        assert trainer.reference_from.startswith(str(tiny_policy))
        assert ("shared trunk" in trainer.reference_from) == (name == "top")
        ids = torch.tensor([tok("Question: how long to ferment a lager?")["input_ids"]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            logits, _, ref = trainer.policy(ids, mask, None, with_reference=True)
            expected = v0(input_ids=ids, attention_mask=mask).logits
            mine = changed(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(ref, expected, atol=1e-5)  # KL is measured to v0
        assert torch.allclose(logits, mine, atol=1e-5) and not torch.allclose(ref, logits, atol=1e-3)


# ---------------------------------------------------------------- the reference judge's relevance term

def test_copying_the_question_pays_less_with_the_down_weighted_relevance(site_data):
    from stackrlhf.data.load import load_split
    from stackrlhf.stats import question_overlap
    from stackrlhf.models.judge import RELEVANCE_WEIGHT, load_judge

    # 3 of the answer's 7 word 3-grams are in the question ("a lager ferment?" keeps its question mark)
    assert question_overlap("how long should a lager ferment at 10 C", "How long should a lager ferment?") == 3 / 7
    assert question_overlap("two weeks", "How long should a lager ferment?") == 0.0
    judge = load_judge("reference", str(site_data))
    rows = [r for r in load_split(site_data, "evaluation", "test").to_list() if r["best_answer"]][:20]
    copies = [r["question"] for r in rows]
    assert RELEVANCE_WEIGHT < 1 and judge.relevance_weight == RELEVANCE_WEIGHT
    down = judge._raw(rows, copies)
    try:
        judge.relevance_weight = 1.0
        full = judge._raw(rows, copies)
    finally:
        judge.relevance_weight = RELEVANCE_WEIGHT
    sim, rel = judge.similarity(rows, copies), judge.relevance(rows, copies)
    assert all(abs(d - (s + RELEVANCE_WEIGHT * r)) < 1e-5 for d, s, r in zip(down, sim, rel))
    assert sum(full) > sum(down)  # a copy of the question gains less from relevance than it did


def test_the_loops_picks_coef_has_the_rl_step_imitate_the_exported_labels(site_data, tmp_path):
    from stackrlhf.loop import LoopConfig, turn_stages

    reg = {"versions": [{"model": str(tmp_path / "v0")}]}
    current = {"model": str(tmp_path / "v0"), "version": 0}
    feedback = tmp_path / "v1" / "feedback"
    for coef in (0.0, 0.25):
        stages, _ = turn_stages(reg, LoopConfig(data=str(site_data), picks_coef=coef), current, 1, tmp_path / "v1",
                                feedback)
        rl = {s.name: s for s in stages}["rl"]
        assert (rl.cfg.sft_data, rl.cfg.sft_coef) == ((str(feedback), 0.25) if coef else ("", 0.0))
        # a turn with new labels reruns the RL step when it imitates them
        assert ("feedback" in rl.parents) == bool(coef)
