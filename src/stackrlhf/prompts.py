"""The one prompt format. Every stage imports it from here, so a model is always asked the way it was trained.

The data stage stores each question as a plain prompt, ``Question: TITLE\\n\\nBODY\\n\\nAnswer: ``: that text is
what the reward models, the judges and the feedback app read. A policy is asked through :func:`encode_prompt`:

- a model whose tokenizer has a chat template (an instruction-tuned model such as SmolLM2-135M-Instruct) gets the
  question (title, blank line, body) as the user's message, rendered by its template with the assistant's turn
  opened; its answer ends with the tokenizer's EOS token (``<|im_end|>`` for ChatML templates);
- any other model (GPT-2, the offline base) gets the plain prompt as it is.

Either way a long question is cut in the middle of its text: the start (title) and the end survive, and so does
the format around it (the template's turn markers, or the plain ``Answer:`` cue).
"""

from __future__ import annotations

from stackrlhf.errors import StackRLHFError

PROMPT_TEMPLATE = "Question: {title}\n\n{body}\n\nAnswer: "
PLAIN_PREFIX = "Question: "
PLAIN_CUE = "\n\nAnswer:"
_SLOT = "\x00QUESTION\x00"  # a placeholder no question contains: splits a rendered template around the question


def format_prompt(title: str, body: str) -> str:
    """The plain prompt for a question. A question without a title (hub data carries only the body) or
    without a body (a one-line question typed at ``stackrlhf ask``) keeps the same shape."""
    title = (title or "").strip()
    body = (body or "").strip()
    if not title or not body:
        return f"Question: {title or body}\n\nAnswer: "
    return PROMPT_TEMPLATE.format(title=title, body=body)


def question_text(prompt: str) -> str:
    """The question inside a plain prompt (title, blank line, body), as a chat model's user message gets it.
    Text in another format (a hub dataset's bare question, say) is returned as it is, stripped."""
    text = prompt.strip()
    if text.startswith(PLAIN_PREFIX):
        text = text[len(PLAIN_PREFIX):]
    if text.endswith(PLAIN_CUE):
        text = text[: -len(PLAIN_CUE)]
    return text.strip()


def uses_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def chat_frame(tok) -> tuple[list[int], list[int]]:
    """The template's token ids before and after the user's message (system turn, markers, the opened assistant
    turn). Cached on the tokenizer: it is the same for every question."""
    cached = getattr(tok, "_stackrlhf_chat_frame", None)
    if cached is not None:
        return cached
    text = tok.apply_chat_template([{"role": "user", "content": _SLOT}], add_generation_prompt=True, tokenize=False)
    if text.count(_SLOT) != 1:
        raise StackRLHFError("the tokenizer's chat template does not render the user's message once; "
                             "give a model whose template does, or remove its chat_template to use the plain format")
    head, tail = text.split(_SLOT)
    frame = (tok(head, add_special_tokens=False)["input_ids"], tok(tail, add_special_tokens=False)["input_ids"])
    tok._stackrlhf_chat_frame = frame
    return frame


def fit_prompt_ids(ids: list[int], budget: int, keep_tail: int = 8) -> list[int]:
    """Cut a tokenized prompt to ``budget`` tokens by dropping from the middle: the start (title) and the last
    ``keep_tail`` tokens (the plain format's ``"\\n\\nAnswer: "`` cue, or the question's last words) are kept."""
    if len(ids) <= budget:
        return ids
    if budget <= keep_tail:
        return ids[-budget:]
    return ids[: budget - keep_tail] + ids[-keep_tail:]


def encode_prompt(tok, prompt: str, budget: int | None = None) -> list[int]:
    """The token ids a policy is asked ``prompt`` with (a plain prompt, see the module's docstring), at most
    ``budget`` tokens (None: no limit)."""
    if not uses_chat_template(tok):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        return ids if budget is None else fit_prompt_ids(ids, budget)
    head, tail = chat_frame(tok)
    question = tok(question_text(prompt), add_special_tokens=False)["input_ids"]
    if budget is None:
        return head + question + tail
    room = budget - len(head) - len(tail)
    if room < 1:
        raise StackRLHFError(f"a prompt budget of {budget} tokens leaves no room for the question: the chat "
                             f"template alone takes {len(head) + len(tail)}; raise the max prompt tokens")
    return head + fit_prompt_ids(question, room) + tail


def render_prompt(tok, prompt: str, budget: int | None = None) -> str:
    """:func:`encode_prompt` as text, special tokens kept (for trainers that take prompt strings, such as TRL's).
    A plain prompt that fits is returned unchanged."""
    if not uses_chat_template(tok) and (budget is None or len(tok(prompt, add_special_tokens=False)["input_ids"])
                                        <= budget):
        return prompt
    return tok.decode(encode_prompt(tok, prompt, budget), skip_special_tokens=False)
