"""Checkpoints from untrusted places: DCP's `.metadata` is a pickle, unpickled through an allowlist (a pickle naming
os.system is refused before it runs); damaged metadata or config.toml is one error line; an export fetches the
metadata once, not once per block."""

import os
import pickle
import shutil

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import _fsspec_filesystem, filesystem

from fluxtrain import cli, digests
from fluxtrain.checkpoint import CheckpointError, read_metadata, storage_reader, verify
from fluxtrain.export import _groups, export, load_checkpoint_model
from tests.helpers import FAST, events, fluxtrain, free_port, torchrun
from tests.test_checkpoint_s3 import s3  # noqa: F401 — the moto S3 endpoint fixture

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# EMA (exported), the ITC head's model and optimizer, background-staged async saves: most of what metadata can hold
ARGS = FAST + ["--checkpoint.interval", "2", "--ema.enabled", "true", "--train.itc_weight", "0.1",
               "--checkpoint.async_save", "true", "--checkpoint.staging", "background"]


def _train(out, steps: int):
    res = torchrun(2, ["-m", "fluxtrain", "train", "--config", "configs/tiny.toml", *ARGS, "--train.steps", str(steps),
                       "--train.output_dir", str(out)])
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-rank run of 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run")
    _train(out, 4)
    return out


def _copy(run, tmp_path, step: int = 4, with_digests: bool = True):
    """A copy of the run's checkpoint; without its SHA-256 digests, it is checked by what reads it alone (a
    checkpoint from before the digests, or one whose digests were rewritten along with the files)."""
    dst = tmp_path / f"step-{step:08d}"
    shutil.copytree(run / "checkpoints" / dst.name, dst)
    if not with_digests:
        for f in dst.glob("sha256-*.json"):
            f.unlink()
    return dst


class _System:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def _metadata_opens(monkeypatch) -> list:
    """Every open of a `.metadata` file, local or fsspec, from now on."""
    opened = []
    for cls in (filesystem.FileSystem, _fsspec_filesystem.FileSystem):
        def counted(self, path, mode, _orig=cls.create_stream):
            if str(path).endswith(".metadata"):
                opened.append(str(path))
            return _orig(self, path, mode)
        monkeypatch.setattr(cls, "create_stream", counted)
    return opened


def _one_line_error(res, *parts: str) -> None:
    assert res.returncode != 0, res.stdout[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fluxtrain: error: "), res.stderr[-3000:]
    assert all(p in lines[0] for p in parts), lines[0]


def test_trainer_checkpoints_resume_and_export_through_the_allowlist(run, tmp_path):
    ckpt = run / "checkpoints" / "step-00000004"
    # the same metadata as DCP's own reader gives, this reader's load_id included
    reader = storage_reader(ckpt)
    got, want = reader.read_metadata(), FileSystemReader(str(ckpt)).read_metadata()
    assert got.state_dict_metadata == want.state_dict_metadata and got.storage_data == want.storage_data
    assert (got.planner_data, got.version) == (want.planner_data, want.version)
    assert got.storage_meta.load_id == reader.load_id
    assert got.storage_meta.checkpoint_id == want.storage_meta.checkpoint_id
    assert any(k.startswith("ema.") for k in got.state_dict_metadata) and "itc_optim.state" in str(got.planner_data)
    # a reader given the metadata returns its own copy of it (load_id is per reader)
    again = storage_reader(ckpt, got).read_metadata()
    assert again.state_dict_metadata is got.state_dict_metadata and again.storage_meta is not got.storage_meta
    # resume (every rank reads the metadata) and export
    shutil.copytree(run, tmp_path / "run")
    _train(tmp_path / "run", 6)
    assert events(tmp_path / "run", "resume")[-1]["step"] == 4
    res = fluxtrain(["export", "--checkpoint", str(ckpt), "--format", "bfl", "--out", str(tmp_path / "f.safetensors")])
    assert res.returncode == 0, res.stderr[-3000:]


def test_metadata_naming_os_system_is_refused_before_it_runs(run, tmp_path):
    ckpt, pwned = _copy(run, tmp_path), tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_System(f"echo pwned > {pwned}")))
    with pytest.raises(CheckpointError, match=r"is damaged: \.metadata has \d+ bytes"):  # the digests see it first
        export(ckpt, "bfl", tmp_path / "f.safetensors")
    shutil.rmtree(ckpt)
    ckpt = _copy(run, tmp_path, with_digests=False)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_System(f"echo pwned > {pwned}")))
    refused = r"\.metadata: refuses to unpickle '\w+\.system' \(not checkpoint metadata\); .* tampered with"
    with pytest.raises(CheckpointError, match=refused):
        read_metadata(ckpt)
    with pytest.raises(CheckpointError, match=refused):
        export(ckpt, "bfl", tmp_path / "f.safetensors")
    # the command line, resume included: one line, nothing run
    res = fluxtrain(["export", "--checkpoint", str(ckpt), "--format", "bfl", "--out", str(tmp_path / "f.safetensors")])
    _one_line_error(res, f"{ckpt}/.metadata: refuses to unpickle")
    res = fluxtrain(["train", "--config", "configs/tiny.toml", *ARGS, "--train.steps", "6", "--checkpoint.resume",
                     str(ckpt), "--train.output_dir", str(tmp_path / "resumed")], timeout=300)
    assert res.returncode != 0 and f"fluxtrain: error: {ckpt}/.metadata: refuses to unpickle" in res.stderr, \
        res.stderr[-3000:]
    assert not pwned.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a pickle", "another object"])
def test_damaged_metadata_is_one_checkpoint_error(run, tmp_path, damage):
    ckpt = _copy(run, tmp_path, with_digests=False)
    data = (ckpt / ".metadata").read_bytes()
    (ckpt / ".metadata").write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "not a pickle": b"garbage\n",
                                      "another object": pickle.dumps({"state_dict_metadata": {}})}[damage])
    with pytest.raises(CheckpointError, match=r"\.metadata: (unreadable checkpoint metadata|holds a dict)") as err:
        load_checkpoint_model(ckpt)
    assert "\n" not in str(err.value)


def test_a_missing_metadata_file_is_one_line(run, tmp_path):
    ckpt = _copy(run, tmp_path, with_digests=False)
    (ckpt / ".metadata").unlink()
    res = fluxtrain(["export", "--checkpoint", str(ckpt), "--format", "bfl", "--out", str(tmp_path / "f.safetensors")])
    _one_line_error(res, f"cannot read the metadata of {ckpt}", "FileNotFoundError")


@pytest.mark.parametrize("url", [False, True])
def test_export_reads_the_metadata_once(run, tmp_path, monkeypatch, url):
    ckpt = run / "checkpoints" / "step-00000004"
    where = f"file://{ckpt}" if url else ckpt  # file://: DCP's fsspec reader, as for s3://
    from fluxtrain.export import run_config_of
    from fluxtrain.models.flux import build_transformer
    from fluxtrain.models.setup import model_kwargs

    blocks = len(_groups(build_transformer(model_kwargs(run_config_of(ckpt)), device="meta").state_dict()))
    assert blocks > 3
    opened = _metadata_opens(monkeypatch)
    export(where, "bfl", tmp_path / "f.safetensors", threads=2)
    assert len(opened) == 1, opened
    opened.clear()
    load_checkpoint_model(where)
    assert len(opened) == 1, opened


@pytest.fixture
def s3_here(s3):  # noqa: F811
    """The S3 endpoint of this module: s3fs caches filesystems by arguments, not endpoint, so one made for another
    module's (stopped) server would be reused; and none made here may outlive this server."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_export_fetches_the_metadata_once_and_refuses_pickles(s3_here, run, tmp_path, monkeypatch):
    import s3fs

    fs, url = s3fs.S3FileSystem(), "s3://fluxtrain-test/safety/step-00000004"
    fs.put(str(run / "checkpoints" / "step-00000004"), url, recursive=True)
    opened = _metadata_opens(monkeypatch)
    export(url, "diffusers", tmp_path / "d", dtype="fp32", threads=2)
    assert opened == [f"{url}/.metadata"]
    pwned = tmp_path / "pwned"
    fs.pipe_file(f"{url}/.metadata", pickle.dumps(_System(f"echo pwned > {pwned}")))
    with pytest.raises(CheckpointError, match=rf"{url}/\.metadata: refuses to unpickle '\w+\.system'"):
        export(url, "bfl", tmp_path / "f.safetensors")
    assert not pwned.exists()


def test_an_unreachable_store_is_named_not_called_a_folder_without_config(tmp_path, monkeypatch):
    """s3fs's isfile answers False to any error: a wrong endpoint was reported as 'no config.toml inside'."""
    import s3fs

    from fluxtrain.export import run_config_of

    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1",
                 "NO_PROXY": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    s3fs.S3FileSystem.clear_instance_cache()
    url = "s3://nowhere/run/checkpoints/step-00000004"
    try:
        with pytest.raises(CheckpointError, match=rf"^cannot read {url}: EndpointConnectionError: .*; check the URL"):
            run_config_of(url)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("command", ["export", "sample"])
def test_corrupt_config_toml_in_a_checkpoint_is_one_line(run, tmp_path, command):
    ckpt = _copy(run, tmp_path)
    (ckpt / "config.toml").write_text('[model]\npreset = "tiny"\n[train\nsteps = 4\n')
    out = str(tmp_path / "out")
    res = fluxtrain(["export", "--checkpoint", str(ckpt), "--format", "bfl", "--out", out] if command == "export"
                    else ["sample", "--model", str(ckpt), "--prompt", "a red circle", "--out", out])
    _one_line_error(res, f"{ckpt}/config.toml: not valid TOML", "line 3")
    assert not os.path.exists(out)


def test_config_toml_in_a_checkpoint_that_is_not_utf8_is_one_config_error(run, tmp_path):
    from fluxtrain.config import ConfigError

    ckpt = _copy(run, tmp_path)
    (ckpt / "config.toml").write_bytes(b"\xff\xfe[model]\n")
    with pytest.raises(ConfigError, match=r"config\.toml: not valid TOML \('utf-8' codec can't decode"):
        load_checkpoint_model(ckpt)


def test_dtypes_and_layouts_of_any_tensor_are_allowed(tmp_path):
    """Sizes, dtypes and layouts beyond the trainer's fp32/int64 (a bf16 export test checkpoint, a uint8 buffer)."""
    import torch.distributed.checkpoint as dcp

    state = {"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(3, dtype=torch.uint8),
             "c": torch.zeros(1, dtype=torch.bool), "d": torch.zeros(2, 2, dtype=torch.float16)}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    got = read_metadata(tmp_path).state_dict_metadata
    assert {k: got[k].properties.dtype for k in state} == {k: v.dtype for k, v in state.items()}
    assert got["d"].properties.layout == torch.strided


def test_every_rank_writes_digests_of_its_files_and_they_check(run):
    ckpt = run / "checkpoints" / "step-00000004"
    listed = {name for name, _, _ in digests.listed(ckpt)}
    assert listed == {".metadata", "__0_0.distcp", "__1_0.distcp", "rank-0.json", "rank-1.json", "rng-0.safetensors",
                      "rng-1.safetensors", "sha256-0.json", "sha256-1.json"} - {"sha256-0.json", "sha256-1.json"}
    assert verify(ckpt) == (7, sum(p.stat().st_size for p in ckpt.iterdir() if p.name in listed))


def test_verify_command_reports_each_checkpoint(run, tmp_path, capsys):
    assert cli.main(["verify", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 checkpoints: 2 intact"
    ckpt, old = _copy(run, tmp_path), _copy(run, tmp_path, step=2, with_digests=False)
    shard = ckpt / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert cli.main(["verify", str(ckpt), str(old)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"damaged      {ckpt}: __1_0.distcp does not match the SHA-256 it was written with", out
    assert out[1].startswith(f"not checked  {old}: no digests") and out[2] == "2 checkpoints: 1 damaged, 1 not checked"
    (old / "config.toml").write_text("{")  # export could not read it, and verify said intact
    assert cli.main(["verify", str(old)]) == 1
    assert "not valid TOML" in capsys.readouterr().out.splitlines()[0]
    assert cli.main(["verify", str(ckpt / "rank-0.json")]) == 2
    assert "is a file: give a step-N folder" in capsys.readouterr().err


@pytest.mark.parametrize("given, said", [("{run}", "is a run folder, not one checkpoint"),
                                         ("{run}/checkpoints", "is a checkpoints folder, not one checkpoint"),
                                         ("{run}/checkpoints/step-00000004/config.toml", "is a file")])
def test_export_of_a_run_folder_names_the_step_to_give(run, tmp_path, capsys, given, said):
    # a run folder was "cannot read the metadata of …: FileNotFoundError"
    given = given.format(run=run)
    assert cli.main(["export", "--checkpoint", given, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fluxtrain: error: {given} {said}") and "\n" not in err, err
    if "folder" in said:
        assert err.endswith(f"e.g. the newest, {run}/checkpoints/step-00000004")


# "truncated" and "deleted" each with and without the digests (a checkpoint written before them): DCP's own failure
# is the one line then. "flipped": same size, one byte changed; without digests it loads, silently wrong.
@pytest.mark.parametrize("damage, with_digests", [("truncated", True), ("deleted", True), ("flipped", True),
                                                  ("truncated", False), ("deleted", False)])
def test_damaged_weight_files_are_one_line_and_a_failed_export_leaves_no_weights(run, tmp_path, damage, with_digests):
    # a truncated or deleted .distcp was a traceback, and the export it broke left its planned weights file in place,
    # whole in size and zeros where unwritten: a file that looked usable
    ckpt = _copy(run, tmp_path)
    if not with_digests:
        for f in ckpt.glob("sha256-*.json"):
            f.unlink()
    # sorted, the files go round the 2 ranks: .metadata to rank 0, __0_0.distcp to rank 1, which must tell rank 0
    shard = ckpt / "__0_0.distcp"
    data = shard.read_bytes()
    if damage == "deleted":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(data[: len(data) // 3])
    else:
        i = len(data) // 2
        shard.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
    expect = {"truncated": f"__0_0.distcp has {len(data) // 3} bytes, {len(data)} when written",
              "deleted": "__0_0.distcp is missing",
              "flipped": "__0_0.distcp does not match the SHA-256 it was written with"}[damage]
    said = f"{ckpt} is damaged: {expect}: use an earlier step-N" if with_digests else f"{ckpt} cannot be read ("
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_model(ckpt)
    assert str(err.value).startswith(said) and "\n" not in str(err.value), str(err.value)
    res = fluxtrain(["export", "--checkpoint", str(ckpt), "--format", "bfl", "--out", str(tmp_path / "f.safetensors")])
    _one_line_error(res, said)
    assert not (tmp_path / "f.safetensors").exists()
    res = fluxtrain(["export", "--checkpoint", str(ckpt), "--format", "diffusers", "--out", str(tmp_path / "d")])
    _one_line_error(res, said)
    assert not list((tmp_path / "d" / "transformer").glob("*.safetensors"))
    res = fluxtrain(["train", "--config", "configs/tiny.toml", "--nproc-per-node", "2", *ARGS, "--train.steps", "6",
                     "--checkpoint.resume", str(ckpt), "--train.output_dir", str(tmp_path / "resumed")], timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if "fluxtrain: error: " in line]
    # both ranks agree on the file (rank 1 checks __0_0.distcp, rank 0 learns it), and the line is said once
    assert len(errors) == 1 and said in errors[0], res.stderr[-3000:]


def test_a_resume_says_what_changed_and_when_nothing_is_left_to_train(run, tmp_path):
    ckpt = _copy(run, tmp_path)
    res = fluxtrain(["train", "--config", "configs/tiny.toml", *ARGS, "--train.steps", "3", "--optim.lr", "1e-3",
                     "--checkpoint.resume", str(ckpt), "--train.output_dir", str(tmp_path / "resumed")], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "settings changed since the checkpoint" in log and "optim.lr: 0.002 → 0.001" in log, log[-3000:]
    assert "train.steps: 4 → 3" in log
    assert "at step 4, at or past train.steps = 3: nothing to train" in log
    # a step count that is not there (rank-0.json emptied, the digests too) is one line, not a KeyError
    for f in ckpt.glob("sha256-*.json"):
        f.unlink()
    (ckpt / "rank-0.json").write_text("{}")
    (ckpt / "rank-1.json").unlink(missing_ok=True)
    res = fluxtrain(["train", "--config", "configs/tiny.toml", *ARGS, "--train.steps", "6", "--checkpoint.resume",
                     str(ckpt), "--train.output_dir", str(tmp_path / "resumed2")], timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "has no step count" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]


def test_a_resume_from_an_earlier_step_moves_the_later_checkpoints_aside(run, tmp_path):
    # resumed at step 2 in a folder holding step 4: retention kept steps 4 and 2 and deleted the new step 3 as soon as
    # it was written, and the next auto resume went on from the step 4 given up
    out = tmp_path / "run"
    shutil.copytree(run, out)
    res = fluxtrain(["train", "--config", "configs/tiny.toml", *ARGS, "--train.steps", "3", "--checkpoint.interval",
                     "1", "--checkpoint.keep", "2", "--checkpoint.resume", str(out / "checkpoints" / "step-00000002"),
                     "--train.output_dir", str(out)], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "moved 1 of them to" in res.stderr + res.stdout, res.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    aside = [p for p in out.iterdir() if p.name.startswith("checkpoints.after-step-2-")]
    assert len(aside) == 1 and (aside[0] / "step-00000004" / "COMPLETE").is_file()


def test_a_re_export_replaces_the_earlier_whole_and_a_failed_one_leaves_it(run, tmp_path):
    # a failed re-export deleted the earlier export's weights up front; a good one kept its stale encoder parts
    out = tmp_path / "exp"
    export(run / "checkpoints" / "step-00000004", "diffusers", out, dtype="fp32")
    (out / "vae" / "config.json").write_text('{"junk": true}')
    weights = sorted(p.name for p in (out / "transformer").iterdir())
    bad = _copy(run, tmp_path, with_digests=False)
    (bad / "__0_0.distcp").write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match="cannot be read"):
        export(bad, "diffusers", out, dtype="fp32")
    assert sorted(p.name for p in (out / "transformer").iterdir()) == weights  # the earlier export is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "step-00000004"]  # no .partial-/.replaced- left
    export(run / "checkpoints" / "step-00000004", "diffusers", out, dtype="fp32")
    assert "junk" not in (out / "vae" / "config.json").read_text()
    f = tmp_path / "f.safetensors"
    export(run / "checkpoints" / "step-00000004", "bfl", f)
    size = f.stat().st_size
    with pytest.raises(CheckpointError):
        export(bad, "bfl", f)
    assert f.stat().st_size == size
