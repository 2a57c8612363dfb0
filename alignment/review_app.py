"""The review app: browse a run's judge datasets and record corrections before training.

A small server-rendered Starlette + Jinja2 app (autoescaping on: model text is shown, never
executed). It reads the run directory only through :mod:`alignment.store` and shows complete
stages only (a stage without a manifest is listed as in progress), so it can be pointed at a
run that is still being written. Request parameters never become paths: the iteration is an
int checked against ``store.iterations()``, stage names against the stages the store reports.

It serves on localhost, but any page the reviewer opens can reach localhost, so
(:func:`guard`, :func:`correct` in :func:`create_app`):
- only the host names the server was started for are answered (DNS rebinding: a foreign
  ``Host`` is a 400, so a page on another name cannot read the data or the export);
- a correction needs the session's CSRF token (an HMAC of the session cookie with a secret of
  this server process) and, when the browser says where the form came from, this origin
  (``Origin: null``, a sandboxed frame or a ``data:`` page, is refused);
- forms are URL-encoded and at most ``MAX_FORM_BYTES`` (no multipart, no uploads);
- every response carries a CSP without inline script or style, ``frame-ancestors 'none'``,
  ``X-Frame-Options: DENY`` and ``nosniff``.

Data and filters: ``alignment.review_data``; view models: ``alignment.review_views``. GET handlers are plain functions, so Starlette runs them in
its thread pool and a first table load does not block other requests.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import socket
import threading
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.middleware import Middleware
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from alignment.corrections import EXPORT_FORMATS, add_correction, encode_pairs, load_corrections
from alignment.files import StoreError
from alignment.review_data import (
    CORE_STAGES,
    FILTERS,
    HIST_BINS,
    META_STAGES,
    PER_PAGE,
    SORTS,
    IterationState,
    Query,
    RunData,
    parse_query,
    select,
    small_int,
)
from alignment.review_urls import ITERATION_ROUTE
from alignment.review_views import (
    NOT_OVERRIDDEN,
    bar_chart,
    eval_charts,
    format_value,
    judge_identity,
    meta_judge_view,
    pretty_json,
    prompt_views,
    stage_page_of,
    training_curve_charts,
)
from alignment.store import RunStore




TEMPLATES_DIR = Path(__file__).resolve().parent / "review_templates"
STYLESHEET = Path(__file__).resolve().parent / "review_static" / "review.css"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SECURITY_HEADERS = {
    # No script at all; the one stylesheet is a file of ours (review_static/review.css).
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: under no-referrer browsers send `Origin: null` on a form post
    # even to the same origin, which the CSRF origin check must refuse (seen in Chromium).
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-store",  # pages carry the CSRF token and live data
}
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024  # a 2000-character note is at most 24 KiB URL-encoded
MAX_FORM_FIELDS = 20
CSRF_FIELD = "csrf_token"
_RETURN_TO_RE = re.compile(r"^/iter/\d+(/prompt)?(\?[\w\-.~%&=+]*)?$")


# ---------------------------------------------------------------------------- app


def create_app(run_dir, host: str = "127.0.0.1") -> Starlette:
    """The review app over ``run_dir`` (StoreError if it is not a run), answering only the host
    names of a server started on ``host`` (:func:`allowed_hosts`)."""
    store = RunStore.open(run_dir)
    secret = secrets.token_bytes(32)  # CSRF tokens of this server process only
    # Cookies ignore the port: a name of its own keeps two review servers on one host apart.
    session_cookie = "selfalign_review_" + hashlib.sha256(secret).hexdigest()[:12]
    stylesheet = STYLESHEET.read_text(encoding="utf-8")
    data = RunData(store)
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    templates.env.autoescape = True  # model text is data, never markup
    templates.env.trim_blocks = templates.env.lstrip_blocks = True
    templates.env.filters["fmt"] = format_value
    templates.env.globals.update(FILTERS=FILTERS, SORTS=SORTS, PER_PAGE=PER_PAGE,
                                 NOT_OVERRIDDEN=NOT_OVERRIDDEN, run_name=store.run_info().get("name"))

    def render(request: Request, name: str, context: dict, status: int = 200) -> HTMLResponse:
        """A page; it starts a session (cookie) if the browser has none, for the forms' token."""
        session = request.cookies.get(session_cookie, "")
        fresh = not SESSION_RE.match(session)
        if fresh:
            session = secrets.token_urlsafe(32)
        response = templates.TemplateResponse(request, name, {**context, "csrf_token": csrf_token(secret, session)},
                                              status_code=status)
        if fresh:
            response.set_cookie(session_cookie, session, httponly=True, samesite="strict")
        return response

    def iteration_of(request: Request) -> int:
        t = small_int(request.path_params["t"])
        if t is None or t not in store.iterations():
            raise HTTPException(404, f"iteration {request.path_params['t'][:20]} does not exist in this run")
        return t

    def check_csrf(request: Request, form: dict) -> None:
        """The form's token must be the one of the session cookie the browser sent with it."""
        session = request.cookies.get(session_cookie, "")
        token = form.get(CSRF_FIELD, "")
        # Bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
        expected = csrf_token(secret, session).encode() if SESSION_RE.match(session) else b""
        if not expected or not hmac.compare_digest(token.encode("utf-8", "replace"), expected):
            raise HTTPException(403, "this form is from an expired session or from another site: "
                                     "reload the page and submit it again")

    def state_of(t: int) -> IterationState:
        state = data.state(t)
        if state is None:
            raise HTTPException(404, f"iteration {t} has no complete judge stage yet (in progress)")
        return state

    def overview(request: Request) -> Response:
        status = store.status()
        iterations = []
        for t in store.iterations():
            state = data.state(t)
            manifests = {s["stage"]: store.manifest(t, s["stage"]) for s in status
                         if s["iteration"] == t and s["state"] == "done"}
            metrics = store.read_json(t, "metrics.json")
            iterations.append({
                "t": t,
                "stages": [s for s in status if s["iteration"] == t],
                "stats": state.stats if state else None,
                "histogram": bar_chart([f"{b:g}" for b in HIST_BINS], [("judgments", state.stats["histogram"])])
                if state else None,
                "manifests": manifests,
                "judged_by": judge_identity(manifests.get("judge"), t),
                "curves": training_curve_charts(metrics),
                "metrics_json": pretty_json(metrics) if metrics else None,
                # The eval stage's summary, as soon as the stage is complete (metrics.json comes later).
                "eval": (manifests.get("eval") or {}).get("info"),
            })
        with_stats = [i for i in iterations if i["stats"]]
        lengths = bar_chart([f"iter {i['t']}" for i in with_stats],
                            [("chosen", [i["stats"]["chosen_length"] for i in with_stats]),
                             ("rejected", [i["stats"]["rejected_length"] for i in with_stats])]) if with_stats else None
        return render(request, "overview.html", {"iterations": iterations, "lengths": lengths,
                                                 "evals": eval_charts([(i["t"], i["eval"]) for i in iterations]),
                                                 "run": store.run_info()})

    def browser_page(request: Request, t: int, error: str | None = None, status: int = 200) -> Response:
        state = state_of(t)
        try:
            query = parse_query(request.query_params)
        except ValueError as e:
            query, error, status = Query(), str(e), 400
        matched = select(state.summaries, query, state.judge.search(query.q) if query.q else None)
        pages = max(1, math.ceil(len(matched) / query.per_page))
        page = min(query.page, pages)
        shown = matched[(page - 1) * query.per_page: page * query.per_page]
        extra = extra_stages(t)
        return render(request, "iteration.html", {
            "t": t, "state": state, "query": query, "matched": len(matched), "page": page, "pages": pages,
            "items": list(zip(shown, prompt_views(state, [s["prompt_id"] for s in shown]))),
            "extra": extra, "error": error, "return_to": str(request.url.path) + (
                "?" + request.url.query if request.url.query else ""),
            "who": reviewer_of(request), "judged_by": judge_identity(store.manifest(t, "judge"), t),
        }, status)

    def iteration(request: Request) -> Response:
        return browser_page(request, iteration_of(request))

    def extra_stages(t: int) -> list[str]:
        return [s for s in data.complete_stages(t) if s not in CORE_STAGES and data.table_hash(t, s)]

    def prompt_page(request: Request, t: int, prompt_id: str, error: str | None = None,
                    status: int = 200, form: dict | None = None) -> Response:
        state = state_of(t)
        if prompt_id not in state.light:
            raise HTTPException(404, f"prompt {prompt_id!r} is not in iteration {t}")
        view = prompt_views(state, [prompt_id])[0]
        meta_tables = data.meta_tables(t)
        meta = meta_judge_view(meta_tables, prompt_id, view["responses"]) if meta_tables else None
        # The meta stages have their own section; the generic cards show any other stage's rows.
        generic = [s for s in extra_stages(t) if not (meta_tables and s in META_STAGES)]
        extra = {s: table.of(prompt_id) for s in generic if (table := data.indexed(t, s)) is not None}
        summary = next(s for s in state.summaries if s["prompt_id"] == prompt_id)
        return render(request, "prompt.html", {
            "t": t, "state": state, "view": view, "summary": summary, "meta": meta,
            "meta_off": meta_tables is not None and not meta_tables.judge_training,
            "meta_links": {s: stage_page_of(rows, prompt_id) for s, rows in meta_tables.by_stage().items()}
            if meta else {},
            "extra": {s: rows for s, rows in extra.items() if rows}, "error": error, "form": form or {},
            "return_to": f"/iter/{t}/prompt?" + urlencode({"id": prompt_id}),
            "who": reviewer_of(request),
        }, status)

    def prompt(request: Request) -> Response:
        return prompt_page(request, iteration_of(request), request.query_params.get("id", ""))

    async def correct(request: Request) -> Response:
        t = iteration_of(request)
        check_same_origin(request)
        form = await read_form(request)
        check_csrf(request, form)
        state = state_of(t)
        record = {k: v for k, v in form.items() if k in
                  ("action", "prompt_id", "response_index", "judgment_index", "value", "note", "who") and v != ""}
        record["iteration"] = t
        try:
            clean = add_correction(store, record, judge_rows=data.rows(t, "judge"))
        except ValueError as e:
            prompt_id = form.get("prompt_id", "")
            if prompt_id in state.light:
                return prompt_page(request, t, prompt_id, error=str(e), status=400, form=form)
            return browser_page(request, t, error=str(e), status=400)
        return_to = form.get("return_to", "")
        if not _RETURN_TO_RE.match(return_to) or not return_to.startswith(f"/iter/{t}"):
            return_to = f"/iter/{t}/prompt?" + urlencode({"id": clean["prompt_id"]})
        response = RedirectResponse(return_to, status_code=303)
        # Percent-encoded: a header is Latin-1, a name need not be (a 500 here would come after
        # the correction is stored, and a retry would store it twice).
        response.set_cookie("reviewer", quote(clean["who"], safe=""), samesite="strict", httponly=True)
        return response

    def corrections_page(request: Request) -> Response:
        t = iteration_of(request)
        state = data.state(t)
        return render(request, "corrections.html", {
            "t": t, "corrections": load_corrections(store, t), "applied": state.applied if state else set()})

    def export(request: Request) -> Response:
        t = iteration_of(request)
        fmt = request.query_params.get("format", "jsonl")
        if fmt not in EXPORT_FORMATS:
            raise HTTPException(400, f"format must be one of {', '.join(EXPORT_FORMATS)}")
        state = state_of(t)
        if not state.has_pairs:
            raise HTTPException(404, f"iteration {t} has no complete pairs stage yet")
        # state.pairs is corrections.review's output, as in reviewed_pairs (what training gets).
        body = encode_pairs(list(state.pairs.values()), fmt)
        media = "application/x-ndjson" if fmt == "jsonl" else "application/vnd.apache.parquet"
        return Response(body, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="pairs_iter_{t}_reviewed.{fmt}"'})

    def stage(request: Request) -> Response:
        t = iteration_of(request)
        name = request.path_params["stage"]
        if name not in data.complete_stages(t) or data.table_hash(t, name) is None:
            raise HTTPException(404, f"iteration {t} has no complete table stage {name!r}")
        # The same cached Arrow table the prompt pages index (meta stages): only this page becomes Python.
        rows = data.indexed(t, name)
        try:
            query = parse_query(request.query_params)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        pages = max(1, math.ceil(len(rows) / query.per_page))
        page = min(query.page, pages)
        shown = rows.table.slice((page - 1) * query.per_page, query.per_page).to_pylist()
        columns = list(dict.fromkeys(k for r in shown for k in r))
        return render(request, "stage.html", {"t": t, "stage": name, "rows": shown, "columns": columns,
                                              "total": len(rows), "page": page, "pages": pages, "query": query})

    async def stylesheet_file(request: Request) -> Response:
        return Response(stylesheet, media_type="text/css")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "run": str(store.root), "iterations": store.iterations()})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return render(request, "error.html", {"status": exc.status_code, "message": exc.detail}, exc.status_code)

    async def store_error(request: Request, exc: StoreError) -> Response:
        return render(request, "error.html", {"status": 500, "message": str(exc)}, 500)

    routes = [
        Route("/", overview),
        Route("/healthz", healthz),
        Route("/static/review.css", stylesheet_file),
        Route(ITERATION_ROUTE, iteration),
        Route(ITERATION_ROUTE + "/prompt", prompt),
        Route(ITERATION_ROUTE + "/corrections", corrections_page, methods=["GET"]),
        Route(ITERATION_ROUTE + "/corrections", correct, methods=["POST"]),
        Route(ITERATION_ROUTE + "/export", export),
        Route(ITERATION_ROUTE + "/stage/{stage}", stage),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, StoreError: store_error},
                    middleware=[Middleware(guard, allowed=allowed_hosts(host))])
    app.state.data = data
    return app


# ---------------------------------------------------------------------------- protections

SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


def csrf_token(secret: bytes, session: str) -> str:
    """token = hex HMAC-SHA256(secret, session): only this server process can make it, and it
    is good only with the session cookie it was made for."""
    return hmac.new(secret, session.encode("ascii"), hashlib.sha256).hexdigest()


def reviewer_of(request: Request) -> str:
    """The reviewer name remembered in the (percent-encoded) ``reviewer`` cookie."""
    return unquote(request.cookies.get("reviewer", ""))


def check_same_origin(request: Request) -> None:
    """Refuse form posts the browser says come from elsewhere (CSRF from another tab).

    Origin, when sent, must be this server (``Origin: null`` is a sandboxed frame or a
    ``data:`` page: refused); ``Sec-Fetch-Site``, when sent, must be same-origin. A post with
    neither still needs the session's token.
    """
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
        raise HTTPException(403, "cross-origin form posts are refused")
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HTTPException(403, "cross-site form posts are refused")


async def read_form(request: Request) -> dict[str, str]:
    """A URL-encoded form of at most ``MAX_FORM_BYTES`` / ``MAX_FORM_FIELDS`` (a repeated field:
    the last wins). Multipart (uploads) is a 415; a larger body a 413, read no further."""
    if request.headers.get("content-type", "").split(";", 1)[0].strip().lower() != FORM_TYPE:
        raise HTTPException(415, f"corrections are posted as {FORM_TYPE}")
    declared = small_int(request.headers.get("content-length", "0"))
    if declared is None or declared > MAX_FORM_BYTES:
        raise HTTPException(413, f"a correction form is at most {MAX_FORM_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, f"a correction form is at most {MAX_FORM_BYTES} bytes")
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS,
                              errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "the form is not valid UTF-8 URL-encoded data") from None


def allowed_hosts(host: str) -> frozenset[str]:
    """Host names a server bound to ``host`` answers: localhost's names and ``host`` itself;
    a wildcard bind (0.0.0.0, ::) adds this machine's name. Lower case, IPv6 without brackets."""
    names = {*LOCAL_HOSTS, host.strip("[]").lower()}
    if host in WILDCARD_HOSTS:
        names.add(socket.gethostname().lower())
    return frozenset(names - {""})


def host_name(header: str) -> str:
    """The name of a ``Host`` header without the port: ``[::1]:8765`` → ``::1``,
    ``Localhost:8765`` → ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def guard(app, allowed: frozenset[str]):
    """ASGI middleware: a request for a host name not in ``allowed`` is a 400 (DNS rebinding);
    every response gets ``SECURITY_HEADERS``."""
    encoded = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *[(k, v) for k, v in encoded if k not in present]]}
            await send(message)

        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_name(host) not in allowed:
            names = ", ".join(sorted(allowed))
            response = PlainTextResponse(f"400: this server answers only for the host names {names}", 400)
            return await response(scope, receive, send_with_headers)
        return await app(scope, receive, send_with_headers)

    return guarded


def serve(run_dir, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the review app on ``host:port`` until interrupted (localhost unless told otherwise)."""
    import uvicorn

    app = create_app(run_dir, host=host)
    # Read the tables while the browser opens, so the first page does not wait for them.
    threading.Thread(target=app.state.data.warm, name="review-warm", daemon=True).start()
    print(f"selfalign review: http://{host}:{port}/  (run {app.state.data.store.root}; Ctrl-C to stop)")
    print(f"  answers only for the host names {', '.join(sorted(allowed_hosts(host)))}")
    uvicorn.run(app, host=host, port=port, log_level="warning")
