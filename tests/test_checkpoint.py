"""Checkpoints and fault tolerance with real processes: kill, preempt, resume, reshard, export."""

import subprocess
import sys

import pytest
import torch

from fluxtrain.checkpoint import complete_checkpoints, find_resume
from tests.helpers import FAST, ROOT, env, events, fluxtrain, free_port, losses, torchrun

TWENTY = FAST + ["--train.steps", "20", "--checkpoint.interval", "10"]


def _train_args(out, extra=()):
    return ["-m", "fluxtrain", "train", "--config", "configs/tiny.toml", *TWENTY, "--train.output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run of 20 steps."""
    out = tmp_path_factory.mktemp("ref")
    res = torchrun(2, _train_args(out))
    assert res.returncode == 0, res.stderr[-4000:]
    return out


def test_sigkill_then_same_command_resumes_bitwise(reference, tmp_path):
    first = torchrun(2, _train_args(tmp_path), extra_env={"FLUXTRAIN_TEST_KILL_AT_STEP": "13"})
    assert first.returncode != 0  # rank 0 was SIGKILLed after the step-10 checkpoint
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-00000010"]
    again = torchrun(2, _train_args(tmp_path))
    assert again.returncode == 0, again.stderr[-4000:]
    ref, got = losses(reference), losses(tmp_path)
    assert all(got[s] == ref[s] for s in range(11, 21)), [(s, got[s], ref[s]) for s in range(11, 21)]
    assert events(tmp_path, "resume")[-1]["step"] == 10


def test_async_save_is_published_before_the_next_save(tmp_path):
    """A finished async save is published within steps, not at the next save: a crash in between resumes from it.
    (It was published only when the next save began, so a kill at step 19 left nothing to resume.)"""
    res = torchrun(2, _train_args(tmp_path, ["--checkpoint.async_save", "true"]),
                   extra_env={"FLUXTRAIN_TEST_KILL_AT_STEP": "19"})
    assert res.returncode != 0
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-00000010"], res.stderr[-3000:]
    assert find_resume(tmp_path, "auto").name == "step-00000010"


def test_torchrun_max_restarts_recovers_a_killed_rank(reference, tmp_path):
    # elastic restarts go through a c10d rendezvous (as deploy/slurm does): the static one reuses stale addresses
    rdzv = ["--max-restarts", "1", "--rdzv-backend", "c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    res = torchrun(2, _train_args(tmp_path), torchrun_args=rdzv,
                   extra_env={"FLUXTRAIN_TEST_KILL_AT_STEP": "12", "FLUXTRAIN_TEST_FAULT_RANK": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    ref, got = losses(reference), losses(tmp_path)
    assert all(got[s] == ref[s] for s in range(11, 21))


def test_sigterm_saves_exits_zero_and_resume_continues(reference, tmp_path):
    res = torchrun(2, _train_args(tmp_path), extra_env={"FLUXTRAIN_TEST_TERM_AT_STEP": "6"})
    assert res.returncode == 0, res.stderr[-4000:]
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-00000006"]
    assert events(tmp_path, "preempted")[0]["step"] == 6
    res = torchrun(2, _train_args(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    ref, got = losses(reference), losses(tmp_path)
    assert all(got[s] == ref[s] for s in range(7, 21))


OFFLOAD = ["--parallel.optimizer_offload", "true"]


def test_optimizer_offload_preempts_and_resumes_as_the_plain_optimizer_runs(reference, tmp_path):
    """Moments on the host, each block's update landing before its forward: saved at a SIGTERM, resumed, and the
    losses equal the uninterrupted run with the plain fused AdamW step for step."""
    res = torchrun(2, _train_args(tmp_path, OFFLOAD), extra_env={"FLUXTRAIN_TEST_TERM_AT_STEP": "6"})
    assert res.returncode == 0, res.stderr[-4000:]
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-00000006"]
    res = torchrun(2, _train_args(tmp_path, OFFLOAD))
    assert res.returncode == 0, res.stderr[-4000:]
    ref, got = losses(reference), losses(tmp_path)
    assert all(got[s] == ref[s] for s in range(1, 21)), [(s, got[s], ref[s]) for s in range(1, 21)]


def test_bf16_offloaded_moments_preempt_and_resume_as_the_uninterrupted_run(tmp_path):
    """bf16 moments (DTensors of another dtype than their fp32 parameters) through DCP: saved at a SIGTERM and
    resumed, the run equals its uninterrupted twin step for step (the stochastic rounding draws from no RNG)."""
    args = OFFLOAD + ["--parallel.optimizer_offload_dtype", "bf16"]
    res = torchrun(2, _train_args(tmp_path / "whole", args))
    assert res.returncode == 0, res.stderr[-4000:]
    res = torchrun(2, _train_args(tmp_path / "cut", args), extra_env={"FLUXTRAIN_TEST_TERM_AT_STEP": "6"})
    assert res.returncode == 0, res.stderr[-4000:]
    assert [p.name for p in complete_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-00000006"]
    res = torchrun(2, _train_args(tmp_path / "cut", args))
    assert res.returncode == 0, res.stderr[-4000:]
    ref, got = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert all(got[s] == ref[s] for s in range(1, 21)), [(s, got[s], ref[s]) for s in range(1, 21)]


def test_a_plain_optimizer_checkpoint_resumes_with_optimizer_offload(reference, tmp_path):
    import shutil

    shutil.copytree(reference / "checkpoints" / "step-00000010", tmp_path / "checkpoints" / "step-00000010")
    res = torchrun(2, _train_args(tmp_path, OFFLOAD))
    assert res.returncode == 0, res.stderr[-4000:]
    ref, got = losses(reference), losses(tmp_path)
    assert all(got[s] == ref[s] for s in range(11, 21)), [(s, got[s], ref[s]) for s in range(11, 21)]


def test_interrupted_save_is_never_resumed(tmp_path):
    ck = tmp_path / "checkpoints"
    (ck / "step-00000010").mkdir(parents=True)
    (ck / "step-00000010" / "COMPLETE").write_text("10")
    (ck / "step-00000020").mkdir()  # rank files written, never published
    (ck / ".tmp-step-00000030").mkdir()
    assert find_resume(tmp_path, "auto") == ck / "step-00000010"
    assert find_resume(tmp_path, "never") is None
    with pytest.raises(Exception, match="not a complete checkpoint"):
        find_resume(tmp_path, str(ck / "step-00000020"))


def test_a_fresh_start_moves_an_earlier_runs_checkpoints_aside(reference, tmp_path):
    """resume = never in a folder holding another run's steps 10 and 20: that run's checkpoints are moved, not mixed.
    Before, keep = 1 kept the earlier step 20 and deleted this run's step 10, and a later resume = auto took step 20."""
    import shutil

    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    res = torchrun(2, _train_args(tmp_path, ["--train.steps", "10", "--checkpoint.keep", "1",
                                             "--checkpoint.resume", "never"]))
    assert res.returncode == 0, res.stderr[-4000:]
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-00000010"]
    (aside,) = tmp_path.glob("checkpoints.earlier-*")
    assert [p.name for p in complete_checkpoints(aside)] == ["step-00000010", "step-00000020"]
    assert f"moved 2 checkpoints of an earlier run to {aside}" in res.stderr
    assert find_resume(tmp_path, "auto") == tmp_path / "checkpoints" / "step-00000010"


def test_a_fresh_start_on_a_url_with_earlier_checkpoints_is_one_line(tmp_path):
    from fluxtrain.checkpoint import CheckpointError, set_aside_earlier

    (tmp_path / "ck" / "step-00000004").mkdir(parents=True)
    (tmp_path / "ck" / "step-00000004" / "COMPLETE").write_text("4")
    with pytest.raises(CheckpointError, match=r"holds 1 checkpoints of an earlier run \(latest step-00000004\).*"
                                              "another checkpoint.dir"):
        set_aside_earlier(tmp_path / "run", f"file://{tmp_path}/ck")
    assert set_aside_earlier(tmp_path / "run") is None  # nothing there: nothing moved


@pytest.mark.parametrize("nproc, batch", [(1, "4"), (4, "1")])
def test_resume_on_another_world_size(reference, tmp_path, nproc, batch):
    import shutil

    shutil.copytree(reference / "checkpoints" / "step-00000010", tmp_path / "checkpoints" / "step-00000010")
    shutil.copy(reference / "config.toml", tmp_path / "config.toml")
    res = torchrun(nproc, _train_args(tmp_path, ["--train.batch_size", batch]))
    assert res.returncode == 0, res.stderr[-4000:]
    ev = events(tmp_path, "resume")[-1]
    assert ev["step"] == 10 and ev["resharded"] is True
    ref, got = losses(reference), losses(tmp_path)
    # same global batch (4 samples), same samples and noise: the losses continue as if nothing changed
    for s in range(11, 21):
        assert got[s] == pytest.approx(ref[s], rel=1e-4)


def test_checkpoint_from_another_model_names_the_key(reference, tmp_path):
    """A checkpoint of another shape fails with the first mismatched key, not a traceback from deep in DCP."""
    code = f"""
import torch.distributed as dist
from fluxtrain.checkpoint import Checkpointer, CheckpointError
from fluxtrain.config import CheckpointConfig
from fluxtrain.models.flux import build_transformer
from fluxtrain.models.presets import transformer_kwargs
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
kw = transformer_kwargs("tiny"); kw["num_layers"] = 3
ck = Checkpointer("{tmp_path}", CheckpointConfig(), 0, 1, __import__("torch").device("cpu"))
try:
    ck.load(__import__("pathlib").Path("{reference}/checkpoints/step-00000010"), build_transformer(kw, "cpu"), None, None)
except CheckpointError as e:
    print("ERR", e)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("ERR")]
    assert line and "transformer_blocks.2" in line[0] and "does not fit" in line[0], res.stdout + res.stderr[-2000:]


def test_export_round_trip_matches_the_trained_model(reference, tmp_path):
    from diffusers import FluxTransformer2DModel

    from fluxtrain import flow
    from fluxtrain.export import load_checkpoint_model

    ckpt = reference / "checkpoints" / "step-00000020"
    res = fluxtrain(["export", "--checkpoint", str(ckpt), "--format", "diffusers", "--out", str(tmp_path / "d"),
                     "--dtype", "fp32"])
    assert res.returncode == 0, res.stderr[-3000:]
    trained, _, _ = load_checkpoint_model(ckpt)
    exported = FluxTransformer2DModel.from_pretrained(tmp_path / "d" / "transformer")
    x, seq, pooled = torch.randn(1, 64, 64), torch.randn(1, 16, 64), torch.randn(1, 64)
    args = flow.transformer_inputs(x, torch.tensor([0.4]), seq, pooled, 16, 16, 1.0)
    assert torch.equal(trained(**args)[0], exported(**args)[0])
    # the export is a whole FluxPipeline folder
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tmp_path / "d")
    img = pipe("a red circle", height=64, width=64, num_inference_steps=2, max_sequence_length=16).images[0]
    assert img.size == (64, 64)
    # BFL single file: the same weights under BFL names
    res = fluxtrain(["export", "--checkpoint", str(ckpt), "--format", "bfl", "--out", str(tmp_path / "f.safetensors"),
                     "--dtype", "fp32"])
    assert res.returncode == 0, res.stderr[-3000:]
    from fluxtrain.models.flux import build_transformer, iter_pretrained_state, load_state_into

    m = build_transformer(dict(trained.config), "cpu")
    load_state_into(m, iter_pretrained_state(tmp_path / "f.safetensors", inner_dim=128))
    assert torch.equal(trained(**args)[0], m(**args)[0])


def test_resume_from_a_missing_checkpoint_is_one_line(tmp_path):
    res = fluxtrain(["train", "--config", "configs/tiny.toml", *FAST, "--checkpoint.resume", "/nonexistent/step-1",
                     "--train.output_dir", str(tmp_path / "run")], timeout=120)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    # refused at config time, before the model is built
    assert "fluxtrain: error: checkpoint.resume '/nonexistent/step-1' does not exist" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_pinned_buffers_are_reserved_before_the_first_save(monkeypatch):
    # Checkpointer.prepare (after the first optimizer step) reserves the staging buffers on the stager's thread, so
    # the first save copies into them instead of allocating (47 s for 24 GB per rank at 12B on an H200).
    from fluxtrain.checkpoint import PinnedStager

    calls = []
    real = PinnedStager._allocate
    monkeypatch.setattr(PinnedStager, "_allocate", lambda self, leaves: (calls.append(len(leaves)), real(self, leaves)))
    state = {"model": {"w": torch.randn(4, 3), "b": torch.randn(3)}, "optim": {"state": [torch.randn(5)]}}
    st = PinnedStager(torch.device("cpu"))
    st.reserve(state).result()
    assert calls == [3] and set(st.buffers) == {"/model/w", "/model/b", "/optim/state/0"}
    state["model"]["w"].add_(1.0)  # the weights change after the reservation: the save must copy the new values
    staged = st.stage(state).result()
    assert calls == [3]  # no second allocation at the save
    assert torch.equal(staged["model"]["w"], state["model"]["w"]) and staged["model"]["w"] is not state["model"]["w"]
    assert torch.equal(staged["optim"]["state"][0], state["optim"]["state"][0])
    st.close()


def test_file_url_checkpoint_dir_saves_and_resumes(tmp_path):
    # checkpoint.dir = file:///… (a shared mount spelled as a URL) goes through fsspec like s3:// does
    url = f"file://{tmp_path}/ck"
    args = ["train", "--config", str(ROOT / "configs" / "tiny.toml"), *FAST, "--train.output_dir", str(tmp_path / "run"),
            "--checkpoint.dir", url, "--checkpoint.interval", "2", "--eval.interval", "0", "--data.num_workers", "0"]
    first = fluxtrain(args[:] + ["--train.steps", "4"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(tmp_path / "ck")] == ["step-00000002", "step-00000004"]
    again = fluxtrain(args + ["--train.steps", "6"])
    assert again.returncode == 0 and f"resumed from {url}/step-00000004 at step 4" in again.stderr, again.stderr[-2000:]
