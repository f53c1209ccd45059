"""The feedback app under hostile and unlucky input: fuzzed fields and ids never 500, late replays
and cross-annotator client ids, skips that free their slot, login CSRF, a login rate limit, Secure cookies,
token revocation, and links that are only ever http(s). On SQLite and on the PostgreSQL server CI starts."""

from __future__ import annotations

import os
import stat
import uuid

from click.testing import CliRunner
from fastapi.testclient import TestClient

from stackrlhf.cli import cli
from stackrlhf.config import write_text_atomic
from stackrlhf.feedback.app import LOGIN_FAILURES, create_app
from stackrlhf.feedback.export import feedback_stats
from stackrlhf.feedback.store import MAX_OFFERS_PER_SLOT, FeedbackStore

from test_feedback import candidates, labels_in, question, rating_form

NASTY = ["²", "9" * 300, "\x00", "a\x00b", "-1", "1e5", " ", "٣", "99999999999", str(2**63), "🍺" * 10, ""]


def setup(db: str, tasks: int = 3, names=("ann", "bob", "cat")) -> tuple[FeedbackStore, dict]:
    store = FeedbackStore(db)
    for i in range(tasks):
        store.add_task(question(i), candidates(i))
    return store, {n: store.add_annotator(n) for n in names}


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def test_fuzzed_fields_and_ids_are_4xx_never_500(db_url):
    _, tokens = setup(db_url)
    client = TestClient(create_app(db_url), raise_server_exceptions=False)
    auth = bearer(tokens["ann"])
    task = client.get("/api/next", headers=auth).json()
    good = rating_form(task, str(uuid.uuid4()))
    for field in [*good, "started", "skip"]:
        for value in NASTY:
            r = client.post(f"/task/{task['task']}", data=dict(good, **{field: value}, client_id=str(uuid.uuid4()))
                            if field != "client_id" else dict(good, client_id=value), headers=auth)
            assert r.status_code < 500, (field, value, r.text)
    for value in ["0", "-5", "99999999999", str(2**63), str(2**64 + 1), "9" * 40]:
        for method in ("get", "post"):
            r = getattr(client, method)(f"/task/{value}", headers=auth, **({"data": good} if method == "post" else {}))
            assert 400 <= r.status_code < 500, (method, value, r.text)
    r = client.post(f"/task/{task['task']}", data=dict(good, comment="bad\x00byte"), headers=auth)
    assert r.status_code == 422 and "NUL" in r.json()["error"]
    r = client.post(f"/task/{task['task']}", data=dict(good, started="²"), headers=auth)
    assert r.status_code == 422 and "milliseconds" in r.json()["error"]
    assert client.post("/login", data={"token": "x\x00y"}).status_code == 422


def test_a_late_replay_never_overwrites_a_newer_edit(db_url):
    _, tokens = setup(db_url)
    client = TestClient(create_app(db_url))
    auth = bearer(tokens["ann"])
    task = client.get("/api/next", headers=auth).json()
    c1, c2 = rating_form(task, str(uuid.uuid4()), best=0), rating_form(task, str(uuid.uuid4()), best=1)
    assert client.post(f"/task/{task['task']}", data=c1, headers=auth).status_code == 201
    assert client.post(f"/task/{task['task']}", data=c2, headers=auth).status_code == 201  # the edit
    late = client.post(f"/task/{task['task']}", data=c1, headers=auth)  # the first submission, delayed
    assert late.status_code == 200 and late.json()["stored"] is False
    [label] = labels_in(db_url)
    assert label.best_candidate_id == task["candidates"][1]


def test_client_ids_are_scoped_to_their_annotator(db_url):
    _, tokens = setup(db_url)
    client = TestClient(create_app(db_url))
    shared = "same-client-id-0001"
    for name in ("ann", "bob"):
        task = client.get("/api/next", headers=bearer(tokens[name])).json()
        r = client.post(f"/task/{task['task']}", data=rating_form(task, shared), headers=bearer(tokens[name]))
        assert r.status_code == 201 and r.json()["stored"] is True, name
    assert len(labels_in(db_url)) == 2


def test_a_skip_frees_the_slot_and_a_task_everyone_skips_ends(db_url):
    names = [f"a{i}" for i in range(MAX_OFFERS_PER_SLOT + 1)]
    store, tokens = setup(db_url, tasks=1, names=names)
    client = TestClient(create_app(db_url, replication=1))
    for i, name in enumerate(names):
        task = client.get("/api/next", headers=bearer(tokens[name])).json()
        if i < MAX_OFFERS_PER_SLOT:  # offered again after each skip
            assert task["task"] is not None, name
            r = client.post(f"/task/{task['task']}", data={"client_id": str(uuid.uuid4()), "skip": "1"},
                            headers=bearer(tokens[name]))
            assert r.status_code == 201
        else:  # out of offers: it ends
            assert task["task"] is None
    stats = feedback_stats(store, replication=1)
    assert stats["tasks_with_skips"] == 1 and stats["tasks_out_of_offers"] == 1


def test_a_skip_lets_another_annotator_label(db_url):
    store, tokens = setup(db_url, tasks=1)
    client = TestClient(create_app(db_url, replication=1))
    first = client.get("/api/next", headers=bearer(tokens["ann"])).json()
    assert client.get("/api/next", headers=bearer(tokens["bob"])).json()["task"] is None  # its one slot is held
    client.post(f"/task/{first['task']}", data={"client_id": str(uuid.uuid4()), "skip": "1"},
                headers=bearer(tokens["ann"]))
    again = client.get("/api/next", headers=bearer(tokens["bob"])).json()
    assert again["task"] == first["task"]
    r = client.post(f"/task/{again['task']}", data=rating_form(again, str(uuid.uuid4())), headers=bearer(tokens["bob"]))
    assert r.status_code == 201
    assert client.get("/api/next", headers=bearer(tokens["cat"])).json()["task"] is None  # labelled once: done


def test_login_csrf_rate_limit_secure_cookie_and_revoke(db_url):
    store, tokens = setup(db_url)
    client = TestClient(create_app(db_url, cookie_secure=True))
    r = client.post("/login", data={"token": tokens["ann"]}, headers={"origin": "https://evil.example"},
                    follow_redirects=False)
    assert r.status_code == 403 and "stackrlhf_token" not in r.headers.get("set-cookie", "")
    r = client.post("/login", data={"token": tokens["ann"]}, headers={"referer": "https://evil.example/page"},
                    follow_redirects=False)
    assert r.status_code == 403
    r = client.post("/login", data={"token": tokens["ann"]}, headers={"origin": "null"}, follow_redirects=False)
    assert r.status_code == 403  # an attacker's no-referrer page
    r = client.post("/login", data={"token": tokens["ann"]}, headers={"origin": "http://testserver"},
                    follow_redirects=False)
    assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
    for _ in range(LOGIN_FAILURES):
        assert client.post("/login", data={"token": "wrong"}).status_code == 401
    assert client.post("/login", data={"token": "wrong"}).status_code == 429
    r = client.post("/login", data={"token": tokens["bob"]}, follow_redirects=False)
    assert r.status_code == 303  # a right token still gets in: the lockout stops guesses, not the address's owner
    result = CliRunner().invoke(cli, ["feedback", "revoke", "cat", "--db", db_url])
    assert result.exit_code == 0, result.output
    assert TestClient(create_app(db_url)).get("/api/next", headers=bearer(tokens["cat"])).status_code == 401
    result = CliRunner().invoke(cli, ["feedback", "revoke", "nobody", "--db", db_url])
    assert result.exit_code != 0 and "no annotator named 'nobody'" in result.output


def test_only_http_links_become_hrefs_and_images_stay_local(db_url, tmp_path):
    store = FeedbackStore(db_url)
    store.add_task(dict(question(0), question_link="javascript:alert(1)"), candidates(0))
    token = store.add_annotator("ann")
    client = TestClient(create_app(db_url))
    page = client.post("/login", data={"token": token})
    assert page.status_code == 200 and "javascript:" not in page.text
    csp = page.headers["content-security-policy"]
    assert "img-src 'self' data:;" in csp and "https:" not in csp
    from stackrlhf.evaluate.report import _link

    assert "href" not in _link("javascript:alert(1)", "t") and 'href="https://x.example/q/1"' in _link(
        "https://x.example/q/1", "t")
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.html", "<p>hi</p>")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644
