"""PPO settings (all hyperparameters in one dataclass, as CleanRL does; free of torch imports)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stackrlhf.config import DTYPE_CHOICES, REPORT_TO_CHOICES


@dataclass(frozen=True)
class Algorithm:
    """One on-policy method of the trainer: its advantage estimator (a name in
    :data:`stackrlhf.rl.estimators.ESTIMATORS`), whether it trains a critic, whether it samples k answers a prompt,
    what the RM's score becomes before the KL penalty (``score`` itself, or ``quantile``: the log of its rank
    quantile among the prompt's k answers) and the update's loss (``clipped``: PPO's surrogate on the advantages;
    ``bonbon``: SFT on each prompt's best answer + IPO on best against worst, :mod:`stackrlhf.rl.bonbon`)."""
    estimator: str
    critic: bool
    grouped: bool
    reward: str = "score"
    loss: str = "clipped"


ALGORITHMS = {
    "ppo": Algorithm("gae", critic=True, grouped=False),
    "rloo": Algorithm("rloo", critic=False, grouped=True),
    "raft": Algorithm("raft", critic=False, grouped=True),
    "vbon": Algorithm("rloo", critic=False, grouped=True, reward="quantile"),
    "bonbon": Algorithm("bonbon", critic=False, grouped=True, loss="bonbon"),
}


@dataclass
class PPOConfig:
    model: str = field(default="", metadata={"aliases": ("policy",),
                                             "help": "The policy to start from: the SFT model directory (or any "
                                                     "causal LM id)."})
    reward: str = field(default="", metadata={"help": "The reward-model directory (`stackrlhf rm` output)."})
    data: str = field(default="", metadata={"help": "A `stackrlhf data build` output (its rl split gives prompts)."})
    out: str = field(default="outputs/ppo", metadata={"help": "Output directory."})
    reference: str = field(default="", metadata={"help": "The model KL is measured against (default: --model "
                                                "itself). The loop passes v0, so KL to v0 is what beta holds."})
    algorithm: str = field(default="ppo", metadata={"choices": tuple(ALGORITHMS), "help":
        "ppo: GAE advantages from a value head; rloo: k answers per prompt, each one's advantage its sequence "
        "reward minus the mean of the other k - 1 (no value head); raft: k answers per prompt, the clipped "
        "update raises the likelihood of the best one (reward-ranked fine-tuning, no value head); vbon: RLOO on the "
        "reward log(rank / k) of each answer among its prompt's k (variational best-of-n: only the RM's order "
        "counts); bonbon: best-of-k distillation, SFT on each prompt's best answer + IPO pulling best against worst "
        "to best-of-k's own log-ratio gap (no advantages, no value head)."})
    rloo_k: int = field(default=2, metadata={"help": "RLOO, RAFT, vbon, bonbon: answers sampled per prompt (>= 2)."})
    steps: int = field(default=100, metadata={"help": "PPO iterations (rollout + update)."})
    prompts_per_step: int = field(default=32, metadata={"aliases": ("batch_size",), "help":
        "Prompts per rollout (per process); RLOO and RAFT answer each rloo_k times."})
    mini_batch_size: int = field(default=8, metadata={"help": "Sequences per gradient step."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Adam learning rate (constant)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    # generation
    min_new_tokens: int = field(default=32, metadata={"help": "Each rollout's length limit is drawn from [min, max]."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens per response."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (also used for log-probs; part of the "
                                                              "policy, so eval's default is the same)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1: off)."})
    max_prompt_tokens: int = field(default=256, metadata={"help": "Longer prompts are cut in the middle."})
    generation_batch_size: int = field(default=0, metadata={
        "help": "Answers generated at once in a rollout (0: all of the step's; less: less memory)."})
    # reward
    allow_below_chance_reward: bool = field(default=False, metadata={"help": "Optimise a reward model whose "
                                            "held-out accuracy is below chance (its 95% interval under 0.5): "
                                            "refused without this, as it moves the policy against the preferences "
                                            "the RM was measured on."})
    score_clip: float = field(default=0.0, metadata={"help": "Clip the normalised RM score to +-this (0: off)."})
    missing_eos_penalty: float = field(default=0.0, metadata={
        "help": "Subtracted from the score of a response that never ends (0: off)."})
    # KL
    kl_estimator: str = field(default="k1", metadata={"choices": ("k1", "k3"), "help":
        "KL estimator of the adaptive controller and the logs (k3: >= 0, lower variance). The reward's per-token "
        "penalty is always k1, whose expected gradient is the KL's; k3's is biased."})
    kl_penalty: str = field(default="mean", metadata={"choices": ("mean", "sum"), "help":
        "How an answer's KL enters its reward. sum: -beta * KL_t on every token (Ziegler et al.), so a longer "
        "answer pays more and the policy learns to stop early; the penalty's expected gradient is the KL's. mean: "
        "each token's penalty scaled by (mean answer length of the step / this answer's length), so an answer pays "
        "beta * mean length * its mean KL per token whatever its own length; that is not the gradient of a KL (it "
        "weighs a short answer's tokens more), so beta then holds a length-normalised divergence, and the KL "
        "reported and targeted stays the plain sum."})
    init_kl_coef: float = field(default=0.05, metadata={"help": "Initial beta."})
    min_kl_coef: float = field(default=0.01, metadata={"help": "The adaptive controller never takes beta below "
                                                   "this: without a floor, a run whose KL stays under target_kl "
                                                   "lowers beta by 20% a step toward zero, and the KL then follows "
                                                   "the update's noise."})
    kl_budget: float = field(default=0.0, metadata={"help": "Stop the run at the first step whose rollout's mean KL "
                                                    "to the reference exceeds this, without updating on it (0: "
                                                    "off). Best-of-k's own KL, log k - (k-1)/k, is bonbon's natural "
                                                    "budget."})
    adaptive_kl: bool = field(default=True, metadata={"help": "Adapt beta toward target_kl (Ziegler et al.)."})
    target_kl: float = field(default=6.0, metadata={"help": "Target KL per response for the adaptive controller."})
    kl_horizon: int = field(default=0, metadata={"help": "Horizon of the adaptive controller in episodes (0: one "
                                                 "step's, so beta moves up to 20% a step and holds KL near the target "
                                                 "within a short run; 10,000 as in Ziegler et al. barely moves it)."})
    # advantages and losses
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    value_warmup_steps: int = field(default=1, metadata={"help": "PPO: the first N steps train only the value head "
                                                         "(the policy waits for a critic that is not cold)."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages per rollout."})
    bonbon_alpha: float = field(default=0.05, metadata={"help": "bonbon: weight of the SFT term on the best answer "
                                                        "(1 - this: the IPO term, divided by its target squared)."})
    sft_data: str = field(default="", metadata={
        "help": "Answers the policy also imitates: a `feedback export` output or a data build, whose pairs' preferred "
                "answers (`chosen`, to their `prompt`) are the targets. Each optimiser step adds sft_coef x the "
                "per-token NLL of sft_batch of them (InstructGPT's supervised mix; the loop's picks_coef feeds it "
                "the annotators' picks). One process only."})
    sft_coef: float = field(default=0.0, metadata={"help": "Weight of the --sft-data term (0: off)."})
    sft_batch: int = field(default=4, metadata={"help": "--sft-data answers per optimiser step, drawn afresh."})
    max_approx_kl: float = field(default=0.0, metadata={
        "help": "Stop a step's update after the first minibatch whose approximate KL to the rollout policy exceeds "
                "this (0: off)."})
    # model
    num_layers_unfrozen: int = field(default=2, metadata={
        "help": "Train the top k blocks + head + value head; the reference shares the frozen trunk (-1: all, "
                "full frozen copy as reference)."})
    value_grad_to_trunk: bool = field(default=False, metadata={
        "help": "Let the value loss also train the policy's unfrozen blocks (shared critic, as trlx)."})
    trunk_precision: str = field(default="auto", metadata={"choices": ("auto", "int8", "float32"), "help":
        "The frozen trunk (the blocks below the trained ones) as part of the policy. int8: quantised once when the "
        "run starts (per-channel weights, per-token activations), so the sampler, the update, the hydra reference "
        "and the trunk reuse all read the same int8 trunk and the RL math stays exact; recorded in the saved "
        "model's config.json (int8_trunk_blocks), so eval, ask and the next turn load it the same way. auto: int8 "
        "on a CPU (float32 where no int8 kernel runs, with a warning), float32 on a GPU."})
    sampler_precision: str = field(default="auto", metadata={"choices": ("auto", "int8", "float32"), "help":
        "The rollout sampler's copy of the trained top blocks and head. int8: re-quantised each step; each token's "
        "policy loss is then weighted by min(pi_old / pi_sampler, is_cap) (truncated importance sampling), and the "
        "mismatch is logged (sampler/k1, sampler/k3, sampler/capped). float32: the policy samples itself (weights "
        "exactly 1). auto: int8 on a CPU, float32 on a GPU."})
    is_cap: float = field(default=2.0, metadata={"help": "Truncated importance sampling: the largest weight "
                                                 "pi_old / pi_sampler of a token's policy loss (int8 sampler)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters; the reference is adapters-off."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    dtype: str = field(default="auto", metadata={"choices": DTYPE_CHOICES, "help":
        "auto: bfloat16 on a capable GPU, else float32. With bfloat16 the frozen trunk and reference are bf16, the "
        "trained weights float32 (master copy) and the forward runs under autocast."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute the LM's activations in the backward pass: less memory, about a third more compute."})
    # operation
    seed: int = field(default=0, metadata={"help": "Random seed."})
    log_every: int = field(default=1, metadata={"help": "Log metrics every N steps."})
    sample_every: int = field(default=10, metadata={"help": "Log a table of samples every N steps (0: off)."})
    save_every: int = field(default=10, metadata={"help": "Checkpoint every N steps."})
    resume: bool = field(default=True, metadata={"help": "Resume from the last checkpoint in OUT/checkpoints."})
    report_to: str = field(default="tensorboard", metadata={"choices": REPORT_TO_CHOICES,
                                                             "help": "tensorboard, wandb, both, or none."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required")
        grouped = ALGORITHMS[self.algorithm].grouped
        rollouts = self.prompts_per_step * (self.rloo_k if grouped else 1)
        if rollouts % self.mini_batch_size:
            raise ValueError(f"the {rollouts} answers of a rollout (prompts_per_step, x rloo_k with RLOO/RAFT) must be a "
                             "multiple of mini_batch_size")
        if grouped and self.rloo_k < 2:
            raise ValueError(f"--rloo-k must be at least 2 with {self.algorithm}: it compares each prompt's answers")
        if not 0 < self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("need 0 < min_new_tokens <= max_new_tokens")
        if not 0 <= self.bonbon_alpha <= 1:
            raise ValueError("--bonbon-alpha must be in [0, 1]")
        if self.sft_coef < 0 or self.sft_batch < 1:
            raise ValueError("--sft-coef must be >= 0 and --sft-batch >= 1")
        if bool(self.sft_data) != (self.sft_coef > 0):
            raise ValueError("--sft-data and --sft-coef go together: the answers to imitate, and a weight above 0")
        if self.kl_budget < 0 or self.min_kl_coef < 0:
            raise ValueError("--kl-budget and --min-kl-coef must be >= 0")
        if self.is_cap < 1:
            raise ValueError("--is-cap must be at least 1 (a cap below 1 would down-weight every token)")
        if self.lora and self.num_layers_unfrozen >= 0:
            self.num_layers_unfrozen = -1  # LoRA decides what trains


@dataclass
class ILQLConfig:
    """Implicit Language Q-Learning (Snell et al. 2022): offline RL from scored answers, no generation in training."""

    model: str = field(default="", metadata={"help": "The SFT model directory (or any causal LM id)."})
    data: str = field(default="", metadata={
        "help": "A `stackrlhf data build` output: the scored answers of its finetune and reward training splits."})
    out: str = field(default="outputs/ilql", metadata={"help": "Output directory."})
    reward_source: str = field(default="votes", metadata={
        "choices": ("votes", "rm"), "help": "votes: the answer's vote-based score; rm: the reward model's score."})
    reward: str = field(default="", metadata={"help": "Reward-model directory (with --reward-source rm)."})
    max_samples: int = field(default=0, metadata={"help": "Use at most this many scored answers (0: all)."})
    pairs_half: str = field(default="all", metadata={"choices": ("all", "proxy", "gold"), "help":
        "Learn only from the answers of one half of the questions: `proxy` when a gold RM (trained on the `gold` "
        "half) judges the result, so it stays held out."})
    max_prompt_tokens: int = field(default=128, metadata={"help": "Longer prompts are cut in the middle."})
    max_answer_tokens: int = field(default=128, metadata={"help": "Longer answers are cut (their reward kept)."})
    # optimisation
    steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = field(default=16, metadata={"aliases": ("batch_size",),
                                                                   "help": "Sequences per step (per process)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate (warm-up, then cosine)."})
    warmup_steps: int = field(default=20, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    # ILQL
    gamma: float = field(default=0.99, metadata={"help": "Discount."})
    tau: float = field(default=0.7, metadata={"help": "Expectile of the V loss (0.5: mean; -> 1: max over actions)."})
    cql_scale: float = field(default=0.1, metadata={"help": "Weight of the CQL (Q-as-logits cross-entropy) loss."})
    awac_scale: float = field(default=1.0, metadata={"help": "Weight of the language-model loss."})
    awac_beta: float = field(default=0.0, metadata={
        "help": "AWAC temperature: each token's LM loss is weighted by exp(awac_beta * (Q - V)) (0: plain LM loss)."})
    awac_max_weight: float = field(default=20.0, metadata={"help": "Largest AWAC weight."})
    alpha: float = field(default=0.01, metadata={"help": "Polyak rate: target <- alpha * online + (1 - alpha) * target."})
    steps_for_target_q_sync: int = field(default=1, metadata={"help": "Sync the target Q heads every N steps."})
    two_qs: bool = field(default=True, metadata={"help": "Two Q heads (the minimum is used), against overestimation."})
    num_layers_unfrozen: int = field(default=2, metadata={"help": "Train the top k blocks + head + Q/V heads (-1: all)."})
    dtype: str = field(default="auto", metadata={"choices": DTYPE_CHOICES, "help":
        "auto: bfloat16 on a capable GPU, else float32. With bfloat16 the frozen trunk is bf16, the trained weights "
        "and the Q/V heads float32 (master copy) and the forward runs under autocast."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute the LM's activations in the backward pass: less memory, about a third more compute."})
    # decoding defaults saved with the model
    beta: float = field(default=1.0, metadata={"help": "Decoding: logits + beta * (Q - V) (0: the plain LM)."})
    top_k: int = field(default=20, metadata={"help": "Decoding: sample among the top k after the shift (0: all)."})
    # operation
    seed: int = field(default=0, metadata={"help": "Random seed."})
    log_every: int = field(default=10, metadata={"help": "Log metrics every N steps."})
    save_every: int = field(default=200, metadata={"help": "Checkpoint every N steps."})
    resume: bool = field(default=True, metadata={"help": "Resume from the last checkpoint in OUT/checkpoints."})
    report_to: str = field(default="tensorboard", metadata={"choices": REPORT_TO_CHOICES,
                                                             "help": "tensorboard, wandb, both, or none."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: the SFT model directory")
        if not 0 < self.tau < 1:
            raise ValueError("tau must be in (0, 1)")
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if self.reward_source == "rm" and not self.reward:
            raise ValueError("--reward-source rm needs --reward RM_DIR")
