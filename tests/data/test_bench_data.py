"""bench/adherence_ablation.make_data reuses a work folder only for the data it was made for: a warm-started stage
(bench/gpu_chain.sh, --data-seed STAGE) once trained on the last stage's scenes because they were taken as made."""

import pytest

from tests.helpers import load_bench


def load_ablation():
    return load_bench("adherence_ablation")


def test_make_data_reuses_only_the_same_draw(tmp_path):
    aa = load_ablation()
    first = aa.make_data(tmp_path, 6, 1, 32, only=("simple_noisy",), seed=0)
    assert sum(first["simple_clean"].values()) == 6
    shard = next((tmp_path / "simple_noisy" / "part0").glob("*.tar"))
    made_at = shard.stat().st_mtime_ns
    assert aa.make_data(tmp_path, 6, 1, 32, only=("simple_noisy",), seed=0) == first  # the same draw: reused
    assert shard.stat().st_mtime_ns == made_at
    with pytest.raises(SystemExit, match="made with .*'seed': 0.* not .*'seed': 1"):
        aa.make_data(tmp_path, 6, 1, 32, only=("simple_noisy",), seed=1)


def test_ablation_refuses_a_base_that_is_not_an_export(tmp_path):
    """--base must be an exported diffusers folder: a wrong path stops before any data is made."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    res = subprocess.run([sys.executable, str(ROOT / "bench" / "adherence_ablation.py"), "--work", str(tmp_path / "w"),
                          "--out", str(tmp_path / "o"), "--base", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and "not an exported diffusers folder" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "w" / "simple_noisy").exists()


def test_a_base_is_scored_once_in_a_merged_table(tmp_path):
    """With --base the base's own score is a row; two calls (one seed each) from the same base merge into one table
    with every arm's seeds and one base row; calls from different bases refuse to merge."""
    import json

    aa = load_ablation()
    (tmp_path / "evals").mkdir()
    for stem, cx in (("base-e0", 0.25), ("base-e1", 0.35), ("all-s0-e0", 0.8), ("all-s1-e0", 0.9)):
        (tmp_path / "evals" / f"{stem}.json").write_text(json.dumps(
            {"per_split": {"complex": {"pass": cx, "n": 64}, "simple": {"pass": 0.9, "n": 64}}}))
    base = aa.score_row(aa.BASE_ROW, "-", 0, 0.0, None, tmp_path / "evals")
    assert base["complex"] == pytest.approx(0.30) and base["n_complex"] == 128  # both eval seeds, no arm's file
    call = lambda seed: {"args": {"base": "/b"}, "rows": [  # noqa: E731
        aa.score_row("all", seed, 1000, 290.0, 0.1, tmp_path / "evals"), base]}
    joint = aa.merge([call(0), call(1)], ["a.json", "b.json"])
    assert [(r["arm"], r["seed"]) for r in joint["rows"]] == [("all", 0), ("all", 1), (aa.BASE_ROW, "-")]
    md = aa.table(joint)
    assert "| all | 0,1 | 1000/1000 |" in md and "| base, not fine-tuned | - | 0 |" in md and "85.0% ± 5.0" in md
    with pytest.raises(SystemExit, match="different bases"):
        aa.merge([call(0), {**call(1), "args": {"base": "/other"}}], ["a.json", "b.json"])


def test_a_second_call_starts_its_runs_fresh(tmp_path):
    """Runs an earlier call left in the work folder are removed (a run of this call that fails before it starts
    would be scored by the earlier call's checkpoint); others' runs stay."""
    aa = load_ablation()
    old = tmp_path / "runs" / "all-s0" / "checkpoints" / "step-00001000"
    old.mkdir(parents=True)
    (tmp_path / "runs" / "all-s5").mkdir()
    assert aa.fresh_runs(tmp_path, [("all", 0), ("all", 1), ("clean", 0)]) == 1
    assert not (tmp_path / "runs" / "all-s0").exists() and (tmp_path / "runs" / "all-s5").exists()


def test_a_call_cut_short_gets_its_table_from_the_work_folder(tmp_path):
    """--table-only writes the table from the runs and scores a call left behind (the twentieth session's seed-0 call
    was killed by its time limit while scoring, and wrote no table): the runs of the chosen arms and seeds that have a
    folder, their last step and loss, their scores, the base row; wall times unknown ("?")."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    work = tmp_path / "w"
    for run, loss in (("all-s0", 0.17), ("clean-s0", 0.15)):
        (work / "runs" / run).mkdir(parents=True)
        (work / "runs" / run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in (
            {"step": 900, "loss": 0.2}, {"step": 1000, "loss": loss}, {"step": 1000, "event": "checkpoint"})))
    (work / "evals").mkdir()
    for stem, cx in (("base-e0", 0.5), ("base-e1", 0.6), ("all-s0-e0", 0.75), ("all-s0-e1", 0.25),
                     ("clean-s0-e0", 0.5)):
        (work / "evals" / f"{stem}.json").write_text(json.dumps(
            {"per_split": {"complex": {"pass": cx, "n": 64}, "simple": {"pass": 0.9, "n": 64}}}))
    cli = [sys.executable, str(ROOT / "bench" / "adherence_ablation.py"), "--table-only", "--work", str(work),
           "--out", str(tmp_path / "o"), "--seeds", "0", "1", "--arms", "clean", "all", "--base", "/tmp/base"]
    res = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "o" / "ablation.json").read_text())
    assert [(x["arm"], x["seed"], x["steps"], x["loss"], x["train_s"]) for x in r["rows"]] == [
        ("clean", 0, 1000, 0.15, None), ("all", 0, 1000, 0.17, None), ("base", "-", 0, None, 0.0)]
    assert [x["complex"] for x in r["rows"]] == [0.5, 0.5, pytest.approx(0.55)]
    md = (tmp_path / "o" / "ablation.md").read_text()
    assert md.startswith("Text encoders: /tmp/base") and "| clean | 0 | 1000 | ? | 50.0% |" in md
    res = subprocess.run(cli[:4] + [str(tmp_path / "nothing")] + cli[5:], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "has no evals/ folder" in res.stderr
