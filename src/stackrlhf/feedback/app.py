"""The annotation web app (FastAPI, server-rendered pages, one small script for keyboard shortcuts).

Every page needs a personal token (a cookie after /login, or an ``Authorization: Bearer`` header). Dump
HTML and model output are untrusted: Markdown is rendered with raw HTML escaped, then sanitised (nh3), and a
Content-Security-Policy allows only this site's own script, so a ``<script>`` in either never runs.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import nh3
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt

from stackrlhf.data.attribution import http_url
from stackrlhf.data.schema import shard_file
from stackrlhf.feedback.store import MAX_COMMENT, MAX_ID, FeedbackStore

HERE = Path(__file__).parent
COOKIE = "stackrlhf_token"
# img-src without remote hosts: opening a task never calls a server the answer's text names
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
LOGIN_FAILURES = 10  # per client address and window; more are answered 429
LOGIN_WINDOW_S = 60.0
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


def text_field(form, name: str, limit: int | None = None) -> str:
    """A form field as text, refused (422) when it holds a NUL (PostgreSQL cannot store one)."""
    value = str(form.get(name) or "")
    if "\x00" in value:
        raise BadInput(422, f"{name} must not contain NUL characters.")
    return value


def same_origin(request: Request) -> bool:
    """A state-changing request from this site, or from no browser page at all (an API client sends neither
    header). A cross-site page's POST carries its own Origin (or Referer): refused, so it cannot sign a victim
    in as someone else (login CSRF) or submit in their name."""
    from urllib.parse import urlsplit

    host = request.headers.get("host", "")
    for header in ("origin", "referer"):
        value = request.headers.get(header)
        if value:
            return value != "null" and urlsplit(value).netloc == host
    return True


def create_app(db: str, replication: int = 2, max_comment: int = MAX_COMMENT, max_body: int = 64 * 1024,
               cookie_secure: bool = False) -> FastAPI:
    store = FeedbackStore(db)
    app = FastAPI(title="stackrlhf feedback", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_body)
    app.state.store = store
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["http_url"] = http_url
    failures: dict[str, list[float]] = {}

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        if request.method == "POST" and not same_origin(request):
            response = JSONResponse({"error": "Cross-site request refused: post from this site's own pages."},
                                    status_code=403)
        else:
            response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        # same-origin, not no-referrer: with no-referrer a browser sends `Origin: null` on our own form posts,
        # which the cross-site check must refuse (an attacker's page can make its own Origin null that way)
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    def annotator_of(request: Request):
        token = request.cookies.get(COOKIE)
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        return store.annotator_by_token(token)

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def message(request: Request, status: int, heading: str, text: str, annotator=None) -> HTMLResponse:
        return page(request, "message.html", status, heading=heading, message=text, kind="error",
                    annotator=annotator)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        if "text/html" in request.headers.get("accept", ""):
            return message(request, exc.status, "That did not work", exc.message, annotator_of(request))
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request):
        return page(request, "login.html", annotator=None, error=None)

    @app.post("/login")
    async def login(request: Request):
        client = request.client.host if request.client else "?"
        recent = [t for t in failures.get(client, []) if time.monotonic() - t < LOGIN_WINDOW_S]
        if len(recent) >= LOGIN_FAILURES:
            failures[client] = recent
            return page(request, "login.html", 429, annotator=None,
                        error=f"Too many wrong tokens; wait {LOGIN_WINDOW_S:.0f} seconds and try again.")
        form = await request.form()
        token = text_field(form, "token")
        if store.annotator_by_token(token) is None:
            failures[client] = recent + [time.monotonic()]
            return page(request, "login.html", 401, annotator=None, error="Unknown token.")
        failures.pop(client, None)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=30 * 24 * 3600,
                            secure=cookie_secure)
        return response

    @app.get("/logout")
    def logout():
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

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
                        raise BadInput(422, f"Answer {letter}: {key} must be a whole number 1-5, got {str(raw)[:20]!r}.")
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
        return JSONResponse(json.loads(json.dumps(feedback_stats(store, replication), default=str)
                                       .replace("NaN", "null")))

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
