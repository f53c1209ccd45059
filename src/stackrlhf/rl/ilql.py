"""ILQL: Implicit Language Q-Learning (Snell et al. 2022), offline RL from scored answers.

No generation during training. Every answer token is an action a_t taken in state s_t (the trunk's hidden
state after x_0..x_t); the answer's reward arrives with its last token. One step (:meth:`ILQLTrainer.step`):
  1. forward the trunk once; heads read the final hidden state of the answer's states only
  2. Q loss:   (Q_i(s_t, a_t) - [r_t + gamma * V(s_{t+1}) * (1 - done_t)])^2, both Q heads
  3. V loss:   expectile tau of  min_i Qtarget_i(s_t, a_t) - V(s_t)   (V -> a soft max over the data's actions)
  4. CQL loss: cross-entropy of each Q head's values, as logits, on the taken action
  5. LM loss:  cross-entropy of the LM on the taken action, weighted by exp(awac_beta * (Q - V)) (AWAC)
  6. step, then every ``steps_for_target_q_sync`` steps: Qtarget <- alpha * Q + (1 - alpha) * Qtarget (Polyak)
Decoding (:class:`ILQLLogitsProcessor`): log_softmax(logits) + beta * (min Qtarget - V), then top-k, temperature.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from stackrlhf.config import write_text_atomic
from stackrlhf.errors import StackRLHFError
from stackrlhf.stats import spearman, words
from stackrlhf.models.freezing import describe_trainable, freeze_bottom
from stackrlhf.models.ilql import SETTINGS_FILE, ILQLModel
from stackrlhf.models.loading import load_causal_lm, resolve_dtype
from stackrlhf.models.precision import autocast, upcast_trainable
from stackrlhf.rl.common import (MetricsWriter, gather_rng_states, make_accelerator, pass_batch, resume_latest,
                                 save_checkpoint, seed_everything, write_run_artifacts)
from stackrlhf.rl.config import ILQLConfig
from stackrlhf.console import console



@dataclass
class ScoredSample:
    """One offline episode: the prompt's tokens, the answer's tokens (ending in EOS), the answer's reward."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float


# ---------------------------------------------------------------- the loss

class ILQLObjective(nn.Module):
    """The loss as a module, so that DDP (``accelerate launch``) wraps it and syncs the model's gradients."""

    def __init__(self, model: ILQLModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, cfg: ILQLConfig, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        return ilql_loss(self.model, batch, cfg, tokens)


def ilql_loss(model: ILQLModel, batch: dict, cfg: ILQLConfig,
              tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The ILQL objective on one batch. ``batch``: right-padded ``input_ids`` / ``attention_mask``,
    ``state_mask`` (t where x_{t+1} is an answer token), ``rewards`` (per sample). Each term is a sum over the
    batch's tokens divided by ``tokens`` (default: their number, a token mean); under DDP, which averages the
    processes' gradients, the mean of the processes' token counts, so the update is the token mean over every
    process's tokens whatever each one's share."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    states = batch["state_mask"][:, :-1]
    h = hidden[:, :-1][states]                                   # s_t, flattened in order: [N, H]
    actions = batch["input_ids"][:, 1:][states]                   # a_t: [N]
    tokens = torch.tensor(float(len(actions)), device=h.device) if tokens is None else tokens.clamp(min=1)
    # the last state of each sample is terminal; its reward is the answer's
    counts = states.sum(1)
    ends = counts.cumsum(0) - 1
    done = torch.zeros(len(actions), device=h.device)
    done[ends] = 1.0
    rewards = torch.zeros_like(done)
    rewards[ends] = batch["rewards"].to(done.dtype)

    heads = model.heads
    v = heads.v_head(h).squeeze(-1).float()                      # V(s_t)
    v_next = torch.cat([v[1:], v.new_zeros(1)]) * (1 - done)     # V(s_{t+1}); 0 after the last action
    q_logits = [head(h).float() for head in heads.q_heads]       # Q_i(s_t, .)
    qs = [q.gather(-1, actions[:, None]).squeeze(-1) for q in q_logits]
    with torch.no_grad():
        target_q = torch.stack([head.gathered(h, actions) for head in heads.target_q_heads]).amin(0).float()

    # 2. TD loss toward r + gamma * V(next)
    td_target = rewards + cfg.gamma * v_next.detach()
    loss_q = sum(((q - td_target) ** 2).sum() / tokens for q in qs)
    # 3. expectile regression of V toward the target Q
    u = target_q - v
    weight = torch.where(u < 0, 1 - cfg.tau, cfg.tau)
    loss_v = (weight * u ** 2).sum() / tokens
    # 4. CQL: push down the Q of actions the data did not take
    loss_cql = sum(F.cross_entropy(q, actions, reduction="sum") / tokens for q in q_logits)
    # 5. AWAC-weighted language-model loss
    lm_logits = model.lm.get_output_embeddings()(h).float()
    nll = F.cross_entropy(lm_logits, actions, reduction="none")
    advantage = (target_q - v).detach()
    awac_w = (torch.exp(cfg.awac_beta * advantage).clamp(max=cfg.awac_max_weight) if cfg.awac_beta
              else torch.ones_like(nll))
    loss_awac = (awac_w * nll).sum() / tokens

    loss = loss_q + loss_v + cfg.cql_scale * loss_cql + cfg.awac_scale * loss_awac
    stats = {"loss/total": loss.item(), "loss/q": loss_q.item(), "loss/v": loss_v.item(),
             "loss/cql": loss_cql.item(), "loss/awac": loss_awac.item(), "values/q_mean": qs[0].mean().item(),
             "values/v_mean": v.mean().item(), "values/target_q_mean": target_q.mean().item(),
             "values/advantage_mean": advantage.mean().item(), "values/reward_mean": batch["rewards"].float().mean().item(),
             "lm/nll": nll.mean().item(), "tokens": int(len(actions))}
    return loss, stats


# ---------------------------------------------------------------- data

def normalise(values: Sequence[float]) -> list[float]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std()) or 1.0
    return list((arr - arr.mean()) / std)


def scored_answers(data_dir: str, half: str = "all") -> list[tuple[str, str, float, str]]:
    """(prompt, answer, vote score, answer link) of every distinct answer in the finetune and reward training
    splits: the best answers and the answers that lost a comparison, so low rewards are represented too.
    ``half`` (proxy / gold) keeps one half of the questions (:func:`stackrlhf.data.splits.pair_half`)."""
    from stackrlhf.data.load import load_split
    from stackrlhf.data.splits import of_half

    seen: set[str] = set()
    out = []
    ft = of_half(load_split(data_dir, "finetune", "train"), half)
    pairs = of_half(load_split(data_dir, "reward", "train"), half)
    for prompt, answer, score, link in zip(ft["prompt"], ft["completion"], ft["answer_score"], ft["answer_link"]):
        if link not in seen:
            seen.add(link)
            out.append((prompt, answer, float(score), link))
    for row in pairs.select_columns(["prompt", "chosen", "rejected", "score_j", "score_k", "answer_link_j",
                                     "answer_link_k"]):
        for answer, score, link in ((row["chosen"], row["score_j"], row["answer_link_j"]),
                                    (row["rejected"], row["score_k"], row["answer_link_k"])):
            if link not in seen:
                seen.add(link)
                out.append((row["prompt"], answer, float(score), link))
    return out


def answer_ids(ids: list[int], eos: int, max_tokens: int) -> list[int]:
    """An answer's tokens for ILQL: ending in EOS when the whole answer fits, cut without EOS when it does not
    (an EOS there would teach the model to stop mid-answer, as SFT's truncation avoids too)."""
    return ids + [eos] if len(ids) < max_tokens else ids[:max_tokens]


def samples_from_data(cfg: ILQLConfig, tok, scorer: Callable | None = None) -> tuple[list[ScoredSample], dict]:
    from stackrlhf.prompts import encode_prompt

    rows = scored_answers(cfg.data, cfg.pairs_half)
    if cfg.max_samples:
        random.Random(cfg.seed).shuffle(rows)
        rows = rows[: cfg.max_samples]
    if not rows:
        raise StackRLHFError(f"{cfg.data}: no scored answers in its finetune/reward training splits")
    if cfg.reward_source == "rm":
        raw = list(scorer([r[0] for r in rows], [r[1] for r in rows]))
    else:
        raw = [r[2] for r in rows]
    rewards = normalise(raw)
    eos = tok.eos_token_id
    samples = []
    for (prompt, answer, _, _), reward in zip(rows, rewards):
        p = encode_prompt(tok, prompt, cfg.max_prompt_tokens)
        a = answer_ids(tok(answer, add_special_tokens=False)["input_ids"], eos, cfg.max_answer_tokens)
        samples.append(ScoredSample(p, a, float(reward)))
    info = {"samples": len(samples), "reward_source": cfg.reward_source,
            "raw_reward_mean": float(np.mean(raw)), "raw_reward_std": float(np.std(raw)),
            # ILQL learns to steer toward what its rewards follow: if that is length, so will its answers be
            "reward_length_spearman": spearman([words(r[1]) for r in rows], raw)}
    return samples, info


def collate(samples: Sequence[ScoredSample], pad_id: int, device) -> dict:
    """Right-padded [prompt | answer] with the mask of states whose next token is an answer token."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    states = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(samples):
        seq = s.prompt_ids + s.response_ids
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = 1
        states[i, len(s.prompt_ids) - 1:len(seq) - 1] = True
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "state_mask": states.to(device),
            "rewards": rewards.to(device)}


# ---------------------------------------------------------------- the trainer

class ILQLTrainer:
    def __init__(self, cfg: ILQLConfig, samples: list[ScoredSample] | None = None, model=None, tok=None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.accelerator = make_accelerator()
        seed_everything(cfg.seed, self.accelerator.process_index)
        self.dtype = resolve_dtype(cfg.dtype)
        if model is None:
            model, tok = load_causal_lm(cfg.model, dtype=cfg.dtype, device=self.accelerator.device, int8_trunk=False)
        self.tok = tok
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        freeze_bottom(model, cfg.num_layers_unfrozen)
        self.model = ILQLModel.create(model, cfg.two_qs).to(self.accelerator.device)
        self.model.heads.float()  # the Polyak-averaged target heads too: alpha-sized steps vanish in bf16
        upcast_trainable(self.model)
        self.model.train()
        console.print(f"ILQL: {describe_trainable(self.model)}")
        self.data_info: dict = {}
        if samples is None:
            if not cfg.data:
                raise StackRLHFError("--data is required: a `stackrlhf data build` output")
            samples, self.data_info = samples_from_data(cfg, tok, self._rm_scorer() if cfg.reward_source == "rm"
                                                        else None)
        if len(samples) < cfg.per_device_train_batch_size:
            raise StackRLHFError(f"only {len(samples)} scored answers, fewer than "
                                 f"per_device_train_batch_size={cfg.per_device_train_batch_size}")
        self.samples = samples
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, cfg.warmup_steps, cfg.steps)
        self.wrapped, self.optimizer = self.accelerator.prepare(ILQLObjective(self.model), self.optimizer)
        self.step_index = 0
        self.history: list[dict] = []
        self.writer = MetricsWriter(self.out, cfg.report_to, self.accelerator.is_main_process, cfg)

    def _rm_scorer(self):
        from stackrlhf.models.reward import RewardModel

        rm = RewardModel.from_pretrained(self.cfg.reward, device=self.accelerator.device)
        return lambda questions, answers: rm.score(list(questions), list(answers))

    def batch(self, step: int) -> list[ScoredSample]:
        """A seeded permutation per pass over the data, each process its own slice: resumable exactly."""
        return [self.samples[i] for i in pass_batch(len(self.samples), step, self.cfg.per_device_train_batch_size,
                                                    self.accelerator.num_processes, self.accelerator.process_index,
                                                    self.cfg.seed)]

    def step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = collate(self.batch(self.step_index), self.tok.pad_token_id, self.accelerator.device)
        tokens = batch["state_mask"][:, :-1].sum().float()
        if self.accelerator.num_processes > 1:  # the processes' mean token count: see ilql_loss
            tokens = self.accelerator.reduce(tokens.detach().clone(), reduction="mean")
        with autocast(self.accelerator.device, self.dtype):
            loss, stats = self.wrapped(batch, cfg, tokens)
        if not torch.isfinite(loss):
            raise StackRLHFError(f"step {self.step_index}: the ILQL loss is NaN/inf; stopping (the last checkpoint "
                                 f"in {self.out / 'checkpoints'} is good). Lower the learning rate.")
        self.optimizer.zero_grad()
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(
            self.trainable, cfg.max_grad_norm) if cfg.max_grad_norm else 0.0
        self.optimizer.step()
        self.scheduler.step()
        self.step_index += 1
        if self.step_index % cfg.steps_for_target_q_sync == 0:
            self.model.heads.sync_target(cfg.alpha)
        seconds = time.perf_counter() - t0
        return {"step": self.step_index, **stats, "grad_norm": float(grad_norm),
                "lr": self.scheduler.get_last_lr()[0], "time/samples_per_s": cfg.per_device_train_batch_size / seconds,
                "time/tokens_per_s": stats["tokens"] / seconds}

    # ------------------------------------------------------------ checkpoints (same layout as PPO's)

    def save_checkpoint(self) -> None:
        rng = gather_rng_states(self.accelerator)  # every process's generators; the main one writes
        if not self.accelerator.is_main_process:
            return
        params = {n: p.detach().cpu() for n, p in self.model.named_parameters()
                  if p.requires_grad or n.startswith("heads.")}
        save_checkpoint(self.out / "checkpoints", self.step_index, {
            "params": params, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "history": self.history}, rng=rng)

    def maybe_resume(self) -> None:
        state = (resume_latest(self.out / "checkpoints", self.model, self.optimizer, self.accelerator.process_index)
                 if self.cfg.resume else None)
        if state is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            self.step_index, self.history = state["step"], state["history"]

    # ------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.maybe_resume()
        bar = tqdm(total=cfg.steps, initial=self.step_index, desc="ilql", disable=not cfg.progress)
        start, samples_seen = time.perf_counter(), 0
        while self.step_index < cfg.steps:
            metrics = self.step()
            samples_seen += cfg.per_device_train_batch_size
            self.history.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss/total']:.3f}", q=f"{metrics['values/q_mean']:.2f}",
                            v=f"{metrics['values/v_mean']:.2f}")
            if self.step_index % cfg.log_every == 0:
                self.writer.scalars(metrics, self.step_index)
            if cfg.save_every and self.step_index % cfg.save_every == 0:
                self.save_checkpoint()
        bar.close()
        return self.finish(samples_seen / max(time.perf_counter() - start, 1e-9))

    def finish(self, samples_per_s: float) -> dict:
        h = self.history
        window = max(len(h) // 10, 1)
        mean = lambda rows, k: float(np.mean([r[k] for r in rows])) if rows else None  # noqa: E731
        metrics = {"steps": self.step_index, "samples_per_s": samples_per_s, "samples": len(self.samples),
                   "loss_first": mean(h[:window], "loss/total"), "loss_last": mean(h[-window:], "loss/total"),
                   "lm_nll_last": mean(h[-window:], "lm/nll"), "advantage_last": mean(h[-window:],
                                                                                        "values/advantage_mean"),
                   **{f"data_{k}": v for k, v in self.data_info.items()}}
        self.save_checkpoint()  # every process: their random generators are gathered
        if self.accelerator.is_main_process:
            self.model.save_pretrained(self.out)
            self.tok.save_pretrained(str(self.out))
            settings = {"beta": self.cfg.beta, "top_k": self.cfg.top_k, "two_qs": self.cfg.two_qs}
            write_text_atomic(self.out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
            write_run_artifacts(self.out, self.cfg, h, metrics)
            self.writer.close()
        self.accelerator.wait_for_everyone()
        return metrics


def train_ilql(cfg: ILQLConfig, samples: list[ScoredSample] | None = None, model=None, tok=None) -> dict:
    metrics = ILQLTrainer(cfg, samples, model, tok).train()
    console.print(f"[green]wrote {cfg.out}[/]: loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f}, "
                  f"{metrics['samples_per_s']:.1f} samples/s")
    return metrics
