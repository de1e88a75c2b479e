"""Prompt sets for gallery runs: a file, a set shipped in ``gallery/prompts/``, or a hub dataset by name.

``load_prompts(spec)`` takes a path (``.txt`` one prompt per line, ``.jsonl`` with a ``prompt`` field,
``.json`` list of strings, ``.tsv`` with a ``Prompt`` column) or a set name:

=============== ================================================ ============================================
name            source                                           licence
=============== ================================================ ============================================
smoke           ``gallery/prompts/smoke.txt`` (8 prompts)        written for diffalign, Apache-2.0
toy             8 held-out captions of the toy world (toy-sdxl)  generated (diffalign.toy.data)
toy-train       every training caption of the toy world          generated
toy-heldout     every held-out caption of the toy world          generated
parti           ``gallery/prompts/parti_prompts.tsv``            Apache-2.0 (google-research/parti)
ddpo-animals    ``gallery/prompts/ddpo_simple_animals.txt`` (45) MIT (kvablack/ddpo-pytorch)
hpdv2           hub dataset ``zhwang/HPDv2`` ``benchmark/*.json`` Apache-2.0; fetched at run time
                                                                 (not shipped)
hpdv2-<style>   one style: anime, concept-art, paintings, photo
drawbench       hub dataset, column ``Prompts``                  loaded at run time, never shipped
pickapic        hub dataset, ``test_unique`` captions            loaded at run time, never shipped
=============== ================================================ ============================================

Sets that need the hub fail with a clear error offline that says how to pass a file instead.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from diffalign.data import TABLE_SUFFIXES
from diffalign.models import HUB_ID
from diffalign.prompts import read_prompts
from diffalign.toy.data import toy_prompts


def prompts_dir() -> Path:
    """``$DIFFALIGN_PROMPTS_DIR`` or the repository's ``gallery/prompts`` folder."""
    if os.environ.get("DIFFALIGN_PROMPTS_DIR"):
        return Path(os.environ["DIFFALIGN_PROMPTS_DIR"])
    return Path(__file__).resolve().parents[1] / "gallery" / "prompts"


#: Sets shipped as files in ``prompts_dir()``.
SHIPPED_SETS: dict[str, str] = {
    "smoke": "smoke.txt",
    "parti": "parti_prompts.tsv",
    "ddpo-animals": "ddpo_simple_animals.txt",
}


@dataclass(frozen=True)
class HubPromptSet:
    """Prompts read from one column of a hub dataset split with ``datasets`` (at run time)."""

    dataset: str
    split: str
    column: str
    data_files: str | None = None


#: Sets of toy captions (the only prompts toy_faithfulness scores): name -> (split, how many; None: all).
TOY_SETS: dict[str, tuple[str, int | None]] = {"toy": ("heldout", 8), "toy-train": ("train", None),
                                               "toy-heldout": ("heldout", None)}


#: Sets loaded from the hub at run time. Dataset ids and columns are settings: override with a file.
HUB_SETS: dict[str, HubPromptSet] = {
    "drawbench": HubPromptSet("sayakpaul/drawbench", "train", "Prompts"),
    "pickapic": HubPromptSet("yuvalkirstain/pickapic_v2_no_images", "test_unique", "caption"),
}

#: HPDv2 benchmark prompts: 4 styles x 800 prompts, one JSON list per style in the dataset repository.
HPDV2_REPO = "zhwang/HPDv2"
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")


def known_prompt_sets() -> list[str]:
    return sorted([*SHIPPED_SETS, *TOY_SETS, *HUB_SETS, "hpdv2", *(f"hpdv2-{s}" for s in HPDV2_STYLES)])


def check_prompt_spec(spec: str) -> None:
    """Reject a spec that is neither an existing file nor a known set name (cheap, no loading)."""
    if Path(spec).is_file() or spec in known_prompt_sets():
        return
    if Path(spec).suffix.lower() in (".txt", ".jsonl", ".json", ".tsv", ".csv") or os.sep in spec:
        raise FileNotFoundError(f"prompt file {spec} does not exist")
    raise ValueError(
        f"unknown prompt set {spec!r}: not a file and not one of {', '.join(known_prompt_sets())}"
    )


def load_prompts(spec: str) -> list[str]:
    """The prompts of a file or a named set; an empty or unreadable source raises a clear error."""
    check_prompt_spec(spec)
    path = Path(spec)
    if path.is_file():
        return read_prompt_file(path)
    if spec in SHIPPED_SETS:
        shipped = prompts_dir() / SHIPPED_SETS[spec]
        if not shipped.is_file():
            raise FileNotFoundError(
                f"prompt set {spec!r} is not shipped in this installation ({shipped} is missing; see "
                "gallery/prompts/README.md). Pass the prompts as a file instead: --prompts FILE.txt")
        return read_prompt_file(shipped)
    if spec in TOY_SETS:
        return toy_prompts(*TOY_SETS[spec])
    if spec in HUB_SETS:
        return load_hub_prompts(spec, HUB_SETS[spec])
    styles = HPDV2_STYLES if spec == "hpdv2" else (spec.removeprefix("hpdv2-"),)
    return [p for style in styles for p in load_hpdv2_style(style)]


def read_prompt_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        prompts = read_table_prompts(path, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".json":
        prompts = read_json_prompts(path)
    else:
        return read_prompts(path)
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts


def read_table_prompts(path: Path, delimiter: str) -> list[str]:
    """A ``Prompt`` (or ``prompt``) column of a TSV/CSV file with a header row (PartiPrompts' layout)."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            column = next(
                (c for c in ("Prompt", "prompt", "Prompts", "caption") if c in (reader.fieldnames or [])),
                None,
            )
            if column is None:
                raise ValueError(
                    f"{path}: expected a header row with a 'Prompt' column, got {reader.fieldnames}"
                )
            return [row[column].strip() for row in reader if (row[column] or "").strip()]
        except (csv.Error, UnicodeDecodeError) as err:  # a malformed row, or bytes that are not UTF-8
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise ValueError(f"{path}:{reader.line_num}: not a readable {kind} row ({err})") from None


def read_json_prompts(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except (UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not a JSON list of prompts ({type(err).__name__}: {err})") from None
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        raise ValueError(f"{path}: expected a JSON list of prompt strings")
    return [p.strip() for p in data if p.strip()]


class PromptSetUnavailable(RuntimeError, ValueError):
    """A hub prompt set that cannot be fetched (offline): the user's to fix, so a ValueError too."""


def _offline_error(name: str, source: str, err: Exception) -> RuntimeError:
    return PromptSetUnavailable(
        f"prompt set {name!r} is not shipped and could not be loaded from the hub ({source}): "
        f"{type(err).__name__}: {err}. Without network access, save the prompts elsewhere and pass "
        "--prompts FILE (.txt one per line, .jsonl, .json list, or .tsv with a 'Prompt' column)")


def load_hub_prompts(name: str, hub_set: HubPromptSet) -> list[str]:
    import datasets

    try:
        data = datasets.load_dataset(hub_set.dataset, split=hub_set.split, data_files=hub_set.data_files)
        prompts = [str(p).strip() for p in data[hub_set.column] if p and str(p).strip()]
    except Exception as err:  # any loader failure (offline, moved dataset, renamed column) reads the same
        raise _offline_error(name, f"dataset {hub_set.dataset}, split {hub_set.split}", err) from err
    if not prompts:
        raise ValueError(f"prompt set {name!r}: column {hub_set.column!r} of {hub_set.dataset} is empty")
    return prompts


def load_hpdv2_style(style: str) -> list[str]:
    """One HPDv2 benchmark style: a shipped ``hpdv2_<style>.json`` if present, else fetched from the hub."""
    shipped = prompts_dir() / f"hpdv2_{style}.json"
    if shipped.is_file():
        return read_json_prompts(shipped)
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(HPDV2_REPO, f"{style}.json", subfolder="benchmark", repo_type="dataset")
    except Exception as err:
        raise _offline_error(f"hpdv2-{style}", f"{HPDV2_REPO} benchmark/{style}.json", err) from err
    return read_json_prompts(Path(path))


def select_prompts(prompts: list[str], max_prompts: int | None) -> list[str]:
    """At most ``max_prompts`` prompts, evenly spaced through the list (sets are often grouped by
    category)."""
    if max_prompts is None or max_prompts >= len(prompts):
        return prompts
    if max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    step = len(prompts) / max_prompts
    return [prompts[int(i * step)] for i in range(max_prompts)]


# ----------------------------------------------------------------------------------------------------
# Prompt sources: a file, a shipped set, the toy world's splits, or a dataset column (online methods)
# ----------------------------------------------------------------------------------------------------
TOY_PROMPT_SETS = ("toy-train", "toy-heldout")


def check_prompt_source(spec: str) -> None:
    """Cheap check that ``spec`` can be a prompt source (no dataset is read)."""
    path = Path(spec)
    if spec in TOY_PROMPT_SETS or (path.is_file() and path.suffix in TABLE_SUFFIXES):
        return
    if not path.exists() and HUB_ID.match(spec) and "." not in Path(spec).suffix:
        return  # a hub dataset id: loaded at run time
    check_prompt_spec(spec)


def load_prompt_source(spec: str, column: str = "prompt") -> list[str]:
    """The prompts of ``spec``: a file, a shipped set, the toy world's splits, or a dataset column."""
    check_prompt_source(spec)
    if spec in TOY_PROMPT_SETS:
        return toy_prompts(spec.removeprefix("toy-"))
    path = Path(spec)
    if (path.is_file() and path.suffix in TABLE_SUFFIXES) or (
        not path.exists() and spec not in known_prompt_sets()
    ):
        return _dataset_column(spec, column)
    if path.suffix == ".jsonl" and column != "prompt":
        return read_prompts(path, key=column)
    return load_prompts(spec)


def _dataset_column(spec: str, column: str) -> list[str]:
    import datasets  # heavy: loaded only for dataset prompt sources

    path = Path(spec)
    if path.is_file():
        try:
            data = (
                datasets.Dataset.from_parquet(str(path))
                if path.suffix == ".parquet"
                else datasets.Dataset.from_file(str(path))
            )
        except Exception as err:  # pyarrow raises many types for a broken file
            raise ValueError(
                f"prompt dataset {path}: cannot read as {path.suffix[1:]} ({type(err).__name__}: {err})"
            ) from None
    else:
        try:
            data = datasets.load_dataset(spec, split="train")
        except Exception as err:
            raise RuntimeError(f"could not load prompt dataset {spec!r} ({type(err).__name__}: {err}); "
                               "without network access pass a local .txt/.jsonl/.parquet file") from err
    if column not in data.column_names:
        raise ValueError(
            f"prompt dataset {spec}: no column {column!r} (has: {', '.join(data.column_names)}); "
            "set method.prompt_column"
        )
    prompts = [str(p).strip() for p in data[column] if p is not None and str(p).strip()]
    if not prompts:
        raise ValueError(f"prompt dataset {spec}: column {column!r} has no non-empty prompts")
    return prompts
