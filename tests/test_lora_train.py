"""LoRA + EMA through the real trainer (2 ranks, FULL_SHARD): resumable, and both exports agree with diffusers."""

import torch

from tests.helpers import FAST, fluxtrain, torchrun

LORA = ["--lora.enabled", "true", "--lora.rank", "4", "--lora.alpha", "8", "--ema.enabled", "true",
        "--ema.decay", "0.9", "--optim.lr", "5e-3", "--checkpoint.interval", "3", "--eval.interval", "3"]


def test_lora_run_exports_load_in_flux_pipeline(tmp_path):
    from diffusers import FluxPipeline

    from fluxtrain.models.tiny import tiny_folder

    run = tmp_path / "run"
    args = ["-m", "fluxtrain", "train", "--config", "configs/tiny.toml", *FAST, *LORA, "--train.steps", "6",
            "--train.output_dir", str(run)]
    res = torchrun(2, args)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (run / "samples" / "step-00000003.png").is_file() and (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    ckpt = run / "checkpoints" / "step-00000006"
    for fmt in ("lora", "diffusers"):
        r = fluxtrain(["export", "--checkpoint", str(ckpt), "--format", fmt, "--out", str(tmp_path / fmt), "--dtype", "fp32"])
        assert r.returncode == 0, r.stderr[-3000:]

    def image(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", height=64, width=64, num_inference_steps=3, max_sequence_length=16, generator=g,
                    output_type="pt").images

    base = FluxPipeline.from_pretrained(tiny_folder())
    plain = image(base)
    base.load_lora_weights(tmp_path / "lora")
    with_lora = image(base)
    merged = image(FluxPipeline.from_pretrained(tmp_path / "diffusers"))
    assert (with_lora - plain).abs().max() > 1e-3  # the adapters changed the model
    assert torch.allclose(with_lora, merged, atol=1e-4)  # the merged export is the same model
