"""The annotation web app (FastAPI, server-rendered pages, one small script for keyboard shortcuts).

Every page needs a personal token: an ``Authorization: Bearer`` header, or a sign-in cookie after /login (the
cookie holds a server-side sign-in id, never the token, so logging out ends it). Dump HTML and model output are
untrusted: Markdown is rendered with raw HTML escaped, then sanitised (nh3), and a Content-Security-Policy
allows only this site's own script, so a ``<script>`` in either never runs. Wrong credentials on any route
count against the client's address (10 a minute, then 429 for wrong ones; a right one still gets in).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from pathlib import Path
from urllib.parse import urlsplit

import nh3
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt

from stackrlhf.data.attribution import http_url
from stackrlhf.data.schema import shard_file
from stackrlhf.feedback.store import MAX_COMMENT, MAX_ID, FeedbackStore, StoreError

HERE = Path(__file__).parent
COOKIE = "stackrlhf_token"
# img-src without remote hosts: opening a task never calls a server the answer's text names
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
LOGIN_FAILURES = 10  # wrong credentials per client address and window; more are answered 429
LOGIN_WINDOW_S = 60.0
MAX_TRACKED_ADDRESSES = 10_000  # the failure table's size at most (the stalest addresses go first)
COOKIE_DAYS = 30
log = logging.getLogger("stackrlhf.feedback")
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


def render_markdown(text: str) -> str:
    """Markdown -> safe HTML: raw HTML in the text is shown as text, and the result is sanitised again."""
    return nh3.clean(_markdown.render(text or ""), link_rel="noopener noreferrer nofollow")


class BadInput(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with a 413 before anything parses it: by its Content-Length
    when it has one, else by counting the chunks as they arrive. (A label form is a few hundred bytes.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self.refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self.refuse(send)

    async def refuse(self, send) -> None:
        await JSONResponse({"error": f"The request body is larger than {self.limit} bytes; nothing was stored."},
                           status_code=413)({"type": "http"}, None, send)


class FailureLimit:
    """Wrong credentials per client address in a sliding window. Entries expire with the window and the table
    holds at most ``max_addresses`` (least recently failed dropped first), so one-off addresses cannot grow it.
    Its methods never await: a handler checks and records with no other request in between."""

    def __init__(self, limit: int = LOGIN_FAILURES, window_s: float = LOGIN_WINDOW_S,
                 max_addresses: int = MAX_TRACKED_ADDRESSES):
        self.limit, self.window_s, self.max_addresses = limit, window_s, max_addresses
        self.failures: OrderedDict[str, deque] = OrderedDict()  # address -> recent failure times, stalest first
        self.lock = threading.Lock()

    def _expire(self, now: float) -> None:
        while self.failures:
            address, times = next(iter(self.failures.items()))
            if now - times[-1] < self.window_s:
                break
            del self.failures[address]

    def fail(self, address: str) -> bool:
        """Record a wrong credential from ``address``; True when it already had ``limit`` in the window (answer
        429). One lock around check and record: sync routes run in threads, and concurrent wrong tokens must
        not all be checked before any is counted."""
        with self.lock:
            now = time.monotonic()
            self._expire(now)
            times = self.failures.pop(address, None) or deque(maxlen=self.limit)
            blocked = len(times) >= self.limit and now - times[0] < self.window_s
            times.append(now)
            self.failures[address] = times
            while len(self.failures) > self.max_addresses:
                self.failures.popitem(last=False)
            return blocked


def text_fields(form) -> None:
    """Refuse (422) a form with a file where a text field belongs: nothing here takes an upload."""
    for name, value in form.multi_items():
        if not isinstance(value, str):
            raise BadInput(422, f"{name[:40]} must be a text field, not a file.")


def text_field(form, name: str, limit: int | None = None) -> str:
    """A form field as text, refused (422) when it holds a NUL (PostgreSQL cannot store one)."""
    value = form.get(name) or ""
    if not isinstance(value, str):
        raise BadInput(422, f"{name} must be a text field, not a file.")
    if "\x00" in value:
        raise BadInput(422, f"{name} must not contain NUL characters.")
    return value


def origin_of(value: str) -> str | None:
    """``scheme://host[:port]`` of an Origin or Referer value; None when it is not a URL (``null``, garbage)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def same_origin(request: Request, allowed_origins: frozenset[str] = frozenset()) -> bool:
    """A state-changing request from this site's own pages, or from an API client. A cross-site page's POST
    carries its own Origin (or Referer): refused, so it cannot sign a victim in as someone else (login CSRF)
    or submit in their name. A POST that signs in by cookie must say where it comes from (a browser always
    does); an API client (Bearer token, or no credential) may send neither header. The page's origin must be
    this server's Host, or one of ``allowed_origins`` (behind a proxy that rewrites Host)."""
    host = request.headers.get("host", "").lower()
    for header in ("origin", "referer"):
        value = request.headers.get(header)
        if value:
            origin = origin_of(value)
            return origin is not None and (origin.split("://", 1)[1] == host or origin in allowed_origins)
    by_cookie = COOKIE in request.cookies and not request.headers.get("authorization")
    return not by_cookie


def host_name(value: str) -> str:
    """The name in a Host header or an allowed-host entry, without port or IPv6 brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.index("]")] if "]" in value else value[1:]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def host_allowed(request: Request, allowed_hosts: frozenset[str]) -> bool:
    """The Host header names this server (a DNS-rebinding page reaches 127.0.0.1 under its own name)."""
    if not allowed_hosts or "*" in allowed_hosts:
        return True
    return host_name(request.headers.get("host", "")) in allowed_hosts


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def serve_config(db: str, host: str = "127.0.0.1", port: int = 8000, replication: int = 2,
                 cookie_secure: bool = False, allowed_hosts: list[str] | None = None,
                 allowed_origins: list[str] | None = None, trusted_proxies: list[str] | None = None):
    """uvicorn's settings for `feedback serve`. The client address is the TCP peer unless ``trusted_proxies``
    names the reverse proxies whose X-Forwarded-For is believed (a header anyone can send otherwise). Host
    names: the loopback names and ``host`` unless ``allowed_hosts`` says otherwise; any name when bound to
    every interface without a list (a warning says so)."""
    import uvicorn

    if not allowed_hosts:
        if host in ("0.0.0.0", "::", ""):
            log.warning("serving on every interface with no --allowed-host: any Host name is answered")
            allowed_hosts = ["*"]
        else:
            allowed_hosts = [*LOOPBACK_NAMES, host]
    app = create_app(db, replication=replication, cookie_secure=cookie_secure, allowed_hosts=allowed_hosts,
                     allowed_origins=allowed_origins)
    return uvicorn.Config(app, host=host, port=port, log_level="warning", proxy_headers=bool(trusted_proxies),
                          forwarded_allow_ips=",".join(trusted_proxies or []) or None)


def finite(value):
    """The value with every NaN or infinity replaced by None (JSON has no NaN; names stay untouched)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def create_app(db: str, replication: int = 2, max_comment: int = MAX_COMMENT, max_body: int = 64 * 1024,
               cookie_secure: bool = False, allowed_hosts: list[str] | None = None,
               allowed_origins: list[str] | None = None, failure_limit: FailureLimit | None = None) -> FastAPI:
    """The app over the store at ``db``. ``allowed_hosts``: Host names it answers (None: any; `feedback serve`
    passes the loopback names by default); ``allowed_origins``: page origins besides the Host's own that may
    post (``https://labels.example`` behind a proxy that rewrites Host)."""
    store = FeedbackStore(db)
    store.set_replication(replication)  # `simulate` and `stats` count against what the app serves with
    app = FastAPI(title="stackrlhf feedback", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_body)
    app.state.store = store
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["http_url"] = http_url
    failures = app.state.failures = failure_limit or FailureLimit()
    hosts = frozenset(host_name(h) if h != "*" else h for h in allowed_hosts or [])
    origins = frozenset(o.lower().rstrip("/") for o in allowed_origins or [])

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        if not host_allowed(request, hosts):
            response = JSONResponse({"error": "Unknown Host: this server answers only for the names it was given "
                                              "(`feedback serve --allowed-host`)."}, status_code=400)
        elif request.method == "POST" and not same_origin(request, origins):
            response = JSONResponse({"error": "Cross-site request refused: post from this site's own pages."},
                                    status_code=403)
        else:
            try:
                response = await call_next(request)
            except Exception:  # answered here, so even a failure carries the headers below
                log.exception("%s %s failed", request.method, request.url.path)
                response = JSONResponse({"error": "Internal error; it has been logged."}, status_code=500)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        # same-origin, not no-referrer: with no-referrer a browser sends `Origin: null` on our own form posts,
        # which the cross-site check must refuse (an attacker's page can make its own Origin null that way)
        response.headers["Referrer-Policy"] = "same-origin"
        if not request.url.path.startswith("/static/"):  # pages and exports hold annotators' data
            response.headers["Cache-Control"] = "no-store"
        return response

    def client_of(request: Request) -> str:
        return request.client.host if request.client else "?"

    def annotator_of(request: Request, count: bool = True):
        """The signed-in annotator, or None. A wrong credential counts against the client's address; once it
        has too many, wrong credentials are answered 429 (a right one still gets in)."""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            credential = auth[7:].strip()
            who = store.annotator_by_token(credential) or store.annotator_by_session(credential)
        else:
            credential = request.cookies.get(COOKIE)
            who = store.annotator_by_session(credential)
        if who is None and credential and count and failures.fail(client_of(request)):
            raise BadInput(429, f"Too many wrong tokens; wait {LOGIN_WINDOW_S:.0f} seconds and try again.")
        return who

    def set_cookie(response: Response, value: str, max_age: int) -> Response:
        response.set_cookie(COOKIE, value, httponly=True, samesite="strict", max_age=max_age, secure=cookie_secure)
        return response

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def message(request: Request, status: int, heading: str, text: str, annotator=None) -> HTMLResponse:
        return page(request, "message.html", status, heading=heading, message=text, kind="error",
                    annotator=annotator)

    @app.exception_handler(BadInput)
    @app.exception_handler(StoreError)
    async def bad_input(request: Request, exc: BadInput | StoreError):
        text = getattr(exc, "message", None) or str(exc)
        if "text/html" in request.headers.get("accept", ""):
            return message(request, exc.status, "That did not work", text, annotator_of(request, count=False))
        return JSONResponse({"error": text}, status_code=exc.status)

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request):
        return page(request, "login.html", annotator=None, error=None)

    @app.post("/login")
    async def login(request: Request):
        form = await request.form()  # read first: from here to the failure's record nothing awaits
        text_fields(form)
        token = text_field(form, "token")
        who = store.annotator_by_token(token)
        if who is None:
            if failures.fail(client_of(request)):
                return page(request, "login.html", 429, annotator=None,
                            error=f"Too many wrong tokens; wait {LOGIN_WINDOW_S:.0f} seconds and try again.")
            return page(request, "login.html", 401, annotator=None, error="Unknown token.")
        return set_cookie(RedirectResponse("/", status_code=303), store.start_session(who.id),
                          COOKIE_DAYS * 24 * 3600)

    @app.get("/logout")
    @app.post("/logout")
    def logout(request: Request):
        store.end_session(request.cookies.get(COOKIE))  # the sign-in ends on the server, not just in the browser
        return set_cookie(RedirectResponse("/login", status_code=303), "", 0)

    @app.get("/")
    def index(request: Request):
        who = annotator_of(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        task_id = store.next_task(who.id, replication)
        if task_id is None:
            done, total = store.progress(who.id, replication)
            return page(request, "message.html", heading="All done", kind="ok", annotator=who,
                        message=f"No tasks left for you: {done} labelled. Thank you!")
        return RedirectResponse(f"/task/{task_id}", status_code=303)

    def own_task(who, task_id: int):
        if not 1 <= task_id <= MAX_ID:  # beyond the id column's range: no such task (and no database error)
            raise BadInput(404, f"Task {task_id} is not one of your tasks.")
        task = store.get_task(task_id)
        if task is None or not store.is_assigned(task_id, who.id):
            raise BadInput(404, f"Task {task_id} is not one of your tasks.")
        return task

    @app.get("/task/{task_id}", response_class=HTMLResponse)
    def show_task(request: Request, task_id: int):
        who = annotator_of(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        task = own_task(who, task_id)
        label = store.label_of(task_id, who.id)
        ratings = label.ratings if label else {}
        candidates = [{"id": c.id, "letter": chr(ord("a") + c.position), "html": render_markdown(c.text),
                       "u": ratings.get(str(c.id), {}).get("usefulness"),
                       "a": ratings.get(str(c.id), {}).get("accuracy")} for c in task.candidates]
        done, total = store.progress(who.id, replication)
        best = None if label is None else ("tie" if label.best_candidate_id is None else label.best_candidate_id)
        return page(request, "task.html", annotator=who, task=task, candidates=candidates,
                    question_html=render_markdown(task.question), client_id=str(uuid.uuid4()),
                    done=done, total=total, best=best,
                    comment=label.comment if label else "", max_comment=max_comment)

    @app.post("/task/{task_id}")
    async def submit(request: Request, task_id: int):
        who = annotator_of(request)
        if who is None:
            raise BadInput(401, "Sign in first: no valid token.")
        task = own_task(who, task_id)
        form = await request.form()
        text_fields(form)
        client_id = text_field(form, "client_id")
        if not 8 <= len(client_id) <= 64:
            raise BadInput(400, "client_id is missing or malformed (8 to 64 characters).")
        skipped = str(form.get("skip") or "0") == "1"
        comment = text_field(form, "comment")
        if len(comment) > max_comment:
            raise BadInput(413, f"The comment is {len(comment)} characters; at most {max_comment} are allowed.")
        ratings, best = {}, None
        if not skipped:
            for c in task.candidates:
                letter = chr(ord("A") + c.position)
                row = {}
                for key, field in (("usefulness", f"u_{c.id}"), ("accuracy", f"a_{c.id}")):
                    raw = form.get(field)
                    if raw is None or raw == "":
                        raise BadInput(422, f"Answer {letter}: {key} is missing (1-5).")
                    try:
                        value = int(str(raw))
                    except ValueError:
                        raise BadInput(422, f"Answer {letter}: {key} must be a whole number 1-5, "
                                            f"got {str(raw)[:20]!r}.") from None
                    if not 1 <= value <= 5:
                        raise BadInput(422, f"Answer {letter}: {key} must be between 1 and 5, got {value}.")
                    row[key] = value
                ratings[c.id] = row
            choice = str(form.get("best") or "")
            ids = {str(c.id): c.id for c in task.candidates}
            if choice == "tie":
                best = None
            elif choice in ids:
                best = ids[choice]
            else:
                raise BadInput(422, "Choose the better answer (or a tie).")
        started = text_field(form, "started")
        if started and not (started.isascii() and started.isdigit() and len(started) <= 15):
            raise BadInput(422, "started must be the page's opening time in milliseconds since 1970 (digits).")
        seconds = max(time.time() - int(started) / 1000, 0.0) if started else 0.0
        stored = store.save_label(who.id, task_id, client_id, ratings, best, skipped, comment, min(seconds, 86400.0))
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse("/", status_code=303)
        return JSONResponse({"stored": stored, "task": task_id}, status_code=201 if stored else 200)

    @app.get("/api/progress")
    def api_progress(request: Request):
        who = annotator_of(request)
        if who is None:
            raise BadInput(401, "Sign in first: no valid token.")
        done, total = store.progress(who.id, replication)
        return {"done": done, "total": total}

    @app.get("/api/next")
    def api_next(request: Request):
        who = annotator_of(request)
        if who is None:
            raise BadInput(401, "Sign in first: no valid token.")
        task_id = store.next_task(who.id, replication)
        if task_id is None:
            return {"task": None}
        task = store.get_task(task_id)
        return {"task": task_id, "candidates": [c.id for c in task.candidates]}

    @app.get("/api/task/{task_id}")
    def api_task(request: Request, task_id: int):
        """A task as data, for API clients (the simulated annotators): the prompt and each candidate's text."""
        who = annotator_of(request)
        if who is None:
            raise BadInput(401, "Sign in first: no valid token.")
        task = own_task(who, task_id)
        return {"task": task.id, "site": task.site, "qid": task.qid, "question_link": task.question_link,
                "prompt": task.prompt, "title": task.title, "question": task.question,
                "candidates": [{"id": c.id, "text": c.text} for c in task.candidates]}

    def admin_of(request: Request):
        who = annotator_of(request)
        if who is None or not who.is_admin:
            raise BadInput(403, "This page needs an admin token.")
        return who

    @app.get("/admin", response_class=HTMLResponse)
    def admin(request: Request):
        from stackrlhf.feedback.export import feedback_stats

        who = admin_of(request)
        return page(request, "admin.html", annotator=who, stats=feedback_stats(store, replication))

    @app.get("/admin/stats.json")
    def admin_stats(request: Request):
        from stackrlhf.feedback.export import feedback_stats

        admin_of(request)
        return JSONResponse(json.loads(json.dumps(finite(feedback_stats(store, replication)), default=str)))

    @app.get("/admin/pairs.jsonl")
    def admin_pairs(request: Request):
        import tempfile

        import pyarrow.parquet as pq

        from stackrlhf.feedback.export import export_feedback

        admin_of(request)
        with tempfile.TemporaryDirectory() as tmp:
            export_feedback(store, Path(tmp) / "export")
            rows = pq.read_table(Path(tmp) / "export" / "reward" / shard_file("train")).to_pylist()
        return PlainTextResponse("".join(json.dumps(r, default=str) + "\n" for r in rows),
                                 media_type="application/x-ndjson")

    @app.get("/healthz")
    def health() -> Response:
        return PlainTextResponse("ok")

    return app
