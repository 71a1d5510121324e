"""`fluxtrain sample`: images from a diffusers FLUX folder or a training checkpoint, in one process."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxtrain import config as C

TRAINED_FOR = "fluxtrain.json"  # beside an export's model_index.json: what its run trained and sampled with


@dataclass(frozen=True)
class TrainedFor:
    """Sampling defaults of a model: its run's (a checkpoint's config, or the file `fluxtrain export` writes beside
    model_index.json), else FLUX.1-dev's. The text length matters most: FLUX attends to every padded T5 token, so a
    model trained on 24 tokens sampled with 512 sees 488 tokens it never trained with (and takes ~13× the time)."""
    max_text_tokens: int = 512
    resolution: int | None = None  # None: from the VAE (64 for a ×4 one, else 512)
    steps: int = 20
    guidance: float = 3.5
    true_cfg: float = 1.0

    @classmethod
    def of_run(cls, cfg: C.Config) -> "TrainedFor":
        return cls(cfg.model.max_text_tokens, cfg.data.resolution, cfg.eval.num_inference_steps, cfg.model.guidance,
                   cfg.eval.true_cfg_scale)

    @classmethod
    def of_folder(cls, folder: Path) -> "TrainedFor":
        f = folder / TRAINED_FOR
        if not f.is_file():
            return cls()
        names = {x.name for x in dataclasses.fields(cls)}
        try:
            raw = json.loads(f.read_text())
            if not isinstance(raw, dict):  # (a bare number or string has no keys to look up)
                raise ValueError("not a JSON object")
            bad = [k for k in names if k in raw and not isinstance(raw[k], (int, float, type(None)))]
            if bad:
                raise ValueError(f"not numbers: {bad}")
        except ValueError as err:  # json.JSONDecodeError is one
            raise C.ConfigError(f"{f}: {err}; fix it, or delete it to sample with FLUX.1-dev's defaults") from None
        return cls(**{k: v for k, v in raw.items() if k in names})

    def write(self, folder: Path) -> None:
        (folder / TRAINED_FOR).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")


def text_length_warning(cfg: C.Config) -> str | None:
    """A line for the log when model.pretrained is an export whose run trained at another T5 length than this run
    pads to; None otherwise. FLUX attends to every padded token: an export of a 24-token run sampled at 512 passed
    0 of 16 prompts (62.5% at 24; bench/RESULTS.md, fifteenth session)."""
    from fluxtrain.checkpoint import is_url

    folder = Path(cfg.model.pretrained) if cfg.model.pretrained and not is_url(cfg.model.pretrained) else None
    if folder is None or not (folder / TRAINED_FOR).is_file():
        return None
    was = TrainedFor.of_folder(folder).max_text_tokens
    if was == cfg.model.max_text_tokens:
        return None
    return (f"model.pretrained {folder} was trained with {was} T5 tokens ({TRAINED_FOR}) and this run pads to "
            f"{cfg.model.max_text_tokens}: it starts from text it never saw; set model.max_text_tokens = {was} to "
            "continue it as trained")


PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")  # what sampling reads beside the model


def _check_parts(folder: Path, parts: tuple[str, ...]) -> None:
    """Each part is there before anything loads (a missing vae/ was transformers' "couldn't connect to
    huggingface.co", a missing tokenizer_2/ "Repo id must be in the form …")."""
    for part in parts:
        if not (Path(folder) / part).is_dir() or not any((Path(folder) / part).iterdir()):
            raise C.ConfigError(f"{Path(folder) / part} is missing or empty: a FLUX pipeline folder holds "
                                f"{', '.join(('transformer', *PARTS))}; export the run again (fluxtrain export)")


def load_for_inference(model_path: str | Path, device: torch.device, max_text_tokens: int | None = None):
    """(transformer, text encoders, vae, TrainedFor) from a diffusers folder or a checkpoint (a folder or an fsspec
    URL such as s3://…); `max_text_tokens` overrides the length the model's run trained with."""
    import sys

    from fluxtrain.checkpoint import is_url
    from fluxtrain.models.encoders import Autoencoder, TextEncoders
    from fluxtrain.models.flux import build_transformer, iter_pretrained_state, load_state_into, pretrained_kwargs

    if max_text_tokens is not None and max_text_tokens < 1:
        raise C.ConfigError(f"--max-text-tokens {max_text_tokens}: give at least 1")
    p = Path(model_path)  # only looked at for local paths: Path folds a URL's `s3://` into `s3:/`
    if not is_url(model_path) and p.name == "transformer" and (p.parent / "model_index.json").is_file():
        raise C.ConfigError(f"{p} is the pipeline's transformer part: give the pipeline folder, {p.parent}")
    if not is_url(model_path) and ((p / "model_index.json").is_file() or p.suffix == ".safetensors"):
        if p.is_file():
            raise C.ConfigError(f"{p}: a BFL single file needs a config; sample from a diffusers folder instead")
        _check_parts(p, ("transformer", *PARTS))
        kw = pretrained_kwargs(p)
        if kw is None:
            raise C.ConfigError(f"{p / 'transformer' / 'config.json'} is missing: export the run again "
                                "(fluxtrain export)")
        folder = p
        model = build_transformer(kw, device="cpu")
        load_state_into(model, iter_pretrained_state(p, kw["num_attention_heads"] * kw["attention_head_dim"]))
        trained = TrainedFor.of_folder(p)
        if max_text_tokens is None and not (p / TRAINED_FOR).is_file():
            # FLUX.1-dev's folder, or an export older than the file: the seventeenth session's v8 base, trained at 24
            # tokens and sampled at 512 for want of it, scored 0%
            print(f"fluxtrain: {p} has no {TRAINED_FOR}: sampling with FLUX.1-dev's defaults "
                  f"({trained.max_text_tokens} T5 tokens, guidance {trained.guidance}); a model trained at another "
                  "text length fails at them: give --max-text-tokens and --guidance", file=sys.stderr)
    else:
        from fluxtrain.export import load_checkpoint_model

        model, cfg, folder = load_checkpoint_model(model_path)
        trained = TrainedFor.of_run(cfg)
        if folder is None:
            raise C.ConfigError(f"{model_path}: its run's text encoders and VAE (model.encoders, else model.pretrained "
                                "or the shipped tiny ones) are not on this machine: copy them to that path")
        _check_parts(folder, PARTS)
    if max_text_tokens is not None:
        trained = dataclasses.replace(trained, max_text_tokens=max_text_tokens)
    dev_dtype = torch.float32
    text = TextEncoders(folder, max_tokens=trained.max_text_tokens, dtype=dev_dtype).to(device)
    vae = Autoencoder(folder, dtype=dev_dtype).to(device)
    if trained.resolution is None:
        trained = dataclasses.replace(trained, resolution=64 if vae.downsample <= 4 else 512)
    return model.to(device).eval(), text, vae, trained


def sample_to_dir(model_path, prompts: list[str], out: str | Path, resolution: int | None = None,
                  steps: int | None = None, guidance: float | None = None, seed: int = 0,
                  max_text_tokens: int | None = None, true_cfg: float | None = None) -> list[Path]:
    """Each setting left None is the run's (TrainedFor): the images its eval and training grid made."""
    from fluxtrain.eval.grid import generate, save_grid

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, text, vae, trained = load_for_inference(model_path, device, max_text_tokens)
    res = resolution or trained.resolution
    g = guidance if guidance is not None else trained.guidance
    images = generate(model, text, vae, prompts, res, steps=steps or trained.steps,
                      guidance=g if model.config.guidance_embeds else None, seed=seed,
                      true_cfg=true_cfg if true_cfg is not None else trained.true_cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(out / f"{i:03d}.png")
        im.save(paths[-1])
    save_grid(images, prompts, out / "grid.png")
    return paths
