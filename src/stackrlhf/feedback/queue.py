"""Fill the feedback store with comparison tasks: K candidate answers per question from one or more models
(which model and which sampling settings made each is recorded), and optionally a real dump answer as a
control."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from stackrlhf.data.load import load_split
from stackrlhf.errors import StackRLHFError
from stackrlhf.feedback.store import FeedbackStore
from stackrlhf.models.answerer import Answerer, parse_model_spec
from stackrlhf.models.sampling import SamplingConfig


def queue_tasks(db: str, models: list[str], split: str = "rl", questions: int = 20,
                answers_per_question: int = 2, control: bool = False, sampling: SamplingConfig | None = None,
                data: str = "", seed: int = 0, batch: str = "", progress: bool = True, batch_size: int = 32) -> dict:
    if split not in ("rl", "evaluation"):
        raise StackRLHFError(f"--split {split}: use rl or evaluation")
    if control and split != "evaluation":
        raise StackRLHFError("--control needs --split evaluation (the rl split carries no answers)")
    if not models:
        raise StackRLHFError("--model is required (repeatable)")
    if batch_size < 1:
        raise StackRLHFError(f"--generation-batch-size {batch_size}: answers are generated at least one at a time (use >= 1)")
    n_generated = answers_per_question - (1 if control else 0)
    if n_generated < 1:
        raise StackRLHFError("--answers-per-question must leave room for at least one model answer")
    sampling = sampling or SamplingConfig()
    rows = load_split(data, split, "train" if split == "rl" else "test")
    order = np.random.RandomState(seed).permutation(len(rows))[:questions]
    picked = rows.select(sorted(order)).to_list()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = [parse_model_spec(m) for m in models]
    # candidate slots: answer k of a question comes from model k mod len(models), with its own seed
    slots = [(k, specs[k % len(specs)]) for k in range(n_generated)]
    answers: dict[int, list[dict]] = {i: [] for i in range(len(picked))}
    for spec in tqdm(specs, desc="models", disable=not progress):
        mine = [k for k, s in slots if s is spec]
        if not mine:
            continue
        model = Answerer(spec, device)
        for k in mine:
            gen = model.generate([q["prompt"] for q in picked], sampling, batch_size, seed + 1000 * k)
            for i, text in enumerate(gen.texts):
                answers[i].append({"text": text, "source": "model", "model": spec.name,
                                   "sampling": asdict(sampling) | {"seed": seed + 1000 * k, "path": spec.path,
                                                                    "beta": model.beta}})
        del model
    rng = np.random.RandomState(seed)
    store = FeedbackStore(db)
    for i, q in enumerate(picked):
        cands = answers[i]
        if control and q["answers"]:
            best = max(q["answers"], key=lambda a: a["score"])
            cands = cands + [{"text": best["text"], "source": "human", "answer_link": best["link"] or "",
                              "author": best["author"] or ""}]
        cands = [cands[j] for j in rng.permutation(len(cands))]  # no position gives the source away
        store.add_task(q, cands, split=split, batch=batch)
    return {"tasks": len(picked), "answers_per_question": answers_per_question, "control": control}
