"""`fluxtrain eval`: the checker on shards (clean ≈ 1, all-noise ≈ 0), the end-to-end generation eval on the tiny
folder, CLIP scoring with a tiny random CLIP, and the trainer-facing `adherence`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fluxtrain.data.synthetic import write_shards
from fluxtrain.eval.evaluate import ClipScorer, save_failures, select_prompts, train_overlap

ROOT = Path(__file__).resolve().parents[2]


def _fluxtrain(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fluxtrain", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def make_tiny_clip(out: Path) -> Path:
    """A random, tiny transformers CLIPModel + CLIPProcessor saved in `out` (the tiny folder's CLIP tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from fluxtrain.models.tiny import SHIPPED

    tok = CLIPTokenizer.from_pretrained(SHIPPED / "tokenizer")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    CLIPModel(cfg).save_pretrained(out)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(out)
    return out


@pytest.mark.parametrize("noise,lo,hi", [(0.0, 0.99, 1.0), (1.0, 0.0, 0.05)])
def test_checker_on_shards(tmp_path, noise, lo, hi):
    write_shards(tmp_path / "d", 200, size=64, complex_frac=0.4, noise_frac=noise, seed=11, per_shard=80)
    out = tmp_path / "checker.json"
    res = _fluxtrain("eval", "checker", "--shards", tmp_path / "d" / "shard-*.tar", "--out", out,
                     "--grid", tmp_path / "fail.png")
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["n"] == 200 and lo <= rep["overall"] <= hi, rep["overall"]
    assert {"per_form", "per_split", "per_relation"} <= rep.keys() and rep["train_overlap"] == 0
    assert set(rep["per_split"]) == {"simple", "complex"}
    assert rep["noise_detection"]["n_noisy"] == round(200 * noise)
    assert (tmp_path / "fail.png").is_file() and "adherence" in res.stdout


def test_checker_missing_shards_is_one_line_error(tmp_path):
    res = _fluxtrain("eval", "checker", "--shards", tmp_path / "none-*.tar")
    assert res.returncode == 2 and "no shard files match" in res.stderr and "Traceback" not in res.stderr


def test_eval_tiny_model_end_to_end(tmp_path):
    from fluxtrain.models.tiny import tiny_folder

    out, grid = tmp_path / "e" / "adh.json", tmp_path / "e" / "fails.png"
    res = _fluxtrain("eval", "--model", tiny_folder(), "--limit", 4, "--steps", 2, "--out", out, "--grid", grid,
                     "--batch", 3, "--true-cfg", 3, "--cfg-interval", 0, 0.5, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["true_cfg"] == 3 and rep["cfg_interval"] == [0, 0.5]
    assert rep["n"] == 4 and rep["n_prompts"] == 4 and rep["train_overlap"] == 0 and rep["n_unparsed"] == 0
    assert 0.0 <= rep["overall"] <= 1.0 and set(rep["per_split"]) == {"simple", "complex"}  # spread over both sets
    assert rep["resolution"] == 64 and rep["steps"] == 2 and len(rep["results"]) == 4
    assert rep["failures_png"] == str(grid) and Image.open(grid).size[0] > 0


def test_eval_rejects_a_reversed_cfg_interval_before_loading(tmp_path):
    res = _fluxtrain("eval", "--model", tmp_path / "absent", "--true-cfg", 4, "--cfg-interval", 0.8, 0.2)
    assert res.returncode == 2 and "give 0 ≤ LO ≤ HI ≤ 1" in res.stderr and "Traceback" not in res.stderr


def test_clip_score_with_tiny_random_clip(tmp_path):
    clip = make_tiny_clip(tmp_path / "clip")
    s = ClipScorer(clip, "cpu").scores([Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (40, 90), "blue")],
                                       ["a red circle", "a photo of a cat on a mat"])
    assert len(s) == 2 and all(-100.0 <= x <= 100.0 for x in s)


def test_adherence_in_process_with_clip_flag(tmp_path):
    """`adherence` (the trainer's call) and `--clip` on a custom prompt file with one prompt outside the grammar."""
    from fluxtrain.eval.evaluate import adherence
    from fluxtrain.models.tiny import tiny_folder
    from fluxtrain.sample import load_for_inference

    model, text, vae, _ = load_for_inference(tiny_folder(), torch.device("cpu"))
    r = adherence(model, text, vae, ["a red circle", "two blue squares"], 64, steps=1, guidance=3.5, seed=0, batch=1)
    assert r["n"] == 2 and 0.0 <= r["overall"] <= 1.0 and isinstance(r["failed"], list)
    assert adherence(model, text, vae, ["a red circle"], 64, steps=1, guidance=3.5, score=False) == {}

    clip = make_tiny_clip(tmp_path / "clip")
    pf = tmp_path / "p.txt"
    pf.write_text("a red circle\n# comment\na photo of a dog\n")
    out = tmp_path / "o.json"
    res = _fluxtrain("eval", "--model", tiny_folder(), "--prompts", pf, "--steps", 1, "--out", out, "--clip", clip)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["n"] == 1 and rep["n_unparsed"] == 1 and isinstance(rep["clip_score"], float)
    assert (tmp_path / "o-failures.png").is_file()


def test_helpers():
    ps = [f"p{i}" for i in range(10)]
    assert select_prompts(ps, 4) == ["p0", "p2", "p5", "p7"] and select_prompts(ps, None) == ps
    import random

    from fluxtrain.data.prompts import format_spec, heldout_prompts, sample_spec

    held = sorted(heldout_prompts())[:3]
    trainable = format_spec(sample_spec(random.Random(0), 0.5))  # a caption the training generator can produce
    assert train_overlap(held + ["a photo of a dog"]) == (0, "held-out exclusion of the synthetic generator")
    assert train_overlap(held + [trainable])[0] == 1


def test_save_failures_empty_and_wrapped(tmp_path):
    p = save_failures([], [], tmp_path / "none.png", title="all passed")
    assert Image.open(p).size[0] > 0
    im = Image.new("RGB", (64, 64), "red")
    p = save_failures([im, im], ["a purple triangle above an orange circle and two green squares | wrong count", "x"],
                      tmp_path / "two.png")
    assert Image.open(p).size[0] == 256 and Image.open(p).size[1] > 128
