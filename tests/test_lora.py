"""LoRA (issue #10): injection on meta, 2-rank FSDP2 training of the adapters only, DCP, diffusers export/merge."""

import json

import pytest
import torch

from fluxtrain import flow
from fluxtrain import lora as L
from fluxtrain.models.flux import build_transformer
from tests.helpers import ROOT, torchrun


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-rank launch of tests/lora_harness.py (FULL_SHARD, fp32, full AC, the shipped tiny weights)."""
    out = tmp_path_factory.mktemp("lora")
    res = torchrun(2, [str(ROOT / "tests" / "lora_harness.py"), "lora", str(out)], timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    return out, json.loads((out / "results.json").read_text())


def _probe_args():
    g = torch.Generator().manual_seed(3)
    x, seq, pooled = torch.randn(1, 64, 64, generator=g), torch.randn(1, 16, 64, generator=g), torch.randn(1, 64, generator=g)
    return flow.transformer_inputs(x, torch.tensor([0.4]), seq, pooled, 16, 16, 1.0)


# ---- in process ---------------------------------------------------------------------------------------------------
def test_apply_lora_on_meta_keeps_the_model_and_targets_block_linears_only():
    m = build_transformer("tiny", "meta")
    assert L.apply_lora(m, rank=4, alpha=4.0) is m
    assert type(m).__name__ == "FluxTransformer2DModel"
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    # tiny: 2 double blocks × 12 linears + 4 single blocks × 5 linears (q, k, v, proj_mlp, proj_out), A and B each
    assert len(names) == 2 * (2 * 12 + 4 * 5) == 88
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in L.trainable_parameters(m))
    assert not any(n.startswith(("proj_out", "x_embedder", "norm_out", "context_embedder")) and ".lora_" in n
                   for n, _ in m.named_parameters())
    assert not any("norm1.linear.lora" in n or "norm.linear.lora" in n for n, _ in m.named_parameters())
    shapes = dict(m.named_parameters())
    assert tuple(shapes["single_transformer_blocks.0.proj_out.lora_A.default.weight"].shape) == (4, 640)
    assert tuple(shapes["single_transformer_blocks.0.proj_out.lora_B.default.weight"].shape) == (128, 4)


def test_custom_targets_bf16_base_and_errors():
    m = build_transformer("tiny", "meta")
    L.apply_lora(m, rank=2, alpha=2.0, targets=["to_q", "ff.net.2"], base_dtype="bf16")
    mods = {n.rsplit(".lora_", 1)[0] for n, _ in L.lora_parameters(m)}
    assert mods == {f"transformer_blocks.{i}.attn.to_q" for i in range(2)} | \
        {f"single_transformer_blocks.{i}.attn.to_q" for i in range(4)} | {f"transformer_blocks.{i}.ff.net.2" for i in range(2)}
    assert {p.dtype for p in m.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in m.parameters() if not p.requires_grad} == {torch.bfloat16}
    with pytest.raises(L.LoraError, match="matched no linear"):
        L.apply_lora(build_transformer("tiny", "meta"), targets=["nope"])
    with pytest.raises(L.LoraError, match="lora.init"):
        L.apply_lora(build_transformer("tiny", "meta"), init="pissa")


def test_merge_equals_the_adapted_forward_and_init_starts_at_base():
    m = build_transformer("tiny", "cpu")
    base = {k: v.clone() for k, v in m.state_dict().items()}
    L.apply_lora(m, rank=4, alpha=8.0, init="kaiming")
    L.load_base_into(m, base.items())
    L.init_lora_weights(m, seed=1)
    plain = build_transformer("tiny", "cpu")
    plain.load_state_dict(base)
    args = _probe_args()
    with torch.no_grad():
        assert torch.equal(m(**args)[0], plain(**args)[0])  # B = 0: the adapted model is the base model
        for n, p in L.lora_parameters(m):
            if "lora_B" in n:
                p.normal_(0, 0.05)
    merged = L.merge_lora_state(base, L.lora_state_dict(m), alpha=8.0, rank=4)
    assert set(merged) == set(base)
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(m(**args)[0], plain(**args)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(L.merged_state_dict(m)["transformer_blocks.0.attn.to_q.weight"],
                               merged["transformer_blocks.0.attn.to_q.weight"], atol=0, rtol=0)
    with pytest.raises(L.LoraError, match="lack lora_B"):
        L.merge_lora_state(base, {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 128)}, 1, 4)


# ---- 2-rank FSDP2 -------------------------------------------------------------------------------------------------
def test_lora_init_is_sharding_independent_and_starts_at_base(run):
    _, r = run
    assert r["n_lora_params"] == 88 and r["trainable_all_lora"] and r["lora_placements"] == ["(Shard(dim=0),)"]
    assert r["init_matches"] and r["init_B_zero"]
    assert r["init_equals_base_maxdiff"] == 0.0


def test_lora_training_lowers_loss_and_only_adapters_change(run):
    _, r = run
    losses = r["losses"]
    assert len(losses) == 20 and losses[-1] < 0.9 * losses[0], losses
    assert r["base_bit_identical"] and r["base_keys"] == 140
    assert r["lora_changed"] == 88 and r["lora_B_absmax"] > 0


def test_ema_of_adapters_and_swap(run):
    _, r = run
    assert r["ema_equals_ref"], r["ema_vs_ref_maxdiff"]
    assert r["swap_inside_is_ema"] and r["swap_restored"] and r["swap_output_restored"]
    assert r["ema_output_differs"] > 0
    assert r["swap_vs_plain_maxdiff"] <= 1e-5


def test_dcp_checkpoint_of_adapters_optimizer_and_ema(run):
    out, r = run
    assert r["ckpt_model_keys"] == 88  # ignore_frozen_params: the base is not in the checkpoint
    assert r["fresh_differs"] and r["dcp_ema_exact"] and r["dcp_lora_exact"] and r["resume_loss_equal"]
    # read back in one process without a process group (resharded 2 → 1): the same as the exported files
    model_lora = L.lora_state_from_checkpoint(out / "ckpt", "model")
    ema_lora = L.lora_state_from_checkpoint(out / "ckpt", "ema")
    exported, meta = L.read_lora_file(out / "lora")
    exported_ema, _ = L.read_lora_file(out / "lora_ema")
    assert meta["r"] == 4 and meta["lora_alpha"] == 8.0
    assert model_lora.keys() == exported.keys() == ema_lora.keys() == exported_ema.keys()
    # nothing was trained between the export and the checkpoint: identical tensors
    assert all(torch.equal(model_lora[k], exported[k]) for k in exported)
    assert all(torch.equal(ema_lora[k], exported_ema[k]) for k in exported)
    assert any(not torch.equal(exported[k], exported_ema[k]) for k in exported)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in exported


def test_bf16_frozen_base_same_numerics_half_memory(run):
    _, r = run
    bf = r["bf16_base"]
    assert r["bf16_base_same_losses"] and r["bf16_base_same_lora"]
    assert bf["bf16"]["frozen_bytes"] * 2 == bf["fp32"]["frozen_bytes"]
    assert bf["bf16"]["lora_dtypes"] == ["torch.float32"]


def test_export_loads_into_flux_pipeline_and_equals_the_merged_transformer(run):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from fluxtrain.models.tiny import tiny_folder

    out, _ = run

    def images(pipe):
        return pipe("a red circle", height=64, width=64, num_inference_steps=2, max_sequence_length=16,
                    guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np").images

    pipe = FluxPipeline.from_pretrained(tiny_folder(), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    plain = images(pipe)
    pipe.load_lora_weights(out / "lora")
    cfg = next(iter(pipe.transformer.peft_config.values()))
    assert cfg.r == 4 and cfg.lora_alpha == 8.0  # from the file's adapter metadata (alpha ≠ rank)
    with_lora = images(pipe)
    assert abs(with_lora - plain).max() > 1e-3
    merged_pipe = FluxPipeline.from_pretrained(tiny_folder(), torch_dtype=torch.float32)
    merged_pipe.set_progress_bar_config(disable=True)
    merged_pipe.transformer.load_state_dict(load_file(str(out / "merged.safetensors")))
    merged = images(merged_pipe)
    assert abs(with_lora - merged).max() <= 1e-5


def test_offline_export_of_a_checkpoint_matches_save_lora(run, tmp_path):
    """`fluxtrain export --format lora` path: DCP checkpoint → diffusers LoRA folder, no process group."""
    out, _ = run
    f = L.write_lora(L.lora_state_from_checkpoint(out / "ckpt", "ema"), tmp_path, L.lora_metadata(4, 8.0))
    got, meta = L.read_lora_file(f)
    want, want_meta = L.read_lora_file(out / "lora_ema")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert meta["target_modules"] == want_meta["target_modules"] and meta["lora_alpha"] == 8.0
