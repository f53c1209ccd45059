"""The answer-score rule (one owner): Askell et al. 2021, as used by HuggingFaceH4/stack-exchange-preferences
and lvwerra/stack-exchange-paired, so that our pairs rank answers exactly as theirs do."""

from __future__ import annotations

import math


def answer_score(upvotes: int, accepted: bool) -> int:
    """``round(log2(1 + upvotes))``, plus 1 for the accepted answer; -1 whenever ``upvotes`` is negative.

    ``upvotes`` is the post's net ``Score`` by default (what the reference datasets use), or the true
    upvote count from Votes.xml with ``--upvotes-from votes``.
    """
    if upvotes < 0:
        return -1
    return round(math.log2(1 + upvotes)) + (1 if accepted else 0)
