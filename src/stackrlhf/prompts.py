"""The one prompt template. Every stage (data, SFT, RM, PPO, ILQL, feedback, eval) imports it from here,
so a model is always asked in exactly the format it was trained on."""

PROMPT_TEMPLATE = "Question: {title}\n\n{body}\n\nAnswer: "


def format_prompt(title: str, body: str) -> str:
    """The prompt for a question. A question without a title (hub data carries only the body)
    keeps the same shape with the body alone after ``Question: ``."""
    title = (title or "").strip()
    body = (body or "").strip()
    if not title:
        return f"Question: {body}\n\nAnswer: "
    return PROMPT_TEMPLATE.format(title=title, body=body)
