"""The HTTP face of :class:`adaptune.serve.engine.Engine`: a Starlette (ASGI) application.

Starlette is the small, well-kept ASGI toolkit FastAPI is built on: routing, streaming responses
(server-sent events) and lifespan events, without a validation layer we would not use (each body
is checked by hand, to answer every bad request with one line). Uvicorn serves it
(:func:`adaptune.serve.run`).

Every error is ``{"error": "<one line>"}`` with a 4xx/5xx status; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adaptune.errors import AdaptuneError, NameConflict
from adaptune.serve.engine import Engine, QueueFull, UnknownTask
from adaptune.serve.metrics import Metrics
from adaptune.serve.page import PAGE

log = logging.getLogger("adaptune.serve")


@dataclass
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 1 << 20
    max_inputs: int = 64
    max_chars: int = 20_000
    timeout_s: float = 30.0
    max_choices: int = 16


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0] if message else "error"}, status, headers=headers)


async def _body(request: Request, limit: int) -> dict:
    """The request's JSON object, read up to ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body of {declared} bytes is over the limit of {limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body is over the limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return body


def _rows(body: dict, limits: Limits, info: dict | None) -> list[tuple[str, str | list[str] | None]]:
    """``inputs`` as (text, pair) rows: strings, or [text, pair] / {"text", "pair"} for pair tasks
    (a question and its context, for QA); a multiple-choice task's [question, [choice, ...]] /
    {"text", "choices"} give the list of choices as the pair."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise HTTPError(422, '"inputs" must be a non-empty list of texts')
    if len(inputs) > limits.max_inputs:
        raise HTTPError(413, f"{len(inputs)} inputs are over the limit of {limits.max_inputs} per request")
    choice = bool(info) and info["task_type"] == "multiple-choice"
    rows = []
    for i, item in enumerate(inputs):
        text, pair = _text_and_pair(item, choice)
        if choice:
            if not isinstance(text, str) or not _texts(pair, 2):
                raise HTTPError(422, f'inputs[{i}] must be {{"text": question, "choices": [two or more texts]}}')
            if len(pair) > limits.max_choices:
                raise HTTPError(413, f"inputs[{i}] has {len(pair)} choices, over {limits.max_choices} (--max-choices)")
        elif not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
            raise HTTPError(422, f"inputs[{i}] must be a text, or [text, pair] for a pair task")
        elif info and info["text_pair"] and pair is None:
            what = "[question, context]" if info["task_type"] == "question-answering" else "[text, pair]"
            raise HTTPError(422, f"inputs[{i}]: this task takes text pairs: give {what}")
        elif info and not info["text_pair"] and pair is not None:
            raise HTTPError(422, f"inputs[{i}]: this task takes one text per input, not pairs")
        parts = [text, *(pair if isinstance(pair, list) else [pair or ""])]
        if sum(map(len, parts)) > limits.max_chars:
            raise HTTPError(413, f"inputs[{i}] has over {limits.max_chars} characters (--max-chars)")
        if not all(map(_encodable, parts)):
            raise HTTPError(422, f"inputs[{i}] holds a character that is not text (a lone UTF-16 surrogate)")
        rows.append((text, pair))
    return rows


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode text (JSON may carry lone surrogates; tokenizers refuse them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _texts(items, least: int) -> bool:
    return isinstance(items, list) and len(items) >= least and all(isinstance(x, str) for x in items)


def _text_and_pair(item, choice: bool = False) -> tuple:
    """An input as (text, pair): a string, [text, pair] or {"text", "pair"} ({"text", "choices"}
    for multiple choice); (None, None) for anything else (a list of another length, a number),
    which the caller refuses."""
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict):
        return item.get("text"), item.get("choices" if choice else "pair")
    if isinstance(item, list) and len(item) == 2:
        return item[0], item[1]
    return None, None


async def _wait(future, timeout: float):
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except TimeoutError:
        future.cancel()  # if it still waits in the queue, the batcher skips it
        raise HTTPError(504, f"no answer within {timeout:g} s (--timeout-s); the server is busy") from None


def _submit(fn, *args, **kw):
    """Queue work on the engine, mapping its refusals to HTTP errors."""
    try:
        return fn(*args, **kw)
    except QueueFull as e:
        raise HTTPError(503, str(e), {"Retry-After": "1"}) from None
    except UnknownTask as e:
        raise HTTPError(404, str(e)) from None
    except AdaptuneError as e:
        raise HTTPError(400, str(e)) from None


class _Api:
    """The endpoints, over one engine."""

    def __init__(self, engine: Engine, limits: Limits, token: str | None, root: Path | None, base_name) -> None:
        self.engine, self.limits, self.token, self.root, self.base_name = engine, limits, token, root, base_name
        self.metrics = Metrics(lambda: engine.queue_depth)
        engine.on_batch = self.metrics.on_batch

    def admin(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise HTTPError(401, "this endpoint needs 'Authorization: Bearer <token>' (the server's --token)")

    def unknown(self, task: str) -> HTTPError:
        return HTTPError(404, f"unknown task {task!r}; served: {', '.join(self.engine.tasks()) or 'none'}")

    async def predict(self, request: Request) -> Response:
        body = await _body(request, self.limits.max_body_bytes)
        task = body.get("task")
        if not isinstance(task, str):
            raise HTTPError(422, '"task" must be the name of a served task (GET /v1/tasks)')
        info = self.engine.tasks().get(task)
        if info is None and self.engine.kind == "predict":
            raise self.unknown(task)
        request.state.task = task  # a served task: a metrics label (unknown names never become one)
        rows = _rows(body, self.limits, info)
        request.state.rows = len(rows)
        results = await _wait(_submit(self.engine.predict, task, rows), self.limits.timeout_s)
        return JSONResponse({"task": task, "outputs": results})

    async def generate(self, request: Request) -> Response:
        body = await _body(request, self.limits.max_body_bytes)
        task, options = _generate_options(body, self.limits)
        if task is not None and not self.engine.has_task(task):
            raise self.unknown(task)
        request.state.task = task or "base"
        prompt = options.pop("prompt")
        if not body.get("stream"):
            reply = await _wait(_submit(self.engine.generate, task, prompt, **options), self.limits.timeout_s)
            return JSONResponse({"task": task, "text": reply})
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        stream = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
        future = _submit(self.engine.generate, task, prompt, stream=stream, **options)
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(pieces.put_nowait, None))
        return StreamingResponse(_events(future, pieces), media_type="text/event-stream")

    async def tasks(self, request: Request) -> Response:
        base = {"model": self.base_name, "fingerprint": self.engine.base_fingerprint}
        return JSONResponse({"kind": self.engine.kind, "base": base, "tasks": self.engine.tasks()})

    async def load(self, request: Request) -> Response:
        self.admin(request)
        if self.root is None:
            raise HTTPError(403, "loading adapters at run time is off: start the server with --adapter-root DIR")
        body = await _body(request, self.limits.max_body_bytes)
        path, name = body.get("path"), body.get("name")
        if not isinstance(path, str) or (name is not None and not isinstance(name, str)):
            raise HTTPError(422, '"path" must be a run folder (under the adapter root) and "name" a text')
        if not _encodable(path) or name == "":
            raise HTTPError(422, '"path" holds a character no folder name has, or "name" is empty')
        folder = (self.root / path).resolve()
        if folder != self.root and self.root not in folder.parents:
            raise HTTPError(403, f"{path} is outside the adapter root {self.root}")
        if not folder.is_dir():
            raise HTTPError(404, f"no folder {path} under the adapter root")
        name = name or folder.name
        if self.engine.has_task(name):
            raise HTTPError(409, f"a task named {name!r} is already served; unload it first or pick another name")
        info = await _wait(_submit(self.engine.load, name, folder), self.limits.timeout_s)  # 409 on a clash
        request.state.task = name
        return JSONResponse({"name": name, "task": info}, 201)

    async def unload(self, request: Request) -> Response:
        self.admin(request)
        name = request.path_params["name"]
        await _wait(_submit(self.engine.unload, name), self.limits.timeout_s)
        request.state.task = name
        return JSONResponse({"unloaded": name})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "tasks": len(self.engine.tasks()), "queue": self.engine.queue_depth})

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE)


def create_app(
    engine: Engine,
    *,
    limits: Limits | None = None,
    token: str | None = None,
    adapter_root: str | Path | None = None,
    base_name: str | None = None,
):
    """The ASGI application serving ``engine``; ``token`` guards the adapter endpoints,
    ``adapter_root`` is the only folder they may load from (none: loading at run time is off)."""
    root = Path(adapter_root).resolve() if adapter_root is not None else None
    api = _Api(engine, limits or Limits(), token, root, base_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.close)  # finish what is queued

    routes = [
        Route("/", api.page),
        Route("/healthz", api.healthz),
        Route("/metrics", api.metrics_page),
        Route("/v1/tasks", api.tasks),
        Route("/v1/predict", api.predict, methods=["POST"]),
        Route("/v1/generate", api.generate, methods=["POST"]),
        Route("/v1/adapters", api.load, methods=["POST"]),
        Route("/v1/adapters/{name}", api.unload, methods=["DELETE"]),
    ]
    guarded = [Route(r.path, _guarded(r.endpoint), methods=r.methods) for r in routes]
    app = Starlette(routes=guarded, lifespan=lifespan)
    app.router.redirect_slashes = False  # /v1/tasks/ is an unknown endpoint (JSON 404), not a redirect
    app.add_exception_handler(404, _not_found)
    app.add_exception_handler(405, _not_allowed)
    return AccessLog(app, api.metrics, {r.path for r in routes})


async def _not_found(request: Request, exc) -> Response:
    return _error(404, f"no such endpoint: {request.url.path}")


async def _not_allowed(request: Request, exc) -> Response:
    return _error(405, f"{request.method} is not allowed on {request.url.path}")


def _generate_options(body: dict, limits: Limits) -> tuple[str | None, dict]:
    """The adapter and the options of ``Generator.generate`` from a request body."""
    task = body.get("task")
    prompt = body.get("prompt", body.get("messages"))
    if task is not None and not isinstance(task, str):
        raise HTTPError(422, '"task" must be a served task name, or null for the base model')
    if isinstance(prompt, str):
        size = len(prompt)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
    ):
        size = sum(len(m["content"]) for m in prompt)
    else:
        raise HTTPError(422, '"prompt" must be a text, or "messages" a list of {"role", "content"}')
    if size > limits.max_chars:
        raise HTTPError(413, f"the prompt has over {limits.max_chars} characters (--max-chars)")
    options = {"prompt": prompt}
    numbers = (("max_new_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float), ("seed", int))
    for key, kind in numbers:
        if key in body and body[key] is not None:
            value = body[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise HTTPError(422, f'"{key}" must be a number')
            options[key] = kind(value)
    if "system" in body and body["system"] is not None:
        if not isinstance(body["system"], str):
            raise HTTPError(422, '"system" must be a text')
        options["system"] = body["system"]
    return task, options


async def _events(future, pieces: asyncio.Queue):
    """Server-sent events: ``data: {"text": piece}`` as text is decoded, then ``event: done`` with the
    whole reply (or ``event: error``)."""
    while True:
        piece = await pieces.get()
        if piece is None:
            break
        yield f"data: {json.dumps({'text': piece})}\n\n"
    try:
        reply = future.result()
        yield f"event: done\ndata: {json.dumps({'text': reply})}\n\n"
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        yield f"event: error\ndata: {json.dumps({'error': message})}\n\n"


def _guarded(endpoint):
    """An endpoint whose failures become one-line JSON errors (and never stop the server)."""

    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except HTTPError as e:
            return _error(e.status, e.message, e.headers)
        except UnknownTask as e:  # unloaded while the request waited
            return _error(404, str(e))
        except NameConflict as e:  # a name taken, an adapter a fusion still uses
            return _error(409, str(e))
        except AdaptuneError as e:
            return _error(422, str(e))
        except Exception as e:  # a bug: say so in one line, keep serving
            log.exception("error in %s", request.url.path)
            return _error(500, f"internal error: {type(e).__name__}: {e}")

    return run


class AccessLog:
    """ASGI middleware: one JSON line per request on the ``adaptune.serve`` logger, and the request
    metrics."""

    def __init__(self, app, metrics: Metrics, paths: set[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - start
            state = scope.get("state", {})
            task, path = state.get("task", ""), scope["path"]
            endpoint = "/v1/adapters/{name}" if path.startswith("/v1/adapters/") else path
            endpoint = endpoint if endpoint in self.paths else "other"  # no label per unknown path
            self.metrics.on_request(endpoint, task, status[0], seconds)
            record = {
                "method": scope["method"],
                "path": path,
                "status": status[0],
                "ms": round(seconds * 1000, 2),
                "task": task or None,
                "rows": state.get("rows"),
                "client": (scope.get("client") or ("?",))[0],
            }
            log.info(json.dumps(record))
