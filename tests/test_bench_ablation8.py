"""bench/chain_prep.sh + bench/gpu_ablation8.sh: the v8 base travels with its fluxtrain.json. The seventeenth
session's base parts predated the file, and eval sampled the 24-token base at FLUX.1-dev's 512 tokens: its row
scored 0%. The checks run before anything GPU-side, so they are tested here with a stand-in base."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _repo(tmp_path: Path, script: str = "gpu_ablation8.sh") -> Path:
    """A scratch copy of chain_prep.sh and the ablation script, a .whl/ with one stand-in wheel and a git dir
    (chain_prep writes its exclude)."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    for f in ("chain_prep.sh", "chain_unpack.sh", "weights_pack.py", script):
        shutil.copy(ROOT / "bench" / f, repo / "bench" / f)
    (repo / ".whl").mkdir()
    (repo / ".whl" / "x-1.0-py3-none-any.whl").write_bytes(b"")
    (repo / ".git" / "info").mkdir(parents=True)
    return repo


def _stage_dir(tmp_path: Path, with_json_in_parts: bool, json_beside: bool) -> Path:
    """A gpu_chain.sh stage's folder: warm.tar.00 (an export, its fluxtrain.json in it or not), sweep.json, and
    optionally export/fluxtrain.json beside (as /work/keep/chain15-stage2 has it)."""
    d = tmp_path / "stage"
    d.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        files = {"./model_index.json": b"{}"}
        if with_json_in_parts:
            files["./fluxtrain.json"] = b'{"max_text_tokens": 24}'
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    (d / "warm.tar.00").write_bytes(buf.getvalue())
    (d / "sweep.json").write_text(json.dumps({"rows": [{"variant": "stage2"}],
                                              "args": {"preset": "small", "resolution": 64}}))
    if json_beside:
        (d / "export").mkdir()
        (d / "export" / "fluxtrain.json").write_text('{"max_text_tokens": 24}')
    return d


def _run(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BASE_DIR": str(repo / "base"), "PYTHON": sys.executable, **env}  # not /tmp/base
    return subprocess.run(["bash", *args], cwd=repo, capture_output=True, text=True, timeout=60, env=env)


def test_a_base_without_fluxtrain_json_is_refused_before_anything_runs(tmp_path):
    repo = _repo(tmp_path)
    r = _run(repo, "bench/gpu_ablation8.sh")
    assert r.returncode == 2 and "no .chain/base.pack or warm.tar.NN: run bench/chain_prep.sh" in r.stderr
    assert _run(repo, "bench/chain_prep.sh", str(_stage_dir(tmp_path, False, False))).returncode == 0
    assert not (repo / ".chain" / "fluxtrain.json").exists()
    r = _run(repo, "bench/gpu_ablation8.sh")
    assert r.returncode == 2 and "the base has no fluxtrain.json (its T5 length)" in r.stderr


def test_chain_prep_carries_the_file_from_beside_the_parts(tmp_path):
    repo = _repo(tmp_path)
    assert _run(repo, "bench/chain_prep.sh", str(_stage_dir(tmp_path, False, True))).returncode == 0
    assert json.loads((repo / ".chain" / "fluxtrain.json").read_text()) == {"max_text_tokens": 24}
    assert (repo / ".chain" / "x-1.0-py3-none-any.whl").exists() and (repo / ".chain" / "stage").read_text() == "2\n"
