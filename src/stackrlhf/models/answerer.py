"""The one "model that answers", used by ``ask``, ``feedback queue``, ``eval`` and the loop: a plain causal LM
(a model directory or hub id), a ``stackrlhf ilql`` output decoding with its beta shift, or best-of-n sampling
from a policy under a reward model; named by a spec ``NAME=PATH``, ``NAME=PATH@BETA``, ``NAME=bon:N@PATH`` or a
bare ``PATH``."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from stackrlhf.config import write_text_atomic
from stackrlhf.errors import StackRLHFError
from stackrlhf.models.generation import Generation, SamplingConfig, generate, pack_sequences
from stackrlhf.models.ilql import ILQLModel, ilql_generate, is_ilql_model
from stackrlhf.models.loading import load_causal_lm


@dataclass
class ModelSpec:
    name: str
    path: str
    beta: float | None = None  # ILQL only; None: the beta saved with the model
    best_of: int = 0  # best-of-n: sample n answers from PATH, keep the reward model's best (0: off)
    pool: int = 0  # best-of-n from a pool of this many samples per prompt, shared by every n of the same policy


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n nats per answer (Stiennon et al. 2020, appendix G.3): an
    upper bound, exact when the n samples are distinct."""
    return math.log(n) - (n - 1) / n


def parse_model_spec(text: str) -> ModelSpec:
    """``NAME=PATH``, ``NAME=PATH@BETA`` (ILQL), ``NAME=bon:N@PATH`` (best-of-n from PATH) or a bare ``PATH`` (named
    after its last folder; ``bon-N`` for a bare best-of-n)."""
    name, sep, path = text.partition("=")
    if path.startswith("bon:") or (not sep and text.startswith("bon:")):
        body = (path if sep else text)[4:]
        n, at, policy = body.partition("@")
        if not at or not policy or not n.isdigit() or int(n) < 1:
            raise StackRLHFError(f"--model {text}: best-of-n is bon:N@POLICY with N >= 1, e.g. bon4=bon:4@out/sft")
        return ModelSpec(name if sep else f"bon-{n}", policy, None, int(n))
    if not sep:
        name, path = Path(text.rstrip("/")).name or text, text
    beta = None
    if "@" in path:
        path, _, b = path.rpartition("@")
        try:
            beta = float(b)
        except ValueError as exc:
            raise StackRLHFError(f"--model {text}: the part after @ must be an ILQL beta, e.g. ilql=out/ilql@2") from exc
    if not name or not path:
        raise StackRLHFError(f"--model {text}: expected NAME=PATH")
    return ModelSpec(name, path, beta)


class Answerer:
    """A model as it answers: a plain causal LM, an ILQL model decoding with logits + beta * (Q - V), or best-of-n
    from a policy (``scorer(questions, answers) -> rewards`` picks; log-probs are the policy's). It samples with
    an int8 copy of its products when ``sampling.sampler_precision`` says so (:meth:`resolve`); its log-probs are
    always the float32 model's."""

    _int8 = None  # the int8 copy, built on first use (False: this model samples in float32)

    def __init__(self, spec: ModelSpec, device, scorer=None, cache: str | Path | None = None):
        self.spec = spec
        self.ilql = None
        self.scorer = scorer
        self.cache = Path(cache) if cache else None  # a folder keeping best-of-n pools across processes
        if spec.best_of and scorer is None:
            raise StackRLHFError(f"{spec.name}: best-of-{spec.best_of} needs a reward model to pick with")
        if is_ilql_model(spec.path):
            self.ilql, self.tok, saved = ILQLModel.from_pretrained(spec.path, device=device)
            self.lm = self.ilql.lm
            self.beta = saved.get("beta", 1.0) if spec.beta is None else spec.beta
            self.top_k = saved.get("top_k", 0)  # ILQL decodes with the top-k it was trained for (trlx: 20)
        else:
            if spec.beta is not None:
                raise StackRLHFError(f"{spec.name}: beta applies to ILQL models only; {spec.path} has no ILQL heads")
            self.lm, self.tok = load_causal_lm(spec.path, device=device)
            self.beta, self.top_k = None, 0
        self.lm.eval()

    @classmethod
    def from_model(cls, lm, tok, name: str = "model") -> Answerer:
        """A plain LM already in memory (a model just trained, say)."""
        answerer = cls.__new__(cls)
        answerer.spec, answerer.ilql, answerer.lm, answerer.tok = ModelSpec(name, ""), None, lm, tok
        answerer.beta, answerer.top_k, answerer.cache = None, 0, None
        return answerer

    def resolve(self, sampling: SamplingConfig) -> SamplingConfig:
        """``sampling`` with the precision this model really samples at (``auto`` -> int8 on a CPU when the int8
        copy can be made, else float32): what caches and records key on."""
        from stackrlhf.models.quant import quantize_for_sampling, resolve_precision

        device = next(self.lm.parameters()).device
        if self.ilql is not None or resolve_precision(sampling.sampler_precision, device) != "int8":
            return replace(sampling, sampler_precision="float32")
        if self._int8 is None:
            self._int8 = quantize_for_sampling(self.lm, self.tok, "int8") or False
        return replace(sampling, sampler_precision="int8" if self._int8 else "float32")

    def sampling_rule(self, sampling: SamplingConfig) -> SamplingConfig:
        """The rule this model's answers are really drawn by under ``sampling``: ILQL decodes with the top-k it was
        trained for unless ``sampling`` names one (a --top-k given wins)."""
        return replace(sampling, top_k=sampling.top_k or self.top_k) if self.ilql is not None else sampling

    def sampler(self, sampling: SamplingConfig):
        """The int8 copy to sample with under ``sampling`` as :meth:`resolve` returned it, or None (float32)."""
        return self._int8 or None if sampling.sampler_precision == "int8" else None

    def generate(self, prompts: list[str], sampling: SamplingConfig, batch_size: int = 8, seed: int | None = None,
                 streamer=None) -> Generation:
        sampling = self.resolve(sampling)
        if self.spec.best_of > 1:
            return self.best_of_n(prompts, sampling, batch_size, seed)
        progress = None if streamer is not None else f"{self.spec.name}: answering"
        if self.ilql is not None:
            sampling = self.sampling_rule(sampling)
            return ilql_generate(self.ilql, self.tok, prompts, sampling, self.beta, batch_size, seed, streamer,
                                 progress=progress)
        return generate(self.lm, self.tok, prompts, sampling, batch_size=batch_size, seed=seed, streamer=streamer,
                        progress=progress, int8=self.sampler(sampling))

    @torch.no_grad()
    def response_logprobs(self, batch: dict, temperature: float = 1.0, sampling: SamplingConfig | None = None):
        """log p(response token | prefix) under the distribution the model samples from at ``temperature``
        (the sampling temperature is part of the policy: KL is measured between tempered distributions). With
        ``sampling``, also (second) the log-probs under that rule applied to this model's float32 logits
        (temperature, top-k, top-p renormalised): what another sampler's draws are weighted against."""
        t = temperature if temperature > 0 else 1.0
        R = batch["responses"].shape[1]
        if self.ilql is None:
            logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"], use_cache=False, logits_to_keep=batch["keep"]).logits
            logp = F.log_softmax(logits[:, :R].float() / t, -1)
        else:
            h = self.ilql.hidden_states(batch["input_ids"], batch["attention_mask"],
                                        batch["position_ids"])[:, -batch["keep"]:][:, :R]
            logits = self.lm.get_output_embeddings()(h)
            logits = self.ilql.shifted_logprobs(logits, h, self.beta or 0.0)
            logp = F.log_softmax(logits / t, -1)
        mask = batch["response_mask"]
        tempered = logp.gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1) * mask
        if sampling is None:
            return tempered
        from stackrlhf.models.engine import sampling_logprobs

        flat = sampling_logprobs(logits[:, :R].reshape(-1, logits.shape[-1]), batch["responses"].reshape(-1),
                                 sampling).view_as(tempered)
        return tempered, flat.masked_fill(mask == 0, 0.0)

    _samples: dict = {}  # (policy dir and its weights' stamp, prompts, sampling, seed, pool size) -> Generation
    _scores: dict = {}  # (that key, scorer) -> the pool's rewards

    def best_of_n(self, prompts: list[str], sampling: SamplingConfig, batch_size: int, seed: int | None) -> Generation:
        """n samples per prompt from the policy; each prompt keeps the one the scorer rates highest. With
        ``spec.pool`` >= n the n are the first n of a pool of samples drawn once for every best-of-n of this policy
        (the first n of i.i.d. samples are n i.i.d. samples: each n is still best-of-n), and scored once per scorer:
        the loop's turns rescore v0's one pool with each turn's RM instead of sampling it again."""
        n = self.spec.best_of
        size = max(self.spec.pool, n)
        key = (self.spec.path, weights_stamp(self.spec.path), tuple(prompts), repr(sampling), seed, size)
        if key not in Answerer._samples:
            Answerer._samples.clear()  # one pool at a time: an evaluation asks for one policy's pool in a row
            Answerer._scores.clear()
            # a prompt's samples in one generation batch: its prompt is prefilled once for all of them
            Answerer._samples[key] = cached(self.cache, ("pool", *key), lambda: generate(
                self.lm, self.tok, [p for p in prompts for _ in range(size)], sampling,
                batch_size=max(batch_size, size), seed=seed, progress=f"{self.spec.name}: {size} samples a question",
                int8=self.sampler(sampling)))
        many = Answerer._samples[key]
        # the scorer object itself, not its id: an id can be reused once its object is gone
        if (key, self.scorer) not in Answerer._scores:
            Answerer._scores.clear()  # one scorer at a time: an old turn's reward model is not kept alive
            Answerer._scores[(key, self.scorer)] = list(self.scorer([p for p in prompts for _ in range(size)],
                                                                    many.texts))
        rewards = Answerer._scores[(key, self.scorer)]
        best = [i * size + max(range(n), key=lambda j: rewards[i * size + j]) for i in range(len(prompts))]
        return Generation(prompts=list(prompts), texts=[many.texts[b] for b in best],
                          prompt_ids=[many.prompt_ids[b] for b in best],
                          response_ids=[many.response_ids[b] for b in best],
                          finished=[many.finished[b] for b in best],
                          sampler_logprobs=([many.sampler_logprobs[b] for b in best] if many.sampler_logprobs
                                            else None))

    def logprobs_of(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
                    batch_size: int = 8, temperature: float = 1.0, sampling: SamplingConfig | None = None):
        """Per answer, the log-probs of its tokens under this model at ``temperature`` (a 1-D tensor each); with
        ``sampling``, also the list of their log-probs under that sampling rule (:meth:`response_logprobs`)."""
        device = next(self.lm.parameters()).device
        out, under_rule = [], []
        for start in range(0, len(prompt_ids), batch_size):
            p, r = prompt_ids[start:start + batch_size], response_ids[start:start + batch_size]
            got = self.response_logprobs(pack_sequences(p, r, self.tok.pad_token_id, device), temperature, sampling)
            logp, rule = (got[0].cpu(), got[1].cpu()) if sampling is not None else (got.cpu(), None)
            out.extend(logp[i, :len(ri)] for i, ri in enumerate(r))
            if rule is not None:
                under_rule.extend(rule[i, :len(ri)] for i, ri in enumerate(r))
        return (out, under_rule) if sampling is not None else out


def cached(cache: Path | None, key: tuple, make: Callable[[], Generation | dict]) -> Generation | dict:
    """``make()``, kept in ``cache`` (a folder; None: off) under a hash of ``key`` (which must name everything the
    result depends on: a model's :func:`weights_stamp`, the prompts, the sampling settings, the seed), and read
    back instead of made again. The loop evaluates v0, its best-of-n pool and the parent in every turn, each turn
    in a new process: they are sampled once."""
    if cache is None:
        return make()
    path = cache / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:32]}.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: made again and rewritten
        stored = {}
    if "generation" in stored:
        return Generation(**stored["generation"])
    if "value" in stored:
        return stored["value"]
    value = make()
    body = ({"generation": {k: v for k, v in asdict(value).items() if k != "trunk"}} if isinstance(value, Generation)
            else {"value": value})
    write_text_atomic(path, json.dumps(body))
    return value


def weights_stamp(path: str) -> tuple:
    """What changes when a model directory's weights are rewritten (name, size, mtime of each weights file); a
    hub id or missing path stamps as itself. Keys the best-of-n sample pool, so a retrained model is resampled."""
    folder = Path(path)
    if not folder.is_dir():
        return (path,)
    files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf") and f.is_file())
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def same_vocabulary(a, b) -> bool:
    """Two tokenizers that map every token to the same id (log-probs of one's tokens mean the same in the other)."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def sample_kl(policy: Answerer, reference: Answerer, prompts: list[str], sampling: SamplingConfig,
              batch_size: int = 8, seed: int = 0) -> list[float]:
    """Per prompt, log p_policy(y) - log p_ref(y) of one answer y sampled from the policy: a Monte-Carlo estimate of
    KL(policy || reference) per sequence (its mean over prompts is the KL the RL stages report)."""
    gen = policy.generate(prompts, sampling, batch_size, seed)
    mine = policy.logprobs_of(gen.prompt_ids, gen.response_ids, batch_size, sampling.temperature)
    ref = reference.logprobs_of(gen.prompt_ids, gen.response_ids, batch_size, sampling.temperature)
    return [float((a - b).sum()) for a, b in zip(mine, ref)]
