"""Generated bad input: configs, preference datasets, prompt files and SePPO winners (hypothesis).

Every malformed input must end in one of two ways: a clear error naming the file/row/key, raised when the
config is loaded or the source is opened (before any model loads), or, for an image that cannot be decoded,
a bad item counted and skipped at read time (:class:`BadRowCounter`). Never another exception type from
inside the data path, never a silent accept of an invalid value.

Hypothesis runs derandomized with a small example budget so CI is reproducible and quick; the end-to-end
runs at the bottom are fixed cases.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
import shutil
import struct
import typing
import zlib
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffalign.config import SECTIONS, Config, ConfigError, load_config, resolve_config_paths
from diffalign.data import (
    BadRowCounter,
    DataError,
    PreferenceDataset,
    Preprocessing,
    collate_pairs,
    open_pairs,
)
from diffalign.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIGS = {
    name: ROOT / "configs" / "tiny-sdxl" / f"{name}.yaml"
    for name in ("dpo", "mapo", "seppo", "prdp", "ddpo", "grpo")
}

CHEAP = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.filter_too_much])


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    """The shipped configs name their data and prompt files relative to the repository root."""
    monkeypatch.chdir(ROOT)


# ====================================================================================================
# Configs
# ====================================================================================================
# YAML-safe text: no surrogates or control characters that safe_dump would refuse.
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)
_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _TEXT
_TREES = st.recursive(
    _SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_TEXT, kids, max_size=3), max_leaves=8
)


def _raw(method: str = "dpo") -> dict:
    """A shipped config as a mapping, its relative paths made absolute (it is written elsewhere)."""
    raw = yaml.safe_load(BASE_CONFIGS[method].read_text())
    resolve_config_paths(raw, BASE_CONFIGS[method].parent)
    return raw


def _load(raw, tmp_path: Path, overrides=()):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return load_config(path, list(overrides))


def _expect_config_error(raw, tmp_path, overrides=(), key: str | None = None) -> ConfigError:
    """load_config raises ConfigError (and nothing else) naming ``key`` (or its list item)."""
    with pytest.raises(ConfigError) as info:
        _load(raw, tmp_path, overrides)
    err = info.value
    assert repr(err.path) in str(err), str(err)
    if key is not None:
        assert err.path == key or err.path.startswith(key + "["), f"expected the error to name {key!r}: {err}"
    return err


def _section_fields(method: str = "dpo") -> list[tuple[str, str, object]]:
    """(section, field, type) for every field of every section, the method's own fields included."""
    out = []
    for section in SECTIONS:
        cls = METHODS[method].config_class if section == "method" else typing.get_type_hints(Config)[section]
        hints = typing.get_type_hints(cls)
        out += [(section, f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init]
    return out


def _is_float_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _wrong_values(tp) -> st.SearchStrategy:
    """Values that are never a valid ``tp`` (before range checks)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    containers = st.lists(st.integers(), min_size=1, max_size=2) | st.dictionaries(
        _TEXT, st.integers(), min_size=1, max_size=2
    )
    if origin in (typing.Union, type(int | None)):
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1
        return _wrong_values(inner[0])
    if origin is Literal:
        return st.one_of(_TEXT.filter(lambda t: t not in args), st.integers(), st.floats(), containers)
    if origin is list:
        bad_items = st.dictionaries(_TEXT, st.integers(), min_size=1, max_size=2)
        if args[0] is str:
            bad_items |= st.integers() | st.floats() | st.booleans()
        else:
            bad_items |= _TEXT | st.booleans()
        return st.lists(bad_items, min_size=1, max_size=3) | st.dictionaries(
            _TEXT, st.integers(), min_size=1, max_size=2
        )
    if tp is bool:
        return st.one_of(st.integers(), st.floats(), _TEXT, containers)
    if tp is int:
        return st.one_of(st.booleans(), st.floats(), _TEXT, containers)
    if tp is float:
        not_finite = st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity"])
        return st.one_of(st.booleans(), _TEXT.filter(lambda t: not _is_float_text(t)), containers, not_finite)
    if tp is str:
        return st.one_of(st.integers(), st.floats(), st.booleans(), containers)
    raise AssertionError(f"no wrong values for {tp!r}")


@st.composite
def wrong_typed_field(draw):
    method = draw(st.sampled_from(sorted(BASE_CONFIGS)))
    section, name, tp = draw(st.sampled_from(_section_fields(method)))
    return method, section, name, draw(_wrong_values(tp))


def _set_and_expect_error(method, section, name, value, tmp_path):
    raw = _raw(method)
    raw[section] = {**(raw.get(section) or {}), name: value}
    _expect_config_error(raw, tmp_path, key=f"{section}.{name}")


#: Every field: the shared sections once (on the DPO config), each method's own section on its config.
_ALL_FIELDS = [("dpo", *f) for f in _section_fields("dpo") if f[0] != "method"] + \
              [(m, *f) for m in sorted(BASE_CONFIGS) for f in _section_fields(m) if f[0] == "method"]


@pytest.mark.parametrize(("method", "section", "name", "tp"), _ALL_FIELDS,
                         ids=[f"{m}-{s}.{n}" for m, s, n, _ in _ALL_FIELDS])
def test_wrong_types_in_every_section_name_the_key(method, section, name, tp, tmp_path):
    @settings(CHEAP, max_examples=2)
    @given(value=_wrong_values(tp))
    def check(value):
        _set_and_expect_error(method, section, name, value, tmp_path)

    check()


@CHEAP
@given(case=wrong_typed_field())
def test_wrong_types_in_random_fields_name_the_key(case, tmp_path):
    _set_and_expect_error(*case, tmp_path)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_unknown_keys_name_the_key(section, tmp_path):
    @settings(CHEAP, max_examples=4)
    @given(key=_TEXT, value=_SCALARS)
    def check(key, value):
        raw = _raw()
        known = {name for s, name, _ in _section_fields() if s == section} | {"name"}
        if key in known:
            key = key + "_unknown"
        raw[section] = {**(raw.get(section) or {}), key: value}
        _expect_config_error(raw, tmp_path, key=f"{section}.{key}")

    check()


@CHEAP
@given(key=_TEXT.filter(lambda k: k not in SECTIONS), value=_TREES)
def test_unknown_sections_name_the_section(key, value, tmp_path):
    raw = _raw()
    raw[key] = value
    _expect_config_error(raw, tmp_path, key=key)


@CHEAP
@given(tree=_TREES)
def test_random_yaml_trees_as_the_whole_file(tree, tmp_path):
    _expect_config_error(tree, tmp_path)


@CHEAP
@given(section=st.sampled_from(list(SECTIONS)),
       tree=_TREES.filter(lambda t: t is not None and t != {} and not isinstance(t, dict)) |
       st.dictionaries(_TEXT.map(lambda k: "x" + k), _TREES, min_size=1, max_size=3))
def test_random_yaml_trees_as_a_section(section, tree, tmp_path):
    raw = _raw()
    raw[section] = tree
    err = _expect_config_error(raw, tmp_path)
    assert err.path == section or err.path.startswith(section + "."), str(err)


# Out-of-range values, one strategy per checked key: (base config, dotted key, invalid values).
_NEG = st.integers(-(2**40), 0)
_OUT_OF_RANGE = [
    (
        "dpo",
        "model.name",
        st.sampled_from(["./no/such/model", "no-such-builtin", "/nonexistent/x", "a" * 300, "  "]),
    ),
    ("dpo", "model.vae", st.sampled_from(["./no/such/vae", "not a model", "~/missing/vae/x"])),
    ("dpo", "lora.rank", _NEG),
    ("dpo", "lora.alpha", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    (
        "dpo",
        "lora.dropout",
        st.floats(min_value=1, allow_infinity=False) | st.floats(max_value=-1e-9, allow_infinity=False),
    ),
    ("dpo", "lora.target_modules", st.just([])),
    ("dpo", "data.source", st.just("")),
    ("dpo", "data.resolution", st.integers(-(2**20), 2**20).filter(lambda r: r < 8 or r % 8)),
    (
        "dpo",
        "data.proportion_empty_prompts",
        st.floats(min_value=1.0001, allow_infinity=False) | st.floats(max_value=-1e-9, allow_infinity=False),
    ),
    ("dpo", "data.max_pairs", _NEG),
    (
        "dpo",
        "data.max_bad_fraction",
        st.floats(min_value=1.0001, allow_infinity=False) | st.floats(max_value=-1e-9, allow_infinity=False),
    ),
    ("dpo", "data.num_workers", st.integers(max_value=-1)),
    ("dpo", "optim.learning_rate", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    ("dpo", "optim.weight_decay", st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False)),
    (
        "dpo",
        "optim.adam_beta1",
        st.floats(min_value=1, allow_infinity=False) | st.floats(max_value=-1e-9, allow_infinity=False),
    ),
    ("dpo", "optim.adam_beta2", st.floats(min_value=1, allow_infinity=False)),
    ("dpo", "optim.adam_epsilon", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    ("dpo", "optim.lr_warmup_steps", st.integers(max_value=-1)),
    ("dpo", "optim.max_grad_norm", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    ("dpo", "train.max_steps", _NEG),
    ("dpo", "train.batch_size", _NEG),
    ("dpo", "train.gradient_accumulation_steps", _NEG),
    ("dpo", "train.seed", st.integers(max_value=-1) | st.integers(min_value=2**32)),
    ("dpo", "train.resume", st.sampled_from(["earliest", "/no/such/checkpoint", "runs/none/checkpoint-7"])),
    ("dpo", "log.every_n_steps", _NEG),
    ("dpo", "log.validation_every_n_steps", st.integers(max_value=-1)),
    (
        "dpo",
        "log.report_to",
        st.lists(_TEXT.filter(lambda t: t not in ("tensorboard", "wandb")), min_size=1, max_size=2),
    ),
    ("dpo", "checkpoint.every_n_steps", st.integers(max_value=-1)),
    ("dpo", "checkpoint.keep_last", _NEG),
    (
        "dpo",
        "eval.seeds",
        st.just([])
        | st.lists(st.integers(max_value=-1) | st.integers(min_value=2**63), min_size=1, max_size=2),
    ),
    (
        "dpo",
        "eval.scorers",
        st.lists(
            st.sampled_from(["no_such_scorer", "2*", "*brightness", "3*nope+brightness"]),
            min_size=1,
            max_size=2,
        ),
    ),
    ("dpo", "eval.num_steps", _NEG),
    ("dpo", "eval.guidance_scale", st.floats(max_value=-1e-9, allow_infinity=False)),
    ("dpo", "eval.eta", st.floats(max_value=-1e-9, allow_infinity=False)),
    ("dpo", "eval.height", st.integers(-(2**20), 2**20).filter(lambda r: r < 8 or r % 8)),
    ("dpo", "eval.width", st.integers(-(2**20), 2**20).filter(lambda r: r < 8 or r % 8)),
    ("dpo", "eval.batch_size", _NEG),
    ("dpo", "eval.train_pairs", st.integers(max_value=-1)),
    ("dpo", "eval.train_pair_draws", _NEG),
    ("dpo", "eval.prompts_file", st.sampled_from(["no/such/prompts.txt", "configs", "x" * 300])),
    ("dpo", "method.name", _TEXT.filter(lambda t: t not in METHODS)),
    ("dpo", "method.beta", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    ("mapo", "method.beta", st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)),
    ("mapo", "method.snr_value", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    ("seppo", "method.pool_interval", _NEG),
    ("seppo", "method.pool_size", _NEG),
    ("seppo", "method.ref_num_steps", _NEG),
    ("seppo", "method.ref_guidance_scale", st.floats(max_value=-1e-9, allow_infinity=False)),
    ("seppo", "method.ref_eta", st.floats(max_value=-1e-9, allow_infinity=False)),
    ("prdp", "method.beta", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    ("prdp", "method.clip_epsilon", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    ("prdp", "method.samples_per_prompt", st.integers(max_value=1)),
    (
        "prdp",
        "method.prompts",
        st.sampled_from(["no/such/prompts.txt", "not-a-prompt-set", "", "p" * 300 + ".txt"]),
    ),
    ("prdp", "method.reward", st.sampled_from(["no_such_scorer", "", "2*"])),
    ("prdp", "method.eta", st.floats(max_value=0, allow_infinity=False)),
    ("prdp", "method.train_timesteps", _NEG | st.integers(min_value=10_000)),
    ("ddpo", "method.clip_range", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    ("ddpo", "method.adv_clip_max", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    ("ddpo", "method.num_prompts", _NEG),
    ("ddpo", "method.sample_batch_size", _NEG),
    ("ddpo", "method.height", st.integers(-(2**20), 2**20).filter(lambda r: r < 8 or r % 8)),
    ("ddpo", "method.max_bad_reward_fraction", st.floats(min_value=1, allow_infinity=False)),
    ("grpo", "method.clip_range", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    ("grpo", "method.beta", st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)),
    ("grpo", "method.std_eps", st.floats(max_value=0, allow_nan=False, allow_infinity=False)),
    ("grpo", "method.timestep_fraction", st.floats(max_value=0.1, allow_nan=False, allow_infinity=False)),
    ("grpo", "method.timestep_selection", st.sampled_from(["first", "all", ""])),
    ("grpo", "method.sde", st.sampled_from(["ddim", "euler", ""])),
    ("grpo", "method.samples_per_prompt", st.integers(max_value=1)),
    ("grpo", "method.train_timesteps", st.integers(min_value=1, max_value=8)),
    ("grpo", "method.ema_update_interval", _NEG),
]


def test_every_checked_section_has_an_out_of_range_case():
    covered = {key.split(".")[0] for _, key, _ in _OUT_OF_RANGE}
    assert covered == set(SECTIONS)


@pytest.mark.parametrize(
    ("method", "key", "values"), _OUT_OF_RANGE, ids=[f"{m}-{k}" for m, k, _ in _OUT_OF_RANGE]
)
def test_out_of_range_values_given_as_overrides_name_the_key(method, key, values, tmp_path):
    @settings(CHEAP, max_examples=2)
    @given(value=values)
    def check(value):
        _expect_config_error(_raw(method), tmp_path, [f"{key}={json.dumps(value)}"], key=key)

    check()


def test_cross_field_rules(tmp_path):
    _expect_config_error(
        _raw(), tmp_path, ["data.cache=true", "data.random_flip=true"], key="data.random_flip"
    )
    _expect_config_error(_raw(), tmp_path, ["log.validation_every_n_steps=5", "log.validation_prompts=[]"],
                         key="log.validation_prompts")
    _expect_config_error(
        _raw(),
        tmp_path,
        [
            "eval.prompts=[]",
            "eval.prompts_file=null",
            "log.validation_prompts=[]",
            "log.validation_every_n_steps=0",
        ],
        key="eval.prompts",
    )
    _expect_config_error(_raw("prdp"), tmp_path, ["method.num_steps=4", "method.train_timesteps=5"],
                         key="method.train_timesteps")
    window = ["method.timestep_selection=window", "method.num_steps=8"]
    _expect_config_error(_raw("grpo"), tmp_path, [*window, "method.window_range=[2, 9]"],
                         key="method.window_range")
    _expect_config_error(_raw("grpo"), tmp_path, [*window, "method.window_range=[2, 4]",
                                                   "method.window_size=3"], key="method.window_size")
    _expect_config_error(_raw("grpo"), tmp_path, ["method.beta=0.04", "method.steps_per_backward=1"],
                         key="method.steps_per_backward")


_FIXED_BAD_OVERRIDES = [
    "=1", ".=1", "a..b=1", "optim.=1", ".optim.learning_rate=1", "optim..learning_rate=1",  # empty key parts
    "model.name.x=1", "train.max_steps.y=2", "eval.seeds.z=[1]", "method.name.beta=1",  # sub-keys of a scalar
    *(f"{key}={text}" for key in ("optim.learning_rate", "model.name")  # values that are not YAML
      for text in ("[unclosed", "{", "a: b: c", "'", "!!python/object/apply:os.system [ls]", "*alias")),
]


@pytest.mark.parametrize("override", _FIXED_BAD_OVERRIDES)
def test_bad_dotted_overrides(override, tmp_path):
    _expect_config_error(_raw(), tmp_path, [override])


@CHEAP
@given(override=st.one_of(
    _TEXT.filter(lambda t: "=" not in t),  # no '='
    st.tuples(_TEXT.filter(lambda t: t and "." not in t and "=" not in t and t not in SECTIONS), _TEXT)
    .map(lambda kv: f"{kv[0]}.key={kv[1]}"),  # an unknown section
))
def test_generated_bad_dotted_overrides(override, tmp_path):
    _expect_config_error(_raw(), tmp_path, [override])


@CHEAP
@given(
    root=st.sampled_from([[], [1, 2], 0, "text", False, 3.5]),
    override=st.sampled_from(["train.max_steps=1", "x=1"]),
)
def test_a_file_that_is_not_a_mapping_with_overrides(root, override, tmp_path):
    _expect_config_error(root, tmp_path, [override], key="<root>")


# ====================================================================================================
# Preference data, prompt files, SePPO winners
# ====================================================================================================
def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with almost no pixel data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


_GOOD_PNG = _encoded(Image.new("RGB", (16, 16), (200, 30, 30)), "PNG")
_GOOD_JPEG = _encoded(Image.new("RGB", (24, 16), (30, 200, 30)), "JPEG")
#: Image files that decode (odd modes, formats and shapes) and files that do not, by name.
GOOD_IMAGES = {
    "rgb.png": _GOOD_PNG,
    "photo.jpg": _GOOD_JPEG,
    "one_pixel.png": _encoded(Image.new("RGB", (1, 1), "white"), "PNG"),
    "tall.png": _encoded(Image.new("L", (1, 300), 90), "PNG"),
    "wide.webp": _encoded(Image.new("RGB", (300, 2), (0, 0, 255)), "WEBP"),
    "alpha.png": _encoded(Image.new("RGBA", (9, 7), (10, 20, 30, 0)), "PNG"),
    "deep.png": _encoded(Image.new("I;16", (8, 8), 40000), "PNG"),
    "float.tiff": _encoded(Image.new("F", (8, 8), 0.5), "TIFF"),
    "palette.gif": _encoded(Image.new("P", (8, 8), 3), "GIF"),
    "bilevel.bmp": _encoded(Image.new("1", (8, 8), 1), "BMP"),
}
#: ... and a folder named like an image: passes the open-time check (video frames are folders), fails to
#: decode.
BAD_IMAGES = {
    "zero_bytes.png": b"",
    "truncated.png": _GOOD_PNG[: len(_GOOD_PNG) // 2],
    "truncated.jpg": _GOOD_JPEG[: len(_GOOD_JPEG) // 2],
    "garbage.png": bytes(range(256)) * 4,
    "text.jpg": b'{"not": "an image"}\n',
    "bomb.png": _png_header_only(100_000, 100_000),
    "zero_width.png": _png_header_only(0, 16),
    "header_only.png": _png_header_only(64, 64),
}
BAD_IMAGE_NAMES = sorted([*BAD_IMAGES, "folder.png"])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for name, data in {**GOOD_IMAGES, **BAD_IMAGES}.items():
        (root / name).write_bytes(data)
    (root / "folder.png").mkdir()  # a folder where an image file should be (allowed: a video's frames)
    return root


def _check_items(dataset, n: int, bad_rows: set[int], description: str) -> None:
    """Every item is a decoded pair or a counted bad item naming the source and row; nothing raises."""
    items = [dataset[i] for i in range(n)]
    for i, item in enumerate(items):
        if i in bad_rows:
            assert "bad" in item and description in item["bad"], item
        else:
            assert "bad" not in item, item
            assert item["pixels"].isfinite().all() and item["pixels"].abs().max() <= 1
    batch = collate_pairs(items)
    assert batch["size"] == n - len(bad_rows) and len(batch["bad"]) == len(bad_rows)
    counter = BadRowCounter(max_bad_fraction=1.0, min_rows=1)
    counter.update(batch)
    assert counter.bad == len(bad_rows)


_CAPTIONS = st.text(max_size=20) | st.none()

# One JSONL line: (kind, text or bytes). Kinds: good, bad_image (decoded at read time) or broken (open fails).
_JSONL_READABLE = st.one_of(
    st.tuples(st.just("blank"), st.sampled_from([b"", b"   ", b"\t"])),
    st.tuples(
        st.just("good"),
        st.fixed_dictionaries(
            {
                "prompt": _CAPTIONS,
                "chosen": st.sampled_from(sorted(GOOD_IMAGES)),
                "rejected": st.sampled_from(sorted(GOOD_IMAGES)),
            }
        ),
    ),
    st.tuples(
        st.just("bad_image"),
        st.fixed_dictionaries(
            {
                "prompt": st.text(max_size=5),
                "chosen": st.sampled_from(BAD_IMAGE_NAMES),
                "rejected": st.sampled_from(sorted(GOOD_IMAGES)),
            }
        ),
    ),
    st.tuples(
        st.just("bad_image"),
        st.fixed_dictionaries(
            {
                "prompt": st.text(max_size=5),
                "chosen": st.sampled_from(sorted(GOOD_IMAGES)),
                "rejected": st.sampled_from(BAD_IMAGE_NAMES),
            }
        ),
    ),
)
_JSONL_BROKEN = st.one_of(
    st.tuples(
        st.just("broken"),
        st.sampled_from(["prompt", "chosen", "rejected"]).map(
            lambda k: {key: "rgb.png" for key in ("prompt", "chosen", "rejected") if key != k}
        ),
    ),  # a missing key
    st.tuples(
        st.just("broken"),
        st.tuples(
            st.sampled_from(["chosen", "rejected"]),
            st.integers() | st.lists(st.text(max_size=3), max_size=2) | st.none() | st.booleans(),
        ).map(lambda kv: {"prompt": "p", "chosen": "rgb.png", "rejected": "rgb.png", kv[0]: kv[1]}),
    ),  # wrong type
    st.tuples(
        st.just("broken"),
        (st.integers() | st.lists(st.integers(), max_size=2) | st.booleans()).map(
            lambda v: {"prompt": v, "chosen": "rgb.png", "rejected": "rgb.png"}
        ),
    ),  # a prompt that is not text
    st.tuples(
        st.just("broken"),
        st.sampled_from(["missing.png", "", "../nowhere/x.png", "a" * 300 + ".png"]).map(
            lambda f: {"prompt": "p", "chosen": f, "rejected": "rgb.png"}
        ),
    ),  # not an image file
    st.tuples(
        st.just("broken"), st.lists(st.integers(), max_size=3) | st.integers() | st.text(max_size=5)
    ),  # not an object
    st.tuples(
        st.just("broken"),
        st.text(min_size=1, max_size=20)
        .filter(lambda t: t.strip() and not _is_json(t))
        .map(lambda t: t.replace("\n", " ").replace("\r", " ").encode()),
    ),  # not JSON
    st.tuples(
        st.just("broken"),
        st.sampled_from(
            [b'{"prompt": "\xff\xfe", "chosen": "rgb.png", "rejected": "rgb.png"}', b"\xc3\x28", b"\x80abc"]
        ),
    ),  # not UTF-8
    st.tuples(st.just("broken"), st.just(b"[" * 100_000)),  # absurdly nested
)


@st.composite
def _files_of(draw, readable: st.SearchStrategy, broken: st.SearchStrategy, max_size: int):
    """Readable lines (good rows, rows with an image that does not decode, blanks), and half the time one
    broken line at a random place."""
    out = draw(st.lists(readable, max_size=max_size))
    if draw(st.booleans()):
        out.insert(draw(st.integers(0, len(out))), draw(broken))
    return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _line_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def _write_lines(path: Path, lines) -> None:
    path.write_bytes(b"".join(_line_bytes(value) + b"\n" for _, value in lines))


def _first_broken_line(lines) -> int | None:
    return next((n for n, (kind, _) in enumerate(lines, 1) if kind == "broken"), None)


@CHEAP
@given(lines=_files_of(_JSONL_READABLE, _JSONL_BROKEN, 6))
def test_generated_jsonl_pair_files(lines, image_dir):
    path = image_dir / "pairs.jsonl"
    _write_lines(path, lines)
    broken = _first_broken_line(lines)
    rows = [kind for kind, _ in lines if kind in ("good", "bad_image")]
    event(
        "rejected at open"
        if broken is not None or not rows
        else f"opened, {rows.count('bad_image')} bad image(s)"
    )
    if broken is not None or not rows:
        with pytest.raises(DataError) as info:
            open_pairs(str(path))
        assert (f"{path}:{broken}:" if broken else str(path)) in str(info.value)
        return
    source = open_pairs(str(path))
    assert len(source) == len(rows)
    dataset = PreferenceDataset(source, Preprocessing(resolution=8, random_crop=True))
    _check_items(dataset, len(rows), {i for i, kind in enumerate(rows) if kind == "bad_image"}, str(path))


_GOOD_ROW = {"prompt": "p", "chosen": "rgb.png", "rejected": "photo.jpg"}
_GOOD_WINNER = {"prompt": "p", "image": "rgb.png"}
_DROP = object()


def _broken_lines(good: dict, path_key: str) -> dict[str, bytes]:
    """Each kind of broken line once, by name (the generated tests combine them at random)."""
    def line(**changes) -> bytes:
        return json.dumps({k: v for k, v in {**good, **changes}.items() if v is not _DROP}).encode()

    return {
        "missing-key": line(**{path_key: _DROP}),
        "path-not-text": line(**{path_key: ["rgb.png"]}),
        "path-null": line(**{path_key: None}),
        "prompt-not-text": line(prompt=7),
        "missing-image": line(**{path_key: "missing.png"}),
        "empty-path": line(**{path_key: ""}),
        "too-long-path": line(**{path_key: "a" * 300 + ".png"}),
        "not-an-object": b"[1, 2]",
        "not-json": b"{prompt: p}",
        "not-utf8": b'{"prompt": "\xff\xfe"}',
        "nested-100000-deep": b"[" * 100_000,
    }


@pytest.mark.parametrize("name", sorted(_broken_lines(_GOOD_ROW, "chosen")))
def test_each_kind_of_broken_line_names_file_and_line(name, image_dir):
    from diffalign.config import DataConfig
    from diffalign.winners import open_winners

    path = image_dir / f"broken-{name}.jsonl"
    path.write_bytes(
        json.dumps(_GOOD_ROW).encode() + b"\n\n" + _broken_lines(_GOOD_ROW, "chosen")[name] + b"\n"
    )
    with pytest.raises(DataError, match=re.escape(f"{path}:3:")):
        open_pairs(str(path))
    winners = image_dir / f"winners-{name}.jsonl"  # the same kind of line in a SePPO winners file
    winners.write_bytes(
        json.dumps(_GOOD_WINNER).encode() + b"\n" + _broken_lines(_GOOD_WINNER, "image")[name] + b"\n"
    )
    with pytest.raises(DataError, match=re.escape(f"{winners}:2:")):
        open_winners(DataConfig(source=str(winners)))


@pytest.mark.parametrize("name", BAD_IMAGE_NAMES)
def test_each_undecodable_image_is_counted_and_skipped(name, image_dir):
    path = image_dir / f"bad-{name}.jsonl"
    rows = [_GOOD_ROW, {**_GOOD_ROW, "rejected": name}, {**_GOOD_ROW, "chosen": name}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _check_items(PreferenceDataset(open_pairs(str(path)), Preprocessing(resolution=8)), 3, {1, 2}, str(path))


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_each_odd_but_valid_image_decodes(name, image_dir):
    path = image_dir / f"good-{name}.jsonl"
    path.write_text(json.dumps({"prompt": None, "chosen": name, "rejected": name}) + "\n")
    _check_items(
        PreferenceDataset(open_pairs(str(path)), Preprocessing(resolution=8, random_crop=True)),
        1,
        set(),
        str(path),
    )


_BLOBS = {
    "png": _GOOD_PNG,
    "jpeg": _GOOD_JPEG,
    **{name: data for name, data in BAD_IMAGES.items()},
    "null": None,
}


@settings(CHEAP, max_examples=15)
@given(
    rows=st.lists(
        st.tuples(
            _CAPTIONS,
            st.sampled_from(sorted(_BLOBS)),
            st.sampled_from(sorted(_BLOBS)),
            st.sampled_from([1.0, 0.0, 0.5, None, math.nan, 2.0]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_generated_pickapic_tables(rows, tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({
        "caption": pa.array([r[0] for r in rows], type=pa.string()),
        "jpg_0": pa.array([_BLOBS[r[1]] for r in rows], type=pa.binary()),
        "jpg_1": pa.array([_BLOBS[r[2]] for r in rows], type=pa.binary()),
        "label_0": pa.array([r[3] for r in rows], type=pa.float64()),
    }), path)
    kept = [r for r in rows if r[3] in (0.0, 1.0)]
    event("rejected at open" if not kept else "opened")
    if not kept:
        with pytest.raises(DataError, match="ties or unlabeled"):
            open_pairs(str(path))
        return
    source = open_pairs(str(path))
    assert len(source) == len(kept)
    bad = {i for i, r in enumerate(kept) if r[1] not in ("png", "jpeg") or r[2] not in ("png", "jpeg")}
    _check_items(PreferenceDataset(source, Preprocessing(resolution=8)), len(kept), bad, str(path))


@pytest.mark.parametrize("table", [
    {"caption": ["a"], "jpg_0": [_GOOD_PNG], "jpg_1": [_GOOD_PNG], "label_0": ["yes"]},
    {"caption": ["a", "b"], "jpg_0": [_GOOD_PNG] * 2, "jpg_1": [_GOOD_PNG] * 2, "label_0": [[1.0], [0.0]]},
    {"caption": ["a"], "jpg_0": [_GOOD_PNG], "jpg_1": [_GOOD_PNG]},
    {"prompt": ["a"], "chosen": [_GOOD_PNG], "rejected": [_GOOD_PNG]},
], ids=["label-text", "label-list", "no-label", "other-schema"])
def test_pickapic_tables_with_a_bad_schema(table, tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(DataError, match="label_0"):
        open_pairs(str(path))


@pytest.mark.parametrize("content", [b"", b"PAR1", b"PAR1" + bytes(100) + b"PAR1", b"not parquet at all"],
                         ids=["zero-bytes", "magic-only", "corrupt-footer", "text"])
def test_corrupt_parquet_files(content, tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(content)
    with pytest.raises(DataError, match="train.parquet"):
        open_pairs(str(path))


def test_truncated_parquet_file(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"caption": ["a"] * 50, "jpg_0": [_GOOD_PNG] * 50, "jpg_1": [_GOOD_PNG] * 50,
                             "label_0": [1.0] * 50}), good)
    path = tmp_path / "train.parquet"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="train.parquet"):
        open_pairs(str(path))


@pytest.mark.parametrize(
    "state",
    ["garbage{", "{}", '{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}'],
    ids=["not-json", "empty-state", "corrupt-arrow"],
)
def test_broken_saved_dataset_folders(state, tmp_path):
    (tmp_path / "data-00000-of-00001.arrow").write_bytes(b"garbage")
    (tmp_path / "state.json").write_text(state)
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        open_pairs(str(tmp_path))


def test_a_folder_mixing_parquet_and_arrow(tmp_path):
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [_GOOD_PNG], "jpg_1": [_GOOD_PNG], "label_0": [1.0]}),
                   tmp_path / "a.parquet")
    (tmp_path / "b.arrow").write_bytes(b"garbage")
    with pytest.raises(DataError, match="mix of .arrow, .parquet"):
        open_pairs(str(tmp_path))


@pytest.mark.parametrize("case", ["corrupt", "no-column", "empty-column"])
def test_bad_prompt_tables_are_config_errors(case, tmp_path):
    path = tmp_path / "prompts.parquet"
    if case == "corrupt":
        path.write_bytes(b"PAR1" + bytes(64) + b"PAR1")
    else:
        column = "caption" if case == "no-column" else "prompt"
        pq.write_table(
            pa.table(
                {column: pa.array(["a cat"] if case == "no-column" else [None, "  "], type=pa.string())}
            ),
            path,
        )
    err = _expect_config_error(_raw("prdp"), tmp_path, [f"method.prompts={path}"], key="method.prompts")
    assert str(path) in str(err)


@pytest.mark.parametrize(
    "name", ["empty.jsonl", "blank.jsonl", "pairs.txt", "no_such_file.jsonl", "empty_folder"]
)
def test_empty_or_missing_sources(name, tmp_path):
    if name == "blank.jsonl":
        (tmp_path / name).write_text("\n  \n\n")
    elif name == "empty_folder":
        (tmp_path / name).mkdir()
    elif name != "no_such_file.jsonl":
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=name):
        open_pairs(str(tmp_path / name))


# ---- prompt files ------------------------------------------------------------------------------------
_PROMPT_TEXT = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(st.text(max_size=10), max_size=4).map(lambda ps: "\n".join(ps).encode("utf-8", "surrogatepass")),
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"prompt": st.text(max_size=8)}),
            st.integers(),
            st.text(max_size=4),
            st.fixed_dictionaries({"Prompt": st.integers()}),
        ),
        max_size=4,
    ).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()),
    st.lists(st.one_of(st.text(max_size=8), st.integers()), max_size=4).map(
        lambda ps: json.dumps(ps).encode()
    ),
    st.lists(st.lists(st.text(max_size=6), max_size=3), max_size=4).map(
        lambda rows: ("Prompt,Category\n" + "\n".join(",".join(r) for r in rows)).encode(
            "utf-8", "surrogatepass"
        )
    ),
    st.sampled_from(
        [
            b'Prompt\tCategory\n"unclosed\tx\n',
            b"Prompt\na\x00b\n",
            b"Prompt\n" + b"x" * 200_000 + b"\n",
            b"[" * 100_000,
            b'\xef\xbb\xbf["bom"]',
        ]
    ),
)


@CHEAP
@given(suffix=st.sampled_from([".txt", ".jsonl", ".csv", ".tsv", ".json"]), content=_PROMPT_TEXT)
def test_generated_prompt_files(suffix, content, tmp_path):
    from diffalign.prompt_sets import load_prompt_source, load_prompts

    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(content)
    for load in (load_prompts, load_prompt_source):
        try:
            prompts = load(str(path))
        except ValueError as err:
            event(f"{suffix} rejected")
            assert str(path) in str(err), f"{load.__name__}: {err}"
        else:
            event(f"{suffix} read")
            assert prompts and all(isinstance(p, str) and p for p in prompts)
    if suffix in (".txt", ".jsonl"):  # eval.prompts_file's reader
        from diffalign.prompts import read_prompts

        try:
            assert all(isinstance(p, str) for p in read_prompts(path))
        except ValueError as err:
            assert str(path) in str(err), str(err)


_FIXED_PROMPT_FILES = {
    **{
        f"not-utf8{suffix}": (suffix, b"Prompt\n\xff\xfe bad\n")
        for suffix in (".txt", ".jsonl", ".csv", ".tsv", ".json")
    },
    **{f"empty{suffix}": (suffix, b"") for suffix in (".txt", ".jsonl", ".csv", ".tsv", ".json")},
    "nul-byte.csv": (".csv", b"Prompt\na\x00b\n"),
    "huge-field.csv": (".csv", b"Prompt\n" + b"x" * 200_000 + b"\n"),
    "unclosed-quote.tsv": (".tsv", b'Prompt\tCategory\n"unclosed\tx\n'),
    "no-prompt-column.csv": (".csv", b"text,category\na cat,animals\n"),
    "nested.json": (".json", b"[" * 100_000),
    "not-a-list.json": (".json", b'{"prompts": ["a"]}'),
    "numbers.json": (".json", b"[1, 2]"),
    "bom.json": (".json", b'\xef\xbb\xbf["a cat"]'),
    "rows-without-prompt.jsonl": (".jsonl", b'{"text": "a cat"}\n'),
}


@pytest.mark.parametrize("name", sorted(_FIXED_PROMPT_FILES))
def test_each_kind_of_bad_prompt_file(name, tmp_path):
    from diffalign.prompt_sets import load_prompts

    suffix, content = _FIXED_PROMPT_FILES[name]
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(content)
    try:
        prompts = load_prompts(str(path))
    except ValueError as err:
        assert str(path) in str(err), str(err)
    else:  # only a NUL, a long prompt or a quote left open at the end (csv's lenient reading) may be text
        assert name in ("nul-byte.csv", "huge-field.csv", "unclosed-quote.tsv"), prompts
        assert prompts and all(isinstance(p, str) and p for p in prompts)


def test_a_bad_prompt_file_is_a_config_error(tmp_path):
    """Online methods' prompts and eval.prompts_file are read when the config loads, not after the model."""
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a fine prompt\n\xff\xfe not utf-8\n")
    _expect_config_error(_raw("prdp"), tmp_path, [f"method.prompts={bad}"], key="method.prompts")
    _expect_config_error(
        _raw(), tmp_path, [f"eval.prompts_file={bad}", "eval.prompts=[]"], key="eval.prompts_file"
    )
    bad.write_text("\n \n")
    _expect_config_error(_raw("ddpo"), tmp_path, [f"method.prompts={bad}"], key="method.prompts")


# ---- SePPO winners -------------------------------------------------------------------------------------
_WINNER_READABLE = st.one_of(
    st.tuples(st.just("blank"), st.just(b"")),
    st.tuples(
        st.just("good"),
        st.fixed_dictionaries({"prompt": st.text(max_size=8), "image": st.sampled_from(sorted(GOOD_IMAGES))}),
    ),
    st.tuples(
        st.just("bad_image"),
        st.fixed_dictionaries({"prompt": st.text(max_size=8), "image": st.sampled_from(BAD_IMAGE_NAMES)}),
    ),
)
_WINNER_BROKEN = st.one_of(
    st.tuples(
        st.just("broken"),
        st.sampled_from(
            [
                {"prompt": "p"},
                {"image": "rgb.png"},
                {"prompt": 3, "image": "rgb.png"},
                {"prompt": "p", "image": ["rgb.png"]},
                {"prompt": "p", "image": "missing.png"},
                {"prompt": "p", "image": ""},
                {"prompt": "p", "image": "b" * 300},
                [1],
                "text",
                7,
            ]
        ),
    ),
    st.tuples(
        st.just("broken"),
        st.sampled_from([b"{not json", b"\xff\xfe\x00", b'{"prompt": "p", "image": "rgb.png"']),
    ),
)


@CHEAP
@given(lines=_files_of(_WINNER_READABLE, _WINNER_BROKEN, 5))
def test_generated_seppo_winner_files(lines, image_dir):
    from diffalign.config import DataConfig
    from diffalign.winners import WinnersDataset, open_winners

    path = image_dir / "winners.jsonl"
    _write_lines(path, lines)
    broken = _first_broken_line(lines)
    rows = [kind for kind, _ in lines if kind in ("good", "bad_image")]
    event(
        "rejected at open"
        if broken is not None or not rows
        else f"opened, {rows.count('bad_image')} bad image(s)"
    )
    if broken is not None or not rows:
        with pytest.raises(DataError) as info:
            open_winners(DataConfig(source=str(path)))
        assert str(path) in str(info.value)
        if broken is not None:
            assert f"{path}:{broken}:" in str(info.value)
        return
    source = open_winners(DataConfig(source=str(path)))
    assert len(source) == len(rows)
    _check_items(WinnersDataset(source, resolution=8, random_flip=True, seed=0), len(rows),
                 {i for i, kind in enumerate(rows) if kind == "bad_image"}, str(path))


# ====================================================================================================
# End to end: unreadable rows during `diffalign train` (fixed cases)
# ====================================================================================================
E2E = [
    "log.progress_bar=false",
    "log.validation_every_n_steps=0",
    "eval.enabled=false",
    "data.random_flip=false",
    "train.batch_size=4",
    "log.every_n_steps=1",
    "checkpoint.keep_last=null",
]


def _shapes_pairs_with_unreadable_images(tmp_path: Path, unreadable: int) -> tuple[Path, list[Path]]:
    """A copy of the shipped 24 shape pairs whose first ``unreadable`` winner images are not images."""
    data = tmp_path / "data"
    shutil.copytree(ROOT / "data" / "shapes-pairs", data)
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines() if line.strip()]
    broken = [data / row["chosen"] for row in rows[:unreadable]]
    for file in broken:
        file.write_bytes(b"this is not a PNG")
    return data, broken


@pytest.mark.slow
def test_training_skips_and_counts_a_few_unreadable_pairs(tmp_path, caplog):
    from diffalign.cli import main

    data, broken = _shapes_pairs_with_unreadable_images(tmp_path, unreadable=1)
    out = tmp_path / "run"
    args = ["train", str(BASE_CONFIGS["dpo"]), f"train.output_dir={out}", f"data.source={data}", *E2E,
            "data.max_pairs=8", "train.max_steps=2", "checkpoint.every_n_steps=0"]
    with caplog.at_level(logging.WARNING, logger="diffalign.data"):
        assert main(args) == 0  # 2 batches of 4: each of the 8 pairs is read once
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable pair" in r.getMessage()]
    assert len(skipped) == 1 and "(1 so far)" in skipped[0] and broken[0].name in skipped[0]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_too_many_unreadable_pairs_stop_the_run_and_keep_its_checkpoints(tmp_path, capsys, tiny_sdxl_path):
    from safetensors.torch import load_file

    from diffalign.cli import main
    from diffalign.models import load_pipeline

    data, broken = _shapes_pairs_with_unreadable_images(tmp_path, unreadable=8)
    out = tmp_path / "run"
    args = ["train", str(BASE_CONFIGS["dpo"]), f"train.output_dir={out}", f"data.source={data}", *E2E,
            "data.max_bad_fraction=0.05", "checkpoint.every_n_steps=1"]
    assert main([*args, "train.max_steps=20"]) == 2
    err = capsys.readouterr().err
    assert "unreadable" in err and "data.max_bad_fraction=0.05" in err and str(data) in err

    # The checkpoints written before the error are complete and load.
    done = sorted((p for p in (out / "checkpoints").iterdir() if (p / "trainer_state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))
    assert done, "no complete checkpoint was written before the data error"
    steps = [int(p.name.split("-")[1]) for p in done]
    assert steps == list(range(1, len(done) + 1))
    for folder in done:
        for file in folder.rglob("*"):
            if file.suffix == ".safetensors":
                assert all(t.isfinite().all() for t in load_file(str(file)).values()), file
            elif file.suffix == ".json":
                json.loads(file.read_text())
    lora = next(p.parent for p in done[-1].rglob("pytorch_lora_weights.safetensors"))
    pipe = load_pipeline(str(tiny_sdxl_path))
    pipe.load_lora_weights(str(lora))

    # With the data repaired, the run resumes from the newest checkpoint and goes on. The bad-row count is
    # part of the resumed state (the rows already read stay counted), so the limit is raised as well.
    fixed, _ = _shapes_pairs_with_unreadable_images(tmp_path / "fixed", unreadable=0)
    for file in broken:
        shutil.copy(fixed / file.relative_to(data), file)
    assert (
        main([*args, "data.max_bad_fraction=0.5", f"train.max_steps={steps[-1] + 1}", "--resume", "latest"])
        == 0
    )
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == steps[-1] + 1
