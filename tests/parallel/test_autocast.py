"""parallel.autocast: one fp32 process whose matmuls run in bf16 (torch.autocast), keeping CUDA graphs available.
The forward computes in bf16, the weights, gradients and losses stay fp32, and a short run trains like fp32."""

from types import SimpleNamespace

import pytest
import torch

from fluxtrain import config as C
from tests.helpers import fluxtrain, losses


def _inputs(model, b=4):
    g = torch.Generator().manual_seed(3)
    c, d, dp = model.config.in_channels // 4, model.config.joint_attention_dim, model.config.pooled_projection_dim
    mean, seq, pooled = torch.randn(b, c, 8, 8, generator=g), torch.randn(b, 6, d, generator=g), torch.randn(b, dp, generator=g)
    return SimpleNamespace(inputs=lambda _b: (mean, torch.zeros_like(mean), seq, pooled),
                           empty=lambda: (torch.zeros(1, 6, d), torch.zeros(1, dp)))


@pytest.mark.parametrize("autocast", [False, True])
def test_the_forward_computes_in_bf16_and_the_gradients_stay_fp32(autocast):
    from fluxtrain.train import forward_backward
    from tests.test_itc import _tiny_model

    model = _tiny_model()
    cfg = C.Config()
    cfg.parallel.mixed_precision, cfg.parallel.autocast, cfg.data.caption_dropout = "fp32", autocast, 0.0
    seen = []
    hook = model.x_embedder.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss = forward_backward(model, _inputs(model), {"indices": torch.arange(4)}, cfg, torch.device("cpu"), 0, 0, 1.0)
    hook.remove()
    assert seen == [torch.bfloat16 if autocast else torch.float32]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("over, what", [
    (["--parallel.mixed_precision", "bf16"], "already computes in bf16"),
    (["--parallel.cpu_offload", "true"], "cpu_offload"),
])
def test_autocast_is_refused_where_fsdp_sets_the_precision(over, what):
    with pytest.raises(C.ConfigError, match=what):
        C.load(None, ["--parallel.mixed_precision", "fp32", "--parallel.autocast", "true", *over])


def test_an_autocast_run_trains_like_fp32(tmp_path):
    """The tiny model on CPU, 30 steps: the same data and noise, losses within bf16's rounding of fp32's, falling."""
    base = ["train", "--model.preset", "tiny", "--data.source", "synthetic", "--train.device", "cpu",
            "--train.steps", "30", "--train.batch_size", "8", "--log.interval", "5", "--parallel.mixed_precision",
            "fp32", "--checkpoint.interval", "1000", "--eval.interval", "0", "--log.progress", "plain"]
    runs = {}
    for name, extra in (("fp32", []), ("autocast", ["--parallel.autocast", "true"])):
        res = fluxtrain(base + ["--train.output_dir", str(tmp_path / name), *extra], timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = losses(tmp_path / name)
    a, b = runs["fp32"], runs["autocast"]
    assert a.keys() == b.keys() and len(a) >= 5
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=0.05), (step, a[step], b[step])
    assert a != b  # bf16 did compute something of its own
    assert b[max(b)] < b[min(b)]
