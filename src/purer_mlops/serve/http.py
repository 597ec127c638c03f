"""`purer serve`: MLflow's scoring server for the logged meta-model, bounded for a network.

The app is MLflow's own (``mlflow.pyfunc.scoring_server.init``: ``/invocations``, ``/ping``,
``/health``, ``/version``, the same JSON formats as ``mlflow models serve``), behind one guard:
a request must say its length (``Content-Length``) and stay under ``max_bytes``, checked
before its body is read, so a client cannot make the server hold an arbitrary body in memory
(``mlflow models serve`` reads every body whole): a refused body is discarded as it arrives (up
to four times the bound), then the refusal is sent. uvicorn reads no more than the length said.
The model's own bounds (rows, bytes and pixels per image, paths only under
``PURER_SERVE_IMAGE_ROOT``) are :mod:`.pyfunc`'s and hold under either server.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


async def _refuse(receive: Callable, send: Callable, status: int, code: str, message: str, drain: int) -> None:
    """Discard (never hold) up to ``drain`` bytes of the body, then answer ``status`` with a
    one-line JSON message: a client that sends its whole body before reading the answer (most
    do) reads the refusal instead of a broken connection (the server closes a connection whose
    answer came before its request's end)."""
    discarded = 0
    while discarded <= drain:
        event = await receive()
        if event["type"] != "http.request":
            return
        discarded += len(event.get("body", b""))
        if not event.get("more_body", False):
            break
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def bounded(app: ASGIApp, max_bytes: int) -> ASGIApp:
    """``app`` refusing, before reading it, a POST body without a length (411) or over
    ``max_bytes`` (413), each with a one-line JSON message."""
    async def guard(scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is None or not length.isdigit():
            return await _refuse(receive, send, 411, "LENGTH_REQUIRED",
                                 "the request says no Content-Length: send the body whole, with its length.",
                                 4 * max_bytes)
        if int(length) > max_bytes:
            return await _refuse(receive, send, 413, "REQUEST_TOO_LARGE",
                                 f"the request has {int(length)} bytes, over the {max_bytes} this server takes: "
                                 "send fewer or smaller images per request.", 4 * max_bytes)
        return await app(scope, receive, send)

    return guard


def serve(model_uri: str, host: str, port: int, max_bytes: int) -> None:
    """Load the logged model and answer on ``host:port`` until stopped (Ctrl-C, SIGTERM)."""
    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    app = bounded(scoring_server.init(mlflow.pyfunc.load_model(model_uri)), max_bytes)
    uvicorn.run(app, host=host, port=port, log_level="warning")
