"""Arrow schemas of the data stage's outputs: the contract every later stage reads.

Pair rows carry lvwerra/stack-exchange-paired's columns (qid, question, date, metadata, response_j,
response_k), TRL's preference columns (prompt, chosen, rejected) and our own (scores, ids, attribution).
Every row of every split carries ``site`` and ``qid`` and the CC BY-SA attribution.
"""

from __future__ import annotations

import pyarrow as pa


def shard_file(split: str, index: int = 0, count: int = 1) -> str:
    """The Parquet file of shard ``index`` of a split, in the hub's naming (``train-00000-of-00001.parquet``), so
    ``load_dataset`` finds the shards and reads them in order."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


_QUESTION_FIELDS = [
    pa.field("site", pa.string()),
    pa.field("qid", pa.int64()),
    pa.field("title", pa.string()),
    pa.field("question", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("date", pa.string()),
    pa.field("question_link", pa.string()),
    pa.field("question_author", pa.string()),
    pa.field("license", pa.string()),
]

ANSWER_STRUCT = pa.struct([
    pa.field("answer_id", pa.int64()),
    pa.field("text", pa.string()),
    pa.field("score", pa.int64()),
    pa.field("votes", pa.int64()),
    pa.field("accepted", pa.bool_()),
    pa.field("date", pa.string()),
    pa.field("author", pa.string()),
    pa.field("link", pa.string()),
])

# finetune: TRL's prompt-completion format (loss on the completion only), one row per question.
FINETUNE = pa.schema(_QUESTION_FIELDS + [
    pa.field("completion", pa.string()),
    pa.field("answer_id", pa.int64()),
    pa.field("answer_score", pa.int64()),
    pa.field("accepted", pa.bool_()),
    pa.field("answer_link", pa.string()),
    pa.field("answer_author", pa.string()),
])

# rl: prompts, with the best human answer (highest score) that only judges read (the simulated annotators'
# `reference` judge); RL trains on the prompt alone.
RL = pa.schema(_QUESTION_FIELDS + [
    pa.field("answer_count", pa.int64()),
    pa.field("reference_answer", pa.string()),
    pa.field("reference_answer_link", pa.string()),
    pa.field("reference_answer_author", pa.string()),
])

# evaluation: held-out questions with all their answers (best first).
EVALUATION = pa.schema(_QUESTION_FIELDS + [
    pa.field("best_answer", pa.string()),
    pa.field("answers", pa.list_(ANSWER_STRUCT)),
])

PAIRS = pa.schema([
    # lvwerra/stack-exchange-paired
    pa.field("qid", pa.int64()),
    pa.field("question", pa.string()),
    pa.field("date", pa.string()),
    pa.field("metadata", pa.list_(pa.string())),
    pa.field("response_j", pa.string()),
    pa.field("response_k", pa.string()),
    # TRL preference format
    pa.field("prompt", pa.string()),
    pa.field("chosen", pa.string()),
    pa.field("rejected", pa.string()),
    # scores, ids, where it came from
    pa.field("score_j", pa.int64()),
    pa.field("score_k", pa.int64()),
    pa.field("answer_id_j", pa.int64()),
    pa.field("answer_id_k", pa.int64()),
    pa.field("date_j", pa.string()),
    pa.field("date_k", pa.string()),
    pa.field("site", pa.string()),
    pa.field("title", pa.string()),
    pa.field("question_link", pa.string()),
    pa.field("answer_link_j", pa.string()),
    pa.field("answer_link_k", pa.string()),
    pa.field("question_author", pa.string()),
    pa.field("author_j", pa.string()),
    pa.field("author_k", pa.string()),
    pa.field("license", pa.string()),
    pa.field("source", pa.string()),
])

SCHEMAS = {"finetune": FINETUNE, "reward": PAIRS, "rl": RL, "evaluation": EVALUATION, "evaluation_pairs": PAIRS}
