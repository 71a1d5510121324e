"""Bad command lines end in one `fluxtrain: error:` line (or argparse's, naming the option) with exit code 2: no
traceback, no run started. Each case here was a traceback or a silent run before (an audit of 62 bad inputs)."""

import io
import tarfile

import pytest
from PIL import Image

from fluxtrain import cli
from tests.helpers import fluxtrain


def _one_line(capsys, rc: int, *parts: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err, err
    assert "Traceback" not in "\n".join(err)
    assert all(p in err[-1] for p in parts), err[-1]
    return err[-1]


def test_an_option_without_its_value_is_an_error_not_the_defaults(capsys):
    # `train --config` alone trained the built-in defaults into runs/demo
    _one_line(capsys, cli.main(["train", "--config"]), "--config needs a value")
    _one_line(capsys, cli.main(["train", "--config", "--train.steps", "2"]), "--config needs a value")
    _one_line(capsys, cli.main(["train", "--config", "configs/tiny.toml", "--nproc-per-node"]),
              "--nproc-per-node needs a value")


def test_the_world_is_checked_before_torchrun_starts(capsys, monkeypatch):
    # it was checked in every rank: the error twice, then torchrun's ChildFailedError traceback
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(cli, "_spawn_torchrun", lambda *a: pytest.fail("torchrun started"))
    rc = cli.main(["train", "--config", "configs/tiny.toml", "--nproc-per-node", "2",
                   "--parallel.strategy", "HYBRID_SHARD", "--parallel.shard_size", "3"])
    line = _one_line(capsys, rc, "HYBRID_SHARD shard size 3 does not divide the world size 2")
    assert line.startswith("fluxtrain: error: ")


@pytest.mark.parametrize("argv, needle", [
    (["plan", "--config", "configs/flux-dev.toml", "--gpus", "0", "--gpu-mem-gib", "40"], "--gpus: must be ≥ 1"),
    (["plan", "--config", "configs/flux-dev.toml", "--gpus", "2", "--gpu-mem-gib", "-4"], "--gpu-mem-gib: must be > 0"),
    (["data", "synth", "--out", "x", "--num", "-5"], "--num: must be ≥ 1"),
    (["data", "synth", "--out", "x", "--num", "4", "--per-shard", "0"], "--per-shard: must be ≥ 1"),
    # a RuntimeError from the layout (size 4), "wrote 5 samples" with fractions outside [0, 1]
    (["data", "synth", "--out", "x", "--num", "5", "--size", "20"], "--size: must be ≥ 32"),
    (["data", "synth", "--out", "x", "--num", "5", "--complex-frac", "1.5"], "--complex-frac: must be in [0, 1]"),
    (["data", "synth", "--out", "x", "--num", "5", "--noise-frac", "nan"], "--noise-frac: must be in [0, 1]"),
    (["eval", "--model", "x", "--steps", "0"], "--steps: must be ≥ 1"),
    (["eval", "--model", "x", "--resolution", "50"], "--resolution: must be a multiple of 16"),
    (["eval", "--model", "x", "--limit", "-1"], "--limit: must be ≥ 1"),
    (["sample", "--model", "x", "--prompt", "a", "--out", "o", "--steps", "abc"], "--steps: not an integer"),
    (["sample", "--model", "x", "--prompt", " ", "--out", "o"], "--prompt: is empty"),  # an unconditioned image
    (["sample", "--model", "x", "--prompt", "a", "--out", "o", "--max-text-tokens", "0"], "--max-text-tokens: must be"),
    (["eval", "--model", "x", "--max-text-tokens", "-3"], "--max-text-tokens: must be ≥ 1"),
    (["eval", "--model", "x", "--device", "foo"], "--device: 'foo' is not a device"),  # tracebacks after loading
    (["eval", "--model", "x", "--device", "cuda:99"], "--device: 'cuda:99': this machine has"),
])
def test_bad_numbers_are_argparse_errors_naming_the_option(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    _one_line(capsys, e.value.code, needle)


def test_paths_that_cannot_be_used_are_one_line(capsys, tmp_path):
    (tmp_path / "afile").write_text("")
    _one_line(capsys, _rc(["data", "synth", "--out", str(tmp_path / "afile" / "x"), "--num", "2"]),
              f"--out: {tmp_path / 'afile'} is a file, not a folder")
    _one_line(capsys, cli.main(["export", "--checkpoint", str(tmp_path / "nope" / "step-1"), "--out", "o"]),
              f"{tmp_path / 'nope' / 'step-1'} does not exist")
    _one_line(capsys, cli.main(["trace", str(tmp_path / "afile")]), "not a profiler trace")


def test_unusable_shards_are_one_line_not_a_traceback(tmp_path):
    # DataError reached the user as a traceback: the command line did not catch it
    (tmp_path / "bad-0.tar").write_bytes(b"not a tar at all" * 10)
    res = fluxtrain(["train", "--config", "configs/tiny.toml", "--train.steps", "2", "--data.source", "webdataset",
                     "--data.path", str(tmp_path / "bad-*.tar"), "--train.output_dir", str(tmp_path / "run")],
                    timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("fluxtrain: error: ") and "no usable sample" in last and "bad-0.tar" in last, last


def test_shards_that_are_not_there_are_found_before_torchrun_starts(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(cli, "_spawn_torchrun", lambda *a: pytest.fail("torchrun started"))
    rc = cli.main(["train", "--config", "configs/tiny.toml", "--nproc-per-node", "2", "--data.source", "webdataset",
                   "--data.path", str(tmp_path / "nope-*.tar")])
    _one_line(capsys, rc, "matches no files")


def _rc(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own error, exit code 2
        return e.code


# the second audit (120 bad inputs to the other commands): each case was a traceback, a silent run that did nothing,
# or an error that came only after the whole generation ("--out under a file" after every image was made)
@pytest.mark.parametrize("argv, needle", [
    (["eval", "--model", "m", "--out", "{f}/r.json"], "--out: {f} is a file, not a folder"),
    (["eval", "--model", "m", "--out", "{d}"], "--out: {d} is a folder: give a file name"),
    (["eval", "--model", "m", "--grid", "{f}/g.png"], "--grid: {f} is a file, not a folder"),
    (["eval", "--model", "m", "--prompts", "{latin}"], "is not UTF-8 text"),
    (["eval", "--model", "m", "--prompts", "{d}"], "is a folder: give a text file"),
    (["eval", "--model", "m", "--prompts", "{outside}"], "none of the 2 prompts is in the shapes grammar"),
    (["eval", "--model", "m", "--clip", "{d}/nope"], "is not a local CLIP model folder"),
    (["eval", "--model", "m", "--train-shards", "{d}/nothing-*.tar"], "--train-shards: no shard files match"),
    (["eval", "checker", "--shards", "{f}"], "no sample could be read from {f}: all 1 shard(s)"),
    (["eval", "checker", "--shards", "{d}"], "is a folder: give a glob of its shards"),
    # both were "adherence 0.000 on 0 prompts", exit 0
    (["eval", "checker", "--shards", "{oog}"], "none of the 1 captions of {oog} is in the shapes grammar (first: "
                                               "'hello world'"),
    (["eval", "checker", "--shards", "{nocap}"], "no sample of {nocap} has both an image and a caption (1 skipped)"),
    (["eval", "chekcer", "--shards", "{d}"], "unknown eval subcommand 'chekcer' (did you mean 'checker'?)"),
    (["sample", "--model", "m", "--prompt", "a red circle", "--out", "{f}"], "--out: {f} is a file: give a folder"),
    (["export", "--checkpoint", "c", "--out", "{f}/x"], "--out: {f} is a file, not a folder"),
    (["export", "--checkpoint", "c", "--out", "{d}"], "holds other files (no model_index.json"),  # mixed in silently
    (["export", "--checkpoint", "c", "--out", "{d}/x.safetensors"], "a diffusers export is a folder"),
    (["report", "{d}", "--out", "{d}"], "--out: {d} is a folder: give a file name"),
    (["cache", "--out", "{d}/c", "--per-shard", "0"], "--per-shard: must be ≥ 1"),
    (["cache", "--out", "{d}/c", "--batch-size", "-1"], "--batch-size: must be ≥ 1"),
    (["data", "clean", "--in", "{d}/*.tar", "--out", "{f}"], "--out: {f} is a file: give a folder"),
    # tracebacks (ValueError), after --out had been made
    (["data", "synth", "--out", "{d}/s", "--num", "2", "--prompts", "{comments}"], "--prompts: {comments} holds no "
                                                                                   "prompt"),
    (["data", "synth", "--out", "{d}/s", "--num", "2", "--prompts", "{outside}"], "--prompts: {outside}: 'a photo of "
                                                                                  "a cat' is not in the shapes grammar"),
    (["data", "synth", "--out", "{d}/s", "--num", "2", "--prompts", "{latin}"], "is not UTF-8 text"),
    # plan said "fits" for a geometry train refuses
    (["plan", "--config", "configs/tiny.toml", "--gpus", "12", "--gpu-mem-gib", "80", "--parallel.strategy",
      "HYBRID_SHARD", "--parallel.shard_size", "5"], "shard size 5 does not divide the world size 12"),
])
def test_other_commands_check_their_input_before_any_work(capsys, tmp_path, argv, needle):
    paths = {"d": tmp_path, "f": tmp_path / "afile", "latin": tmp_path / "latin.txt",
             "outside": tmp_path / "outside.txt"}
    paths["f"].write_text("abc")
    paths["latin"].write_bytes("a red circle\nun cercle rouge \xe9\n".encode("latin-1"))
    paths["outside"].write_text("a photo of a cat\nhello world\n")
    paths["comments"] = tmp_path / "comments.txt"
    paths["comments"].write_text("# only a comment\n\n")
    for name, members in {"oog": {"x.png": _png(), "x.txt": b"hello world"}, "nocap": {"x.png": _png()}}.items():
        paths[name] = tmp_path / f"{name}.tar"
        with tarfile.open(paths[name], "w") as tar:
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    _one_line(capsys, _rc([a.format(**paths) for a in argv]), needle.format(**paths))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    return buf.getvalue()


def test_an_existing_output_that_cannot_be_written_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    # a read-only --out folder passed the check (only its parent was looked at): sample failed after every image.
    # The tests run as root, which may write anywhere: os.access is made to answer as for a read-only folder.
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) and mode & os.W_OK else real(p, mode))
    _one_line(capsys, _rc(["sample", "--model", "m", "--prompt", "a red circle", "--out", str(ro)]),
              f"--out: no permission to write {ro}")
    _one_line(capsys, _rc(["export", "--checkpoint", "c", "--out", str(ro / "x")]), f"no permission to write in {ro}")


def test_the_ranks_get_the_command_line_without_the_process_count():
    # `--parallel.nproc_per_node 2` left its 2 behind: "unexpected argument '2'" from every rank
    for given in (["--parallel.nproc_per_node", "2"], ["--parallel.nproc_per_node=2"], ["--nproc-per-node", "2"],
                  ["--nproc_per_node=2"]):
        assert cli._strip_nproc(["--config", "c.toml", *given, "--train.steps", "3"]) == [
            "--config", "c.toml", "--train.steps", "3"], given
