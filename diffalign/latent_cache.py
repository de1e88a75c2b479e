"""Cached text embeddings and VAE latents of a preference set (``data.cache``), keyed by everything they
depend on: the model, the rows and the preprocessing."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffalign.data import PairSource, Preprocessing
from diffalign.files import apply_umask
from diffalign.tiny import cache_dir


def cache_key(model_id: str, source: PairSource, prep: Preprocessing, extra: str = "") -> str:
    """Hash of everything the cached tensors depend on: model, rows and preprocessing."""
    text = json.dumps(
        {"model": model_id, "rows": source.fingerprint(), "prep": prep.key(), "extra": extra, "v": 1}
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class CachedPairs(torch.utils.data.Dataset):
    """Pairs whose text conditioning and VAE latent distributions were computed once.

    ``tensors`` holds, per row: ``latent_params`` [2, 2C, h, w] (the VAE posterior mean and log-variance
    of winner and loser, sampled afresh at every step as the uncached path does), ``time_ids`` [2, 6]
    and one entry per conditioning tensor (``cond.<name>`` [...]); ``empty`` holds the conditioning of
    the empty prompt, swapped in with ``proportion_empty_prompts``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], prep: Preprocessing):
        self.tensors, self.empty, self.prep, self.epoch = tensors, empty, prep, 0

    def __len__(self):
        return self.tensors["latent_params"].shape[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(f"{self.prep.seed}/{self.epoch}/{index}")
        blank = self.prep.proportion_empty_prompts > 0 and rng.random() < self.prep.proportion_empty_prompts
        item = {"index": index, "caption": "", "latent_params": self.tensors["latent_params"][index],
                "time_ids": self.tensors["time_ids"][index]}
        for name, value in self.tensors.items():
            if name.startswith("cond."):
                item[name] = self.empty[name] if blank else value[index]
        return item

    @staticmethod
    def save(
        path: Path, tensors: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], metadata: dict
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        all_tensors = {**tensors, **{f"empty.{k}": v for k, v in empty.items()}}
        save_file({k: v.contiguous() for k, v in all_tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in metadata.items()})
        apply_umask(tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, prep: Preprocessing) -> CachedPairs:
        loaded = load_file(str(path))
        empty = {k[6:]: v for k, v in loaded.items() if k.startswith("empty.")}
        return cls({k: v for k, v in loaded.items() if not k.startswith("empty.")}, empty, prep)


def default_cache_dir() -> Path:
    return cache_dir() / "latents"
