"""Score one batch in the background while the caller samples the next.

::

    with ScoringQueue(reward) as queue:
        for chunk in chunks:
            images = sample(chunk)          # batch i+1 is sampled ...
            queue.submit(images, prompts)   # ... while batch i is scored
        rewards = queue.gather()            # all scores, in submission order

One worker thread, so batches are scored one at a time and in order: the scores are those of calling
``reward`` on each batch in turn (the same numbers as synchronous scoring when the reward scores each
image on its own, as every registered scorer does). The first error a batch raised is raised again by
``results()``; batches not started yet are then cancelled.

What it saves is the time scoring and sampling could overlap: a remote scorer (network, another GPU), a
CPU scorer beside GPU sampling, image encoding. Two workloads on the same GPU still share it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class ScoringQueue:
    def __init__(self, reward: Callable[[torch.Tensor, list[str]], torch.Tensor]):
        self.reward = reward
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffalign-scoring")
        self.futures: list[Future] = []

    def submit(self, images: torch.Tensor, prompts: list[str]) -> None:
        """Queue one batch; returns at once. A batch that failed already makes this raise."""
        for future in self.futures:
            if future.done() and future.exception() is not None:
                self.results()  # raises it now rather than after more sampling
        self.futures.append(self.executor.submit(self.reward, images, prompts))

    def results(self) -> list[torch.Tensor]:
        """Every batch's scores in submission order, waiting for the last; raises a batch's error."""
        try:
            return [future.result() for future in self.futures]
        except BaseException:
            for future in self.futures:
                future.cancel()
            raise

    def gather(self) -> torch.Tensor:
        """All scores concatenated in submission order; the worker is shut down either way."""
        try:
            return torch.cat(self.results())
        finally:
            self.close()

    def close(self) -> None:
        for future in self.futures:
            future.cancel()
        self.executor.shutdown(wait=True)

    def __enter__(self) -> ScoringQueue:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ScoringQueue"]
