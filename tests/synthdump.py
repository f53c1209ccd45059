"""A made-up Stack Exchange dump of any size, for the tests that need a site-sized dump when ../shared is absent.

Its sentences are recombined from the tea dump in ``tests/data`` (CC0), so it has no licensed text: an answer's
score follows its quality (sentences drawn from the tea dump's well-voted answers or from its poorly voted ones,
and how many), so a reward model has something to learn and votes something to rank. It has the
official dump's layout: Posts.xml (questions, answers, a wiki post, accepted answers, owners by id and by name),
Users.xml and Votes.xml (one VoteTypeId 2 row per upvote, and some downvotes), with HTML bodies that hold
paragraphs, lists, links and code. The same ``seed`` gives the same bytes.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

TEA = Path(__file__).resolve().parent / "data" / "tea.example.com" / "Posts.xml"


def _sentences() -> tuple[list[str], list[str], list[str]]:
    """Question sentences, and the sentences of well-voted (score >= 3) and of poorly voted answers."""
    rows = ElementTree.parse(TEA).getroot()
    questions, good, poor = [], [], []
    for row in rows:
        text = re.sub(r"<[^>]+>", " ", row.get("Body", ""))
        parts = [p.strip() for p in re.split(r"(?<=[.?!])\s+", text) if len(p.strip()) > 3]
        if row.get("PostTypeId") == "1":
            questions.extend(parts)
        else:
            (good if int(row.get("Score", "0")) >= 3 else poor).extend(parts)
    return questions, good, poor


def _body(rng: random.Random, pool: list[str], n: int, index: int) -> str:
    parts = [f"<p>{' '.join(rng.sample(pool, min(n, len(pool))))}</p>"]
    if index % 5 == 0:
        parts.append(f"<ul><li>{rng.choice(pool)}</li><li>{rng.choice(pool)}</li></ul>")
    if index % 7 == 0:
        parts.append(f"<pre><code>brew --temperature {70 + index % 25} --minutes {1 + index % 4}\n</code></pre>")
    if index % 11 == 0:
        parts.append(f'<p>See <a href="https://example.com/tea/{index}">this guide</a>.</p>')
    return "\n".join(parts) + "\n"


def write_synthetic_dump(folder: Path, questions: int = 800, seed: int = 0) -> Path:
    """Writes the dump into ``folder`` (its name is the site's) and returns ``folder``."""
    rng = random.Random(seed)
    q_pool, good, poor = _sentences()
    folder.mkdir(parents=True, exist_ok=True)
    users = [(i, f"brewer{i}") for i in range(1, 41)]
    posts, votes = [], []
    post_id = 1
    for q in range(questions):
        day = f"2021-{1 + q % 12:02d}-{1 + q % 28:02d}"
        qid = post_id
        n_answers = rng.choice([0, 1, 2, 2, 3, 3, 4, 5])
        answer_ids = list(range(qid + 1, qid + 1 + n_answers))
        quality = [rng.random() for _ in answer_ids]
        sizes = [1 + round(3 * rng.random() * (0.5 + q)) for q in quality]
        scores = [round(12 * q + sizes[k] - 3 + rng.gauss(0, 1.5)) for k, q in enumerate(quality)]
        accepted = answer_ids[scores.index(max(scores))] if answer_ids and rng.random() < 0.6 else None
        owner = rng.choice(users)
        posts.append({"Id": qid, "PostTypeId": 1, "CreationDate": f"{day}T09:00:00.000", "Score": rng.randint(0, 9),
                      "ViewCount": rng.randint(10, 900), "Body": _body(rng, q_pool, 2, q),
                      "OwnerUserId": owner[0], "Title": f"{rng.choice(q_pool).rstrip('?.!')} (case {q})?",
                      "Tags": f"<tea><{rng.choice(['brewing', 'storage', 'leaves', 'water'])}>",
                      "AnswerCount": n_answers, "AcceptedAnswerId": accepted})
        for k, (aid, score) in enumerate(zip(answer_ids, scores)):
            owner = rng.choice(users)
            by_name = rng.random() < 0.1
            posts.append({"Id": aid, "PostTypeId": 2, "ParentId": qid, "CreationDate": f"{day}T{10 + k:02d}:00:00.000",
                          "Score": score, "Body": _body(rng, good if quality[k] > 0.5 else poor, sizes[k], aid),
                          "OwnerUserId": None if by_name else owner[0],
                          "OwnerDisplayName": f"guest{aid}" if by_name else None})
            votes += [(aid, 2)] * max(score, 0) + [(aid, 3)] * max(-score, 0)
        post_id += 1 + n_answers
        if q == questions // 2:  # a tag wiki: neither question nor answer
            posts.append({"Id": post_id, "PostTypeId": 5, "CreationDate": f"{day}T08:00:00.000", "Score": 0,
                          "Body": "<p>About tea.</p>\n"})
            post_id += 1
    _write(folder / "Posts.xml", "posts", posts)
    _write(folder / "Users.xml", "users", [{"Id": i, "DisplayName": name, "Reputation": 1 + i} for i, name in users])
    _write(folder / "Votes.xml", "votes", [{"Id": i + 1, "PostId": pid, "VoteTypeId": kind,
                                            "CreationDate": "2022-01-01T00:00:00.000"}
                                           for i, (pid, kind) in enumerate(votes)])
    return folder


def _write(path: Path, root: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'<?xml version="1.0" encoding="utf-8"?>\n<{root}>\n')
        for row in rows:
            attrs = " ".join(f"{k}={quoteattr(str(v))}" for k, v in row.items() if v is not None)
            f.write(f"  <row {attrs} />\n")
        f.write(f"</{root}>\n")
