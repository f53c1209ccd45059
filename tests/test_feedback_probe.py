"""The feedback app against what an outside probe tried: concurrent wrong logins, lockouts, forged client
addresses, skip-then-relabel, revoked and greedy annotators, malformed headers, file fields, names with NaN,
caching and logout, simulate reruns and flooding, CSRF edges. The concurrency cases use real connections to a
real server (a bounded number, with timeouts); the store's cases run on SQLite and on PostgreSQL."""

from __future__ import annotations

import socket
import sqlite3
import sys
import threading
import time
import uuid

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from stackrlhf.cli import cli
from stackrlhf.errors import StackRLHFError
from stackrlhf.feedback.app import LOGIN_FAILURES, FailureLimit, create_app
from stackrlhf.feedback.config import SimulateConfig
from stackrlhf.feedback.export import feedback_stats
from stackrlhf.feedback.simulate import sign_in_simulated
from stackrlhf.feedback.store import MAX_SUBMISSIONS_PER_TASK, Assignment, FeedbackStore, Submission

from helpers import free_port
from test_feedback import candidates, labels_in, question, rating_form
from test_feedback_hardening import bearer, setup

BROWSER = {"origin": "http://testserver"}


def sqlite_db(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'feedback.db'}"


class Served:
    """`feedback serve`'s app (its uvicorn settings, `serve_config`) in a thread of this process: no interpreter
    start per test. ``options`` are `serve_config`'s keyword arguments, as the CLI passes them."""

    def __init__(self, db: str, **options):
        import uvicorn

        from stackrlhf.feedback.app import serve_config

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(serve_config(db, "127.0.0.1", self.port, **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("the app did not start")

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# ---------------------------------------------------------------- 1-3: the failure limit

def slow_login(port: int, token: str, start: threading.Event, out: list, lock: threading.Lock) -> None:
    """POST /login with the headers now and the body only once ``start`` is set (a slow client)."""
    body = f"token={token}".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        start.wait(30)
        conn.sendall(body)
        status = int(conn.recv(64).split(b" ")[1])
    with lock:
        out.append(status)


def test_concurrent_wrong_logins_are_all_counted(tmp_path):
    db = sqlite_db(tmp_path)
    setup(db, tasks=1)
    with Served(db) as app:
        url, port = app.url, app.port
        start, lock, statuses = threading.Event(), threading.Lock(), []
        threads = [threading.Thread(target=slow_login, args=(port, f"wrong{i}", start, statuses, lock))
                   for i in range(40)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # every request is in, waiting for its body
        start.set()
        for t in threads:
            t.join(60)
        assert len(statuses) == 40
        assert statuses.count(401) == LOGIN_FAILURES and statuses.count(429) == 40 - LOGIN_FAILURES, statuses
        assert httpx.post(f"{url}/login", data={"token": "again"}).status_code == 429


def test_the_limit_survives_success_and_covers_every_route(tmp_path):
    db = sqlite_db(tmp_path)
    _, tokens = setup(db, tasks=1)
    client = TestClient(create_app(db))
    statuses = []
    for _ in range(3):  # 9 wrong tokens and the attacker's own right one, three times
        statuses += [client.post("/login", data={"token": f"wrong{i}"}, headers=BROWSER).status_code for i in range(9)]
        assert client.post("/login", data={"token": tokens["ann"]}, headers=BROWSER,
                           follow_redirects=False).status_code == 303
    assert statuses.count(401) == LOGIN_FAILURES and 429 in statuses
    for route in ("/api/progress", "/api/next"):  # wrong Bearer tokens and cookies count as well
        other = TestClient(create_app(db))
        codes = [other.get(route, headers=bearer(f"nope{i}")).status_code for i in range(LOGIN_FAILURES + 3)]
        assert codes[:LOGIN_FAILURES] == [401] * LOGIN_FAILURES and codes[LOGIN_FAILURES:] == [429] * 3
        other.cookies.set("stackrlhf_token", "forged")
        assert other.get(route).status_code == 429
        assert other.get(route, headers=bearer(tokens["bob"])).status_code == 200  # the right one gets in


def test_forwarded_addresses_are_trusted_only_from_a_named_proxy(tmp_path):
    db = sqlite_db(tmp_path)
    _, tokens = setup(db, tasks=1)
    for options, expect_429 in (({}, True), ({"trusted_proxies": ["127.0.0.1"]}, False)):
        with Served(db, **options) as app:
            url = app.url
            codes = [httpx.post(f"{url}/login", data={"token": "wrong"},
                                headers={"x-forwarded-for": f"10.0.{i}.1"}).status_code
                     for i in range(LOGIN_FAILURES + 2)]
            assert (429 in codes) is expect_429, (options, codes)  # by default the header names nobody
            # failures sent "in the victim's name" never lock out the victim's right token
            r = httpx.post(f"{url}/login", data={"token": tokens["ann"]}, headers={"x-forwarded-for": "10.0.0.1"})
            assert r.status_code == 303


def test_the_failure_table_expires_and_is_capped():
    limit = FailureLimit(limit=3, window_s=0.2, max_addresses=100)
    for i in range(2000):
        limit.fail(f"10.1.{i // 250}.{i % 250}")
    assert len(limit.failures) == 100  # one-off addresses cannot grow it
    time.sleep(0.25)
    limit.fail("10.9.9.9")
    assert list(limit.failures) == ["10.9.9.9"]  # the rest expired with the window
    assert [limit.fail("10.9.9.9") for _ in range(3)] == [False, False, True]


# ---------------------------------------------------------------- 4-6: slots

def test_a_skip_is_final_so_a_task_never_gets_more_labels_than_its_replication(db_url):
    _, tokens = setup(db_url, tasks=1)
    client = TestClient(create_app(db_url, replication=1))
    a, b = bearer(tokens["ann"]), bearer(tokens["bob"])
    task = client.get("/api/next", headers=a).json()
    assert client.post(f"/task/{task['task']}", data={"client_id": str(uuid.uuid4()), "skip": "1"},
                       headers=a).status_code == 201
    again = client.get("/api/next", headers=b).json()
    assert again["task"] == task["task"]
    assert client.post(f"/task/{task['task']}", data=rating_form(again, str(uuid.uuid4())), headers=b).status_code == 201
    late = client.post(f"/task/{task['task']}", data=rating_form(task, str(uuid.uuid4())), headers=a)
    assert late.status_code == 409 and "skipped" in late.json()["error"]
    assert sum(not lb.skipped for lb in labels_in(db_url)) == 1


def test_revoking_an_annotator_frees_their_task_and_ends_their_sign_ins(db_url):
    store, tokens = setup(db_url, tasks=1)
    client = TestClient(create_app(db_url, replication=1))
    assert client.get("/api/next", headers=bearer(tokens["ann"])).json()["task"] is not None
    browser = TestClient(create_app(db_url, replication=1))
    browser.post("/login", data={"token": tokens["ann"]}, follow_redirects=False)
    assert browser.get("/api/progress").status_code == 200
    assert client.get("/api/next", headers=bearer(tokens["bob"])).json()["task"] is None  # its one slot is held
    result = CliRunner().invoke(cli, ["feedback", "revoke", "ann", "--db", db_url])
    assert result.exit_code == 0 and "1 unlabelled task" in result.output, result.output
    assert browser.get("/api/progress").status_code == 401  # the sign-in cookie ended too
    task = client.get("/api/next", headers=bearer(tokens["bob"])).json()
    assert task["task"] is not None
    assert client.post(f"/task/{task['task']}", data=rating_form(task, str(uuid.uuid4())),
                       headers=bearer(tokens["bob"])).status_code == 201
    stats = feedback_stats(store, replication=1)
    assert stats["labels"] == 1 and stats["tasks_out_of_offers"] == 0


def test_concurrent_next_calls_give_one_annotator_one_task(db_url):
    store, tokens = setup(db_url, tasks=10)
    with Served(db_url, replication=1) as app:
        url = app.url
        got, errors, lock = [], [], threading.Lock()

        def ask() -> None:
            try:
                r = httpx.get(f"{url}/api/next", headers=bearer(tokens["ann"]), timeout=60)
                with lock:
                    got.append(r.json()["task"] if r.status_code == 200 else f"{r.status_code} {r.text[:200]}")
            except Exception as exc:  # a failed request is reported, not lost with its thread
                with lock:
                    errors.append(repr(exc))

        threads = [threading.Thread(target=ask) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert errors == [] and len(got) == 40 and len(set(got)) == 1, (errors, sorted(set(map(str, got))))
        held = [t for t in range(1, 11) if store.is_assigned(t, store.annotator_by_token(tokens["ann"]).id)]
        assert held == got[:1]


def test_many_lost_races_for_a_slot_still_give_a_task_never_none(db_url):
    """CI once saw "no task left" with 600 tasks open: 20 annotators raced for the same slot and one lost 50
    times in a row. Here 60 rivals each take, just before our commit, the very slot we are about to take."""
    store = FeedbackStore(db_url)
    for i in range(10):
        store.add_task(question(i), candidates(i))
    ours = store.annotator_by_token(store.add_annotator("ours")).id
    rivals = [store.annotator_by_token(store.add_annotator(f"rival{i}")).id for i in range(60)]
    rival_store, real_session = FeedbackStore(db_url), store.session

    def racing_session():
        session, commit = real_session(), None

        def lose_then_commit():
            taking = [row for row in session.new if isinstance(row, Assignment)]
            if rivals and taking:  # a rival takes our very (task, slot) first
                with rival_store.session() as other:
                    other.add(Assignment(task_id=taking[0].task_id, annotator_id=rivals.pop(), slot=taking[0].slot))
                    other.commit()
            commit()

        commit, session.commit = session.commit, lose_then_commit
        return session

    store.session = racing_session
    task = store.next_task(ours, replication=100)
    store.session = real_session
    assert not rivals  # all 60 races were run, and lost, before ours won
    assert task is not None and store.is_assigned(task, ours)


def test_first_concurrent_calls_on_a_fresh_store_all_find_a_task(tmp_path):
    """CI's other "no task left": the first calls on a new store object raced to build its cached count
    subqueries, and a query that joined one copy but filtered on the other found nothing (a cross join with an
    empty table). Twenty annotators ask at once, on a fresh store object each round."""
    url = sqlite_db(tmp_path)
    seed = FeedbackStore(url)
    for i in range(30):
        seed.add_task(question(i), candidates(i))
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so the first calls interleave
    try:
        for round_ in range(10):
            ids = [seed.annotator_by_token(seed.add_annotator(f"r{round_}-{i}")).id for i in range(20)]
            got = first_calls(FeedbackStore(url), ids)
            assert len(got) == 20 and None not in got, (round_, got)
    finally:
        sys.setswitchinterval(switch)


def first_calls(store: FeedbackStore, ids: list[int]) -> list:
    got, lock, start = [], threading.Lock(), threading.Barrier(len(ids))

    def ask(aid: int) -> None:
        start.wait()
        task = store.next_task(aid, replication=40)
        with lock:
            got.append(task)

    threads = [threading.Thread(target=ask, args=(a,)) for a in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return got


# ---------------------------------------------------------------- 7-10: headers, fields, names, sign-ins

def test_malformed_origin_or_referer_is_refused_not_a_500(tmp_path):
    db = sqlite_db(tmp_path)
    _, tokens = setup(db, tasks=1)
    client = TestClient(create_app(db), raise_server_exceptions=False)
    for header, value in (("origin", "http://[::1"), ("referer", "http://["), ("origin", "http://x:99999"),
                          ("origin", "javascript:alert(1)")):
        r = client.post("/login", data={"token": tokens["ann"]}, headers={header: value})
        assert r.status_code == 403 and "default-src 'self'" in r.headers["content-security-policy"], (value, r.text)


def test_a_file_where_a_text_field_belongs_is_refused(db_url):
    _, tokens = setup(db_url, tasks=1)
    client = TestClient(create_app(db_url))
    auth = bearer(tokens["ann"])
    task = client.get("/api/next", headers=auth).json()
    form = rating_form(task, str(uuid.uuid4()))
    r = client.post(f"/task/{task['task']}", data=form, files={"comment": ("evil.txt", b"x" * 3000)}, headers=auth)
    assert r.status_code == 422 and "not a file" in r.json()["error"]
    r = client.post("/login", files={"token": ("t.txt", tokens["ann"].encode())})
    assert r.status_code == 422
    assert labels_in(db_url) == []


def test_stats_json_keeps_names_that_contain_nan(tmp_path):
    db = sqlite_db(tmp_path)
    _, tokens = setup(db, tasks=1, names=("NaNa", "bob"))
    admin = FeedbackStore(db).add_annotator("root", admin=True)
    client = TestClient(create_app(db))
    assert client.get("/admin/stats.json", headers=bearer(admin)).json()["krippendorff_alpha"] is None  # NaN: null
    for name in ("NaNa", "bob"):
        task = client.get("/api/next", headers=bearer(tokens[name])).json()
        client.post(f"/task/{task['task']}", data=rating_form(task, str(uuid.uuid4())), headers=bearer(tokens[name]))
    stats = client.get("/admin/stats.json", headers=bearer(admin)).json()
    assert stats["labels_per_annotator"] == {"NaNa": 1, "bob": 1}
    assert list(stats["cohen_kappa"]) == ["NaNa~bob"] and stats["cohen_kappa"]["NaNa~bob"]["kappa"] == 1.0


def test_pages_are_not_cached_and_logout_ends_the_sign_in_on_the_server(db_url):
    _, tokens = setup(db_url, tasks=2)
    admin = FeedbackStore(db_url).add_annotator("root", admin=True)
    client = TestClient(create_app(db_url, cookie_secure=True), base_url="https://testserver")
    r = client.post("/login", data={"token": tokens["ann"]}, headers={"origin": "https://testserver"},
                    follow_redirects=False)
    login_cookie = r.headers["set-cookie"].lower()
    cookie = client.cookies.get("stackrlhf_token")
    assert cookie and cookie != tokens["ann"]  # a server-side sign-in id, not the token
    page = client.get("/", follow_redirects=True)
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    for path in ("/api/progress", "/admin/pairs.jsonl", "/admin/stats.json"):
        assert client.get(path, headers=bearer(admin)).headers["cache-control"] == "no-store", path
    out = client.get("/logout", follow_redirects=False)
    logout_cookie = out.headers["set-cookie"].lower()
    for flag in ("httponly", "secure", "samesite=strict"):
        assert flag in login_cookie and flag in logout_cookie, flag
    copied = TestClient(create_app(db_url), base_url="https://testserver")
    copied.cookies.set("stackrlhf_token", cookie)
    assert copied.get("/api/progress").status_code == 401  # a copied cookie stops working at logout


# ---------------------------------------------------------------- 11: simulate and flooding

def test_a_second_simulate_run_does_not_lock_out_the_first(tmp_path):
    db = sqlite_db(tmp_path)
    store = FeedbackStore(db)
    cfg = SimulateConfig(db=db, judge="rm:x", annotators=2)
    first = sign_in_simulated(store, cfg)
    second = sign_in_simulated(store, cfg)
    assert set(first) == set(second) == {"bot:sim-1", "bot:sim-2"}
    for credentials in (first, second):
        for credential in credentials.values():
            assert store.annotator_by_session(credential) is not None


def test_a_refused_name_clash_creates_nobody_and_names_are_kept_apart(tmp_path):
    path = tmp_path / "feedback.db"
    db = f"sqlite:///{path}"
    store = FeedbackStore(db)
    with sqlite3.connect(path) as conn:  # a person named like a simulated annotator, from an older version
        conn.execute("INSERT INTO annotators (name, token_hash, is_admin, kind, created) "
                     "VALUES ('bot:sim-2', 'x', 0, 'human', '2026-01-01 00:00:00')")
    with pytest.raises(StackRLHFError, match="is a person"):
        sign_in_simulated(store, SimulateConfig(db=db, judge="rm:x", annotators=3))
    assert [a.name for a in store.annotators()] == ["bot:sim-2"]  # bot:sim-1 was not left behind
    with pytest.raises(StackRLHFError, match="kept for simulated"):
        store.add_annotator("bot:carol")
    result = CliRunner().invoke(cli, ["feedback", "add-annotator", "bot:dave", "--db", db])
    assert result.exit_code != 0 and "kept for simulated" in result.output
    with pytest.raises(ValueError, match="--annotators"):
        SimulateConfig(db=db, judge="rm:x", annotators=10_000)


def test_one_annotator_cannot_flood_the_submissions_table(db_url):
    store, tokens = setup(db_url, tasks=1)
    client = TestClient(create_app(db_url))
    auth = bearer(tokens["ann"])
    task = client.get("/api/next", headers=auth).json()
    codes = [client.post(f"/task/{task['task']}", data=rating_form(task, str(uuid.uuid4()), best=i % 2),
                         headers=auth).status_code for i in range(MAX_SUBMISSIONS_PER_TASK + 5)]
    assert codes == [201] * MAX_SUBMISSIONS_PER_TASK + [429] * 5
    from sqlalchemy import func, select

    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Submission)) == MAX_SUBMISSIONS_PER_TASK


def test_agreement_and_ratings_never_pool_people_and_simulated_labels(db_url):
    store, tokens = setup(db_url, tasks=1, names=("ann",))
    bots = {}
    for name in ("bot:a", "bot:b"):
        bots[name] = store.add_annotator(name, kind="simulated")
    client = TestClient(create_app(db_url, replication=3))
    for credential, best in ((tokens["ann"], 0), (bots["bot:a"], 1), (bots["bot:b"], 1)):
        task = client.get("/api/next", headers=bearer(credential)).json()
        assert client.post(f"/task/{task['task']}", data=rating_form(task, str(uuid.uuid4()), best=best),
                           headers=bearer(credential)).status_code == 201
    stats = feedback_stats(store, 3)
    assert stats["statistics_of"] == "human" and stats["items_with_two_or_more_labels"] == 0
    assert stats["by_model"]["sft"]["chosen_best"] == 1.0  # the person's choice alone
    assert stats["by_kind"]["simulated"]["by_model"]["ppo"]["chosen_best"] == 1.0
    assert list(stats["by_kind"]["simulated"]["cohen_kappa"]) == ["bot:a~bot:b"]


# ---------------------------------------------------------------- 12: CSRF edges

def test_cookie_posts_need_an_origin_and_hosts_and_origins_are_checked(tmp_path):
    db = sqlite_db(tmp_path)
    _, tokens = setup(db, tasks=1)
    client = TestClient(create_app(db))
    client.post("/login", data={"token": tokens["ann"]}, follow_redirects=False)
    task = client.get("/api/next").json()
    form = rating_form(task, str(uuid.uuid4()))
    assert client.post(f"/task/{task['task']}", data=form).status_code == 403  # cookie, neither header
    assert client.post(f"/task/{task['task']}", data=form, headers=BROWSER).status_code == 201
    # an allowed-host list refuses a DNS-rebinding name, whatever Origin says
    pinned = TestClient(create_app(db, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://evil.example")
    r = pinned.post("/login", data={"token": tokens["bob"]}, headers={"origin": "http://evil.example"})
    assert r.status_code == 400 and "Host" in r.json()["error"]
    local = TestClient(create_app(db, allowed_hosts=["127.0.0.1"]), base_url="http://127.0.0.1:8000")
    assert local.get("/healthz").status_code == 200
    # behind a proxy that rewrites Host, the public origin is allowed by name
    proxied = TestClient(create_app(db, allowed_origins=["https://labels.example"]), base_url="http://internal:8000")
    r = proxied.post("/login", data={"token": tokens["bob"]}, headers={"origin": "https://labels.example"},
                     follow_redirects=False)
    assert r.status_code == 303
    assert proxied.post("/login", data={"token": tokens["bob"]}, headers={"origin": "https://other.example"},
                        follow_redirects=False).status_code == 403
    # `feedback serve` answers only loopback names by default
    with Served(db) as app:
        assert httpx.get(f"{app.url}/healthz", headers={"host": "evil.example"}).status_code == 400
        assert httpx.get(f"{app.url}/healthz").status_code == 200
    # and the CLI passes its options to those settings
    from stackrlhf.cli import cli as command

    help_text = CliRunner().invoke(command, ["feedback", "serve", "--help"]).output
    assert all(o in help_text for o in ("--allowed-host", "--allowed-origin", "--trusted-proxy"))
