"""ILQL: the randomwalks task, the Polyak rule, resume equality, the NaN guard, the CLI and `ask --beta`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stackrlhf.cli import cli
from stackrlhf.errors import StackRLHFError
from stackrlhf.rl.config import ILQLConfig
from stackrlhf.models.ilql import ILQLHeads, ILQLModel
from helpers import randomised_q_heads
from stackrlhf.rl.ilql import ILQLTrainer, ScoredSample, answer_ids, collate
from randomwalks import evaluate, generate_random_walks, walk_model, walk_tokenizer


def walk_config(out: Path, **kw) -> ILQLConfig:
    base = dict(model="randomwalks", out=str(out), steps=300, per_device_train_batch_size=100, learning_rate=1e-3,
                warmup_steps=10, num_layers_unfrozen=-1, tau=0.8, alpha=0.1, steps_for_target_q_sync=5, cql_scale=0.1,
                report_to="none", progress=False, save_every=0, seed=0)
    base.update(kw)
    return ILQLConfig(**base)


@pytest.fixture(scope="module")
def walks():
    task = generate_random_walks()
    return task, walk_tokenizer(task.n_nodes)


def test_randomwalks_ilql_finds_shorter_paths_than_the_data(walks, tmp_path):
    task, tok = walks
    behaviour = task.behaviour_optimality()
    trainer = ILQLTrainer(walk_config(tmp_path / "ilql"), task.samples(tok), walk_model(tok), tok)
    trainer.train()
    model = trainer.model.eval()
    greedy = evaluate(task, model, tok, beta=10.0)
    sampled = evaluate(task, model, tok, beta=10.0, samples_per_start=10, temperature=1.0)
    plain = evaluate(task, model, tok, beta=0.0, samples_per_start=20, temperature=1.0)
    assert greedy >= 0.8 and sampled >= 0.8, (greedy, sampled, behaviour)
    assert sampled > behaviour + 0.05
    assert abs(plain - behaviour) < 0.12, (plain, behaviour)  # beta = 0 is the behaviour policy, imitated
    assert json.loads((tmp_path / "ilql" / "metrics.json").read_text())["steps"] == 300


def test_polyak_target_update_follows_the_rule():
    torch.manual_seed(0)
    heads = ILQLHeads(hidden=8, vocab=11)
    for p in heads.q_heads.parameters():  # make online and target differ
        p.data.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in heads.q_heads.parameters()]
    before = [p.detach().clone() for p in heads.target_q_heads.parameters()]
    heads.sync_target(0.3)
    for t, o, b in zip(heads.target_q_heads.parameters(), online, before):
        torch.testing.assert_close(t, 0.3 * o + 0.7 * b)
    assert not any(p.requires_grad for p in heads.target_q_heads.parameters())


def test_trainer_syncs_targets_every_n_steps(walks, tmp_path):
    task, tok = walks
    cfg = walk_config(tmp_path / "sync", steps=6, per_device_train_batch_size=16, steps_for_target_q_sync=3, alpha=0.5)
    trainer = ILQLTrainer(cfg, task.samples(tok), walk_model(tok), tok)
    heads = trainer.model.heads
    targets = lambda: [p.detach().clone() for p in heads.target_q_heads.parameters()]  # noqa: E731
    start = targets()
    for _ in range(2):
        trainer.step()
        for a, b in zip(targets(), start):
            assert torch.equal(a, b)  # no sync yet
    online_before = [p.detach().clone() for p in heads.q_heads.parameters()]
    trainer.step()  # the third step syncs, after its optimizer update
    online = [p.detach().clone() for p in heads.q_heads.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(online, online_before))
    for t, o, s in zip(targets(), online, start):
        torch.testing.assert_close(t, 0.5 * o + 0.5 * s)


def test_collate_marks_answer_states_and_terminal_reward():
    batch = collate([ScoredSample([5, 6], [7, 8, 0], 1.5), ScoredSample([5], [9, 0], -1.0)], pad_id=1, device="cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0], [5, 9, 0, 1, 1]]
    # states whose next token is an answer token: the last prompt token up to the one before EOS
    assert batch["state_mask"].int().tolist() == [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert batch["rewards"].tolist() == [1.5, -1.0]


def test_resume_gives_the_same_next_steps(walks, tmp_path):
    task, tok = walks
    samples = task.samples(tok)
    full = ILQLTrainer(walk_config(tmp_path / "full", steps=4, per_device_train_batch_size=16, save_every=2), samples,
                       walk_model(tok), tok)
    full.train()
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", resumed_dir / "checkpoints" / "step-2")
    resumed = ILQLTrainer(walk_config(resumed_dir, steps=4, per_device_train_batch_size=16, save_every=2), samples,
                          walk_model(tok, seed=123), tok)  # other initial weights: the checkpoint must restore them
    resumed.train()
    for a, b in zip(full.history[2:], resumed.history[2:]):
        for key in ("loss/total", "loss/q", "loss/v", "values/q_mean", "lm/nll"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_nan_reward_stops_with_a_clear_message(walks, tmp_path):
    task, tok = walks
    samples = task.samples(tok)[:32]
    samples[3] = ScoredSample(samples[3].prompt_ids, samples[3].response_ids, float("nan"))
    trainer = ILQLTrainer(walk_config(tmp_path / "nan", steps=5, per_device_train_batch_size=32), samples, walk_model(tok), tok)
    with pytest.raises(StackRLHFError, match="NaN"):
        trainer.train()


def test_cli_ilql_on_the_dump_then_ask_with_beta(tiny_lm, site_data, tmp_path):
    out = tmp_path / "ilql"
    runner = CliRunner()
    result = runner.invoke(cli, ["ilql", "--model", str(tiny_lm), "--data", str(site_data), "--out", str(out),
                                 "--steps", "3", "--per-device-train-batch-size", "4", "--max-samples", "40",
                                 "--num-layers-unfrozen", "1", "--report-to", "none", "--no-progress",
                                 "--beta", "2.0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["samples"] == 40 and metrics["data_reward_source"] == "votes"
    model, tok, settings = ILQLModel.from_pretrained(out, device="cpu")
    assert settings["beta"] == 2.0
    # the saved heads are the trained ones, not a fresh init
    state = torch.load(next((out / "checkpoints").glob("step-*")) / "state.pt", weights_only=False)["params"]
    torch.testing.assert_close(model.heads.v_head.out.weight, state["heads.v_head.out.weight"])

    for beta in ("0", "5"):
        asked = runner.invoke(cli, ["ask", str(out), "Which hops for an IPA?", "--max-new-tokens", "8",
                                    "--seed", "0", "--beta", beta, "--device", "cpu"])
        assert asked.exit_code == 0, asked.output
    plain = runner.invoke(cli, ["ask", str(tiny_lm), "Which hops?", "--beta", "1", "--device", "cpu"])
    assert plain.exit_code != 0 and "ILQL models only" in plain.output


def test_beta_shifts_decoding_by_the_advantage(tiny_lm):
    """The processor's output is exactly log_softmax(logits) + beta * (min Qtarget - V)."""
    from stackrlhf.models.loading import load_causal_lm
    from stackrlhf.models.ilql import ILQLLogitsProcessor

    lm, tok = load_causal_lm(str(tiny_lm))
    model = randomised_q_heads(ILQLModel.create(lm)).eval()
    ids = torch.tensor([tok("Question: hops?\n\nAnswer: ")["input_ids"]])
    processor = ILQLLogitsProcessor(model, beta=3.0)
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[:, -1]
        h = processor._hidden[:, -1]
        shifted = processor(ids, logits)
        expected = torch.log_softmax(logits, -1) + 3.0 * model.heads.advantage(h)
    processor.close()
    torch.testing.assert_close(shifted, expected)
    assert not torch.allclose(shifted, torch.log_softmax(logits, -1))


def test_truncated_answers_get_no_eos():
    assert answer_ids([5, 6, 7], eos=0, max_tokens=8) == [5, 6, 7, 0]  # fits: ends
    assert answer_ids(list(range(1, 11)), eos=0, max_tokens=8) == list(range(1, 9))  # cut: no EOS
    assert answer_ids(list(range(1, 8)), eos=0, max_tokens=8) == list(range(1, 8)) + [0]


def test_an_untrained_ilql_model_decodes_as_its_lm(tiny_lm):
    """The Q heads start at zero: before training the shift beta * (min Qtarget - V) is one number per state,
    so the decoding distribution is the LM's at any beta (random Q heads made it a random projection, and the
    slow Polyak targets kept it so through a short run)."""
    from stackrlhf.models.loading import load_causal_lm

    lm, tok = load_causal_lm(str(tiny_lm))
    model = ILQLModel.create(lm).eval()
    ids = torch.tensor([tok("Question: hops?\n\nAnswer: ")["input_ids"]])
    with torch.no_grad():
        h = model.hidden_states(ids, torch.ones_like(ids))
        logits = lm.get_output_embeddings()(h)
        for beta in (1.0, 5.0):
            shifted = torch.log_softmax(model.shifted_logprobs(logits, h, beta), -1)
            torch.testing.assert_close(shifted, torch.log_softmax(logits.float(), -1))
    # and the heads are still trainable: the Q loss reaches the output layer
    q = model.heads.q_heads[0]
    q.gathered(h.detach(), torch.zeros(h.shape[:2], dtype=torch.long)).sum().backward()
    assert q.out.weight.grad is not None and q.out.weight.grad.abs().sum() > 0
