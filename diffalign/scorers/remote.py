"""``remote:URL``: a scorer served by another process (``diffalign serve-scorer``), used like any other.

It batches (``batch_size``), times out (``connect_timeout``, ``timeout`` seconds), retries refused
connections, timeouts and 502/503/504 answers ``retries`` times with exponential backoff, and then:

* a server that stays unreachable raises :class:`~diffalign.scorers.transport.ServiceError` naming the URL
  and what was tried (the online trainer stops with it, before the next optimizer step);
* a batch that still times out, or an answer that is not JSON, has the wrong number of scores, or holds
  NaN/inf/null, scores NaN for the batch's images (those images only for NaN/null). It is logged with the
  URL and counted in ``bad_batches``; the online loop drops NaN rewards and stops when more than
  ``method.max_bad_reward_fraction`` of an epoch's rewards are bad, as for an in-process scorer.
* a 4xx answer (wrong token, body too large, bad request) or a 500 (the served scorer raised) raises at
  once: retrying cannot fix it.

Settings: ``remote:http://host:port[,timeout=60,retries=3,backoff=0.5,encoding=uint8,token_env=VAR]``.
The server's ``/health`` is read once when the scorer is built (it says whether prompts are needed).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter

import requests
import torch
from urllib3.exceptions import ReadTimeoutError

from diffalign.scorers.base import Scorer, register_scorer
from diffalign.scorers.transport import (
    ENCODINGS,
    TOKEN_ENV,
    ServiceError,
    auth_headers,
    encode_batch,
    make_session,
    worst_case_s,
)

log = logging.getLogger(__name__)


def check_url(url: str, scorer: str) -> str:
    url = str(url or "").strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"scorer {scorer!r}: url must start with http:// or https://, got {url!r}")
    return url


def read_token(token_env: str | None, scorer: str) -> str | None:
    """The shared token from the environment variable ``token_env`` (None: no token)."""
    if not token_env:
        return None
    token = os.environ.get(token_env)
    if token_env != TOKEN_ENV and not token:
        raise ValueError(
            f"scorer {scorer!r}: token_env={token_env} names an environment variable that is not set"
        )
    return token or None


class HTTPScorer(Scorer):
    """What :class:`RemoteScorer` and the VLM judge share: one retrying session, one URL, error counting."""

    def __init__(self, url: str, *, timeout: float, connect_timeout: float, retries: int, backoff: float,
                 max_backoff: float, token_env: str | None):
        for key, value, low in (
            ("timeout", timeout, 0),
            ("connect_timeout", connect_timeout, 0),
            ("backoff", backoff, -1),
            ("max_backoff", max_backoff, -1),
        ):
            if not isinstance(value, int | float) or value <= low:
                raise ValueError(
                    f"scorer {self.name!r}: {key} must be a number > {max(low, 0)}, got {value!r}"
                )
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"scorer {self.name!r}: retries must be an integer >= 0, got {retries!r}")
        self.url = check_url(url, self.name)
        self.timeouts = (float(connect_timeout), float(timeout))
        self.retries, self.backoff, self.max_backoff = retries, float(backoff), float(max_backoff)
        self.token = read_token(token_env, self.name)
        self.session = make_session(retries, backoff, max_backoff)
        self.bad_batches: Counter[str] = (
            Counter()
        )  # why batches scored NaN: timeout, not_json, wrong_count, ...

    def auth_headers(self) -> dict:
        return auth_headers(self.token)

    @property
    def give_up_after_s(self) -> float:
        return worst_case_s(self.retries, self.backoff, self.max_backoff, *self.timeouts)

    def request(self, method: str, path: str, **kwargs) -> requests.Response | None:
        """The server's answer; None after a timeout on every try; ServiceError when it cannot be reached."""
        url = self.url + path
        headers = {**kwargs.pop("headers", {}), **self.auth_headers()}
        try:
            return self.session.request(method, url, headers=headers, timeout=self.timeouts, **kwargs)
        except requests.exceptions.ReadTimeout:
            return None
        except requests.exceptions.ConnectionError as err:  # refused, reset, DNS, connect timeout
            reason = getattr(err.args[0], "reason", None) if err.args else None
            if isinstance(reason, ReadTimeoutError):
                return None  # every try timed out while reading: counted as a bad batch
            raise ServiceError(
                f"scorer {self.name!r}: cannot reach {url} after {self.retries + 1} tries over at most "
                f"{self.give_up_after_s:.0f} s ({_reason(err)}). Is the server running (diffalign "
                "serve-scorer ...)? Resume the run from its last checkpoint with --resume latest once it is "
                "back."
            ) from None

    def raise_for_refusal(self, response: requests.Response) -> None:
        """4xx and 500 answers cannot be fixed by retrying: raise with the server's own message."""
        if response.status_code < 400 or response.status_code in (502, 503, 504):
            return
        try:
            message = response.json().get("error", response.text[:200])
        except (ValueError, AttributeError):
            message = response.text[:200]
        raise ServiceError(f"scorer {self.name!r}: {response.request.method} {response.url} answered "
                           f"{response.status_code}: {message}")

    def bad(self, why: str, n: int, detail: str) -> torch.Tensor:
        self.bad_batches[why] += 1
        log.warning("scorer %s: %s from %s (%s); %d image(s) score NaN (bad batches so far: %s)",
                    self.name, why.replace("_", " "), self.url, detail, n, dict(self.bad_batches))
        return torch.full((n,), float("nan"))


def _reason(err: Exception) -> str:
    reason = getattr(err.args[0], "reason", err) if err.args else err
    return f"{type(reason).__name__}: {str(reason).splitlines()[0][:200]}"


@register_scorer("remote")
class RemoteScorer(HTTPScorer):
    name = "remote"
    positional_setting = "url"  # remote:http://host:port

    def __init__(
        self,
        url: str = "",
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        encoding: str = "uint8",
        token_env: str | None = TOKEN_ENV,
    ):
        if encoding not in ENCODINGS:
            raise ValueError(
                f"scorer 'remote': encoding={encoding!r}; expected one of {', '.join(ENCODINGS)}"
            )
        super().__init__(
            url,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            token_env=token_env,
        )
        self.encoding = encoding
        response = self.request("GET", "/health")
        if response is None:
            raise ServiceError(f"scorer 'remote': {self.url}/health timed out on every try")
        self.raise_for_refusal(response)
        try:
            health = response.json()
        except ValueError:
            raise ServiceError(
                f"scorer 'remote': {self.url}/health did not answer JSON: {response.text[:200]!r}"
            ) from None
        self.served = str(health.get("scorer", "?"))
        self.needs_prompts = bool(health.get("needs_prompts", False))
        self.higher_is_better = bool(health.get("higher_is_better", True))
        log.info("scorer remote: %s serves %s", self.url, self.served)

    def _score(self, images, prompts):
        n = len(images)
        response = self.request("POST", "/score", **encode_batch(images, prompts, self.encoding))
        if response is None:
            return self.bad(
                "timeout", n, f"no answer within {self.timeouts[1]:g} s on {self.retries + 1} tries"
            )
        self.raise_for_refusal(response)
        if response.status_code >= 400:
            return self.bad("unavailable", n, f"status {response.status_code} after {self.retries + 1} tries")
        try:
            scores = response.json()["scores"]
        except (ValueError, KeyError, TypeError):
            return self.bad("not_json", n, f"answer is not JSON with 'scores': {response.text[:80]!r}")
        if not isinstance(scores, list) or len(scores) != n:
            got = len(scores) if isinstance(scores, list) else type(scores).__name__
            return self.bad("wrong_count", n, f"sent {n} images, got {got} scores")
        values = [
            float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan for v in scores
        ]
        num_bad = sum(not math.isfinite(v) for v in values)
        if num_bad:
            self.bad_batches["nonfinite"] += 1
            log.warning(
                "scorer %s: %d of %d scores from %s are NaN/inf/null or not numbers",
                self.name,
                num_bad,
                n,
                self.url,
            )
        return torch.tensor(values)


__all__ = ["HTTPScorer", "RemoteScorer"]
