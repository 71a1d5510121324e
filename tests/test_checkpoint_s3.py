"""Checkpoints on an object store: moto's S3 server on loopback, every rank writing, the COMPLETE marker as publish,
async saves with background staging, and a bitwise resume from S3."""

import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fluxtrain.checkpoint import complete_checkpoints, find_resume
from fluxtrain.export import export
from fluxtrain.sample import load_for_inference
from tests.helpers import FAST, ROOT, env, events, free_port, losses, torchrun

BUCKET = "fluxtrain-test"
URL = f"s3://{BUCKET}/run/checkpoints"
TWELVE = FAST + ["--train.steps", "12", "--checkpoint.interval", "4", "--checkpoint.keep", "2"]


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint with one bucket; the AWS_* variables reach every process the tests start."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                     "NO_PROXY": "127.0.0.1,localhost"}.items():
            mp.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield
    server.stop()


def _train_args(out, extra=()):
    return ["-m", "fluxtrain", "train", "--config", "configs/tiny.toml", *TWELVE, "--train.output_dir", str(out),
            *extra]


def test_async_saves_to_s3_resume_bitwise_and_skip_unpublished(s3, tmp_path):
    import s3fs

    on_s3 = ["--checkpoint.dir", URL, "--checkpoint.async_save", "true", "--checkpoint.staging", "background"]
    ref = torchrun(2, _train_args(tmp_path / "ref", on_s3))
    assert ref.returncode == 0, ref.stderr[-4000:]
    fs = s3fs.S3FileSystem()
    # retention (keep 2) deleted step 4; every checkpoint names its run's config wherever it is stored
    assert complete_checkpoints(URL) == [f"{URL}/step-00000008", f"{URL}/step-00000012"]
    assert not fs.exists(f"{URL}/step-00000004") and fs.exists(f"{URL}/step-00000012/config.toml")
    # export straight from the bucket (the config read from inside the checkpoint) equals an export of a local copy,
    # and sample/eval load the same weights from the URL
    step12 = f"{URL}/step-00000012"
    exp = subprocess.run([sys.executable, "-m", "fluxtrain", "export", "--checkpoint", step12, "--format", "diffusers",
                          "--dtype", "fp32", "--out", str(tmp_path / "exp")], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert exp.returncode == 0, exp.stderr[-3000:]
    fs.get(step12, str(tmp_path / "copy" / "step-00000012"), recursive=True)
    local = export(tmp_path / "copy" / "step-00000012", "diffusers", tmp_path / "exp-local", dtype="fp32")
    got, want = (load_file(str(d / "transformer" / "diffusion_pytorch_model.safetensors"))
                 for d in (tmp_path / "exp", local))
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    sampled = load_for_inference(step12, torch.device("cpu"))[0].state_dict()
    assert all(torch.equal(sampled[k], v) for k, v in want.items())
    # a save cut short: one rank's data and the marker missing; resume = auto must take step 8, saved async
    fs.rm([f"{URL}/step-00000012/COMPLETE", f"{URL}/step-00000012/__1_0.distcp"])
    assert find_resume(tmp_path, "auto", URL) == f"{URL}/step-00000008"
    run = tmp_path / "run"
    again = torchrun(2, _train_args(run, on_s3))
    assert again.returncode == 0, again.stderr[-4000:]
    assert events(run, "resume")[-1]["path"] == f"{URL}/step-00000008"
    want, got = losses(tmp_path / "ref"), losses(run)
    assert sorted(got) == list(range(9, 13)) and all(got[s] == want[s] for s in got), (got, want)
    assert complete_checkpoints(URL) == [f"{URL}/step-00000008", f"{URL}/step-00000012"]
    assert all(e["stall_s"] >= 0 for e in events(run, "checkpoint"))


def _save_code(ckpt_dir: str) -> str:
    return f"""
import torch, torch.distributed as dist
from fluxtrain.checkpoint import Checkpointer, CheckpointError
from fluxtrain.config import CheckpointConfig
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
ck = Checkpointer("{ROOT}/runs/unused", CheckpointConfig(dir="{ckpt_dir}", async_save=False), 0, 1, torch.device("cpu"))
try:
    ck.save(1, torch.nn.Linear(2, 2), None, None, {{}})
except CheckpointError as e:
    print("ERR", e)
"""


def test_storage_errors_are_one_line(s3):
    res = subprocess.run([sys.executable, "-c", _save_code("s3://no-such-bucket/x")], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=120)
    err = [ln for ln in res.stdout.splitlines() if ln.startswith("ERR")]
    assert err and "s3://no-such-bucket/x/step-00000001" in err[0] and "credentials" in err[0], res.stdout + res.stderr


def test_missing_s3fs_is_told_before_launch():
    code = "import sys; sys.modules['s3fs'] = None; from fluxtrain.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, "train", "--checkpoint.dir", URL], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "pip install 'fluxtrain[s3]'" in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
