"""What the scorer server and its HTTP clients share: the wire format of a batch, and retrying sessions.

A batch travels as one of:

* ``application/x-safetensors``: a safetensors file with the tensor ``images`` ``[B, 3, H, W]``
  (``uint8`` 0-255, or ``float16``/``float32`` in [0, 1]) and the prompts as JSON in its metadata
  (key ``prompts``; absent for prompt-free scorers). ``uint8`` carries what a PNG would, without the
  compression cost; ``float32`` is lossless, so a remote score equals the in-process one.
* ``multipart/form-data``: image files (PNG/JPEG/WebP) in the field ``images``, in order, and the prompts as
  a JSON list in the form field ``prompts`` (what ``curl -F images=@a.png -F 'prompts=["..."]'`` sends).

The answer is JSON ``{"scores": [number | null, ...]}``, ``null`` for a NaN/inf score.
"""

from __future__ import annotations

import io
import json
import logging

import requests
import torch
from requests.adapters import HTTPAdapter
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from urllib3.util.retry import Retry

from diffalign.images import to_pil, to_tensor, to_uint8

log = logging.getLogger(__name__)

SAFETENSORS_TYPE = "application/x-safetensors"
ENCODINGS = ("uint8", "float32", "float16", "png")
#: Header for the shared token (``Authorization: Bearer TOKEN`` is accepted too).
TOKEN_HEADER = "X-Diffalign-Token"
#: Environment variable holding the shared token, on the server and the client alike.
TOKEN_ENV = "DIFFALIGN_SCORER_TOKEN"
#: Answers worth another try: the server is starting, overloaded or behind a restarting proxy.
RETRY_STATUSES = (502, 503, 504)


class ServiceError(RuntimeError):
    """A scoring service could not be reached or refused the request (the message names its URL)."""


def encode_batch(images, prompts: list[str] | None, encoding: str) -> dict:
    """The ``requests`` keyword arguments (body and headers) of one scoring request.

    ``images`` is a tensor ``[B, 3, H, W]`` in [0, 1] or a list of PIL images.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown image encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    if encoding == "png":  # PIL images of any size go as they are
        files = []
        for i, image in enumerate(to_pil(images)):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)
            files.append(("images", (f"{i:05d}.png", buffer.getvalue(), "image/png")))
        return {"files": files, "data": {} if prompts is None else {"prompts": json.dumps(prompts)}}
    x = to_tensor(images).detach().float().cpu().clamp(0, 1)
    if encoding == "uint8":
        tensor = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).contiguous()
    else:
        tensor = x.to(getattr(torch, encoding))
    metadata = {} if prompts is None else {"prompts": json.dumps(prompts)}
    return {
        "data": save_safetensors({"images": tensor}, metadata=metadata),
        "headers": {"Content-Type": SAFETENSORS_TYPE},
    }


def decode_safetensors_batch(body: bytes) -> tuple[torch.Tensor, list[str] | None]:
    """The images ``[B, 3, H, W]`` float in [0, 1] and prompts of a safetensors request (ValueError if
    malformed)."""
    try:
        tensors = load_safetensors(body)
        metadata = _safetensors_metadata(body)
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error types for a broken header)
        raise ValueError(f"body is not a safetensors file ({type(err).__name__}: {err})") from None
    if set(tensors) != {"images"}:
        raise ValueError(f"expected exactly one tensor named 'images', got {sorted(tensors)}")
    images = tensors["images"]
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"'images' must be [B, 3, H, W] with B >= 1, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif images.dtype in (torch.float16, torch.bfloat16, torch.float32):
        images = images.float()
    else:
        raise ValueError(f"'images' must be uint8, float16 or float32, got {images.dtype}")
    return images, parse_prompts(metadata.get("prompts"))


def _safetensors_metadata(body: bytes) -> dict:
    header_size = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + header_size]).get("__metadata__") or {}


def parse_prompts(text: str | None) -> list[str] | None:
    if text is None:
        return None
    try:
        prompts = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"'prompts' is not JSON ({err})") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("'prompts' must be a JSON list of strings")
    return prompts


def make_session(retries: int, backoff: float, max_backoff: float) -> requests.Session:
    """A session that retries refused connections, read timeouts and 502/503/504 answers ``retries`` times,
    sleeping ``backoff * 2**(n-1)`` seconds (at most ``max_backoff``) before the n-th retry.

    Scoring is idempotent, so a POST is retried like a GET. With timeouts ``(connect, read)`` one call
    takes at most ``(retries + 1) * (connect + read) + sum of the sleeps`` seconds (:func:`worst_case_s`).
    """
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=0, allowed_methods=None,
                  status_forcelist=RETRY_STATUSES, backoff_factor=backoff, backoff_max=max_backoff,
                  raise_on_status=False, respect_retry_after_header=False)
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def worst_case_s(
    retries: int, backoff: float, max_backoff: float, connect_timeout: float, timeout: float
) -> float:
    """The longest one call of a :func:`make_session` session can take before it gives up."""
    sleeps = sum(min(max_backoff, backoff * 2 ** (n - 1)) for n in range(2, retries + 1)) if backoff else 0.0
    return (retries + 1) * (connect_timeout + timeout) + sleeps


def auth_headers(token: str | None) -> dict:
    return {TOKEN_HEADER: token} if token else {}


__all__ = [
    "ENCODINGS",
    "SAFETENSORS_TYPE",
    "ServiceError",
    "TOKEN_ENV",
    "TOKEN_HEADER",
    "auth_headers",
    "decode_safetensors_batch",
    "encode_batch",
    "make_session",
    "parse_prompts",
    "worst_case_s",
]
