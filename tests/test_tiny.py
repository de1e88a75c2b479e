"""Offline tiny models: real tokenizer, real architectures, deterministic weights, diffusers round trip."""

import open_clip
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffalign.tiny import build_clip_tokenizer, cached_tiny, save_tiny, write_folder_atomically

# Strings without HTML entities or '!': open_clip also html-unescapes (HF's CLIP tokenizer does not), and
# SDXL's second tokenizer pads with '!', which HF then splits out as a special token (the real one does too).
STRINGS = [
    "a photo of a cat",
    "An ASTRONAUT riding a horse on   Mars, 4k, trending on artstation",
    "héllo wörld café naïve",
    "emoji 🐱 test 🚀",
    "",
    "it's 3.14 don't won't they're",
    "tab\tnew\nline   spaces",
    "日本語のテキスト",
    "word " * 100,  # truncated at 77 tokens
    "a red-and-blue (striped) umbrella; #42 @home",
]


def _until_eot(ids):
    return ids[: ids.index(49407) + 1]


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_clip_tokenizer_matches_open_clip(pad_token):
    tokenizer = build_clip_tokenizer(pad_token)
    reference = open_clip.get_tokenizer("ViT-L-14")
    for text in STRINGS:
        ours = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        theirs = reference([text])[0].tolist()
        assert len(ours) == 77
        assert _until_eot(ours) == _until_eot(theirs), text
        pad_id = tokenizer.convert_tokens_to_ids(pad_token)
        assert all(i == pad_id for i in ours[len(_until_eot(ours)) :])


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_same_seed_same_weights_and_round_trip(kind, tmp_path):
    a, b, c = (
        save_tiny(kind, tmp_path / "a", seed=3),
        save_tiny(kind, tmp_path / "b", seed=3),
        save_tiny(kind, tmp_path / "c", seed=4),
    )
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    wc = load_file(c / "unet" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)

    # tokenizers as the real repositories ship them, loadable by transformers 4 and 5
    assert (a / "tokenizer" / "vocab.json").is_file() and (a / "tokenizer" / "merges.txt").is_file()
    assert not (a / "tokenizer" / "tokenizer.json").exists()
    pipe = DiffusionPipeline.from_pretrained(a)
    pipe.set_progress_bar_config(disable=True)
    expected = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    assert type(pipe).__name__ == expected
    image = pipe(
        "a cat", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    # saving the loaded pipeline again gives identical weights
    pipe.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], again[k]) for k in wa)


def test_sdxl_architecture_is_real_sdxl(tiny_sdxl):
    unet = tiny_sdxl.unet
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == (
        tiny_sdxl.text_encoder.config.hidden_size + tiny_sdxl.text_encoder_2.config.hidden_size
    )
    assert type(tiny_sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert tiny_sdxl.tokenizer_2.pad_token == "!"


def test_a_cache_build_keeps_the_folder_another_process_placed_first(tmp_path):
    """Processes started together (an ``accelerate launch`` on a fresh cache) all build it: the first folder
    in place stays, so a process already loading it never sees it removed; an ordinary save replaces."""
    out = tmp_path / "cache" / "model"

    def write(marker):
        def fill(tmp):
            (tmp / "who").write_text(marker)
        return fill

    def loses_the_race(tmp):  # the other process renames its build into place while ours is being written
        write("other")(tmp)
        write_folder_atomically(out, write("first"))

    write_folder_atomically(out, loses_the_race, replace=False)
    assert (out / "who").read_text() == "first"
    write_folder_atomically(out, write("later"), replace=False)
    assert (out / "who").read_text() == "first"
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # no build left aside
    write_folder_atomically(out, write("saved"))
    assert (out / "who").read_text() == "saved"
    empty = tmp_path / "cache" / "empty"  # an empty folder is no build: the cache fills it
    empty.mkdir()
    write_folder_atomically(empty, write("built"), replace=False)
    assert (empty / "who").read_text() == "built"


def test_a_cached_tiny_folder_without_its_index_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path))
    path = cached_tiny("sd")
    (path / "model_index.json").unlink()  # what a crash of a non-atomic write would leave
    assert cached_tiny("sd") == path and (path / "model_index.json").is_file()
    DiffusionPipeline.from_pretrained(path)
