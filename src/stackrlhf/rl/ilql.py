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

import copy
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from rich.console import Console
from torch import nn
from tqdm.auto import tqdm
from transformers import LogitsProcessor, get_cosine_schedule_with_warmup

from stackrlhf.config import save_config, write_text_atomic
from stackrlhf.errors import StackRLHFError
from stackrlhf.models.confounders import spearman, words
from stackrlhf.models.freezing import describe_trainable, freeze_bottom
from stackrlhf.models.loading import load_causal_lm, resolve_dtype
from stackrlhf.models.precision import autocast, upcast_trainable
from stackrlhf.rl.checkpoints import load_latest, save_checkpoint
from stackrlhf.rl.config import ILQLConfig

console = Console(stderr=True)
HEADS_FILE = "ilql_heads.safetensors"
SETTINGS_FILE = "ilql.json"


@dataclass
class ScoredSample:
    """One offline episode: the prompt's tokens, the answer's tokens (ending in EOS), the answer's reward."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float


# ---------------------------------------------------------------- heads

class MLPHead(nn.Module):
    """hidden -> 2*hidden -> out (trlx's head shape). :meth:`gathered` computes only the chosen outputs."""

    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(2 * hidden, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(h)))

    def gathered(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``forward(h).gather(-1, index)`` without the vocabulary-wide product."""
        z = F.relu(self.fc(h))
        return (z * self.out.weight[index]).sum(-1) + self.out.bias[index]


class ILQLHeads(nn.Module):
    """Q heads (one or two), their target copies (never trained by gradient), and the V head."""

    def __init__(self, hidden: int, vocab: int, two_qs: bool = True):
        super().__init__()
        self.q_heads = nn.ModuleList(MLPHead(hidden, vocab) for _ in range(2 if two_qs else 1))
        self.target_q_heads = copy.deepcopy(self.q_heads)
        for p in self.target_q_heads.parameters():
            p.requires_grad_(False)
        self.v_head = MLPHead(hidden, 1)

    @torch.no_grad()
    def sync_target(self, alpha: float) -> None:
        """Polyak averaging: target <- alpha * online + (1 - alpha) * target."""
        for target, online in zip(self.target_q_heads.parameters(), self.q_heads.parameters()):
            target.mul_(1 - alpha).add_(online, alpha=alpha)

    def advantage(self, h: torch.Tensor) -> torch.Tensor:
        """min_i Qtarget_i(s, .) - V(s): the decoding shift, for every token of the vocabulary."""
        q = torch.stack([head(h) for head in self.target_q_heads]).amin(0)
        return q - self.v_head(h)


class ILQLModel(nn.Module):
    """A causal LM and the ILQL heads on its final hidden state."""

    def __init__(self, lm: nn.Module, heads: ILQLHeads):
        super().__init__()
        self.lm = lm
        self.heads = heads

    @classmethod
    def create(cls, lm: nn.Module, two_qs: bool = True) -> "ILQLModel":
        head = lm.get_output_embeddings()
        heads = ILQLHeads(head.weight.shape[1], head.weight.shape[0], two_qs)
        p = next(lm.parameters())
        return cls(lm, heads.to(p.device, dtype=p.dtype))

    def forward(self, batch: dict, cfg: ILQLConfig) -> tuple[torch.Tensor, dict]:
        """The ILQL loss of a batch: through ``forward`` so that DDP (``accelerate launch``) syncs the gradients."""
        return ilql_loss(self, batch, cfg)

    def hidden_states(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """Final hidden states (after the last norm: what the LM head reads), without computing any logits."""
        trunk = getattr(self.lm, self.lm.base_model_prefix)  # GPT2Model, LlamaModel ... (ends with the final norm)
        return trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state

    def shifted_logprobs(self, logits: torch.Tensor, h: torch.Tensor, beta: float) -> torch.Tensor:
        """The decoding distribution's scores: log_softmax(logits) + beta * (min Qtarget - V)."""
        logp = F.log_softmax(logits.float(), dim=-1)
        if not beta:
            return logp
        return logp + beta * self.heads.advantage(h).float()[..., : logp.shape[-1]]

    def save_pretrained(self, out: Path) -> None:
        from safetensors.torch import save_file

        self.lm.save_pretrained(str(out), safe_serialization=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}, str(out / HEADS_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype: str | None = "auto"):
        """(model, tokenizer, saved decoding settings) of a ``stackrlhf ilql`` output."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / HEADS_FILE).is_file():
            raise StackRLHFError(f"{path}: not an ILQL model (no {HEADS_FILE}); train one with `stackrlhf ilql`")
        lm, tok = load_causal_lm(str(path), dtype=dtype, device=device)
        settings = json.loads((path / SETTINGS_FILE).read_text()) if (path / SETTINGS_FILE).is_file() else {}
        model = cls.create(lm, two_qs=settings.get("two_qs", True))
        model.heads.load_state_dict(load_file(str(path / HEADS_FILE), device=str(next(lm.parameters()).device)))
        return model.eval(), tok, settings


def is_ilql_model(path: str | Path) -> bool:
    return (Path(path) / HEADS_FILE).is_file()


# ---------------------------------------------------------------- the loss

def ilql_loss(model: ILQLModel, batch: dict, cfg: ILQLConfig) -> tuple[torch.Tensor, dict]:
    """The ILQL objective on one batch. ``batch``: right-padded ``input_ids`` / ``attention_mask``,
    ``state_mask`` (t where x_{t+1} is an answer token), ``rewards`` (per sample)."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    states = batch["state_mask"][:, :-1]
    h = hidden[:, :-1][states]                                   # s_t, flattened in order: [N, H]
    actions = batch["input_ids"][:, 1:][states]                   # a_t: [N]
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
    loss_q = sum(F.mse_loss(q, td_target) for q in qs)
    # 3. expectile regression of V toward the target Q
    u = target_q - v
    weight = torch.where(u < 0, 1 - cfg.tau, cfg.tau)
    loss_v = (weight * u ** 2).mean()
    # 4. CQL: push down the Q of actions the data did not take
    loss_cql = sum(F.cross_entropy(q, actions) for q in q_logits)
    # 5. AWAC-weighted language-model loss
    lm_logits = model.lm.get_output_embeddings()(h).float()
    nll = F.cross_entropy(lm_logits, actions, reduction="none")
    advantage = (target_q - v).detach()
    awac_w = (torch.exp(cfg.awac_beta * advantage).clamp(max=cfg.awac_max_weight) if cfg.awac_beta
              else torch.ones_like(nll))
    loss_awac = (awac_w * nll).mean()

    loss = loss_q + loss_v + cfg.cql_scale * loss_cql + cfg.awac_scale * loss_awac
    stats = {"loss/total": loss.item(), "loss/q": loss_q.item(), "loss/v": loss_v.item(),
             "loss/cql": loss_cql.item(), "loss/awac": loss_awac.item(), "values/q_mean": qs[0].mean().item(),
             "values/v_mean": v.mean().item(), "values/target_q_mean": target_q.mean().item(),
             "values/advantage_mean": advantage.mean().item(), "values/reward_mean": batch["rewards"].float().mean().item(),
             "lm/nll": nll.mean().item(), "tokens": int(len(actions))}
    return loss, stats


# ---------------------------------------------------------------- decoding

class ILQLLogitsProcessor(LogitsProcessor):
    """Shift each next-token distribution by beta * (min Qtarget - V) of the current state.

    It reads the final hidden state that the LM head has just consumed (a forward pre-hook), so it works
    inside ``model.generate`` with its KV cache; the sampler's temperature / top-k / top-p apply after it."""

    def __init__(self, model: ILQLModel, beta: float):
        self.model, self.beta = model, beta
        self._hidden = None
        self._hook = model.lm.get_output_embeddings().register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        self._hidden = args[0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.model.shifted_logprobs(scores, self._hidden[:, -1], self.beta)

    def close(self) -> None:
        self._hook.remove()


def ilql_generate(model: ILQLModel, tok, prompts: Sequence[str], sampling, beta: float, batch_size: int = 8,
                  seed: int | None = None, streamer=None):
    """:func:`stackrlhf.models.generation.generate` with the ILQL shift."""
    from stackrlhf.models.generation import generate

    processor = ILQLLogitsProcessor(model, beta)
    try:
        return generate(model.lm, tok, list(prompts), sampling, batch_size=batch_size, seed=seed, streamer=streamer,
                        logits_processor=[processor])
    finally:
        processor.close()


# ---------------------------------------------------------------- data

def normalise(values: Sequence[float]) -> list[float]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std()) or 1.0
    return list((arr - arr.mean()) / std)


def scored_answers(data_dir: str) -> list[tuple[str, str, float, str]]:
    """(prompt, answer, vote score, answer link) of every distinct answer in the finetune and reward training
    splits: the best answers and the answers that lost a comparison, so low rewards are represented too."""
    from stackrlhf.data.load import load_split

    seen: set[str] = set()
    out = []
    ft = load_split(data_dir, "finetune", "train")
    for prompt, answer, score, link in zip(ft["prompt"], ft["completion"], ft["answer_score"], ft["answer_link"]):
        if link not in seen:
            seen.add(link)
            out.append((prompt, answer, float(score), link))
    pairs = load_split(data_dir, "reward", "train")
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
    from stackrlhf.prompts import fit_prompt_ids

    rows = scored_answers(cfg.data)
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
        p = fit_prompt_ids(tok(prompt, add_special_tokens=False)["input_ids"], cfg.max_prompt_tokens)
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
        self.accelerator = Accelerator()
        self._seed_everything()
        self.dtype = resolve_dtype(cfg.dtype)
        if model is None:
            model, tok = load_causal_lm(cfg.model, dtype=cfg.dtype, device=self.accelerator.device)
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
        if len(samples) < cfg.batch_size:
            raise StackRLHFError(f"only {len(samples)} scored answers, fewer than batch_size={cfg.batch_size}")
        self.samples = samples
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, cfg.warmup_steps, cfg.steps)
        self.wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.step_index = 0
        self.history: list[dict] = []
        self.writer = None
        if self.accelerator.is_main_process and "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out / "runs"))

    def _seed_everything(self) -> None:
        seed = self.cfg.seed + self.accelerator.process_index
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    def _rm_scorer(self):
        from stackrlhf.models.reward import RewardModel

        rm = RewardModel.from_pretrained(self.cfg.reward, device=self.accelerator.device)
        return lambda questions, answers: rm.score(list(questions), list(answers))

    def batch(self, step: int) -> list[ScoredSample]:
        """A seeded permutation per pass over the data, each process its own slice: resumable exactly."""
        per_step = self.cfg.batch_size * self.accelerator.num_processes
        steps_per_pass = max(len(self.samples) // per_step, 1)
        order = list(range(len(self.samples)))
        random.Random(self.cfg.seed + step // steps_per_pass).shuffle(order)
        start = (step % steps_per_pass) * per_step + self.accelerator.process_index * self.cfg.batch_size
        return [self.samples[i] for i in order[start:start + self.cfg.batch_size]]

    def step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = collate(self.batch(self.step_index), self.tok.pad_token_id, self.accelerator.device)
        with autocast(self.accelerator.device, self.dtype):
            loss, stats = self.wrapped(batch, cfg)
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
                "lr": self.scheduler.get_last_lr()[0], "time/samples_per_s": cfg.batch_size / seconds,
                "time/tokens_per_s": stats["tokens"] / seconds}

    # ------------------------------------------------------------ checkpoints (same layout as PPO's)

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        params = {n: p.detach().cpu() for n, p in self.model.named_parameters()
                  if p.requires_grad or n.startswith("heads.")}
        save_checkpoint(self.out / "checkpoints", self.step_index, {
            "params": params, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "history": self.history})

    def maybe_resume(self) -> None:
        found = load_latest(self.out / "checkpoints") if self.cfg.resume else None
        if found is None:
            return
        state, folder = found
        result = self.model.load_state_dict(state["params"], strict=False)
        if result.unexpected_keys:
            raise StackRLHFError(f"{folder}: checkpoint does not match this model ({result.unexpected_keys[:3]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_index, self.history = state["step"], state["history"]
        console.print(f"resumed from {folder} (step {self.step_index})")

    # ------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.maybe_resume()
        bar = tqdm(total=cfg.steps, initial=self.step_index, desc="ilql", disable=not cfg.progress)
        start, samples_seen = time.perf_counter(), 0
        while self.step_index < cfg.steps:
            metrics = self.step()
            samples_seen += cfg.batch_size
            self.history.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss/total']:.3f}", q=f"{metrics['values/q_mean']:.2f}",
                            v=f"{metrics['values/v_mean']:.2f}")
            if self.writer is not None and self.step_index % cfg.log_every == 0:
                for key, value in metrics.items():
                    self.writer.add_scalar(key, value, self.step_index)
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
        if self.accelerator.is_main_process:
            self.save_checkpoint()
            self.model.save_pretrained(self.out)
            self.tok.save_pretrained(str(self.out))
            settings = {"beta": self.cfg.beta, "top_k": self.cfg.top_k, "two_qs": self.cfg.two_qs}
            write_text_atomic(self.out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
            save_config(self.cfg, self.out / "config.yaml")
            write_text_atomic(self.out / "history.jsonl", "".join(json.dumps(r) + "\n" for r in h))
            clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
            write_text_atomic(self.out / "metrics.json", json.dumps(clean, indent=2) + "\n")
            if self.writer is not None:
                self.writer.close()
        self.accelerator.wait_for_everyone()
        return metrics


def train_ilql(cfg: ILQLConfig, samples: list[ScoredSample] | None = None, model=None, tok=None) -> dict:
    metrics = ILQLTrainer(cfg, samples, model, tok).train()
    console.print(f"[green]wrote {cfg.out}[/]: loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f}, "
                  f"{metrics['samples_per_s']:.1f} samples/s")
    return metrics
