"""Full fine-tunes (every transformer weight, no LoRA) on the flow families: a run writes a pipeline folder
that stock ``DiffusionPipeline.from_pretrained`` loads, and that pipeline samples the trainer's own
``eval/tuned`` image; the transformer moved and the other components are the base model's."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from test_outputs import as_saved, read_sample

from diffalign.config import load_config
from diffalign.evaluation import generate_and_score
from diffalign.models import BUILTIN_MODELS
from diffalign.train import train

ROOT = Path(__file__).resolve().parents[1]
ONLINE_SHORT = ["method.num_steps=3", "method.train_timesteps=null", "method.samples_per_prompt=2",
                "method.num_prompts=2", "method.gradient_steps_per_epoch=1"]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method"), [("sd3", "dpo"), ("flux", "dpo"), ("flux", "prdp")])
def test_full_finetune_saves_a_stock_pipeline_that_samples_the_trainers_eval(name, method, tmp_path,
                                                                              one_thread):
    out = tmp_path / "run"
    extra = ONLINE_SHORT if method == "prdp" else ["optim.lr_warmup_steps=0", "eval.train_pairs=0"]
    cfg = load_config(ROOT / "configs" / f"tiny-{name}" / f"{method}.yaml", [
        "model.finetune=full", f"train.output_dir={out}", "train.max_steps=2", "optim.learning_rate=1e-3",
        "log.validation_every_n_steps=0", "log.progress_bar=false", "checkpoint.every_n_steps=0",
        "eval.seeds=[0]", "eval.num_steps=3", *extra])
    cfg.eval.prompts = cfg.eval.prompts[:1]
    train(cfg)

    assert not (out / "pytorch_lora_weights.safetensors").exists()
    user_pipe = DiffusionPipeline.from_pretrained(str(out))
    user_pipe.set_progress_bar_config(disable=True)
    base_pipe = DiffusionPipeline.from_pretrained(str(BUILTIN_MODELS[f"tiny-{name}"]()))
    assert type(user_pipe) is type(base_pipe)
    tuned, base = user_pipe.transformer.state_dict(), base_pipe.transformer.state_dict()
    assert tuned.keys() == base.keys()
    assert any(not torch.equal(tuned[k], base[k]) for k in tuned), "the transformer did not move"
    for component in ("vae", "text_encoder"):  # frozen
        for k, v in getattr(user_pipe, component).state_dict().items():
            assert torch.equal(v, getattr(base_pipe, component).state_dict()[k]), f"{component}.{k} changed"

    ours = generate_and_score(user_pipe, cfg.eval.prompts, cfg.eval.seeds, [], cfg.eval, None)["images"][0]
    saved = read_sample(next((out / "eval" / "tuned").glob("0000.*")))
    assert np.abs(as_saved(ours) - saved).max() <= 1.5 / 255
    base_sample = read_sample(next((out / "eval" / "base").glob("0000.*")))
    assert np.abs(saved - base_sample).max() > 1 / 255, "training changed nothing visible: proves nothing"
