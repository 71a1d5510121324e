"""EMA of the trainable parameters: the update rule in one process, and under 2-rank FSDP2 (sharded, DCP)."""

import json

import pytest
import torch

from fluxtrain.ema import EMA
from tests.helpers import FAST, ROOT, fluxtrain, torchrun


def _toy():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    m[0].bias.requires_grad_(False)  # frozen: not tracked
    return m


def test_update_rule_every_and_warmup():
    m = _toy()
    ema = EMA(m, decay=0.9, every=2, warmup=True)
    assert set(ema.state_dict()) == {"0.weight", "1.weight", "1.bias"}
    ref = {k: v.clone() for k, v in ema.state_dict().items()}
    for step in range(1, 6):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * step)
        did = ema.update(m, step)
        assert did == (step % 2 == 0)
        if did:
            d = min(0.9, (1 + step) / (10 + step))
            cur = dict(m.named_parameters())
            ref = {k: d * v + (1 - d) * cur[k].detach() for k, v in ref.items()}
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=0)
    assert ema.decay_at(2) == pytest.approx(3 / 12) and EMA(m, decay=0.5).decay_at(100) == 0.5


def test_swap_into_restores_and_state_dict_round_trip():
    m = _toy()
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m, 1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(5, 3)
    with ema.swap_into(m):
        assert torch.equal(m[0].weight, ema.state_dict()["0.weight"])
        assert torch.equal(m[0].bias, before["0.bias"])  # frozen: untouched
        y_ema = m(x)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(y_ema, m(x))
    other = EMA(m, decay=0.5)
    other.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    assert all(torch.equal(other.state_dict()[k], v) for k, v in ema.state_dict().items())
    with pytest.raises(KeyError, match="lacks"):
        other.load_state_dict({})
    m[1].bias.requires_grad_(False)
    with pytest.raises(KeyError, match="differ"):
        ema.update(m, 2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Full fine-tuning of the tiny model under 2-rank FULL_SHARD with EMA (tests/lora_harness.py ema)."""
    out = tmp_path_factory.mktemp("ema")
    res = torchrun(2, [str(ROOT / "tests" / "lora_harness.py"), "ema", str(out)], timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    return out, json.loads((out / "results.json").read_text())


def test_sharded_ema_equals_single_process_reference(run):
    _, r = run
    assert r["n_params"] == 140 and r["losses"][-1] < r["losses"][0]
    assert r["ema_equals_ref"], r["ema_vs_ref_maxdiff"]
    assert r["ema_differs_from_params"]
    assert r["all_dtensor"] and r["ema_local_numel"] * 2 == r["full_numel"]  # each rank: its shards only
    assert r["toy_uneven_local_rows"][0] in (2, 3) and r["toy_uneven_exact"]


def test_swap_into_under_fsdp_sees_ema_after_a_no_grad_forward(run):
    _, r = run
    assert r["swap_restored"] and r["swap_output_restored"]
    assert r["train_vs_ema_output"] > 0 and r["swap_vs_plain_maxdiff"] <= 1e-5


def test_ema_dcp_round_trip_exact_and_reshards_to_one_process(run):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    out, r = run
    assert r["dcp_exact"] and r["full_load_exact"]
    full = load_file(str(out / "ema_full.safetensors"))
    state = {"ema": {k: torch.empty_like(v) for k, v in full.items()}}
    dcp.load(state, checkpoint_id=str(out / "ckpt"))  # no process group: DCP reassembles the 2 ranks' shards
    assert all(torch.equal(state["ema"][k], v) for k, v in full.items())


def test_full_fine_tune_export_writes_the_checkpoints_ema(tmp_path):
    """ema.use_for_export (the default) through the real trainer: a full fine-tune's export holds the checkpoint's
    "ema" section, not its raw weights."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from fluxtrain.export import export

    run = tmp_path / "run"
    res = fluxtrain(["train", "--config", "configs/tiny.toml", *FAST, "--train.steps", "3", "--ema.enabled", "true",
                     "--ema.decay", "0.5", "--train.output_dir", str(run)])
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = run / "checkpoints" / "step-00000003"
    got = load_file(str(export(ckpt, "diffusers", tmp_path / "exp", dtype="fp32") / "transformer" /
                        "diffusion_pytorch_model.safetensors"))
    saved = {s: {k: torch.empty_like(v) for k, v in got.items()} for s in ("model", "ema")}
    dcp.load(saved, checkpoint_id=str(ckpt), no_dist=True)
    assert all(torch.equal(got[k], v) for k, v in saved["ema"].items())
    assert not all(torch.equal(got[k], v) for k, v in saved["model"].items())
