"""``vlm_judge``: ask a vision-language model served behind an OpenAI-compatible API to rate each image.

Works with any server speaking ``POST /v1/chat/completions`` with image inputs (vLLM, sglang, TGI,
LMDeploy serving UnifiedReward, Qwen2-VL/2.5-VL, InternVL, ...)::

    vlm_judge:url=http://127.0.0.1:8001,model=CodeGoat24/UnifiedReward-qwen-7b,prompt="Rate ... {prompt} ..."

Each image goes as a PNG data URL (``data:image/png;base64,...``) with the text of ``prompt``, where
``{prompt}`` is replaced by the image's own prompt. The first number in the answer is the score;
an answer without one, or with a number outside ``[min_score, max_score]``, scores NaN and is counted
in ``unparsable`` (the online loop drops NaN rewards and stops past ``method.max_bad_reward_fraction``).
Requests run ``concurrency`` at a time (servers batch concurrent requests), with the timeouts, bounded
retries and clear errors of the ``remote`` scorer. ``token_env`` names an environment variable with an
API key sent as ``Authorization: Bearer``. ``temperature=0`` by default so a rating is repeatable.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor

import torch

from diffalign.images import to_pil
from diffalign.scorers.base import NUMBER_PATTERN, register_scorer
from diffalign.scorers.remote import HTTPScorer

log = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    'You are judging an AI-generated image. The prompt was: "{prompt}". Rate how well the image follows the '
    "prompt and how good it looks, from 0 (worst) to 10 (best). Answer with the number only."
)
_FIRST_NUMBER = re.compile(NUMBER_PATTERN)
CHAT_PATH = "/v1/chat/completions"


def parse_rating(answer: str | None) -> float:
    """The first number in ``answer`` (NaN when there is none)."""
    match = _FIRST_NUMBER.search(answer or "")
    return float(match.group(0)) if match else math.nan


def image_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@register_scorer("vlm_judge")
class VLMJudge(HTTPScorer):
    name = "vlm_judge"
    needs_prompts = True
    positional_setting = "url"

    def __init__(
        self,
        url: str = "",
        model: str = "",
        prompt: str = DEFAULT_PROMPT,
        min_score: float = 0.0,
        max_score: float = 10.0,
        max_tokens: int = 16,
        temperature: float = 0.0,
        concurrency: int = 8,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 1.0,
        max_backoff: float = 10.0,
        token_env: str | None = None,
    ):
        if not model:
            raise ValueError("scorer 'vlm_judge' needs model=NAME (the model name the server serves)")
        if "{prompt}" not in prompt:
            raise ValueError(
                "scorer 'vlm_judge': prompt must contain {prompt} (where the image's prompt goes), got "
                f"{prompt!r}"
            )
        if not min_score < max_score:
            raise ValueError(f"scorer 'vlm_judge': min_score ({min_score}) must be < max_score ({max_score})")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"scorer 'vlm_judge': concurrency must be an integer >= 1, got {concurrency!r}")
        url = str(url).rstrip("/")
        for suffix in (CHAT_PATH, "/v1"):  # accept the base URL, .../v1, or the full endpoint
            url = url.removesuffix(suffix)
        super().__init__(
            url,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            token_env=token_env,
        )
        self.model, self.prompt = model, prompt
        self.score_range = (float(min_score), float(max_score))
        self.max_tokens, self.temperature, self.concurrency = max_tokens, temperature, concurrency
        self.unparsable = 0  # answers without a number in range
        self.last_answers: list[str] = []  # the latest batch's raw answers, to see what the judge says

    def auth_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def ask(self, image, prompt: str) -> str | None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": self.prompt.replace("{prompt}", prompt)},
            ]}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        response = self.request("POST", CHAT_PATH, json=body)
        if response is None:
            self.bad("timeout", 1, f"no answer within {self.timeouts[1]:g} s on {self.retries + 1} tries")
            return None
        self.raise_for_refusal(response)
        try:
            return response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            self.bad("not_json", 1, f"not a chat completion: {response.text[:80]!r}")
            return None

    def _score(self, images, prompts):
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(self.ask, to_pil(images), prompts))
        self.last_answers = [a or "" for a in answers]
        low, high = self.score_range
        scores = []
        for answer in answers:
            value = parse_rating(answer)
            if answer is not None and not low <= value <= high:  # NaN fails this too
                self.unparsable += 1
                log.warning(
                    "scorer vlm_judge: no rating in [%g, %g] in the answer %r from %s (%d unparsable so far)",
                    low,
                    high,
                    answer[:120],
                    self.url,
                    self.unparsable,
                )
                value = math.nan
            scores.append(value)
        return torch.tensor(scores)


__all__ = ["DEFAULT_PROMPT", "VLMJudge", "parse_rating"]
