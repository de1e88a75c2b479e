"""Real HTTP servers for the service tests, run on loopback in a thread.

* :func:`misbehaving_scorer_app`: speaks the scorer wire format but answers badly on purpose (wrong count,
  NaN, not JSON, too slow, 503 a few times) so the client's handling of each is tested against real HTTP.
* :func:`openai_compatible_app`: a minimal ``/v1/chat/completions`` that "rates" an image by its mean
  brightness (so the answer follows from the request), like a vLLM/sglang-served VLM would answer.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time

import numpy as np
from flask import Flask, jsonify, request
from PIL import Image
from werkzeug.serving import make_server

from diffalign.scorers.server import read_batch


class ThreadServer:
    def __init__(self, app: Flask):
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.thread.join()


def misbehaving_scorer_app(mode: str, *, sleep_s: float = 1.0, fail_times: int = 2) -> Flask:
    """``mode``: wrong_count | nan | not_json | slow | flaky (503 ``fail_times`` times, then right)."""
    app = Flask("misbehaving")
    app.config["calls"] = 0

    @app.get("/health")
    def health():
        return jsonify(status="ok", scorer=f"misbehaving-{mode}", needs_prompts=False, higher_is_better=True)

    @app.post("/score")
    def score():
        app.config["calls"] += 1
        images, _ = read_batch()
        means = [float(x.mean()) for x in images]
        if mode == "wrong_count":
            return jsonify(scores=means[:-1])
        if mode == "nan":  # Python's json writes NaN literals; a JSON null is the other spelling
            return app.response_class(
                '{"scores": [NaN' + ", null" + "".join(f", {m}" for m in means[2:]) + "]}",
                mimetype="application/json",
            )
        if mode == "not_json":
            return "<html>502 Bad Gateway from a proxy</html>", 200
        if mode == "slow":
            time.sleep(sleep_s)
            return jsonify(scores=means)
        if mode == "flaky" and app.config["calls"] <= fail_times:
            return jsonify(error="warming up"), 503
        return jsonify(scores=means)

    return app


UNPARSABLE = "I cannot rate this image."


def openai_compatible_app(answer_template: str = "Rating: {score:.2f} out of 10") -> Flask:
    """Chat completions rating the image 10 x its mean brightness; a text containing 'refuse' gets no
    number."""
    app = Flask("openai-compatible")
    app.config["requests"] = []

    @app.post("/v1/chat/completions")
    def chat():
        body = request.get_json()
        app.config["requests"].append(body)
        content = body["messages"][-1]["content"]
        text = " ".join(part["text"] for part in content if part["type"] == "text")
        url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
        header, data = url.split(",", 1)
        assert header.startswith("data:image/png;base64")
        image = (
            np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.float64)
            / 255.0
        )
        score = 10.0 * image.mean()
        answer = UNPARSABLE if "refuse" in text else answer_template.format(score=score)
        assert math.isfinite(score)
        return jsonify(
            id="cmpl-test",
            object="chat.completion",
            model=body["model"],
            choices=[
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
            ],
        )

    return app
