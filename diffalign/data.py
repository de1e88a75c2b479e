"""Preference pairs for the offline methods (Diffusion-DPO, MaPO, SePPO's winners).

Two on-disk formats, one in-memory layout:

* **Pick-a-Pic v2** (a hub id through ``datasets``, local parquet/arrow files, or a ``save_to_disk``
  folder): columns ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes) and ``label_0`` (1, 0, or 0.5
  for a tie). Ties are dropped; the winner is ``jpg_0`` when ``label_0 == 1``.
* **JSONL**: one object per line with ``prompt``, ``chosen`` and ``rejected`` image paths (relative to
  the file). ``diffalign pairs`` writes this format (``pairs.jsonl`` in its output folder). For video
  models the two paths are videos: an animated GIF/WebP, an MP4 (with ``imageio[ffmpeg]``) or a
  folder of frame images (sorted by name); each is resampled to ``num_frames`` evenly spaced frames
  or, with ``frame_policy="reject"``, skipped and counted when its length differs.

Each item is a pair, winner first: ``pixels`` [2, 3, R, R] in [-1, 1], resized, cropped and flipped
*jointly*, with SDXL micro-conditioning (original size, crop offsets). The schema, ties and file paths
are checked when a dataset is opened (before any model loads); an image that cannot be decoded is
returned as a bad item, counted and skipped by :class:`BadRowCounter`, which stops the run with a clear
error once more than ``max_bad_fraction`` of the rows read are bad.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageSequence

from diffalign.images import to_rgb
from diffalign.jsonl import iter_jsonl
from diffalign.models import HUB_ID

log = logging.getLogger("diffalign.data")

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
#: Files read as tables (Pick-a-Pic shards, prompt datasets).
TABLE_SUFFIXES = (".parquet", ".arrow")


class DataError(ValueError):
    """A dataset that cannot be used: the message names the file/row/column and what was expected."""


# ----------------------------------------------------------------------------------------------------
# Opening a dataset: schema checks only, no image decoding
# ----------------------------------------------------------------------------------------------------
def detect_format(source: str) -> str:
    path = Path(os.path.expanduser(source))
    if path.is_file():
        if path.suffix == ".jsonl":
            return "jsonl"
        if path.suffix in TABLE_SUFFIXES:
            return "pickapic"
        raise DataError(f"data source {path}: expected a .jsonl, .parquet or .arrow file")
    if path.is_dir():
        if (path / "pairs.jsonl").is_file():
            return "jsonl"
        if any(path.rglob("*.parquet")) or any(path.rglob("*.arrow")):
            return "pickapic"
        raise DataError(f"data source {path}: folder has no pairs.jsonl and no .parquet/.arrow files")
    if HUB_ID.match(source) and not source.startswith((".", "/", "~")) and not path.parent.is_dir():
        return "pickapic"
    # 'data/typo': a local path, not an 'org/name' hub id
    if path.parent.is_dir() and path.parent != Path("."):
        raise DataError(f"data source {source!r} does not exist: folder {path.parent} has no {path.name!r}")
    raise DataError(f"data source {source!r} does not exist (expected a file, a folder, or a hub dataset id)")


class PairSource:
    """Rows of (caption, winner image, loser image), ties already dropped. Images load lazily."""

    description: str

    def __len__(self) -> int:
        raise NotImplementedError

    def caption(self, i: int) -> str:
        raise NotImplementedError

    def images(self, i: int, draft_size: int | None = None) -> tuple[Decoded, Decoded]:
        """(winner, loser) as RGB images with their original sizes; raises on undecodable data."""
        raise NotImplementedError

    def videos(self, i: int) -> tuple[list[Image.Image], list[Image.Image]]:
        """(winner, loser) as lists of RGB frames; raises on unreadable videos."""
        raise NotImplementedError(f"{self.description}: video pairs are read from JSONL only (video files or "
                                  "frame folders); this format holds images")

    def where(self, i: int) -> str:
        """Where a user finds pair ``i``: ``FILE row N`` (Pick-a-Pic) or ``FILE:LINE`` (JSONL)."""
        return f"{self.description} pair {i}"

    def fingerprint(self) -> str:
        """Identifies the rows for cache keys."""
        raise NotImplementedError


class Decoded(NamedTuple):
    image: Image.Image  # RGB, possibly decoded at a reduced scale (JPEG draft) when very large
    original_size: tuple[int, int]  # (height, width) of the stored image


def _decode(value, where: str, draft_size: int | None) -> Decoded:
    if isinstance(value, Image.Image):
        image = value
    else:
        if isinstance(value, dict):  # datasets' Image feature without decoding: {"bytes", "path"}
            value = value.get("bytes") or (Path(value["path"]).read_bytes() if value.get("path") else None)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ValueError(f"{where}: expected encoded image bytes, got {type(value).__name__}")
        image = Image.open(io.BytesIO(bytes(value)))
    original = (image.height, image.width)
    if draft_size and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))  # decode huge JPEGs at a reduced scale
    image.load()
    return Decoded(to_rgb(image), original)


def media_file(root: Path, value: str, where: str, label: str) -> Path:
    """The image/video file (or frame folder) a row names, relative to ``root`` unless absolute; a
    :class:`DataError` naming ``where`` and ``label`` when it cannot be used or does not exist."""
    file = Path(value) if os.path.isabs(value) else root / value
    try:
        exists = file.is_file() or file.is_dir()  # a folder: a video's frames
    except OSError as err:  # e.g. a name too long for the file system
        raise DataError(f"{where}: {label} {value!r} cannot be used ({err.strerror})") from None
    if not exists:
        raise DataError(f"{where}: {label} {file} does not exist")
    return file


def open_image_file(path: Path, draft_size: int | None) -> Decoded:
    """Decode an image file (huge JPEGs at a reduced scale when ``draft_size`` is given)."""
    with Image.open(path) as image:
        original = (image.height, image.width)
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        return Decoded(to_rgb(image), original)


def _label(value, where: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label_0 must be a number (1 or 0, 0.5 for a tie), got {value!r}") from None


class PickapicPairs(PairSource):
    """``files``: ``[(file, rows)]`` in the order the table concatenates them (local parquet/arrow), so a
    row is named by its file and its row there; without them rows are named by their table index."""

    def __init__(self, table, description: str, max_pairs: int | None = None,
                 files: list[tuple[str, int]] | None = None):
        missing = [c for c in PICKAPIC_COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"{description}: missing column(s) {', '.join(missing)}; Pick-a-Pic format needs "
                            f"{', '.join(PICKAPIC_COLUMNS)} (has: {', '.join(table.column_names)})")
        labels = table["label_0"]
        labels = list(labels) if not isinstance(labels, list) else labels
        labels = [_label(v, f"{description} row {i}") for i, v in enumerate(labels)]
        keep = [i for i, v in enumerate(labels) if v is not None and v in (0.0, 1.0)]
        if not keep:
            raise DataError(f"{description}: all {len(labels)} rows are ties or unlabeled (label_0 not 0 or "
                            "1); no preference pairs to train on")
        if max_pairs is not None:
            keep = keep[:max_pairs]
        self.table, self.rows, self.description = table, keep, description
        self.files = files if files and sum(n for _, n in files) == len(labels) else None
        self.num_ties = len(labels) - len(keep) if max_pairs is None else None
        self._winner_first = [float(labels[i]) == 1.0 for i in keep]

    def __len__(self):
        return len(self.rows)

    def caption(self, i):
        caption = self.table[self.rows[i]]["caption"]
        return caption if isinstance(caption, str) else ""

    def where(self, i):
        row = self.rows[i]
        for file, count in self.files or ():
            if row < count:
                return f"{file} row {row}"
            row -= count
        return f"{self.description} row {self.rows[i]}"

    def images(self, i, draft_size=None):
        row = self.table[self.rows[i]]
        where = self.where(i)
        first, second = (_decode(row[key], f"{where} {key}", draft_size) for key in ("jpg_0", "jpg_1"))
        return (first, second) if self._winner_first[i] else (second, first)

    def fingerprint(self):
        fp = getattr(self.table, "_fingerprint", None) or self.description
        return f"pickapic:{fp}:{len(self.rows)}"


class JsonlPairs(PairSource):
    def __init__(self, path: Path, max_pairs: int | None = None):
        self.description = str(path)
        root = path.parent
        self.rows: list[tuple[str, Path, Path]] = []
        self.lines: list[str] = []  # "FILE:LINE" of each pair
        for where, row in iter_jsonl(path, DataError):
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with prompt, chosen, rejected")
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
            if missing:
                raise DataError(f"{where}: missing key(s) {', '.join(missing)}; expected prompt, chosen, "
                                "rejected")
            prompt = row["prompt"] if isinstance(row["prompt"], str) else None
            if prompt is None and row["prompt"] is not None:
                raise DataError(f"{where}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
            paths = []
            for key in ("chosen", "rejected"):
                if not isinstance(row[key], str) or not row[key]:
                    raise DataError(f"{where}: {key!r} must be an image path, got {row[key]!r}")
                paths.append(media_file(root, row[key], where, f"{key} image"))
            self.rows.append((prompt or "", paths[0], paths[1]))
            self.lines.append(where)
            if max_pairs is not None and len(self.rows) >= max_pairs:
                break
        if not self.rows:
            raise DataError(f"{path}: no pairs")

    def __len__(self):
        return len(self.rows)

    def caption(self, i):
        return self.rows[i][0]

    def where(self, i):
        return self.lines[i]

    def images(self, i, draft_size=None):
        _, chosen, rejected = self.rows[i]
        return open_image_file(chosen, draft_size), open_image_file(rejected, draft_size)

    def videos(self, i):
        _, chosen, rejected = self.rows[i]
        return read_video_frames(chosen), read_video_frames(rejected)

    def fingerprint(self):
        digest = hashlib.sha256()
        for prompt, chosen, rejected in self.rows:
            for file in (chosen, rejected):
                stat = file.stat()
                digest.update(f"{prompt}|{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return f"jsonl:{digest.hexdigest()}"


def _table_rows(path: Path) -> int:
    """Rows in one parquet or arrow file, from its metadata (nothing decoded)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    import datasets

    return datasets.Dataset.from_file(str(path)).num_rows


def open_pairs(source: str, format: str = "auto", split: str = "train",
               max_pairs: int | None = None) -> PairSource:
    """Open a preference dataset and check its schema (no image decoding)."""
    fmt = detect_format(source) if format == "auto" else format
    path = Path(os.path.expanduser(source))
    if fmt == "jsonl":
        file = path / "pairs.jsonl" if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"JSONL pairs file {file} does not exist")
        return JsonlPairs(file, max_pairs)
    if fmt != "pickapic":
        raise DataError(f"unknown data format {fmt!r}; expected auto, pickapic or jsonl")
    import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_info.json").is_file()):
            try:
                table = datasets.load_from_disk(str(path))
            except Exception as err:  # datasets raises many types for a broken save_to_disk folder
                raise DataError(f"{path}: cannot read as a saved dataset ({type(err).__name__}: "
                                f"{err})") from None
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise DataError(f"{path}: no split {split!r} (has: {', '.join(table)})")
                table = table[split]
        elif path.exists():
            files = ([path] if path.is_file()
                     else sorted(p for p in path.rglob("*") if p.suffix in TABLE_SUFFIXES))
            kinds = {p.suffix for p in files}
            if len(kinds) != 1:
                raise DataError(f"{path}: mix of {', '.join(sorted(kinds))} files; expected only .parquet or "
                                "only .arrow")
            builder = "parquet" if kinds == {".parquet"} else "arrow"
            try:
                table = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
                counts = [(str(p), _table_rows(p)) for p in files]
            except Exception as err:  # pyarrow raises many types for a broken file
                raise DataError(f"{path}: cannot read as {builder} ({type(err).__name__}: {err})") from None
            return PickapicPairs(table, str(source), max_pairs, files=counts)
        else:
            try:
                table = datasets.load_dataset(source, split=split)
            except Exception as err:
                raise DataError(f"could not load dataset {source!r} split {split!r} from the hub "
                                f"({type(err).__name__}: {err}); there is no local file or folder {source!r} "
                                "either; without network access, pass local parquet files") from None
    return PickapicPairs(table, str(source), max_pairs)


# ----------------------------------------------------------------------------------------------------
# Joint preprocessing
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocessing:
    resolution: int = 64
    random_crop: bool = False
    random_flip: bool = True
    proportion_empty_prompts: float = 0.0
    seed: int = 0
    num_frames: int | None = None  # set for video models: items are clips of this many frames
    frame_policy: str = "resample"  # other lengths: "resample" evenly, or "reject" (a counted bad row)

    def key(self) -> str:
        key = f"r{self.resolution}-crop{'rand' if self.random_crop else 'center'}-flip{int(self.random_flip)}"
        return key if self.num_frames is None else f"{key}-f{self.num_frames}-{self.frame_policy}"


# ----------------------------------------------------------------------------------------------------
# Videos: files or frame folders
# ----------------------------------------------------------------------------------------------------
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PIL_VIDEO_SUFFIXES = (".gif", ".webp", ".png", ".apng")  # animated formats Pillow reads frame by frame


def read_video_frames(path: Path) -> list[Image.Image]:
    """The RGB frames of a video: a folder of frame images (sorted by name), an animated GIF/WebP/APNG
    (Pillow), or another container such as MP4 through ``imageio`` (needs ``pip install imageio[ffmpeg]``)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"frame folder {path} has no {'/'.join(FRAME_SUFFIXES)} images")
        return [open_image_file(f, None).image for f in files]
    if path.suffix.lower() in PIL_VIDEO_SUFFIXES:
        with Image.open(path) as video:
            return [to_rgb(frame.copy()) for frame in ImageSequence.Iterator(video)]
    try:
        import imageio.v3 as iio
    except ImportError:
        raise ValueError(f"{path}: reading {path.suffix} videos needs imageio with a video plugin (pip "
                         "install imageio[ffmpeg]); GIF/WebP files and frame folders need nothing") from None
    try:
        return [Image.fromarray(np.asarray(frame)).convert("RGB") for frame in iio.imiter(path)]
    except Exception as err:  # imageio raises plugin-specific types for a broken or unsupported file
        raise ValueError(f"{path}: cannot read video ({type(err).__name__}: {err})") from None


def fit_frames(frames: list, num_frames: int, policy: str, where: str) -> list:
    """``frames`` as exactly ``num_frames``: evenly spaced indices (repeating frames when too few), or a
    ValueError naming ``where`` under the ``reject`` policy."""
    if len(frames) == num_frames:
        return frames
    if policy == "reject":
        raise ValueError(f"{where} has {len(frames)} frames, expected {num_frames} "
                         "(data.frame_policy=reject)")
    if policy != "resample":
        raise ValueError(f"unknown frame policy {policy!r}; expected resample or reject")
    index = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return [frames[i] for i in index]


def resize_crop(image: Image.Image, resolution: int, crop_fraction: tuple[float, float] | None,
                original_size: tuple[int, int] | None = None):
    """Resize the short side to ``resolution`` and crop a square: ``crop_fraction`` (top, left) in [0, 1]
    of the free range, or None for the centre. Returns (image, (crop_top, crop_left)) in resized pixels.
    ``original_size`` (h, w) is the stored size when ``image`` was decoded at a reduced scale: the crop
    offsets are reported for the image as stored.

    The crop box is cut from the original before resampling (PIL ``resize(box=...)``), so a very large or
    very elongated image never makes a huge intermediate.
    """
    w, h = image.size
    oh, ow = original_size or (h, w)
    scale = resolution / min(ow, oh)  # stored pixels -> training pixels
    rw, rh = max(resolution, round(ow * scale)), max(resolution, round(oh * scale))
    ft, fl = crop_fraction if crop_fraction is not None else (0.5, 0.5)
    top, left = int(round((rh - resolution) * ft)), int(round((rw - resolution) * fl))
    scale *= ow / w  # the decoded image may be smaller than the stored one
    box = (left / scale, top / scale, (left + resolution) / scale, (top + resolution) / scale)
    box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
    return image.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box), (top, left)


def _to_model_range(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


#: What a broken image or video raises while it is decoded and preprocessed (a counted bad row).
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def preprocess_images(images, resolution: int, crop, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded images ``(image, original size)`` resized, cropped and flipped alike: ``pixels`` [K, 3, R, R]
    in [-1, 1] and SDXL micro-conditioning ``time_ids`` [K, 6] (original size, crop offsets, target size)."""
    r, pixels, time_ids = resolution, [], []
    for image, original in images:
        image, (top, left) = resize_crop(image, r, crop, original)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels.append(_to_model_range(image))
        time_ids.append(torch.tensor([*original, top, left, r, r], dtype=torch.float32))
    return torch.stack(pixels), torch.stack(time_ids)


def preprocess_clips(named_clips, prep: Preprocessing, crop, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips ``(name, frames)`` fitted to ``prep.num_frames`` and resized, cropped and flipped alike (every
    frame of every clip): ``pixels`` [K, F, 3, R, R] and placeholder ``time_ids`` [K, 6]."""
    r, clips = prep.resolution, []
    for name, frames in named_clips:
        frames = fit_frames(frames, prep.num_frames, prep.frame_policy, f"{name} video")
        frames = [resize_crop(frame, r, crop)[0] for frame in frames]
        if flip:
            frames = [frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for frame in frames]
        clips.append(torch.stack([_to_model_range(frame) for frame in frames]))
    time_ids = torch.tensor([r, r, 0, 0, r, r], dtype=torch.float32).repeat(len(clips), 1)  # unused for video
    return torch.stack(clips), time_ids


class PreferenceDataset(torch.utils.data.Dataset):
    """Items of a :class:`PairSource`, jointly preprocessed. Randomness comes from (seed, epoch, index)."""

    def __init__(self, source: PairSource, prep: Preprocessing):
        self.source, self.prep, self.epoch = source, prep, 0

    def __len__(self):
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.prep.seed}/{self.epoch}/{index}")

    def caption(self, index: int, rng: random.Random) -> str:
        blank = self.prep.proportion_empty_prompts > 0 and rng.random() < self.prep.proportion_empty_prompts
        return "" if blank else self.source.caption(index)

    def __getitem__(self, index: int) -> dict:
        rng = self.rng(index)
        caption = self.caption(index, rng)
        r = self.prep.resolution
        crop = (rng.random(), rng.random()) if self.prep.random_crop else None
        flip = self.prep.random_flip and rng.random() < 0.5
        if self.prep.num_frames is not None:
            return self._video_item(index, caption, crop, flip)
        try:
            pixels, time_ids = preprocess_images(self.source.images(index, draft_size=2 * r), r, crop, flip)
        except UNREADABLE as err:
            return bad_item(self.source, index, err)
        return {"index": index, "caption": caption, "pixels": pixels, "time_ids": time_ids}

    def _video_item(self, index: int, caption: str, crop, flip: bool) -> dict:
        """A video pair: ``pixels`` [2, F, 3, R, R]; every frame of both clips gets the same crop and flip."""
        try:
            named_clips = zip(("chosen", "rejected"), self.source.videos(index), strict=True)
            pixels, time_ids = preprocess_clips(named_clips, self.prep, crop, flip)
        except UNREADABLE as err:
            return bad_item(self.source, index, err)
        return {"index": index, "caption": caption, "pixels": pixels, "time_ids": time_ids}


def bad_item(source: PairSource, index: int, err: Exception) -> dict:
    """The item for an unreadable pair: a message naming where it is stored (file and row or line), and
    that place as the key that counts it once however often it is read."""
    where = source.where(index)
    message = f"{where} (pair {index}): {type(err).__name__}: {err}"
    return {"bad": message, "bad_row": where, "index": index}


def collate_pairs(items: list[dict]) -> dict:
    """Batch good items; bad ones go in ``bad`` (messages) and ``bad_rows`` (where each is stored)."""
    good = [it for it in items if "bad" not in it]
    batch = {"bad": [it["bad"] for it in items if "bad" in it], "size": len(good),
             "bad_rows": [it.get("bad_row", it["bad"]) for it in items if "bad" in it]}
    if good:
        batch["index"] = torch.tensor([it["index"] for it in good])
        batch["caption"] = [it["caption"] for it in good]
        for key in good[0]:
            if key not in ("index", "caption"):
                batch[key] = torch.stack([it[key] for it in good])
    return batch


class BadRowCounter:
    """Counts unreadable pairs; warns once per distinct row, raises once the bad fraction exceeds the limit.

    ``bad`` is the number of distinct unreadable rows, ``skips`` how many times they were skipped (once per
    epoch each), ``seen`` how many rows were read. The fraction (skips over reads) is checked once at least
    ``min_rows`` have been read (so that one bad row in the first batch does not stop a large run).
    """

    def __init__(self, max_bad_fraction: float, min_rows: int = 20):
        self.max_bad_fraction, self.min_rows = max_bad_fraction, min_rows
        self.seen = self.skips = 0
        self.rows: set[str] = set()  # where each distinct unreadable row is stored
        self.last: str | None = None  # the latest bad row's message (names the file and row)

    @property
    def bad(self) -> int:
        return len(self.rows)

    def update(self, batch: dict) -> None:
        self.seen += batch["size"] + len(batch["bad"])
        for message, row in zip(batch["bad"], batch.get("bad_rows", batch["bad"]), strict=True):
            self.skips += 1
            self.last = message
            if row not in self.rows:
                self.rows.add(row)
                log.warning("skipping unreadable pair (%d so far): %s", self.bad, message)
        if self.skips and self.seen >= self.min_rows and self.skips / self.seen > self.max_bad_fraction:
            raise DataError(f"{self.skips} of {self.seen} pairs read so far are unreadable "
                            f"({self.skips / self.seen:.1%} > data.max_bad_fraction={self.max_bad_fraction});"
                            f" last: {self.last or 'see warnings above'}")

    def summary(self) -> str:
        return (f"skipped {self.bad} unreadable row{'s' if self.bad != 1 else ''} ({self.skips} skips in "
                f"{self.seen} rows read; last: {self.last})")

    def state_dict(self) -> dict:
        return {"bad_seen": self.seen, "bad_skips": self.skips, "bad_rows": sorted(self.rows),
                "bad_last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.last = state["bad_seen"], state.get("bad_last")
        self.rows = set(state.get("bad_rows", ()))
        self.skips = state.get("bad_skips", state.get("bad", 0))


class EpochBatches:
    """Endless shuffled batches of a dataset, one epoch after another, with a resumable position.

    Epoch ``e`` is shuffled by a generator seeded from ``(seed, e)`` and the dataset is told the epoch
    (``set_epoch``, for its per-item randomness), so ``(epoch, batches taken)`` is all a checkpoint needs
    for a resumed run to see exactly the batches an uninterrupted one would. Unreadable items are counted
    by a :class:`BadRowCounter`; batches with no readable item are skipped.
    """

    def __init__(self, dataset, accelerator, *, batch_size: int, seed: int, num_workers: int = 0,
                 max_bad_fraction: float = 0.0):
        self.dataset, self.accelerator, self.seed = dataset, accelerator, seed
        self.generator = torch.Generator()
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                             generator=self.generator, collate_fn=collate_pairs,
                                             num_workers=num_workers)
        self.loader = accelerator.prepare(loader)
        self.bad_rows = BadRowCounter(max_bad_fraction)
        self.epoch = 0
        self.taken = 0  # batches of the current epoch already yielded (or skipped as unreadable)

    def __iter__(self):
        while True:
            self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)
            # accelerate's loader tells the dataset *its own* pass count at the start of every pass, which
            # restarts at 0 in a resumed process: set it to our epoch, or per-item draws (flips, crops, blank
            # captions) after a resume would replay epoch 0's.
            self.loader.set_epoch(self.epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            loader = (self.accelerator.skip_first_batches(self.loader, self.taken) if self.taken
                      else self.loader)
            for batch in loader:
                self.taken += 1
                self.bad_rows.update(batch)
                if batch["size"]:
                    yield batch
            self.epoch += 1
            self.taken = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.taken, **self.bad_rows.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.taken = state["epoch"], state["batches_in_epoch"]
        self.bad_rows.load_state_dict(state)
