"""The one prompt template. Every stage (data, SFT, RM, PPO, ILQL, feedback, eval) imports it from here,
so a model is always asked in exactly the format it was trained on."""

PROMPT_TEMPLATE = "Question: {title}\n\n{body}\n\nAnswer: "


def format_prompt(title: str, body: str) -> str:
    """The prompt for a question. A question without a title (hub data carries only the body) or
    without a body (a one-line question typed at ``stackrlhf ask``) keeps the same shape."""
    title = (title or "").strip()
    body = (body or "").strip()
    if not title or not body:
        return f"Question: {title or body}\n\nAnswer: "
    return PROMPT_TEMPLATE.format(title=title, body=body)


def fit_prompt_ids(ids: list[int], budget: int, keep_tail: int = 8) -> list[int]:
    """Cut a tokenized prompt to ``budget`` tokens by dropping from the middle of the question body:
    the start (title) and the last ``keep_tail`` tokens (the ``"\\n\\nAnswer: "`` cue) are kept."""
    if len(ids) <= budget:
        return ids
    if budget <= keep_tail:
        return ids[-budget:]
    return ids[: budget - keep_tail] + ids[-keep_tail:]
