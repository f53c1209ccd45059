"""CC BY-SA attribution for every derived example: the site, a link to the post, its author, the licence."""

from __future__ import annotations


def question_link(site: str, qid: int) -> str:
    return f"https://{site}/q/{qid}"


def answer_link(site: str, answer_id: int) -> str:
    return f"https://{site}/a/{answer_id}"


def post_license(creation_date: str | None) -> str:
    """The licence of a post by its creation date (ISO string), per Stack Exchange's terms."""
    day = (creation_date or "")[:10]
    if day and day < "2011-04-08":
        return "CC BY-SA 2.5"
    if day and day < "2018-05-02":
        return "CC BY-SA 3.0"
    return "CC BY-SA 4.0"


def author_name(display_name: str | None, user_id: int | None) -> str:
    """Users.xml DisplayName, else the post's OwnerDisplayName, else ``user<id>``, else ``anonymous``."""
    if display_name:
        return display_name
    if user_id is not None:
        return f"user{user_id}"
    return "anonymous"


def http_url(url: str | None) -> str:
    """``url`` when it is an http(s) link, else "": pages render links from the store and the dumps only through
    this, so a ``javascript:`` or ``data:`` URL in either never becomes an href."""
    url = (url or "").strip()
    return url if url.lower().startswith(("https://", "http://")) else ""
