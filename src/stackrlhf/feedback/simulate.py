"""``stackrlhf feedback simulate``: annotators with a known judge, labelling through the real app as people do.

What every annotation project wants before paying people (and what Gao et al. 2022 measure with): a gold judge
labels, a proxy reward model learns from those labels, RL optimises the proxy, the judge scores the result.
Each simulated annotator is an annotator of kind ``simulated`` in the store (so exports and stats never mix its
labels with people's without saying so), signs in with its own token, and over HTTP fetches ``/api/next``, reads
the task (``/api/task/ID``) and posts its ratings and preference to ``/task/ID``, with retries, several at once.

The judge (``models/judge.py``) gives each candidate answer a score s on a standard scale: ``rm:DIR``, a reward
model or ensemble, or ``reference``, the answer's embedding similarity to the question's best human answer plus
its relevance to the question; ``--judge-length-neutral`` takes the judge's trend in length off. The annotator prefers
answer i with probability softmax(s / noise)
(Bradley-Terry with temperature ``noise``; 0: always the judge's best), rates usefulness and accuracy as
round(3 + s + N(0, rating_noise)) clipped to 1-5, and skips a task with probability ``skip_rate``.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid

import httpx

from stackrlhf.errors import StackRLHFError
from stackrlhf.feedback.config import SimulateConfig
from stackrlhf.feedback.store import SIMULATED_PREFIX, FeedbackStore
from stackrlhf.models.judge import load_judge


def choose(scores: list[float], noise: float, rng: random.Random) -> int:
    """The preferred answer: softmax(scores / noise) sampled, or the best when noise is 0 (ties: the first)."""
    if noise == 0:
        return max(range(len(scores)), key=lambda i: scores[i])
    top = max(scores)
    weights = [math.exp((s - top) / noise) for s in scores]
    return rng.choices(range(len(scores)), weights=weights)[0]


def rating(score: float, noise: float, rng: random.Random) -> int:
    return int(min(5, max(1, round(3 + score + rng.gauss(0.0, noise)))))


def label_for(task: dict, scores: list[float], cfg: SimulateConfig, rng: random.Random) -> dict:
    """The form an annotator posts for ``task``."""
    form = {"client_id": uuid.UUID(int=rng.getrandbits(128)).hex, "started": str(int(time.time() * 1000))}
    if rng.random() < cfg.skip_rate:
        return {**form, "skip": "1"}
    for c, s in zip(task["candidates"], scores):
        form[f"u_{c['id']}"] = str(rating(s, cfg.rating_noise, rng))
        form[f"a_{c['id']}"] = str(rating(s, cfg.rating_noise, rng))
    form["best"] = str(task["candidates"][choose(scores, cfg.noise, rng)]["id"])
    return form


def request(client: httpx.Client, method: str, path: str, retries: int = 5, **kwargs) -> httpx.Response:
    """One API call, retried on connection errors and 5xx (a restarting server, a busy database)."""
    for attempt in range(retries):
        try:
            response = client.request(method, path, **kwargs)
            if response.status_code < 500:
                return response
        except httpx.TransportError:
            if attempt == retries - 1:
                raise
        time.sleep(0.2 * 2 ** attempt)
    return response


def annotate(base_url: str, token: str, judge, cfg: SimulateConfig, seed: int) -> int:
    """One annotator's session: label tasks until none is left (or ``max_labels``); returns how many."""
    rng = random.Random(seed)
    done = 0
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        while not cfg.max_labels or done < cfg.max_labels:
            nxt = request(client, "GET", "/api/next")
            if nxt.status_code != 200:
                raise StackRLHFError(f"/api/next: {nxt.status_code} {nxt.text[:200]}")
            task_id = nxt.json()["task"]
            if task_id is None:
                break
            task = request(client, "GET", f"/api/task/{task_id}").json()
            answers = [c["text"] for c in task["candidates"]]
            if judge.knows(task):
                form = label_for(task, judge.score([task] * len(answers), answers), cfg, rng)
            else:  # nothing to judge against (an unanswered question): skip it, as a person unsure would
                form = {"client_id": uuid.UUID(int=rng.getrandbits(128)).hex, "skip": "1",
                        "comment": "simulated: the judge has no reference answer for this question"}
            posted = request(client, "POST", f"/task/{task_id}", data=form)
            if posted.status_code >= 400:
                raise StackRLHFError(f"/task/{task_id}: {posted.status_code} {posted.text[:200]}")
            done += 1
    return done


def sign_in_simulated(store: FeedbackStore, cfg: SimulateConfig) -> dict[str, str]:
    """The run's annotators (made when new) and a fresh sign-in for each: {name: credential}. Tokens are never
    reissued, so a second run with the same names does not lock the first one out; a name held by a person
    refuses the run before any annotator is made."""
    existing = {a.name: a for a in store.annotators()}
    names = [f"{SIMULATED_PREFIX}{cfg.name_prefix}-{i}" for i in range(1, cfg.annotators + 1)]
    people = [n for n in names if n in existing and existing[n].kind != "simulated"]
    if people:  # checked before any annotator is made, so a refused run leaves the store as it was
        raise StackRLHFError(f"annotator {people[0]} exists and is a person; choose another --name-prefix")
    for name in names:
        if name not in existing:
            store.add_annotator(name, kind="simulated")
    ids = {a.name: a.id for a in store.annotators() if a.name in names}
    return {name: store.start_session(ids[name]) for name in names}


def simulate(cfg: SimulateConfig) -> dict:
    """Create (or reuse) the simulated annotators, run them concurrently against the app; returns labels made."""
    store = FeedbackStore(cfg.db)
    judge = load_judge(cfg.judge, cfg.data, cfg.judge_length_neutral)
    tokens = sign_in_simulated(store, cfg)
    server = None
    url = cfg.url
    if not url:
        server, url = start_local_app(cfg.db, store.replication(cfg.replication))
    counts: dict[str, int] = {}
    errors: list[BaseException] = []

    def run(name: str, index: int) -> None:
        try:
            counts[name] = annotate(url, tokens[name], judge, cfg, cfg.seed * 1000 + index)
        except BaseException as exc:  # reported after every thread ends
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name, i)) for i, name in enumerate(tokens)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        if server is not None:
            server.should_exit = True
        for token in tokens.values():
            store.end_session(token)
    if errors:
        raise errors[0]
    return {"labels": sum(counts.values()), "per_annotator": counts, "url": url}


def start_local_app(db: str, replication: int):
    """The real app (uvicorn) on a free loopback port, in a thread, for the length of a run."""
    import socket

    import uvicorn

    from stackrlhf.feedback.app import serve_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(serve_config(db, "127.0.0.1", port, replication))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.05)
    raise StackRLHFError("the local feedback app did not start")
