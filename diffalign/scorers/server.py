"""Serve any scorer spec over HTTP (``diffalign serve-scorer``), so a big reward runs beside training.

Flask (a WSGI app, so any WSGI server can run it in place of the built-in threaded one) with:

* ``GET /health``: ``{"status": "ok", "scorer": NAME, "needs_prompts": ..., "higher_is_better": ...}``;
* ``POST /score``: one batch in the wire format of :mod:`diffalign.scorers.transport`, answered with
  ``{"scores": [...]}`` (``null`` for NaN/inf). Bad input is a 400 with ``{"error": ...}``, a body over
  ``max_request_mb`` a 413, a missing or wrong token a 401, a scorer that raises a 500 naming it.

Requests are scored one at a time (a lock): a model on one GPU gains nothing from concurrent batches, and
most scorers are not thread-safe. The shared token is read from an environment variable, never from the
command line (where ``ps`` would show it).
"""

from __future__ import annotations

import hmac
import logging
import math
import threading

import torch
from flask import Flask, jsonify, request
from PIL import Image, UnidentifiedImageError
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from diffalign.scorers.base import Scorer
from diffalign.scorers.transport import (
    SAFETENSORS_TYPE,
    TOKEN_HEADER,
    decode_safetensors_batch,
    parse_prompts,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_MB = 256.0


def create_app(
    scorer: Scorer, *, token: str | None = None, max_request_mb: float = DEFAULT_MAX_REQUEST_MB
) -> Flask:
    """The WSGI app serving ``scorer``; ``token``: the shared secret clients must send (None: none needed)."""
    app = Flask("diffalign.scorers.server")
    app.config["MAX_CONTENT_LENGTH"] = int(max_request_mb * 1024 * 1024)
    lock = threading.Lock()
    counts = {"requests": 0, "images": 0, "errors": 0}

    def error(status: int, message: str):
        counts["errors"] += 1
        return jsonify(error=message), status

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):  # 404, 405, 413 as JSON like every other answer
        return error(err.code or 500, f"{err.name}: {err.description}")

    @app.before_request
    def check_token():
        if token is None or request.path == "/health":
            return None
        sent = request.headers.get(TOKEN_HEADER) or request.headers.get("Authorization", "").removeprefix(
            "Bearer "
        )
        if not hmac.compare_digest(sent.encode(), token.encode()):
            return error(401, f"missing or wrong token (send it in the {TOKEN_HEADER} header)")
        return None

    @app.get("/health")
    def health():
        return jsonify(status="ok", scorer=scorer.name, needs_prompts=scorer.needs_prompts,
                       higher_is_better=scorer.higher_is_better, **counts)

    @app.post("/score")
    def score():
        try:
            images, prompts = read_batch()
        except ValueError as err:
            return error(400, str(err))
        n = len(images)
        if prompts is not None and len(prompts) != n:
            return error(400, f"got {n} images but {len(prompts)} prompts")
        if prompts is None and scorer.needs_prompts:
            return error(400, f"scorer {scorer.name!r} needs one prompt per image ('prompts')")
        try:
            with lock, torch.no_grad():
                values = scorer.score(images, prompts).detach().float().cpu().tolist()
        except Exception as err:  # noqa: BLE001  (the client is told which scorer failed and why)
            log.exception("scorer %s raised on a batch of %d", scorer.name, n)
            return error(500, f"scorer {scorer.name!r} raised {type(err).__name__}: {err}")
        counts["requests"] += 1
        counts["images"] += n
        return jsonify(scores=[v if math.isfinite(v) else None for v in values])

    return app


def read_batch() -> tuple[torch.Tensor | list[Image.Image], list[str] | None]:
    """The images and prompts of the current request (ValueError saying what is wrong)."""
    content_type = request.mimetype
    if content_type == SAFETENSORS_TYPE:
        return decode_safetensors_batch(request.get_data())
    if content_type == "multipart/form-data":
        files = request.files.getlist("images")
        if not files:
            raise ValueError("multipart request without image files in the field 'images'")
        images = []
        for i, file in enumerate(files):
            try:
                images.append(Image.open(file.stream).convert("RGB"))
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"image {i} ({file.filename}) cannot be read: {err}") from None
        return images, parse_prompts(request.form.get("prompts"))
    raise ValueError(
        f"unsupported Content-Type {content_type!r}; send {SAFETENSORS_TYPE} or multipart/form-data"
    )


class ScorerServer:
    """``create_app`` on a threaded werkzeug server in a background thread: ``start()``, ``url``, ``stop()``.

    ``port=0`` picks a free port (read it from ``port`` after ``start``).
    """

    def __init__(self, scorer: Scorer, host: str = "127.0.0.1", port: int = 0, **app_settings):
        self.server = make_server(host, port, create_app(scorer, **app_settings), threaded=True)
        self.host, self.port = host, self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, name="scorer-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ScorerServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()

    def __enter__(self) -> ScorerServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C / SIGTERM ends the process)."""
        self.server.serve_forever()


__all__ = ["DEFAULT_MAX_REQUEST_MB", "ScorerServer", "create_app"]
