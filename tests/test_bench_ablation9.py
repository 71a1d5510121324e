"""bench/gpu_ablation9.sh: one ablation script for every base source (BASE=warm: the last gpu_chain.sh call's export
on the warm machine; BASE=chain: the carried parts). Its checks run before anything GPU-side, so they are tested here
with stand-in bases; a stub bench/gpu_env.sh ends the script where the GPU part would start."""

import json
import shutil
from pathlib import Path

from tests.test_bench_ablation8 import _repo as _repo8
from tests.test_bench_ablation8 import _run as _run8
from tests.test_bench_ablation8 import _stage_dir


def _repo(tmp_path: Path) -> Path:
    repo = _repo8(tmp_path, "gpu_ablation9.sh")
    (repo / "bench" / "gpu_env.sh").write_text("exit 0\n")  # sourced: the script stops where the GPU work begins
    return repo


def _run(repo: Path, *args: str, **env: str):
    return _run8(repo, *args, WARM_DIR=str(repo / "warm-out"), **env)  # not the device's /tmp/warm-out


def _warm_export(repo: Path) -> Path:
    """gpu_chain.sh's export on a warm machine, before its fluxtrain.json (a test adds it)."""
    w = repo / "warm-out"
    w.mkdir()
    (w / "model_index.json").write_text("{}")
    (w / ".stage").write_text("2 deep 64 complex_clean\n")
    return w


def test_a_base_source_must_be_named(tmp_path):
    r = _run(_repo(tmp_path), "bench/gpu_ablation9.sh")
    assert r.returncode == 2 and "give BASE=warm" in r.stderr


def test_the_warm_base_is_copied_with_its_length_and_stays_for_the_next_seed(tmp_path):
    repo = _repo(tmp_path)
    r = _run(repo, "bench/gpu_ablation9.sh", BASE="warm")
    assert r.returncode == 2 and "BASE=warm: no export in" in r.stderr  # a machine given back since the chain
    w = _warm_export(repo)
    r = _run(repo, "bench/gpu_ablation9.sh", BASE="warm")
    assert r.returncode == 2 and "the base has no fluxtrain.json" in r.stderr
    (w / "fluxtrain.json").write_text('{"max_text_tokens": 24}')
    r = _run(repo, "bench/gpu_ablation9.sh", BASE="warm")
    assert r.returncode == 0, r.stderr
    assert "2 deep 64 complex_clean" in r.stdout
    base = repo / "base"
    assert json.loads((base / "fluxtrain.json").read_text()) == {"max_text_tokens": 24}
    assert (base / "model_index.json").is_file() and not (base / ".stage").exists()
    assert (w / "model_index.json").is_file() and (w / ".stage").is_file()  # a second call (SEED=1) finds it again


def test_the_chain_base_is_unpacked_from_the_carried_parts(tmp_path):
    repo = _repo(tmp_path)
    r = _run(repo, "bench/gpu_ablation9.sh", BASE="chain")
    assert r.returncode == 2 and "BASE=chain: no .chain/base.pack or warm.tar.NN" in r.stderr
    assert _run(repo, "bench/chain_prep.sh", str(_stage_dir(tmp_path, False, False))).returncode == 0
    r = _run(repo, "bench/gpu_ablation9.sh", BASE="chain")
    assert r.returncode == 2 and "the base has no fluxtrain.json" in r.stderr
    shutil.rmtree(tmp_path / "stage")
    assert _run(repo, "bench/chain_prep.sh", str(_stage_dir(tmp_path, False, True))).returncode == 0
    r = _run(repo, "bench/gpu_ablation9.sh", BASE="chain")
    assert r.returncode == 0, r.stderr
    assert "stage 2 (small 64)" in r.stdout
    assert (repo / ".chain" / "base.pack").is_file() and not list((repo / ".chain").glob("warm.tar.*"))
    assert (repo / "base" / "model_index.json").is_file() and (repo / "base" / "fluxtrain.json").is_file()


def _stub_python(repo: Path) -> None:
    """gpu_env.sh puts a python3 first on PATH that prints its arguments, one per line, instead of running them."""
    stub = repo / "stub"
    stub.mkdir()
    (stub / "python3").write_text('#!/bin/sh\nfor x in "$@"; do echo "ARG $x"; done\n')
    (stub / "python3").chmod(0o755)
    (repo / "bench" / "gpu_env.sh").write_text(f'export PATH="{stub}:$PATH"\n')


def _args(out: str) -> list[str]:
    return [line[4:] for line in out.splitlines() if line.startswith("ARG ")]


def test_the_data_made_ahead_is_the_data_the_ablation_call_takes(tmp_path):
    """DATA_ONLY=1 (started by gpu_chain.sh's last stage) must make the same sets in the same work folder with the
    same draw as the BASE=warm call after it, or that call makes them again (or refuses the folder: make_data's
    stamp). It differs only in the model (encoders, no base), --data-only and its own --out."""
    repo = _repo(tmp_path)
    r = _run(repo, "bench/gpu_ablation9.sh", DATA_ONLY="1")
    assert r.returncode == 2 and "DATA_ONLY=1 needs ENCODERS=" in r.stderr
    _stub_python(repo)
    w = _warm_export(repo)
    (w / "fluxtrain.json").write_text('{"max_text_tokens": 24}')
    env = dict(ABL_WORK=str(tmp_path / "abl"), OUT=str(tmp_path / "out"), OUT_AHEAD=str(tmp_path / "ahead"))
    ahead = _run(repo, "bench/gpu_ablation9.sh", DATA_ONLY="1", ENCODERS=str(w), **env)
    assert ahead.returncode == 0, ahead.stderr
    call = _run(repo, "bench/gpu_ablation9.sh", BASE="warm", **env)
    assert call.returncode == 0, call.stderr
    a, c = _args(ahead.stdout), _args(call.stdout)
    assert a[0] == c[0] == "bench/adherence_ablation.py"

    def opts(args: list[str]) -> dict[str, list[str]]:
        d, key = {}, None
        for x in args[1:]:
            if x.startswith("--"):
                key = x
                d[key] = []
            else:
                d[key].append(x)
        return d

    oa, oc = opts(a), opts(c)
    assert oa.pop("--encoders") == [str(w)] and oa.pop("--data-only") == []
    assert oa.pop("--out") == [str(tmp_path / "ahead")]
    assert oc.pop("--base") == [str(repo / "base")] and oc.pop("--out") == [str(tmp_path / "out")]
    assert oa == oc and oa["--work"] == [str(tmp_path / "abl")] and oa["--num"] == ["24000"]


def test_a_call_stopped_before_its_table_writes_the_table_of_what_it_scored(tmp_path):
    """The ablation killed by LIMIT (timeout's 124) leaves no ablation.json: the script then runs --table-only on the
    same work folder, base, seeds and extra arguments. A call that wrote its table is left alone."""
    repo = _repo(tmp_path)
    _stub_python(repo)
    calls = tmp_path / "calls"  # the script shows only the tail of its python's output: the stub logs to a file
    (repo / "stub" / "python3").write_text(f'#!/bin/sh\necho CALL >> {calls}\nfor x in "$@"; do echo "ARG $x" >> {calls}; '
                                           'done\ncase "$*" in *--table-only*) exit 0;; esac\nexit ${STUB_RC:-0}\n')
    w = _warm_export(repo)
    (w / "fluxtrain.json").write_text('{"max_text_tokens": 24}')
    env = dict(ABL_WORK=str(tmp_path / "abl"), OUT=str(tmp_path / "out"), SEED="1", EXTRA="--arms baseline all")
    ok = _run(repo, "bench/gpu_ablation9.sh", BASE="warm", **env)
    assert ok.returncode == 0 and calls.read_text().count("CALL") == 1
    calls.unlink()
    cut = _run(repo, "bench/gpu_ablation9.sh", BASE="warm", STUB_RC="124", **env)
    assert cut.returncode == 0, cut.stderr
    assert "stopped (rc 124) before its table" in cut.stdout
    args = _args(calls.read_text())
    t = args.index("--table-only")
    first, table = args[:t - 1], args[t - 1:]
    assert table[0] == first[0] == "bench/adherence_ablation.py"
    for opt, n in (("--work", 1), ("--base", 1), ("--seeds", 1), ("--arms", 2), ("--eval-seeds", 2)):
        i, j = first.index(opt), table.index(opt)
        assert first[i:i + 1 + n] == table[j:j + 1 + n], opt
    (tmp_path / "out" / "ablation.json").write_text("{}")  # the call wrote its table and then failed: no second table
    calls.unlink()
    _run(repo, "bench/gpu_ablation9.sh", BASE="warm", STUB_RC="1", **env)
    assert calls.read_text().count("CALL") == 1 and "--table-only" not in calls.read_text()


def test_a_chain_of_parts_as_they_came_still_unpacks(tmp_path):
    """.chain/ made before the twenty-first session holds the parts themselves, not base.pack."""
    repo = _repo(tmp_path)
    stage = _stage_dir(tmp_path, True, False)
    (repo / ".chain").mkdir()
    shutil.copy(stage / "warm.tar.00", repo / ".chain" / "warm.tar.00")
    (repo / ".chain" / "stage").write_text("2\n")
    r = _run(repo, "bench/gpu_ablation9.sh", BASE="chain")
    assert r.returncode == 0, r.stderr
    assert json.loads((repo / "base" / "fluxtrain.json").read_text()) == {"max_text_tokens": 24}
