"""Preference data: formats, winner-first layout, joint preprocessing, bad input."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.data import (
    BadRowCounter,
    DataError,
    PreferenceDataset,
    Preprocessing,
    collate_pairs,
    open_pairs,
)


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _half_white(size=(40, 24), value=255):
    """Left half ``value``, right half black: shows flips and which image is which."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:, : size[0] // 2] = value
    return Image.fromarray(array)


def _write_pickapic(path, rows):
    table = pa.table({
        "caption": [r[0] for r in rows],
        "jpg_0": pa.array([r[1] for r in rows], type=pa.binary()),
        "jpg_1": pa.array([r[2] for r in rows], type=pa.binary()),
        "label_0": [r[3] for r in rows],
    })
    pq.write_table(table, path)


@pytest.fixture()
def pickapic(tmp_path):
    white, grey = _png(Image.new("RGB", (16, 16), "white")), _png(Image.new("RGB", (16, 16), (128, 128, 128)))
    rows = [
        ("winner first", white, grey, 1.0),
        ("a tie", white, grey, 0.5),
        ("winner second", grey, white, 0.0),
        ("corrupt", b"\xff\xd8not really a jpeg", white, 1.0),
        ("", white, grey, 1.0),  # empty caption is fine
    ]
    path = tmp_path / "train.parquet"
    _write_pickapic(path, rows)
    return path


def test_pickapic_drops_ties_and_puts_winner_first(pickapic):
    source = open_pairs(str(pickapic))
    assert len(source) == 4 and source.num_ties == 1
    data = PreferenceDataset(source, Preprocessing(resolution=8, random_flip=False))
    first, second = data[0], data[1]
    assert first["caption"] == "winner first" and second["caption"] == "winner second"
    for item in (first, second):  # winner (white) first, loser (grey) second, in [-1, 1]
        assert item["pixels"].shape == (2, 3, 8, 8)
        assert item["pixels"][0].mean() == pytest.approx(1.0)
        assert item["pixels"][1].mean() == pytest.approx(128 / 127.5 - 1, abs=1e-6)
    assert data[3]["caption"] == ""


def test_corrupt_bytes_are_counted_and_skipped(pickapic, caplog):
    data = PreferenceDataset(open_pairs(str(pickapic)), Preprocessing(resolution=8))
    batch = collate_pairs([data[i] for i in range(len(data))])
    assert batch["size"] == 3 and len(batch["bad"]) == 1 and "pair 2" in batch["bad"][0]
    counter = BadRowCounter(max_bad_fraction=0.5, min_rows=1)
    counter.update(batch)
    assert counter.bad == 1 and "skipping unreadable pair" in caplog.text
    strict = BadRowCounter(max_bad_fraction=0.1, min_rows=1)
    with pytest.raises(DataError, match="max_bad_fraction"):
        strict.update(batch)


def test_missing_column_and_only_ties(tmp_path):
    path = tmp_path / "nolabel.parquet"
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"]}), path)
    with pytest.raises(DataError, match="missing column.*label_0"):
        open_pairs(str(path))
    ties = tmp_path / "ties.parquet"
    _write_pickapic(ties, [("a", b"x", b"y", 0.5), ("b", b"x", b"y", 0.5)])
    with pytest.raises(DataError, match="all 2 rows are ties"):
        open_pairs(str(ties))


def test_jsonl_pairs_and_errors(tmp_path):
    _half_white().save(tmp_path / "w.png")
    _half_white(value=100).save(tmp_path / "l.png")
    good = {"prompt": "p", "chosen": "w.png", "rejected": "l.png"}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    source = open_pairs(str(tmp_path))  # a folder with pairs.jsonl
    assert len(source) == 2 and source.caption(0) == "p"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "chosen": "w.png"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing key\(s\) rejected"):
        open_pairs(str(bad))
    bad.write_text(json.dumps({**good, "rejected": "missing.png"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: rejected image .*missing.png does not exist"):
        open_pairs(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1: not valid JSON"):
        open_pairs(str(bad))
    with pytest.raises(DataError, match="does not exist"):
        open_pairs(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P", "LA"])
def test_image_modes_are_converted(tmp_path, mode):
    image = Image.new("RGB", (20, 12), (200, 100, 50)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((12, 20), 40000, dtype=np.uint16))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    image.save(tmp_path / f"w{suffix}", format=fmt)
    Image.new("RGB", (20, 12)).save(tmp_path / "l.png")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "p", "chosen": f"w{suffix}", "rejected": "l.png"})
    )
    item = PreferenceDataset(open_pairs(str(tmp_path)), Preprocessing(resolution=8))[0]
    assert "bad" not in item and item["pixels"].shape == (2, 3, 8, 8)
    assert item["pixels"][0].mean() > -0.9  # not black: the content survived the conversion


def test_tiny_huge_and_elongated_images(tmp_path):
    Image.new("RGB", (1, 1), "white").save(tmp_path / "tiny.png")
    Image.new("RGB", (4000, 3000), "white").save(tmp_path / "huge.jpg", quality=50)
    Image.new("RGB", (5000, 3), "white").save(tmp_path / "long.png")
    rows = [{"prompt": "p", "chosen": a, "rejected": b} for a, b in
            [("tiny.png", "huge.jpg"), ("long.png", "tiny.png")]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PreferenceDataset(open_pairs(str(tmp_path)), Preprocessing(resolution=16))
    for i in range(2):
        item = data[i]
        assert item["pixels"].shape == (2, 3, 16, 16)
        assert item["pixels"].min() > 0.9  # all white, no padding
    # SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)
    assert data[1]["time_ids"][0].tolist()[:2] == [3.0, 5000.0]
    assert data[0]["time_ids"][1].tolist()[:2] == [3000.0, 4000.0]


def test_joint_crop_and_flip_with_micro_conditioning(tmp_path):
    _half_white((40, 24)).save(tmp_path / "w.png")
    _half_white((40, 24), value=200).save(tmp_path / "l.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "w.png", "rejected": "l.png"}))
    source = open_pairs(str(tmp_path))
    center = PreferenceDataset(source, Preprocessing(resolution=24, random_flip=False))[0]
    # 40x24 -> short side 24 already; centre crop of width 24 starts at (40 - 24) / 2 = 8
    assert center["time_ids"][0].tolist() == [24.0, 40.0, 0.0, 8.0, 24.0, 24.0]
    assert torch.equal(center["time_ids"][0], center["time_ids"][1])
    flipped_seen = unflipped_seen = False
    data = PreferenceDataset(source, Preprocessing(resolution=24, random_flip=True, random_crop=True))
    for epoch in range(12):
        data.set_epoch(epoch)
        item = data[0]
        w, l_ = item["pixels"][0].mean(0), item["pixels"][1].mean(0)
        w_left_bright = w[:, :4].mean() > w[:, -4:].mean()
        l_left_bright = l_[:, :4].mean() > l_[:, -4:].mean()
        assert w_left_bright == l_left_bright  # flipped together
        assert torch.equal(item["time_ids"][0], item["time_ids"][1])  # same crop for both
        flipped_seen |= not bool(w_left_bright)
        unflipped_seen |= bool(w_left_bright)
    assert flipped_seen and unflipped_seen


def test_empty_prompt_proportion(tmp_path):
    _half_white().save(tmp_path / "w.png")
    rows = [{"prompt": f"p{i}", "chosen": "w.png", "rejected": "w.png"} for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = open_pairs(str(tmp_path))
    never = PreferenceDataset(source, Preprocessing(resolution=8))
    assert all(never[i]["caption"] == f"p{i}" for i in range(40))
    always = PreferenceDataset(source, Preprocessing(resolution=8, proportion_empty_prompts=1.0))
    assert all(always[i]["caption"] == "" for i in range(40))
    some = PreferenceDataset(source, Preprocessing(resolution=8, proportion_empty_prompts=0.5))
    blanks = sum(some[i]["caption"] == "" for i in range(40))
    assert 5 < blanks < 35


def test_pairs_cli_writes_a_dataset_the_trainer_reads(tmp_path, tiny_sdxl_path, capsys):
    from diffalign.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = tmp_path / "pairs"
    code = main(["pairs", "--model", str(tiny_sdxl_path), "--prompts", str(prompts), "--scorer", "brightness",
                 "--out", str(out), "--images-per-prompt", "3", "--steps", "2", "--device", "cpu"])
    assert code == 0 and "pairs" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["chosen_score"] > r["rejected_score"] for r in rows)
    assert json.loads((out / "info.json").read_text())["scorer"] == "brightness"
    # the labels are the scorer's: re-scoring the written images gives the same order
    from diffalign.scorers import make_scorer

    scorer = make_scorer("brightness")
    for r in rows:
        chosen, rejected = Image.open(out / r["chosen"]), Image.open(out / r["rejected"])
        assert scorer.score([chosen]).item() > scorer.score([rejected]).item()
    source = open_pairs(str(out))
    item = PreferenceDataset(source, Preprocessing(resolution=32))[0]
    assert item["caption"] == "a red circle" and item["pixels"].shape == (2, 3, 32, 32)


def test_pairs_cli_rejects_bad_input_before_loading(tmp_path, capsys):
    from diffalign.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\n")
    assert (
        main(
            [
                "pairs",
                "--model",
                "tiny-sdxl",
                "--prompts",
                str(prompts),
                "--scorer",
                "nope",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "unknown scorer 'nope'" in capsys.readouterr().err
    assert main(["pairs", "--model", "tiny-sdxl", "--prompts", str(prompts), "--scorer", "brightness",
                 "--out", str(tmp_path), "--images-per-prompt", "1"]) == 2


def test_bad_rows_are_named_by_file_and_row_and_counted_once(tmp_path, caplog):
    """Two parquet files; ties before the bad rows: the message names the file and its row (not the pair
    index left after ties are dropped), and three epochs warn once per distinct row but count every skip."""
    white, grey = _png(Image.new("RGB", (16, 16), "white")), _png(Image.new("RGB", (16, 16), (128, 128, 128)))
    corrupt = b"\xff\xd8not really a jpeg"
    folder = tmp_path / "pickapic"
    folder.mkdir()
    _write_pickapic(folder / "a.parquet", [("ok", white, grey, 1.0)] * 3)
    _write_pickapic(folder / "b.parquet", [("tie", white, grey, 0.5), ("tie", white, grey, 0.5),
                                            ("ok", white, grey, 0.0), ("bad", corrupt, white, 1.0),
                                            ("bad too", white, corrupt, 0.0)])
    data = PreferenceDataset(open_pairs(str(folder)), Preprocessing(resolution=8))
    counter = BadRowCounter(max_bad_fraction=0.5, min_rows=1)
    for _ in range(3):
        counter.update(collate_pairs([data[i] for i in range(len(data))]))
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable pair" in r.getMessage()]
    assert len(warnings) == 2
    assert (
        f"{folder / 'b.parquet'} row 3 (pair 4)" in warnings[0]
    )  # pair 4 of the tie-free list is row 3 of b
    assert f"{folder / 'b.parquet'} row 4" in warnings[1]
    assert counter.bad == 2 and counter.skips == 6 and counter.seen == 3 * len(data)
    assert "skipped 2 unreadable rows (6 skips in 18 rows read" in counter.summary()
    # a resumed run keeps knowing which rows it has already reported
    resumed = BadRowCounter(max_bad_fraction=0.5, min_rows=1)
    resumed.load_state_dict(counter.state_dict())
    caplog.clear()
    resumed.update(collate_pairs([data[i] for i in range(len(data))]))
    assert resumed.bad == 2 and resumed.skips == 8 and "skipping unreadable pair" not in caplog.text


def test_jsonl_bad_rows_are_named_by_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "pairs.jsonl").write_text(
        '{"prompt": "a", "chosen": "ok.png", "rejected": "ok.png"}\n\n'
        '{"prompt": "b", "chosen": "broken.png", "rejected": "ok.png"}\n')
    data = PreferenceDataset(open_pairs(str(tmp_path)), Preprocessing(resolution=8))
    assert data[1]["bad"].startswith(f"{tmp_path / 'pairs.jsonl'}:3 (pair 1): ")
