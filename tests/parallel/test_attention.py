"""model.attention_backend (and TF32 for fp32 matmuls, CPU threads with offload): resolved per device and precision, refused where it can't run, and set on every
attention module of the training model (so the kernel the config names is the one that runs)."""

import pytest
import torch

from fluxtrain import config as C
from fluxtrain import flow
from fluxtrain.models.flux import build_transformer
from fluxtrain.models.presets import transformer_kwargs
from fluxtrain.parallel.attention import apply_attention_backend, resolve_backend


def test_auto_picks_cudnn_on_hopper_flash_on_other_gpus_in_bf16_only():
    assert resolve_backend("auto", "cuda", "bf16", (9, 0)) == "cudnn"
    assert resolve_backend("auto", "cuda", "bf16", (8, 0)) == "flash"
    assert resolve_backend("auto", "cuda", "bf16", (10, 0)) == "flash"
    assert resolve_backend("auto", "cuda", "fp32") == "native"  # flash has no fp32 kernel
    assert resolve_backend("auto", "cpu", "bf16") == "native"
    assert resolve_backend("cudnn", "cuda", "bf16") == "cudnn"


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_gpu_only_backends_are_refused_in_one_line_before_training(backend):
    with pytest.raises(C.ConfigError, match=f"attention_backend = {backend} needs bf16 on a CUDA GPU") as e:
        C.load(None, ["--model.attention_backend", backend, "--train.device", "cpu"])
    assert "\n" not in str(e.value)
    with pytest.raises(C.ConfigError, match="parallel.mixed_precision = bf16"):
        C.load(None, ["--model.attention_backend", backend, "--train.device", "cuda",
                      "--parallel.mixed_precision", "fp32"])


def _processors(model):
    return [m.processor for m in model.modules() if hasattr(m, "processor")]


def test_the_named_backend_is_set_on_every_attention_module_and_computes_the_same():
    torch.manual_seed(0)
    kw = transformer_kwargs("tiny")
    model = build_transformer(kw, device="cpu").eval()
    b, lat = 2, 8
    x = torch.randn(b, (lat // 2) ** 2, kw["in_channels"])
    inputs = flow.transformer_inputs(x, torch.rand(b), torch.randn(b, 5, kw["joint_attention_dim"]),
                                     torch.randn(b, kw["pooled_projection_dim"]), lat, lat, 1.0)
    with torch.no_grad():
        ref = model(**inputs)[0]
    assert apply_attention_backend(model, "auto", "cpu", "fp32") == "native"
    assert all(getattr(p, "_attention_backend", None) is None for p in _processors(model))
    assert apply_attention_backend(model, "math", "cpu", "fp32") == "math"
    procs = _processors(model)
    assert len(procs) == kw["num_layers"] + kw["num_single_layers"]
    assert {str(p._attention_backend.value) for p in procs} == {"_native_math"}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], ref, atol=1e-5, rtol=1e-5)


def test_the_trainer_sets_the_configured_backend():
    from types import SimpleNamespace

    from fluxtrain.models.setup import build_training_model

    one_cpu = SimpleNamespace(size=lambda: 1, device_type="cpu")  # what parallelize reads of a 1-process mesh
    cfg = C.load(None, ["--model.preset", "tiny", "--train.device", "cpu", "--parallel.mixed_precision", "fp32",
                        "--model.attention_backend", "math"])
    model = build_training_model(cfg, one_cpu, torch.device("cpu"))
    assert {str(p._attention_backend.value) for p in _processors(model)} == {"_native_math"}


def test_tf32_follows_the_config_on_a_gpu_and_leaves_the_cpu_alone():
    from fluxtrain.parallel import set_matmul_precision

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        set_matmul_precision(torch.device("cuda"), True)  # the flags can be set without a GPU
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_matmul_precision(torch.device("cuda"), False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        set_matmul_precision(torch.device("cpu"), True)
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = before


def test_cpu_threads_auto_gives_the_offloaded_optimizer_the_rank_s_share_of_cores():
    from fluxtrain.parallel import cpu_threads

    off = C.load(None, ["--parallel.cpu_offload", "true"]).parallel
    assert cpu_threads(off, local_world_size=2, cores=32) == 16  # torchrun's OMP_NUM_THREADS=1 is overridden
    assert cpu_threads(off, local_world_size=8, cores=4) == 1
    assert cpu_threads(C.load(None, []).parallel, 2, 32) is None  # no offload: torch's setting stays
    assert cpu_threads(C.load(None, ["--parallel.cpu_threads", "3"]).parallel, 2, 32) == 3
    with pytest.raises(C.ConfigError, match="parallel.cpu_threads must be ≥ 0"):
        C.load(None, ["--parallel.cpu_threads", "-1"])


def test_usable_cores_honours_a_cgroup_quota(tmp_path, monkeypatch):
    from fluxtrain.parallel import usable_cores

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert usable_cores(tmp_path) == 64  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == 64  # no quota
    (tmp_path / "cpu.max").write_text("3200000 100000\n")
    assert usable_cores(tmp_path) == 32  # a 32-core quota inside a 64-core affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cores(tmp_path) == 2  # 1.5 cores round up
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("800000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(tmp_path) == 8  # cgroup v1
