"""The vlm_judge scorer against a real OpenAI-compatible server on loopback (answers follow from the
request)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.services import UNPARSABLE, ThreadServer, openai_compatible_app

from diffalign.images import to_uint8
from diffalign.scorers import check_scorer_names, make_scorer
from diffalign.scorers.transport import ServiceError
from diffalign.scorers.vlm_judge import parse_rating

FAST = "retries=1,backoff=0.05,max_backoff=0.1,connect_timeout=0.5,timeout=5"


def _images(n=4):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_judge_sends_images_and_prompts_and_parses_the_rating():
    app = openai_compatible_app()
    images = _images(5)
    prompts = [f"a red cube number {i}" for i in range(5)]
    with ThreadServer(app) as server:
        judge = make_scorer(f'vlm_judge:{server.url}/v1,model=tiny-vlm,prompt="Rate, 0 to 10: {{prompt}}",'
                            f"batch_size=2,concurrency=3,{FAST}")
        scores = judge.score(images, prompts)
    expected = torch.tensor([10 * (to_uint8(images[i : i + 1]).astype(float) / 255).mean() for i in range(5)])
    assert torch.allclose(scores, expected.float(), atol=0.006)  # the server rounds to 2 decimals
    assert judge.unparsable == 0 and judge.last_answers[-1].startswith("Rating: ")
    sent = app.config["requests"]
    assert len(sent) == 5 and {r["model"] for r in sent} == {"tiny-vlm"} and sent[0]["temperature"] == 0.0
    texts = sorted(
        part["text"] for r in sent for part in r["messages"][0]["content"] if part["type"] == "text"
    )
    assert texts == sorted(f"Rate, 0 to 10: {p}" for p in prompts)  # the quoted prompt kept its comma


def test_unparsable_and_out_of_range_answers_score_nan_and_are_counted():
    prompts = ["fine", "please refuse", "fine", "refuse this too"]
    with ThreadServer(openai_compatible_app()) as server:
        judge = make_scorer(f"vlm_judge:url={server.url},model=m,{FAST}")
        scores = judge.score(_images(4), prompts)
        assert torch.isnan(scores[[1, 3]]).all() and torch.isfinite(scores[[0, 2]]).all()
        assert judge.unparsable == 2 and UNPARSABLE in judge.last_answers
    with ThreadServer(openai_compatible_app("Score: {score:.1f}00 / 10")) as server:  # e.g. "5.300" -> 5.3 ok
        judge = make_scorer(f"vlm_judge:url={server.url},model=m,max_score=1,{FAST}")
        assert (
            torch.isnan(judge.score(_images(2), ["a", "b"])).all() and judge.unparsable == 2
        )  # above max_score


def test_judge_errors_are_clear():
    with pytest.raises(ValueError, match="needs model=NAME"):
        make_scorer("vlm_judge:url=http://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"must contain \{prompt\}"):
        make_scorer("vlm_judge:url=http://127.0.0.1:1,model=m,prompt=Rate it")
    with pytest.raises(ValueError, match="unbalanced"):
        check_scorer_names(['vlm_judge:url=http://x,model=m,prompt="Rate {prompt}'])
    judge = make_scorer(f"vlm_judge:url=http://127.0.0.1:9,model=m,{FAST}")  # nothing listens on port 9
    with pytest.raises(
        ServiceError, match=r"cannot reach http://127.0.0.1:9/v1/chat/completions after 2 tries"
    ):
        judge.score(_images(1), ["a"])


@pytest.mark.parametrize(
    "answer,value",
    [
        ("7", 7.0),
        ("Rating: 8.5/10", 8.5),
        ("I'd say 3", 3.0),
        ("-1 bad", -1.0),
        ("none", math.nan),
        ("", math.nan),
        (None, math.nan),
    ],
)
def test_parse_rating_takes_the_first_number(answer, value):
    parsed = parse_rating(answer)
    assert (math.isnan(parsed) and math.isnan(value)) or parsed == value
