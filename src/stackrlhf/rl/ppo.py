"""PPO for language models (Ziegler et al. 2019; "The N Implementation Details of RLHF with PPO", Huang et al.
2023), on torch + transformers + accelerate.

One iteration, top to bottom (:meth:`PPOTrainer.step`):
  1. rollout: sample answers to a batch of prompts (KV cache, a length limit drawn per rollout, stop at EOS); with
     an int8 sampler, the sampler's own log-prob of each token is kept for truncated importance sampling
  2. score: the reward model reads the decoded text with its own tokenizer; normalised with its saved stats
  3. forward once, no grad: log-probs and values of the policy, log-probs of the frozen reference
  4. rewards: -beta * KL_t on every response token (``--kl-penalty mean``, the default: scaled by the step's mean
     answer length over this answer's, so a short answer saves no penalty), + the score on the last one
  5. advantages: the estimator the algorithm names (:mod:`stackrlhf.rl.estimators`): PPO's GAE(gamma, lambda),
     whitened, returns = advantages + values; RLOO's leave-one-out advantage over k answers a prompt; RAFT's 1 for
     each prompt's best answer, 0 for the rest
  6. ppo_epochs x minibatches: clipped policy loss (each token's weighted by min(pi_old / pi_sampler, is_cap)
     when the sampler is an int8 copy: Yao et al. 2025's truncated importance sampling) + vf_coef * clipped value
     loss, gradient clipping, early stop after the first minibatch whose approximate KL to the rollout policy
     exceeds max_approx_kl
  7. adapt beta (Ziegler's proportional controller), log, checkpoint
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from tqdm.auto import tqdm

from stackrlhf.data.load import load_split
from stackrlhf.errors import StackRLHFError
from stackrlhf.stats import history_length_analysis, words
from stackrlhf.models.engine import sampling_logprobs, supports
from stackrlhf.models.freezing import apply_lora, describe_trainable, transformer_blocks
from stackrlhf.models.answerer import same_vocabulary
from stackrlhf.models.generation import SamplingConfig, encode_prompts, generate, pack_sequences
from stackrlhf.models.quant import calibration_maxima, int8_usable, quantize_llama, quantize_trunk, trunk_blocks
from stackrlhf.models.policy import PolicyWithValue, select_rows, trunk_from_rollout
from stackrlhf.models.loading import load_causal_lm, resolve_dtype
from stackrlhf.models.precision import autocast, upcast_trainable
from stackrlhf.rl.common import (MetricsWriter, gather_rng_states, make_accelerator, pass_batch, resume_latest,
                                 save_checkpoint, seed_everything, write_run_artifacts)
from stackrlhf.rl.config import ALGORITHMS, PPOConfig
from stackrlhf.rl.bonbon import bonbon_loss
from stackrlhf.rl.rloo import quantile_rewards
from stackrlhf.rl.estimators import ESTIMATORS, Step, gae, masked_mean, masked_whiten  # noqa: F401 (re-exported)
from stackrlhf.console import console, warn

Scorer = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
# a step's rollout is a function of (seed, step) alone, the same on every process and after a resume:
LENGTH_SEED_STRIDE = 100_003  # its length limit: Random(seed * this + step)
SAMPLING_SEED_STRIDE, STEP_SEED_STRIDE = 1_000_003, 10_007  # its sampling seed: seed * the first + step * the second


# ---------------------------------------------------------------- small helpers, each one idea

def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) in float32: the one computation of the rollout's and the update's log-probs,
    so the two are bit for bit the same."""
    return torch.log_softmax(logits.float() * (1.0 / temperature) if temperature != 1 else logits.float(), -1)


class _TokenLogProb(torch.autograd.Function):
    """log softmax(logits / T)[token] with its gradient (onehot - softmax) / T. The backward turns the saved
    log-softmax into the gradient in place, where autograd's log_softmax, gather and division backwards would
    each read and write a vocabulary-wide tensor again."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        logp = _log_softmax(logits, temperature)
        ctx.logp, ctx.dtype, ctx.temperature = logp, logits.dtype, temperature
        ctx.save_for_backward(tokens)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        (tokens,) = ctx.saved_tensors
        grad = (grad.float() * (1.0 / ctx.temperature)).unsqueeze(-1)
        out, ctx.logp = ctx.logp.exp_().mul_(-grad), None  # -softmax * grad, in the saved tensor's memory
        out.scatter_add_(-1, tokens.unsqueeze(-1), grad)
        return out.to(ctx.dtype), None, None


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature), the distribution the tokens were sampled from."""
    return _TokenLogProb.apply(logits, tokens, temperature)


@torch.no_grad()
def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """:func:`logprobs_of` (exactly: the same operations) and the entropy of softmax(logits / temperature), from
    one log-softmax; no gradient."""
    logp = _log_softmax(logits, temperature)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, >= 0)."""
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return log_ratio.exp() - 1 - log_ratio
    return logp - ref_logp


def kl_penalty(kl_k1: torch.Tensor, mask: torch.Tensor, beta: float, mode: str,
               mean_length: float | None = None) -> torch.Tensor:
    """Per-token reward penalty. ``sum``: -beta * KL_t, so an answer's total penalty grows with its length and
    stopping early pays. ``mean``: -beta * KL_t * (L_mean / L_i), so answer i's total is -beta * L_mean * (its mean
    KL per token): the same leash per token, no premium on short answers, but not the gradient of a KL (that is
    ``sum``'s): it regularises toward the reference by a length-normalised divergence, while ``kl/mean`` and the
    controller's target stay the summed KL. ``mean_length`` is the step's mean answer length (over every process;
    default: over these rows)."""
    penalty = -beta * kl_k1 * mask
    if mode == "sum":
        return penalty
    lengths = mask.sum(1, keepdim=True).clamp(min=1)
    mean = float(lengths.mean()) if mean_length is None else mean_length
    return penalty * (mean / lengths)


def clipped_policy_loss(advantages: torch.Tensor, ratio: torch.Tensor, cliprange: float):
    """PPO's pessimistic clipped surrogate per token, and where its clipped branch is the one in force (a ratio
    outside [1-c, 1+c] is clipped only on the side its advantage pushes toward)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return torch.max(unclipped, clipped), clipped > unclipped



class AdaptiveKLController:
    """Ziegler et al.: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon, never below ``floor``."""

    def __init__(self, beta: float, target: float, horizon: int, floor: float = 0.0):
        self.value, self.target, self.horizon, self.floor = beta, target, horizon, floor

    def update(self, kl: float, n: int) -> None:
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.value = max(self.value * (1 + error * n / self.horizon), self.floor)


class FixedKLController:
    def __init__(self, beta: float):
        self.value = beta

    def update(self, kl: float, n: int) -> None:
        pass


def load_value_head(policy, model_dir: str) -> str:
    """Start the critic from the one a previous PPO run saved beside ``model_dir`` (the loop's parent version),
    not from zero; returns where it came from ("" when there is none)."""
    path = Path(model_dir) / "value_head.safetensors"
    if not path.is_file():
        return ""
    from safetensors.torch import load_file

    state = load_file(str(path))
    head = policy.value_head
    policy.value_head.load_state_dict({k: v.to(head.weight.device, head.weight.dtype) for k, v in state.items()})
    return str(path)


# ---------------------------------------------------------------- the trainer

class PPOTrainer:
    """PPO, RLOO and RAFT on one rollout and update loop; what differs is the advantage estimator the algorithm
    names (:data:`stackrlhf.rl.config.ALGORITHMS`). ``scorer(questions, answers) -> rewards`` replaces the reward
    model of ``cfg.reward``, and ``prompts`` (strings, or a ``datasets.Dataset`` with a ``prompt`` column) the rl
    split of ``cfg.data``, so the trainer runs as a library on any prompts and reward."""

    def __init__(self, cfg: PPOConfig, scorer: Scorer | None = None, prompts=None):
        if prompts is None and not cfg.data:
            raise StackRLHFError("--data is required: a `stackrlhf data build` output (its rl split gives prompts)")
        self.cfg = cfg
        self.algorithm = ALGORITHMS[cfg.algorithm]
        self.estimate = ESTIMATORS[self.algorithm.estimator]
        self.out = Path(cfg.out)
        self.accelerator = make_accelerator()
        seed_everything(cfg.seed, self.accelerator.process_index)
        self.dtype = resolve_dtype(cfg.dtype)
        lm, self.tok = load_causal_lm(cfg.model, dtype=cfg.dtype, device=self.accelerator.device)
        self.int8_trunk_blocks = self._quantize_trunk(lm)
        if cfg.gradient_checkpointing:  # active in the update's forward (train mode), not in the rollout's
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:
            lm = apply_lora(lm, cfg.lora_r, cfg.lora_alpha)
        self.policy = PolicyWithValue(lm, cfg.num_layers_unfrozen, lora=cfg.lora,
                                      value_grad_to_trunk=cfg.value_grad_to_trunk).to(self.accelerator.device)
        upcast_trainable(self.policy)  # the reference was copied before: it stays in the loaded dtype
        self.value_head_from = load_value_head(self.policy, cfg.model) if self.algorithm.critic else ""
        self.reference_from = ""
        if cfg.reference and Path(cfg.reference).resolve() != Path(cfg.model).resolve():
            ref_lm, ref_tok = load_causal_lm(cfg.reference, dtype=cfg.dtype, device=self.accelerator.device)
            if not same_vocabulary(self.tok, ref_tok):
                raise StackRLHFError(f"--reference {cfg.reference} has another tokenizer than --model {cfg.model}: "
                                     "KL compares their log-probs of the same tokens")
            how = self.policy.set_reference(ref_lm)
            shared = 'its top blocks on the shared trunk' if how == 'hydra' else 'a full copy'
            self.reference_from = f"{cfg.reference} ({shared})"
        if not self.algorithm.critic:  # the value head is not trained (nor, under DDP, expected to get gradients)
            self.policy.value_head.requires_grad_(False)
        # the rollout sampler's int8 copy of the trained top blocks and head: calibrated once, re-quantised a step
        self.sampler_maxima = (calibration_maxima(lm, self.tok) if not cfg.lora and cfg.num_layers_unfrozen >= 0
                               and int8_usable(lm, cfg.sampler_precision) else None)
        self._int8_head = None
        self.answers_per_prompt = cfg.rloo_k if self.algorithm.grouped else 1
        self.rollouts_per_step = cfg.prompts_per_step * self.answers_per_prompt
        console.print(f"PPO policy ({self.policy.mode} reference{': ' + self.reference_from if self.reference_from else ''}): "
                      f"{describe_trainable(self.policy)}; value head: "
                      + (self.value_head_from or "zero (no parent critic)" if self.algorithm.critic
                         else f"unused ({cfg.algorithm.upper()})"))
        # no weight decay: it would pull the trained blocks toward zero, not toward the reference (the KL's job)
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=cfg.learning_rate, eps=1e-5,
                                           weight_decay=0.0)
        self.model, self.optimizer = self.accelerator.prepare(self.policy, self.optimizer)
        self.value_optimizer = torch.optim.AdamW(self.policy.value_head.parameters(), lr=cfg.learning_rate, eps=1e-5,
                                                 weight_decay=0.0)
        self.scorer = scorer if scorer is not None else self._load_rm()
        horizon = cfg.kl_horizon or self.rollouts_per_step * self.accelerator.num_processes
        self.kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, horizon, cfg.min_kl_coef) if cfg.adaptive_kl
                       else FixedKLController(cfg.init_kl_coef))
        if prompts is None:
            prompts = load_split(cfg.data, "rl", "train")
        self.prompts = list(prompts["prompt"] if hasattr(prompts, "column_names") else prompts)
        if len(self.prompts) < cfg.prompts_per_step:
            raise StackRLHFError(f"{cfg.data or 'the prompts given'}: {len(self.prompts)} prompts, fewer than "
                                 f"prompts_per_step={cfg.prompts_per_step}")
        self.demonstrations = self._load_demonstrations() if cfg.sft_data else None
        self.step_index = 0
        self.over_budget = False  # a rollout's KL to the reference exceeded kl_budget: the run stops
        self.history: list[dict] = []
        self.warned_negative_kl = False
        self.writer = MetricsWriter(self.out, cfg.report_to, self.accelerator.is_main_process, cfg)

    def _load_demonstrations(self) -> tuple[list[list[int]], list[list[int]]]:
        """--sft-data's (prompt, preferred answer) pairs, each once, as token ids: the prompt as the rollout asks it
        (cut at max_prompt_tokens), the answer cut at max_new_tokens."""
        cfg = self.cfg
        if self.accelerator.num_processes > 1:
            raise StackRLHFError("--sft-data runs in one process: its forward pass is not DDP-synchronised")
        rows = load_split(cfg.sft_data, "reward", "train")
        pairs = list(dict.fromkeys(zip(rows["prompt"], rows["chosen"])))
        answers = [ids[:cfg.max_new_tokens]
                   for ids in self.tok([a for _, a in pairs], add_special_tokens=False)["input_ids"]]
        kept = [(p, a) for (p, _), a in zip(pairs, answers) if a]
        if not kept:
            raise StackRLHFError(f"--sft-data {cfg.sft_data}: no preferred answer to imitate (no labelled pairs yet?)")
        prompts = encode_prompts(self.tok, [p for p, _ in kept], cfg.max_prompt_tokens)
        console.print(f"imitating {len(kept)} answers of {cfg.sft_data} (x {cfg.sft_coef} per token)")
        return prompts, [a for _, a in kept]

    def sft_loss(self, generator: torch.Generator) -> torch.Tensor:
        """The per-token NLL, at the sampling temperature, of ``sft_batch`` --sft-data answers drawn with
        ``generator`` (a full forward: their frozen trunk is not cached)."""
        prompt_ids, answer_ids = self.demonstrations
        rows = torch.randperm(len(prompt_ids), generator=generator)[:self.cfg.sft_batch].tolist()
        batch = pack_sequences([prompt_ids[i] for i in rows], [answer_ids[i] for i in rows], self.tok.pad_token_id,
                               self.accelerator.device)
        logits, _, _ = self.model(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                  keep=batch["keep"])
        logp = logprobs_of(self.response_part(logits, batch), batch["responses"], self.cfg.temperature)
        mask = batch["response_mask"]
        return -(logp * mask).sum() / mask.sum().clamp(min=1)

    def with_sft(self, loss: torch.Tensor, draws: torch.Generator | None, totals: dict) -> torch.Tensor:
        """``loss`` plus the supervised mix (--sft-data: sft_coef x :meth:`sft_loss`), its NLL logged in
        ``totals``; ``loss`` itself when there is no mix (``draws`` None)."""
        if draws is None:
            return loss
        imitation = self.sft_loss(draws)
        totals["loss/sft_data"].append(float(imitation.detach()))
        return loss + self.cfg.sft_coef * imitation

    def sft_generator(self) -> torch.Generator | None:
        """The draws of this step's --sft-data answers: seeded by the step, so a resumed run draws the same."""
        if self.demonstrations is None:
            return None
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step_index)

    def _quantize_trunk(self, lm) -> int:
        """Quantise the frozen trunk as --trunk-precision says; returns how many blocks run in int8 (a model trained
        so, loaded with its trunk in int8 already, keeps it)."""
        cfg = self.cfg
        total = len(transformer_blocks(lm))
        frozen = total - cfg.num_layers_unfrozen if cfg.num_layers_unfrozen >= 0 and not cfg.lora else 0
        already = trunk_blocks(lm)
        if already > frozen:
            raise StackRLHFError(f"{cfg.model} runs its bottom {already} blocks in int8 (it was trained so): train at "
                                 f"most its top {total - already} blocks (--num-layers-unfrozen, or -1 with LoRA "
                                 "excluded)")
        if frozen > already and int8_usable(lm, cfg.trunk_precision):
            quantize_trunk(lm, self.tok, frozen)
        return trunk_blocks(lm) if any(getattr(b, "int8_block", None) for b in transformer_blocks(lm)) else 0

    def sampler_copy(self, policy):
        """The int8 copy the rollout samples with (None: the policy samples itself in float32): the trunk as the
        policy runs it, the trained top blocks and the head quantised from their current weights."""
        if self.sampler_maxima is None:
            return None
        lm = policy.lm
        total = len(transformer_blocks(lm))
        head_frozen = not any(p.requires_grad for p in lm.get_output_embeddings().parameters())
        if head_frozen and self._int8_head is None:
            self._int8_head = quantize_llama(lm, self.tok, blocks=range(0), maxima=self.sampler_maxima).head
        copy = quantize_llama(lm, self.tok, blocks=range(total - self.cfg.num_layers_unfrozen, total),
                              head=not head_frozen, maxima=self.sampler_maxima)
        if head_frozen:
            copy.head = self._int8_head
        return copy

    def _load_rm(self):
        from stackrlhf.models.reward import RewardModel

        if not self.cfg.reward:
            raise StackRLHFError("--reward is required: a reward-model directory (`stackrlhf rm` output)")
        from stackrlhf.config import read_json
        from stackrlhf.stats import below_chance

        why = below_chance(read_json(Path(self.cfg.reward) / "metrics.json"))
        if why and not self.cfg.allow_below_chance_reward:
            raise StackRLHFError(f"--reward {self.cfg.reward}: {why}. Optimising it would move the policy against "
                                 "those preferences: retrain it (more pairs, other --adjust settings) or pass "
                                 "--allow-below-chance-reward")
        if why:
            warn(f"--reward {self.cfg.reward}: {why}; optimising it anyway (--allow-below-chance-reward)")
        rm = RewardModel.from_pretrained(self.cfg.reward, device=self.accelerator.device)
        return lambda questions, answers: rm.score(list(questions), list(answers), normalize=True)

    # ------------------------------------------------------------ one iteration

    def batch_prompts(self, step: int) -> list[str]:
        """Prompts of a step: a seeded permutation per pass over the rl split, each process its own slice."""
        return [self.prompts[i] for i in pass_batch(len(self.prompts), step, self.cfg.prompts_per_step,
                                                    self.accelerator.num_processes, self.accelerator.process_index,
                                                    self.cfg.seed)]

    def step(self) -> dict:
        with autocast(self.accelerator.device, self.dtype):
            return self._step()

    def _step(self) -> dict:
        cfg, device = self.cfg, self.accelerator.device
        policy = self.accelerator.unwrap_model(self.model)
        t0 = time.perf_counter()

        # 1. rollout
        prompts = self.batch_prompts(self.step_index)
        prompts = [p for p in prompts for _ in range(self.answers_per_prompt)]  # grouped: k answers, prompt-major
        # the same length limit and sampling seeds on every process: process p's rows continue process p-1's
        limit = random.Random(cfg.seed * LENGTH_SEED_STRIDE + self.step_index).randint(cfg.min_new_tokens,
                                                                                      cfg.max_new_tokens)
        seed = cfg.seed * SAMPLING_SEED_STRIDE + self.step_index * STEP_SEED_STRIDE
        # float32: the policy samples itself, its log-probs are the ratio's denominator; int8: a copy samples, and
        # its own log-probs weight the loss back to the policy (step 3)
        int8 = self.sampler_copy(policy)
        sampling = SamplingConfig(max_new_tokens=limit, temperature=cfg.temperature, top_k=cfg.top_k,
                                  top_p=cfg.top_p, max_prompt_tokens=cfg.max_prompt_tokens,
                                  sampler_precision="float32" if int8 is None else "int8")
        rollout = generate(policy.lm, self.tok, prompts, sampling, batch_size=cfg.generation_batch_size or len(prompts),
                           seed=seed, capture_layer=self.trunk_layer(policy),
                           first_row=self.accelerator.process_index * len(prompts), int8=int8)
        t_gen = time.perf_counter() - t0

        # 2. score the decoded text (the RM has its own tokenizer)
        scores = torch.tensor(list(self.scorer(prompts, rollout.texts)), dtype=torch.float, device=device)
        if not torch.isfinite(scores).all():
            raise StackRLHFError(f"step {self.step_index}: the reward model returned NaN/inf; stopping (the last "
                                 f"checkpoint in {self.out / 'checkpoints'} is good)")
        if cfg.score_clip:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        finished = torch.tensor(rollout.finished, device=device)
        if cfg.missing_eos_penalty:
            scores = torch.where(finished, scores, scores - cfg.missing_eos_penalty)
        # vbon: the reward is the log rank quantile of the score among the prompt's k answers (scores stay logged)
        reward_scores = (quantile_rewards(scores, self.answers_per_prompt) if self.algorithm.reward == "quantile"
                         else scores)

        # 3. one forward pass without grad: old log-probs, values, reference log-probs
        batch = pack_sequences(rollout.prompt_ids, rollout.response_ids, self.tok.pad_token_id, device)
        # (the sampler already ran the frozen trunk over every position: only the top blocks run again)
        with torch.no_grad():
            if rollout.trunk is not None:
                trunk = trunk_from_rollout(policy.lm, batch, rollout.trunk)
                logits, values, ref_logits = policy.forward_from_trunk(trunk, batch["keep"], with_reference=True)
            else:
                logits, values, ref_logits = policy(batch["input_ids"], batch["attention_mask"],
                                                    batch["position_ids"], with_reference=True, keep=batch["keep"])
                trunk = policy.frozen_trunk()
            old_logp, entropy = logprobs_and_entropy(self.response_part(logits, batch), batch["responses"],
                                                     cfg.temperature)  # and the rollout policy's entropy
            ref_logp = logprobs_of(self.response_part(ref_logits, batch), batch["responses"], cfg.temperature)
            old_values = self.response_part(values, batch)
            mask = batch["response_mask"]
            # truncated importance sampling: the int8 sampler's draws, weighted back to the policy's distribution
            is_weights, mismatch = (self.importance_weights(self.response_part(logits, batch), old_logp, batch,
                                                            rollout, sampling, mask) if int8 is not None else (None, {}))
        # the frozen trunk's output is reused by every epoch: they run only the trained top blocks on it

        # 4. per-token rewards: -beta * KL_t everywhere (--kl-penalty mean: scaled so no answer pays for its
        # length), + the score on the last response token
        # the reward's penalty is always k1: its expected gradient is that of the KL, while k3's is not
        # (E_p[grad k3] != 0, a biased policy gradient); --kl-estimator picks what the controller and logs see
        kl = kl_per_token(old_logp, ref_logp, cfg.kl_estimator) * mask
        mean_length = float(self.accelerator.gather(mask.sum(1)).float().mean())
        rewards = kl_penalty(kl_per_token(old_logp, ref_logp, "k1"), mask, self.kl_ctl.value, cfg.kl_penalty,
                             mean_length)
        last = mask.sum(1).long() - 1
        rewards[torch.arange(len(last)), last] += reward_scores

        # 5. advantages, by the algorithm's estimator
        advantages, returns = self.advantages(rewards, old_values, mask, scores)

        # 6. PPO epochs over minibatches (bonbon: its loss over best/worst pairs); none once over the KL budget
        rollout_kl = float(self.accelerator.gather(kl.sum(1)).mean())
        if cfg.kl_budget and rollout_kl > cfg.kl_budget:
            self.over_budget = True
            stats = {"policy/epochs": 0, "policy/minibatches": 0}
        elif self.algorithm.loss == "bonbon":
            stats = self.bonbon_update(batch, ref_logp, advantages, mask, trunk)
        else:
            stats = self.update(batch, old_logp, old_values, advantages, returns, mask, trunk, is_weights)

        # 7. KL controller, bookkeeping: means over every process, so beta stays the same on all of them
        episodes = self.gather_episodes({
            "score": scores, "kl": kl.sum(1), "total_reward": (rewards * mask).sum(1),
            "words": torch.tensor([float(words(t)) for t in rollout.texts], device=device),
            "length": mask.sum(1), "ended": finished.float()})
        mean_kl = float(episodes["kl"].mean())
        if mean_kl < 0 and not self.warned_negative_kl:
            warnings.warn("mean KL is negative: the sampling settings (top-k/top-p, temperature) bias the samples "
                          "away from the distribution the log-probs are computed under", stacklevel=2)
            self.warned_negative_kl = True
        beta = self.kl_ctl.value
        self.kl_ctl.update(mean_kl, self.rollouts_per_step * self.accelerator.num_processes)
        seconds = time.perf_counter() - t0
        n_tokens = float(mask.sum())
        metrics = {
            "step": self.step_index + 1, "reward/score_mean": float(episodes["score"].mean()),
            "reward/score_std": float(episodes["score"].std()) if len(episodes["score"]) > 1 else 0.0,
            "reward/total_mean": float(episodes["total_reward"].mean()), "kl/mean": mean_kl, "kl/beta": beta,
            "kl/per_token": float((episodes["kl"] / episodes["length"].clamp(min=1)).mean()),
            "response/length": float(episodes["length"].mean()), "response/ended": float(episodes["ended"].mean()),
            "response/words": float(episodes["words"].mean()),
            "reward/score_each": episodes["score"].tolist(), "response/words_each": episodes["words"].tolist(),
            "time/tokens_per_s": n_tokens / seconds,
            "time/episodes_per_s": len(prompts) * self.accelerator.num_processes / seconds,
            "time/generate_s": t_gen, "time/step_s": seconds, **stats, **mismatch,
            "policy/entropy": float(self.gather_episodes({"e": (entropy * mask).sum(1) / mask.sum(1).clamp(min=1)})[
                "e"].mean()),
        }
        self.step_index += 1
        return metrics | {"_samples": list(zip(prompts, rollout.texts, scores.tolist()))}

    def gather_episodes(self, per_episode: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each named per-episode value of this process, gathered from every process (one collective)."""
        names = list(per_episode)
        stacked = self.accelerator.gather(torch.stack([per_episode[k].float() for k in names], 1))
        return dict(zip(names, stacked.unbind(1)))

    def importance_weights(self, logits, old_logp, batch, rollout, sampling, mask):
        """Each response token's min(pi_old(t) / pi_sampler(t), is_cap), detached, with pi_old the policy's
        probability under the sampling rule (temperature, top-k, top-p) and pi_sampler the int8 sampler's; and the
        mismatch, means over every process: k1 and k3 estimates of KL(sampler || policy) per token, and the share of
        weights the cap cut."""
        rows, width = batch["responses"].shape
        sampler = torch.zeros(rows, width, device=mask.device)
        for r, values in enumerate(rollout.sampler_logprobs):
            sampler[r, :len(values)] = torch.as_tensor(values, dtype=torch.float)[:width]
        policy = old_logp if not sampling.top_k and sampling.top_p >= 1 else sampling_logprobs(  # else: truncated
            logits.reshape(rows * width, -1).float(), batch["responses"].reshape(-1), sampling).view(rows, width)
        log_ratio = torch.where(mask.bool(), policy - sampler, torch.zeros_like(sampler))
        ratio = log_ratio.exp()
        weights = ratio.clamp(max=self.cfg.is_cap)
        finite = log_ratio.clamp(min=-30.0)  # a token the policy's top-k/top-p would not draw: weight 0, finite k3
        tokens = self.accelerator.gather(mask.sum()[None]).sum().clamp(min=1)
        sums = self.accelerator.gather(torch.stack([(-finite * mask).sum(), ((finite.exp() - 1 - finite) * mask).sum(),
                                                    ((ratio > self.cfg.is_cap).float() * mask).sum()])[None]).sum(0)
        k1, k3, capped = (sums / tokens).tolist()
        return weights.detach(), {"sampler/k1": k1, "sampler/k3": k3, "sampler/capped": capped}

    @staticmethod
    def trunk_layer(policy) -> int | None:
        """The first trained block, whose input the sampler keeps for the update (hydra mode with the engine)."""
        if policy.hydra is None or policy.hydra.k == 0 or policy.ref_copy is not None or not supports(policy.lm):
            return None
        return len(transformer_blocks(policy.lm)) - policy.hydra.k

    def advantages(self, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   scores: torch.Tensor | None = None):
        """(advantages, returns) by the algorithm's estimator (:mod:`stackrlhf.rl.estimators`)."""
        cfg = self.cfg
        return self.estimate(Step(rewards, values, mask, k=self.answers_per_prompt, gamma=cfg.gamma, lam=cfg.lam,
                                  whiten=cfg.whiten_advantages, scores=scores))

    def backward(self, loss: torch.Tensor, what: str) -> None:
        """Gradients of ``loss`` into the trained parameters, clipped to ``max_grad_norm``; a NaN/inf loss stops
        the run before any weight moves."""
        if not torch.isfinite(loss):
            raise StackRLHFError(f"step {self.step_index}: the {what} loss is NaN/inf; stopping (the last "
                                 f"checkpoint in {self.out / 'checkpoints'} is good). Lower the learning rate.")
        self.optimizer.zero_grad()
        self.accelerator.backward(loss)
        if self.cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.policy.trainable_parameters(), self.cfg.max_grad_norm)

    def bonbon_update(self, batch, ref_logp, roles, mask, trunk: tuple | None = None) -> dict:
        """Best-of-k distillation (:mod:`stackrlhf.rl.bonbon`): epochs over minibatches of each prompt's (best,
        worst) pair, ``roles`` +1 / -1 on their tokens (0 on the other answers, which take no part). Not weighted
        by the int8 sampler's importance weights: the samples only pick the targets, whose loss is supervised."""
        cfg = self.cfg
        role = roles.sum(1)  # +-length on the best/worst rows, 0 elsewhere
        k = self.answers_per_prompt
        groups = len(role) // k
        best = (role.view(groups, k) > 0).float().argmax(1) + torch.arange(groups) * k
        worst = (role.view(groups, k) < 0).float().argmax(1) + torch.arange(groups) * k
        pairs = torch.stack([best, worst], 1)  # [P, 2]
        n = len(roles)
        per_minibatch = max(1, cfg.mini_batch_size // 2)
        totals: dict[str, list[float]] = {"loss/policy": [], "loss/ipo": [], "loss/sft": [], "bonbon/gap": [],
                                          "loss/sft_data": []}
        draws = self.sft_generator()
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(groups)
            for start in range(0, groups, per_minibatch):
                idx = pairs[order[start:start + per_minibatch]].reshape(-1)  # best, worst, best, worst, ...
                if trunk is not None:
                    logits, _, _ = self.model(None, None, None, keep=batch["keep"], trunk=select_rows(trunk, idx, n))
                else:
                    logits, _, _ = self.model(batch["input_ids"][idx], batch["attention_mask"][idx],
                                              batch["position_ids"][idx], keep=batch["keep"])
                logp = logprobs_of(self.response_part(logits, batch), batch["responses"][idx], cfg.temperature)
                loss, ipo, sft, gap = bonbon_loss(logp, ref_logp[idx], mask[idx], k, cfg.bonbon_alpha)
                loss = self.with_sft(loss, draws, totals)
                self.backward(loss, "bonbon")
                self.optimizer.step()
                for name, value in (("loss/policy", loss), ("loss/ipo", ipo), ("loss/sft", sft), ("bonbon/gap", gap)):
                    totals[name].append(float(value.detach()))
        out = {name: float(np.mean(v)) for name, v in totals.items() if v}
        out["policy/epochs"] = cfg.ppo_epochs
        out["policy/minibatches"] = cfg.ppo_epochs * math.ceil(groups / per_minibatch)
        return out

    @staticmethod
    def response_part(x: torch.Tensor, batch: dict) -> torch.Tensor:
        """Of the last R+1 positions the model kept (P-1 .. P+R-1), the R that predict (or value) the response."""
        return x[:, :batch["responses"].shape[1]]

    def update(self, batch, old_logp, old_values, advantages, returns, mask, trunk: tuple | None = None,
               is_weights: torch.Tensor | None = None) -> dict:
        """PPO epochs over minibatches. With ``trunk`` (the frozen bottom blocks' output for the rollout, hydra
        mode) each minibatch runs only the trained top blocks and the heads: the same losses and gradients as a
        full forward, without recomputing the blocks that do not change. ``is_weights`` (int8 sampler): each
        token's truncated importance weight multiplies its policy loss."""
        cfg = self.cfg
        n = len(old_logp)
        totals: dict[str, list[float]] = {k: [] for k in ("loss/policy", "loss/value", "policy/clipfrac",
                                                           "policy/approx_kl", "value/clipfrac", "loss/sft_data")}
        critic = self.algorithm.critic
        draws = self.sft_generator()
        epochs_done, minibatches, stop = 0, 0, False
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n)
            for start in range(0, n, cfg.mini_batch_size):
                idx = order[start:start + cfg.mini_batch_size]
                m = mask[idx]
                if trunk is not None:
                    logits, values, _ = self.model(None, None, None, keep=batch["keep"],
                                                   trunk=select_rows(trunk, idx, n))
                else:
                    logits, values, _ = self.model(batch["input_ids"][idx], batch["attention_mask"][idx],
                                                   batch["position_ids"][idx], keep=batch["keep"])
                logits = self.response_part(logits, batch)
                vpred = self.response_part(values, batch)
                logp = logprobs_of(logits, batch["responses"][idx], cfg.temperature)
                # clipped value loss
                vclipped = old_values[idx] + (vpred - old_values[idx]).clamp(-cfg.cliprange_value, cfg.cliprange_value)
                vf_losses = torch.max((vpred - returns[idx]) ** 2, (vclipped - returns[idx]) ** 2)
                # token means over the minibatch of every process: DDP averages gradients per process, so each
                # process divides by the mean token count, not its own (answers that end early differ in length)
                tokens = m.sum()
                if self.accelerator.num_processes > 1:
                    tokens = self.accelerator.reduce(tokens.detach().clone(), reduction="mean")
                tokens = tokens.clamp(min=1)
                vf_loss = 0.5 * (vf_losses * m).sum() / tokens
                # clipped policy loss
                log_ratio = logp - old_logp[idx]
                ratio = log_ratio.exp()
                pg_losses, clipped = clipped_policy_loss(advantages[idx], ratio, cfg.cliprange)
                if is_weights is not None:
                    pg_losses = pg_losses * is_weights[idx]
                pg_loss = (pg_losses * m).sum() / tokens
                warming = critic and self.step_index < cfg.value_warmup_steps  # the critic learns first
                if not critic:
                    loss = pg_loss
                elif warming:  # 0 x the policy loss: every parameter gets a (zero) gradient, as DDP expects
                    loss = 0.0 * pg_loss + cfg.vf_coef * vf_loss
                else:
                    loss = pg_loss + cfg.vf_coef * vf_loss
                loss = loss if warming else self.with_sft(loss, draws, totals)
                self.backward(loss, "PPO")
                # while warming up only the value head steps (the policy's optimizer would still decay its weights)
                (self.value_optimizer if warming else self.optimizer).step()
                minibatches += 1
                with torch.no_grad():
                    approx_kl = masked_mean((ratio - 1) - log_ratio, m)
                    if self.accelerator.num_processes > 1:  # every process stops at the same minibatch
                        approx_kl = self.accelerator.reduce(approx_kl.detach().clone(), reduction="mean")
                    totals["loss/policy"].append(float(pg_loss))
                    if critic:
                        totals["loss/value"].append(float(vf_loss))
                    totals["policy/clipfrac"].append(float(masked_mean(clipped.float(), m)))
                    totals["policy/approx_kl"].append(float(approx_kl))
                    if critic:
                        totals["value/clipfrac"].append(float(masked_mean(((vpred - old_values[idx]).abs()
                                                                           > cfg.cliprange_value).float(), m)))
                # early stop: the policy moved as far from the rollout's as allowed (not while only the critic trains)
                if cfg.max_approx_kl and not warming and float(approx_kl) > cfg.max_approx_kl:
                    stop = True
                    break
            epochs_done += 1
            if stop:
                break
        out = {k: float(np.mean(v)) for k, v in totals.items() if v}
        out["policy/epochs"] = epochs_done
        out["policy/minibatches"] = minibatches
        return out

    # ------------------------------------------------------------ checkpoints

    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> None:
        """Every process takes part (their random generators are gathered); the main one writes."""
        rng = gather_rng_states(self.accelerator)
        if not self.accelerator.is_main_process:
            return
        trainable = {n: p.detach().cpu() for n, p in self.policy.named_parameters() if p.requires_grad}
        save_checkpoint(self.checkpoint_dir(), self.step_index, {
            "params": trainable, "optimizer": self.optimizer.state_dict(),
            "value_optimizer": self.value_optimizer.state_dict(), "kl_coef": self.kl_ctl.value,
            "history": self.history, "warned_negative_kl": self.warned_negative_kl}, rng=rng)

    def maybe_resume(self) -> None:
        state = (resume_latest(self.checkpoint_dir(), self.policy, self.optimizer, self.accelerator.process_index)
                 if self.cfg.resume else None)
        if state is not None:
            if "value_optimizer" in state:
                self.value_optimizer.load_state_dict(state["value_optimizer"])
            self.kl_ctl.value = state["kl_coef"]
            self.step_index, self.history = state["step"], state["history"]
            self.warned_negative_kl = state["warned_negative_kl"]

    # ------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.maybe_resume()
        bar = tqdm(total=cfg.steps, initial=self.step_index, desc=cfg.algorithm, disable=not cfg.progress)
        start = time.perf_counter()
        episodes = 0
        while self.step_index < cfg.steps and not self.over_budget:
            metrics = self.step()
            samples = metrics.pop("_samples")
            episodes += self.rollouts_per_step * self.accelerator.num_processes
            self.history.append(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/score_mean']:.3f}", kl=f"{metrics['kl/mean']:.2f}")
            if self.step_index % cfg.log_every == 0:
                self.writer.scalars(metrics, self.step_index)
            if cfg.sample_every and self.step_index % cfg.sample_every == 0:
                self.log_samples(samples)
            if cfg.save_every and self.step_index % cfg.save_every == 0:
                self.save_checkpoint()
        bar.close()
        return self.finish(episodes / max(time.perf_counter() - start, 1e-9))

    def log_samples(self, samples: list[tuple[str, str, float]], n: int = 3) -> None:
        if not self.accelerator.is_main_process:
            return
        table = Table(title=f"step {self.step_index} samples", show_lines=True)
        for col in ("question", "response", "reward"):
            table.add_column(col)
        text = []
        for q, r, s in samples[:n]:
            table.add_row(q[-200:], r[:300], f"{s:.3f}")
            text.append(f"| {q[-200:]!r} | {r[:300]!r} | {s:.3f} |")
        console.print(table)
        self.writer.text("samples", "| question | response | reward |\n|---|---|---|\n" + "\n".join(text),
                         self.step_index)

    def finish(self, episodes_per_s: float) -> dict:
        history = self.history
        metrics = {"steps": self.step_index, "episodes_per_s": episodes_per_s,
                   "reward_first": history[0]["reward/score_mean"] if history else None,
                   "reward_last": history[-1]["reward/score_mean"] if history else None,
                   "kl_last": history[-1]["kl/mean"] if history else None,
                   "beta_last": self.kl_ctl.value, "reference": self.policy.mode, "algorithm": self.cfg.algorithm,
                   "stopped_at_kl_budget": self.over_budget,
                   "int8_trunk_blocks": self.int8_trunk_blocks,
                   "sampler_precision": "float32" if self.sampler_maxima is None else "int8",
                   "length": history_length_analysis(history)}
        self.save_checkpoint()  # every process: their random generators are gathered
        if self.accelerator.is_main_process:
            lm = self.policy.lm
            if self.policy.mode == "lora":
                lm.save_pretrained(str(self.out / "adapter"))
                lm = lm.merge_and_unload()
            lm.save_pretrained(str(self.out), safe_serialization=True)
            self.tok.save_pretrained(str(self.out))
            from safetensors.torch import save_file

            if self.algorithm.critic:
                save_file({k: v.contiguous() for k, v in self.policy.value_head.state_dict().items()},
                          str(self.out / "value_head.safetensors"))
            write_run_artifacts(self.out, self.cfg, history, metrics)
            self.writer.close()
        self.accelerator.wait_for_everyone()
        return metrics


def train_ppo(cfg: PPOConfig, scorer: Scorer | None = None, prompts=None) -> dict:
    metrics = PPOTrainer(cfg, scorer, prompts).train()
    console.print(f"[green]wrote {cfg.out}[/]: reward {metrics['reward_first']:.3f} -> {metrics['reward_last']:.3f}, "
                  f"KL {metrics['kl_last']:.2f}, {metrics['episodes_per_s']:.2f} episodes/s")
    length = metrics["length"]
    if length["reward_gain"] is not None:
        share = length["length_explained_share"]
        console.print(f"length: {length['words_early']:.1f} -> {length['words_late']:.1f} words; reward gain "
                      f"{length['reward_gain']:+.3f} overall, {length['reward_gain_within_length_bins'] or 0:+.3f} at "
                      f"equal length" + ("" if share is None else f" (length explains {share:.0%})"))
    return metrics
