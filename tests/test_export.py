"""`fluxtrain export` streamed from a DCP checkpoint: bit-identical to converting the whole state, diffusers shards
that from_pretrained reads, and a BFL file at FLUX.1's width that diffusers' single-file loader reads."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from PIL import Image
from safetensors.torch import load_file

from fluxtrain import config as C
from fluxtrain.export import export, load_checkpoint_model
from fluxtrain.models import bfl
from fluxtrain.models.flux import WeightsError, build_transformer, write_config
from fluxtrain.models.presets import transformer_kwargs

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated")]


def _run(tmp: Path, kw: dict, state: dict, preset: str | None = None, extra: tuple = ()) -> Path:
    """A run dir whose checkpoint holds `state` as the trainer saves it ("model." keys). A shape that is no preset
    is given as a pretrained folder's config with `model.load_transformer = false`, as a user would."""
    over = ["--train.output_dir", str(tmp / "run"), *extra]
    if preset:
        over += ["--model.preset", preset]
    else:
        write_config(kw, tmp / "shape" / "transformer")
        over += ["--model.pretrained", str(tmp / "shape"), "--model.load_transformer", "false"]
    (tmp / "run").mkdir()
    C.save(C.load(None, over), tmp / "run" / "config.toml")
    ckpt = tmp / "run" / "checkpoints" / "step-00000001"
    dcp.save({"model": state}, checkpoint_id=str(ckpt), no_dist=True)
    return ckpt


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_streamed_export_equals_the_whole_state_converted(tmp_path, dtype):
    from diffusers import FluxTransformer2DModel

    kw = transformer_kwargs("tiny")
    model = build_transformer(kw, "cpu")
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    state = model.state_dict()
    ckpt = _run(tmp_path, kw, state, preset="tiny")
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    whole = {k: v.to(dt) for k, v in state.items()}  # what the export did before it streamed

    # diffusers: shards of ≤ 1 MB with their index, then from_pretrained gives the same model
    out = export(ckpt, "diffusers", tmp_path / "d", dtype, threads=3, shard_bytes=2**20)
    shards = sorted((out / "transformer").glob("*.safetensors"))
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    got = _tensors(out / "transformer")
    assert got.keys() == whole.keys() and all(torch.equal(got[k], whole[k]) for k in whole)
    loaded = FluxTransformer2DModel.from_pretrained(out / "transformer", torch_dtype=dt)
    assert all(torch.equal(v, whole[k]) for k, v in loaded.state_dict().items())
    assert (out / "model_index.json").is_file() and (out / "vae").is_dir()

    # one file below the shard size; a re-export replaces the shards
    export(ckpt, "diffusers", tmp_path / "d", dtype)
    assert [p.name for p in (out / "transformer").glob("*.safetensors*")] == ["diffusion_pytorch_model.safetensors"]

    # BFL: each block converted alone equals the whole state converted at once
    f = export(ckpt, "bfl", tmp_path / "f.safetensors", dtype, threads=2)
    got, want = _tensors(f), bfl.diffusers_to_bfl(whole)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    trained, _, _ = load_checkpoint_model(ckpt)
    assert all(torch.equal(v, state[k]) for k, v in trained.state_dict().items())


def test_checkpoint_of_another_shape_names_the_key(tmp_path):
    kw = transformer_kwargs("tiny")
    state = build_transformer({**kw, "num_layers": 1}, "cpu").state_dict()
    ckpt = _run(tmp_path, kw, state, preset="tiny")
    with pytest.raises(WeightsError, match="transformer_blocks.1"):
        export(ckpt, "bfl", tmp_path / "f.safetensors")


def test_bfl_export_loads_through_diffusers_single_file_at_flux_width(tmp_path, monkeypatch):
    """diffusers' BFL converter hard-codes FLUX.1's width (3072) and MLP ratio: the real width, one block of each
    kind (0.5 B parameters, made and kept in bf16 only)."""
    from diffusers import FluxTransformer2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kw = {**transformer_kwargs("flux-dev"), "num_layers": 1, "num_single_layers": 1}
    model = build_transformer(kw, "meta").to(torch.bfloat16).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    state = model.state_dict()
    ckpt = _run(tmp_path, kw, state)
    f = export(ckpt, "bfl", tmp_path / "flux1.safetensors")

    loaded = FluxTransformer2DModel.from_single_file(str(f), config=str(tmp_path / "shape"), subfolder="transformer",
                                                     local_files_only=True, torch_dtype=torch.bfloat16)
    got = loaded.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_ema_runs_export_the_ema_weights_from_the_config_inside_the_checkpoint(tmp_path):
    """ema.use_for_export: the checkpoint's "ema" section is written, not the raw weights; the run's config is read
    from the copy inside the checkpoint (checkpoints stored away from their run, e.g. on S3)."""
    kw = transformer_kwargs("tiny")
    raw = {k: v.clone() for k, v in build_transformer(kw, device="cpu").state_dict().items()}
    ema = {k: v + 0.5 for k, v in raw.items()}
    ckpt = tmp_path / "elsewhere" / "step-00000001"
    dcp.save({"model": raw, "ema": ema}, checkpoint_id=str(ckpt), no_dist=True)
    cfg = C.load(None, ["--model.preset", "tiny", "--ema.enabled", "true"])
    C.save(cfg, ckpt / "config.toml")
    got = _tensors(export(ckpt, "diffusers", tmp_path / "out", dtype="fp32") / "transformer")
    assert got.keys() == ema.keys() and all(torch.equal(got[k], ema[k]) for k in ema)
    C.save(C.load(None, ["--model.preset", "tiny", "--ema.enabled", "true", "--ema.use_for_export", "false"]),
           ckpt / "config.toml")
    got = _tensors(export(ckpt, "diffusers", tmp_path / "raw", dtype="fp32") / "transformer")
    assert all(torch.equal(got[k], raw[k]) for k in raw)


def test_an_export_samples_as_its_checkpoint(tmp_path):
    """An export keeps what its run trained with (text length, resolution, guidance, steps, CFG), so sampling it
    gives the checkpoint's images. Before, an export was sampled with 512 T5 tokens whatever its run trained on, and
    FLUX attends to every padded token."""
    from fluxtrain.eval.grid import generate
    from fluxtrain.sample import TrainedFor, load_for_inference, sample_to_dir

    kw = transformer_kwargs("tiny")
    model = build_transformer(kw, "cpu")
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    run = ("--model.max_text_tokens", "24", "--data.resolution", "32", "--model.guidance", "2.0",
           "--eval.num_inference_steps", "3", "--eval.true_cfg_scale", "1.5")
    ckpt = _run(tmp_path, kw, model.state_dict(), preset="tiny", extra=run)
    out = export(ckpt, "diffusers", tmp_path / "d", "fp32")
    loaded = [load_for_inference(x, torch.device("cpu")) for x in (ckpt, out)]
    assert loaded[0][3] == loaded[1][3] == TrainedFor(24, 32, 3, 2.0, 1.5)
    assert loaded[1][1]("a red circle")[0].shape[1] == 24  # the export's T5 sequence: the run's length, not 512
    images = [generate(m, t, v, ["a red circle", "two blue squares"], tf.resolution, steps=tf.steps,
                       guidance=tf.guidance, seed=0, true_cfg=tf.true_cfg) for m, t, v, tf in loaded]
    assert all(a.size == (32, 32) and a.tobytes() == b.tobytes() for a, b in zip(*images))
    # `fluxtrain sample` with nothing given makes the same images (it sampled 20 steps without CFG)
    paths = sample_to_dir(out, ["a red circle", "two blue squares"], tmp_path / "s")
    assert [Image.open(p).tobytes() for p in paths] == [im.tobytes() for im in images[1]]
    (out / "fluxtrain.json").write_text('{"max_text_tokens": "24"')  # broken by hand: a one-line error
    with pytest.raises(C.ConfigError, match="fluxtrain.json: .*delete it to sample with FLUX.1-dev's defaults"):
        load_for_inference(out, torch.device("cpu"))
    (out / "fluxtrain.json").unlink()  # a folder from elsewhere (FLUX.1-dev): FLUX.1-dev's defaults
    assert load_for_inference(out, torch.device("cpu"))[3] == TrainedFor(512, 64, 20, 3.5, 1.0)


def test_fine_tuning_an_export_at_another_text_length_is_logged(tmp_path):
    """Training from an export whose run used another T5 length names both lengths and the setting that continues it
    as trained; the same length, or a folder without fluxtrain.json (FLUX.1-dev's), says nothing."""
    import shutil

    from fluxtrain.models.tiny import tiny_folder
    from fluxtrain.sample import TrainedFor, text_length_warning

    shutil.copytree(tiny_folder(), tmp_path / "export")
    TrainedFor(24, 64).write(tmp_path / "export")
    at = lambda n: C.load(None, ["--model.pretrained", str(tmp_path / "export"), "--model.max_text_tokens", n])  # noqa: E731
    line = text_length_warning(at("512"))
    assert "trained with 24 T5 tokens" in line and "pads to 512" in line and "model.max_text_tokens = 24" in line
    assert text_length_warning(at("24")) is None
    (tmp_path / "export" / "fluxtrain.json").unlink()
    assert text_length_warning(at("512")) is None


def test_eval_of_a_folder_without_fluxtrain_json_says_so_and_takes_a_text_length(tmp_path, capsys):
    """A diffusers folder without fluxtrain.json is sampled with FLUX.1-dev's 512 T5 tokens: eval and sample say so in
    a line and --max-text-tokens sets the length (the v8 ablation's base, trained at 24 tokens, scored 0% at 512)."""
    import json
    import shutil

    from fluxtrain.cli import main as cli_main
    from fluxtrain.eval.evaluate import main
    from fluxtrain.models.tiny import tiny_folder
    from fluxtrain.sample import TrainedFor

    shutil.copytree(tiny_folder(), tmp_path / "m")
    common = ["--model", str(tmp_path / "m"), "--limit", "1", "--steps", "1", "--resolution", "32", "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "a.json")]) == 0
    err = capsys.readouterr().err
    assert "has no fluxtrain.json: sampling with FLUX.1-dev's defaults (512 T5 tokens" in err
    assert json.loads((tmp_path / "a.json").read_text())["max_text_tokens"] == 512
    assert main(common + ["--max-text-tokens", "24", "--out", str(tmp_path / "b.json")]) == 0
    assert "has no fluxtrain.json" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b.json").read_text())["max_text_tokens"] == 24
    with pytest.raises(SystemExit) as e:  # argparse's, before the model loads
        cli_main(["eval"] + common + ["--max-text-tokens", "0", "--out", str(tmp_path / "z.json")])
    assert e.value.code == 2 and "--max-text-tokens: must be ≥ 1" in capsys.readouterr().err
    # `sample` loads the same way: the same line and the same override
    assert cli_main(["sample", "--model", str(tmp_path / "m"), "--prompt", "a red circle", "--steps", "1",
                     "--resolution", "32", "--out", str(tmp_path / "s")]) == 0
    assert "has no fluxtrain.json: sampling with FLUX.1-dev's defaults (512 T5 tokens" in capsys.readouterr().err
    assert cli_main(["sample", "--model", str(tmp_path / "m"), "--prompt", "a red circle", "--steps", "1",
                     "--resolution", "32", "--max-text-tokens", "24", "--out", str(tmp_path / "s")]) == 0
    assert "has no fluxtrain.json" not in capsys.readouterr().err
    TrainedFor(24, 32).write(tmp_path / "m")  # an export's own file: no line, its length
    assert main(common + ["--out", str(tmp_path / "c.json")]) == 0
    assert "has no fluxtrain.json" not in capsys.readouterr().err
    assert json.loads((tmp_path / "c.json").read_text())["max_text_tokens"] == 24


def test_a_checkpoint_whose_run_resumed_from_a_moved_folder_still_exports(tmp_path):
    # the config a checkpoint keeps may name the folder its run resumed from; that folder need not exist at export
    from fluxtrain import config as C
    from fluxtrain.export import run_config_of

    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    cfg = C.load("configs/tiny.toml")
    cfg.checkpoint.resume = str(tmp_path / "moved" / "step-00000001")
    C.save(cfg, ckpt / "config.toml")
    assert run_config_of(ckpt).checkpoint.resume == cfg.checkpoint.resume


@pytest.mark.parametrize("damage, said", [
    ("no vae", "/vae is missing or empty: a FLUX pipeline folder holds"),  # "couldn't connect to huggingface.co"
    ("no tokenizer_2", "/tokenizer_2 is missing or empty"),  # "Repo id must be in the form …"
    ("truncated weights", "diffusion_pytorch_model.safetensors is damaged or not a safetensors file"),  # Rust error
    ("the transformer part", "is the pipeline's transformer part: give the pipeline folder"),
])
def test_a_damaged_pipeline_folder_is_one_line(tmp_path, capsys, damage, said):
    import shutil

    from fluxtrain.cli import main as cli_main
    from fluxtrain.models.tiny import tiny_folder

    m = tmp_path / "m"
    shutil.copytree(tiny_folder(), m)
    model = m
    if damage.startswith("no "):
        shutil.rmtree(m / damage[3:])
    elif damage == "truncated weights":
        w = next((m / "transformer").glob("*.safetensors"))
        w.write_bytes(w.read_bytes()[:100])
    else:
        model = m / "transformer"
    assert cli_main(["sample", "--model", str(model), "--prompt", "a red circle", "--steps", "1", "--resolution",
                     "32", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fluxtrain: error: ") and said in err[-1], err
