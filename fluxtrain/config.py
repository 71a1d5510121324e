"""Typed run configuration: dataclasses with sections, TOML files, `--section.key value` overrides.

Parsing and type checking are pydantic's (dataclasses validated in strict-ish lax mode); this module only
turns a TOML file plus command-line overrides into one nested dict, and pydantic's errors into one line each.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from dataclasses import asdict, field, fields
from pathlib import Path
from typing import Any, Literal

import pydantic
import tomli_w
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from fluxtrain.data.prompts import MIN_SIZE  # stdlib only: config stays light

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A configuration problem, told in one line with what to do about it."""


@dataclass(config=_STRICT)
class ModelConfig:
    preset: Literal["tiny", "small", "medium", "deep", "deeper", "flux-dev", "flux-schnell"] = "tiny"
    # A diffusers-layout FLUX folder (transformer/, vae/, text_encoder*/, tokenizer*/) or a BFL single file.
    pretrained: str | None = None
    # Where the frozen encoders and VAE come from when `pretrained` is a BFL single file.
    encoders: str | None = None
    # Load the transformer's weights from `pretrained` (false: random init of the preset, encoders still loaded).
    load_transformer: bool = True
    guidance: float = 1.0
    max_text_tokens: int = 512
    attention_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"


@dataclass(config=_STRICT)
class DataConfig:
    source: Literal["synthetic", "webdataset", "cache"] = "synthetic"
    path: str | None = None
    resolution: int = 64
    complex_frac: float = 0.0
    # DataLoader worker processes ahead of the step: webdataset decodes shards, synthetic renders scenes in them (the
    # cache reads in the training process)
    num_workers: int = 0
    shuffle_buffer: int = 1000
    caption_dropout: float = 0.0
    caption_dropout_clip: float | None = None
    # P(caption composed from the sample's scene metadata instead), drawn from (seed, sample id): data/augment.py
    caption_augment: float = 0.0
    max_skip_frac: float = 0.5
    buckets: list[list[int]] = field(default_factory=list)
    seed: int = 0


@dataclass(config=_STRICT)
class TrainConfig:
    output_dir: str = "runs/demo"
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: bool = True
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    max_nonfinite_steps: int = 10
    itc_weight: float = 0.0
    # the noise level of ITC's image features: the batch's σ times this (1: the flow loss's own noisy latents; < 1:
    # cleaner ones, where the caption's objects can already be seen: near σ = 1 no caption is readable)
    itc_sigma_scale: float = 1.0
    compile: bool = False
    # reduce-overhead: each compiled block replays as a CUDA graph (a small model's step is otherwise bound by kernel
    # launches: 1,600 launches for 14 ms of GPU work). One fp32 process without FSDP, no ITC.
    compile_mode: Literal["default", "reduce-overhead"] = "default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    inject_nan_at_step: int | None = None  # test hook: makes one rank's loss NaN at this step
    inject_nan_rank: int = 0


@dataclass(config=_STRICT)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0
    fused: bool = True


@dataclass(config=_STRICT)
class ParallelConfig:
    strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD"
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    # fp32 matmuls on a GPU use TF32 tensor cores (10-bit mantissa, ~8x the fp32 rate on Hopper); false: exact fp32
    tf32: bool = True
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # selective AC: checkpoint every k-th block (k=1 is full) or, with ac_ops, save matmuls and recompute the rest.
    ac_every: int = 2
    ac_ops: bool = False
    cpu_offload: bool = False
    # only the AdamW moments (8 of 16 bytes per parameter) in pinned host memory, streamed through the GPU one block at
    # a time behind the next forward; weights, gradients and the fused step stay on the GPU (exact AdamW)
    optimizer_offload: bool = False
    # the GPU ring the offloaded moments pass through (0 = the least: two blocks' shards). More lets the next step's
    # copies in run under this step's forward and backward: GPU memory for speed (`fluxtrain plan` sizes it)
    optimizer_offload_buffer_gib: float = 0.0
    # the offloaded moments' host dtype: bf16 halves the copies each way (the update stays fp32 on the GPU; rounding
    # back is stochastic, so small increments to the second moment accumulate instead of being rounded away)
    optimizer_offload_dtype: Literal["fp32", "bf16"] = "fp32"
    # intra-op threads for this rank's CPU work. 0 = auto: with cpu_offload (the optimizer step runs on the CPU),
    # the cores this rank may use ÷ the ranks on its node, since torchrun sets OMP_NUM_THREADS=1 and the offloaded
    # AdamW over billions of parameters then runs on one core; without offload, torch's default.
    cpu_threads: int = 0
    fp8: bool = False  # torchao Float8Linear on the block linears, fp8 all-gather (GPU only)
    # tensorwise: one scale per tensor, fp8 all-gather; rowwise: one per row (more accurate, bf16 all-gather);
    # *_gw_hp: the weight-gradient GEMM stays in bf16; tensorwise_saved: tensorwise, the input's fp8 cast kept for the
    # weight gradient instead of made again in the backward (with op-level AC the casts are saved, not recomputed):
    # the same gradients, 1.04× tensorwise's speed on an H200 for +1 byte per linear-input element (`fluxtrain plan`
    # counts it and proposes it where it fits)
    fp8_recipe: Literal["tensorwise", "tensorwise_gw_hp", "tensorwise_saved", "rowwise",
                        "rowwise_with_gw_hp"] = "tensorwise"
    # tensorwise recipes: FSDP all-gathers the weights in fp8 (half of bf16's bytes) through torchao's weight subclass;
    # off by default: torch 2.11's inductor refused the compiled block with it (gpu_run23)
    fp8_all_gather: bool = False
    # HYBRID_SHARD: ranks per shard group (default 0 = GPUs per node, LOCAL_WORLD_SIZE).
    shard_size: int = 0
    forward_prefetch: int = 1
    backward_prefetch: int = 1
    reshard_last_block: bool = False
    nccl_timeout_s: int = 600
    nproc_per_node: int = 0  # >0: `fluxtrain train` spawns torchrun with this many processes


@dataclass(config=_STRICT)
class CheckpointConfig:
    interval: int = 200
    resume: str = "auto"  # auto | never | PATH (a checkpoint folder or URL)
    # Where checkpoints go: empty = <train.output_dir>/checkpoints; a local folder or an fsspec URL such as
    # s3://bucket/run/checkpoints (pip install 'fluxtrain[s3]'; credentials and endpoint from the AWS_* variables)
    dir: str = ""
    keep: int = 3
    keep_every: int = 0
    async_save: bool = True
    # How an async save copies the state off the GPU. background: into pinned host memory on a thread, overlapping
    # the next step's forward/backward (its optimizer step waits for the copy); sync: before training continues,
    # into pageable memory; auto: background on CUDA, sync elsewhere.
    staging: Literal["auto", "background", "sync"] = "auto"
    export_dtype: Literal["bf16", "fp32"] = "bf16"
    # SHA-256 of each local checkpoint file, hashed by its rank on the save's thread after the save, checked before a
    # resume or export (each rank hashes 1/world of the files): a file damaged in place is an error, not wrong weights
    digests: bool = True

    def __post_init__(self):
        # a missing filesystem package (s3fs) is told now, before any process group starts
        import fsspec

        for key in ("dir", "resume"):
            url = getattr(self, key)
            if "://" in url:
                protocol = url.split("://", 1)[0]
                try:
                    fsspec.get_filesystem_class(protocol)
                except (ImportError, ValueError) as err:
                    fix = "pip install 'fluxtrain[s3]'" if protocol in ("s3", "s3a") else str(err)
                    raise ConfigError(f"checkpoint.{key} = {url}: no filesystem for {protocol}://: {fix}") from None


@dataclass(config=_STRICT)
class EvalConfig:
    interval: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 3.5
    # classifier-free guidance against the empty prompt when sampling (diffusers' true_cfg_scale; 1 = off): useful
    # for models trained with data.caption_dropout > 0
    true_cfg_scale: float = 1.0
    prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle",
            "two blue squares",
            "a yellow triangle and a green circle",
            "a white square above a black circle",
        ]
    )
    adherence_prompts: int = 0
    seed: int = 1234


@dataclass(config=_STRICT)
class LogConfig:
    interval: int = 1
    trackers: list[Literal["tensorboard", "wandb", "jsonl"]] = field(default_factory=lambda: ["tensorboard"])
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    profile_steps: list[int] = field(default_factory=list)
    profile_ranks: Literal["all", "rank0"] = "rank0"
    wandb_project: str = "fluxtrain"


@dataclass(config=_STRICT)
class LoraConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    # attention and MLP linears inside the blocks (fluxtrain.lora.DEFAULT_TARGETS when empty)
    targets: list[str] = field(default_factory=list)
    init: Literal["gaussian", "kaiming"] = "gaussian"
    base_dtype: Literal["fp32", "bf16"] = "fp32"


@dataclass(config=_STRICT)
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999
    every: int = 1
    warmup: bool = False
    use_for_samples: bool = True
    use_for_export: bool = True


@dataclass(config=_STRICT)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "optim": OptimConfig,
            "parallel": ParallelConfig, "checkpoint": CheckpointConfig, "eval": EvalConfig, "log": LogConfig,
            "lora": LoraConfig, "ema": EmaConfig}

# The guide's train_flux1dev.py flags, mapped onto our keys. A flag with value None takes no argument.
ALIASES: dict[str, tuple[str, Any]] = {
    "--use_fsdp": ("parallel.strategy", "FULL_SHARD"),
    "--mixed_precision": ("parallel.mixed_precision", None),
    "--gradient_accumulation_steps": ("train.grad_accum", None),
    "--gradient_checkpointing": ("parallel.activation_checkpointing", "full"),
    "--output_dir": ("train.output_dir", None),
    "--train_batch_size": ("train.batch_size", None),
    "--max_train_steps": ("train.steps", None),
    "--learning_rate": ("optim.lr", None),
    "--seed": ("train.seed", None),
    "--pretrained_model_name_or_path": ("model.pretrained", None),
}


def _keys_of(name: str) -> list[str]:
    return [f.name for f in fields(SECTIONS[name])]


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_keys(raw: dict[str, Any], origin: str) -> None:
    for sec, body in raw.items():
        if sec not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section '{sec}'{_suggest(sec, list(SECTIONS))}; sections are {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: '{sec}' must be a table of keys, got {body!r}")
        for key in body:
            if key not in _keys_of(sec):
                raise ConfigError(f"{origin}: unknown key '{sec}.{key}'{_suggest(key, _keys_of(sec))}")


def _parse_value(text: str) -> Any:
    """Command-line values: TOML/JSON literals (numbers, booleans, lists) where they parse, else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_overrides(argv: list[str]) -> dict[str, dict[str, Any]]:
    """`--section.key value`, `--section.key=value` and the guide's aliases, as a nested dict."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key value")
        name, eq, inline = arg.partition("=")
        if name in ALIASES:
            dotted, fixed = ALIASES[name]
            if fixed is not None:
                value, i = (inline if eq else fixed), i + 1
            elif eq:
                value, i = inline, i + 1
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 2
            else:
                raise ConfigError(f"{name} needs a value")
        else:
            dotted = name[2:]
            if "." not in dotted:
                known = [a for a in ALIASES] + [f"--{s}.KEY" for s in SECTIONS]
                raise ConfigError(f"unknown option '{name}'{_suggest(name, known)}: overrides look like --section.key value")
            kind = _field_type(dotted)
            if eq:
                value, i = inline, i + 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 2
            elif kind in ("bool", None):  # a bare flag sets a boolean (an unknown key is named further on)
                value, i = "true", i + 1
            else:  # `--optim.lr --train.steps 2` set the lr to 1.0 (true, as a number)
                raise ConfigError(f"{name} needs a value: {name} <{kind}>")
        sec, _, key = dotted.partition(".")
        # a name stays a name (an alias's too): 2024-06-01 was read as a TOML date
        literal = isinstance(value, str) and _field_type(dotted) not in ("str", "str | None")
        out.setdefault(sec, {})[key] = _parse_value(value) if literal else value
    return out


def _field_type(dotted: str) -> str | None:
    """A key's annotation as written ("int", "str | None", …); None for an unknown key."""
    sec, _, key = dotted.partition(".")
    return next((str(f.type) for f in fields(SECTIONS[sec]) if f.name == key), None) if sec in SECTIONS else None


def _merge(base: dict, over: dict) -> dict:
    merged = {k: dict(v) for k, v in base.items()}
    for sec, body in over.items():
        merged.setdefault(sec, {}).update(body)
    return merged


def _one_line(err: pydantic.ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int) or len(e["loc"]) > 2)
    msg = e["msg"]
    if e.get("type") == "literal_error":
        msg = f"must be one of {e['ctx']['expected']}"
    return f"{loc}: {msg} (got {e.get('input')!r})"


def from_dict(raw: dict[str, Any], origin: str = "config", overrides: dict | None = None) -> Config:
    """`overrides`: the part of `raw` that came from the command line, so that a bad value there is not blamed on
    the file."""
    _check_keys(raw, origin)
    try:
        cfg = pydantic.TypeAdapter(Config).validate_python(raw)
    except pydantic.ValidationError as err:
        loc = err.errors()[0]["loc"]
        if overrides and len(loc) >= 2 and loc[1] in overrides.get(loc[0], {}):
            origin = "command line"
        raise ConfigError(f"{origin}: {_one_line(err)}") from None
    validate(cfg)
    return cfg


def parse_toml(data: bytes, origin, fix: str = "") -> dict[str, Any]:
    """A TOML file's contents as a dict; bad UTF-8 or TOML is one ConfigError line naming the file (and line)."""
    try:
        return tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{origin}: not valid TOML ({err})" + (f"; {fix}" if fix else "")) from None


def load(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or the defaults), apply overrides, validate. Raises ConfigError (one line)."""
    raw: dict[str, Any] = {}
    origin = "command line"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' not found: pass --config with a TOML file such as configs/tiny.toml")
        raw = parse_toml(p.read_bytes(), path)
        origin = str(path)
        _check_keys(raw, origin)
    over = parse_overrides(overrides or [])
    _check_keys(over, "command line")
    cfg = from_dict(_merge(raw, over), origin, over)
    check_new_run(cfg)
    return cfg


def check_new_run(cfg: Config) -> None:
    """What a run about to start needs, checked where it starts, not in `validate`: a checkpoint's saved config, read
    back by export, may name a resume folder that has moved since (or an lr nobody trains with again)."""
    t, resume = cfg.train, cfg.checkpoint.resume
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr must be > 0 (got {cfg.optim.lr}); to freeze the weights, evaluate instead of training")
    if "://" not in t.output_dir and Path(t.output_dir).exists() and not Path(t.output_dir).is_dir():
        raise ConfigError(f"train.output_dir '{t.output_dir}' is a file, not a folder: give another path")
    if resume not in ("auto", "never") and "://" not in resume and not Path(resume).exists():
        raise ConfigError(f"checkpoint.resume '{resume}' does not exist: give a checkpoint step-N folder or URL, "
                          "or auto (the run's latest) or never")


def validate(cfg: Config) -> None:
    """Combinations that can't work, refused before any process group starts."""
    t, p, d = cfg.train, cfg.parallel, cfg.data
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "data.resolution": d.resolution, "checkpoint.interval": cfg.checkpoint.interval,
                "log.interval": cfg.log.interval, "parallel.ac_every": p.ac_every,
                "model.max_text_tokens": cfg.model.max_text_tokens, "ema.every": cfg.ema.every,
                "eval.num_inference_steps": cfg.eval.num_inference_steps}
    for k, v in positive.items():
        if v < 1:
            raise ConfigError(f"{k} must be ≥ 1 (got {v})")
    # each was accepted: NaN or inf trained NaN steps (and saved them), a negative clip or ITC weight turned it off
    o = cfg.optim
    at_least_0 = {"optim.grad_clip": o.grad_clip, "optim.weight_decay": o.weight_decay,
                  "optim.warmup_steps": o.warmup_steps, "train.itc_weight": t.itc_weight,
                  "train.logit_std": t.logit_std, "checkpoint.keep": cfg.checkpoint.keep,
                  "checkpoint.keep_every": cfg.checkpoint.keep_every, "eval.interval": cfg.eval.interval,
                  "data.shuffle_buffer": d.shuffle_buffer, "model.guidance": cfg.model.guidance}
    for k, v in at_least_0.items():
        if not (v >= 0 and math.isfinite(v)):  # NaN fails both
            raise ConfigError(f"{k} must be a finite number ≥ 0 (got {v})")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] (got {o.min_lr_ratio})")
    if not (all(0.0 <= b < 1.0 for b in o.betas) and o.eps > 0):
        raise ConfigError(f"optim.betas must be in [0, 1) and optim.eps > 0 (got {list(o.betas)}, {o.eps})")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1) (got {cfg.lora.dropout})")
    if p.nccl_timeout_s < 1:
        raise ConfigError(f"parallel.nccl_timeout_s must be ≥ 1 (got {p.nccl_timeout_s})")
    if not t.output_dir.strip():  # "" wrote the run into the working folder
        raise ConfigError("train.output_dir is empty: give the run's folder")
    if not cfg.eval.prompts or not all(q.strip() for q in cfg.eval.prompts):  # [] failed after the last step
        raise ConfigError(f"eval.prompts needs at least one prompt and no empty one (got {cfg.eval.prompts})")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be ≥ 0 (0 = load in the training process), got {d.num_workers}")
    if p.cpu_threads < 0:
        raise ConfigError(f"parallel.cpu_threads must be ≥ 0 (0 = auto), got {p.cpu_threads}")
    if d.resolution % 16:
        raise ConfigError(f"data.resolution must be a multiple of 16 (VAE ×8 and 2×2 packing), got {d.resolution}")
    if d.source == "synthetic" and d.resolution < MIN_SIZE:
        raise ConfigError(f"data.source = synthetic needs data.resolution ≥ {MIN_SIZE} (smaller images cannot hold a "
                          f"complex scene), got {d.resolution}")
    for name, v in (("data.complex_frac", d.complex_frac), ("data.caption_dropout", d.caption_dropout),
                    ("data.caption_augment", d.caption_augment), ("data.max_skip_frac", d.max_skip_frac)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1] (got {v})")
    if not 0.0 < t.itc_sigma_scale <= 1.0:
        raise ConfigError(f"train.itc_sigma_scale must be in (0, 1] (1: ITC sees the flow loss's noisy latents), got "
                          f"{t.itc_sigma_scale}")
    if d.source in ("webdataset", "cache") and not d.path:
        raise ConfigError(f"data.source = {d.source} needs data.path (a shard glob, brace pattern or URL list)")
    if p.cpu_offload and p.strategy == "NO_SHARD":
        raise ConfigError("parallel.cpu_offload needs a sharded strategy: use FULL_SHARD or SHARD_GRAD_OP with offload")
    if p.optimizer_offload and p.cpu_offload:
        raise ConfigError("parallel.optimizer_offload and parallel.cpu_offload both move the optimizer state to the host: "
                          "choose one (cpu_offload also moves weights and gradients, and steps on the CPU)")
    if p.optimizer_offload and not cfg.optim.fused:
        raise ConfigError("parallel.optimizer_offload streams through the fused AdamW kernel: set optim.fused = true")
    if p.optimizer_offload_dtype != "fp32" and not p.optimizer_offload:
        raise ConfigError(f"parallel.optimizer_offload_dtype = {p.optimizer_offload_dtype} applies to offloaded moments only: "
                          "set parallel.optimizer_offload = true, or leave the dtype at fp32")
    if p.optimizer_offload_buffer_gib < 0:
        raise ConfigError(f"parallel.optimizer_offload_buffer_gib must be >= 0 (0 = the least), got {p.optimizer_offload_buffer_gib}")
    if p.shard_size and p.strategy != "HYBRID_SHARD":
        raise ConfigError("parallel.shard_size only applies to HYBRID_SHARD: remove it or set parallel.strategy = HYBRID_SHARD")
    if p.shard_size < 0:
        raise ConfigError(f"parallel.shard_size must be ≥ 0 (got {p.shard_size})")
    if cfg.model.pretrained and not Path(cfg.model.pretrained).exists() and "://" not in cfg.model.pretrained:
        # paths inside the package (the shipped tiny folder) also resolve outside the repo and from an installed wheel
        shipped = Path(__file__).resolve().parent.parent / cfg.model.pretrained
        if shipped.exists():
            cfg.model.pretrained = str(shipped)
    if cfg.model.pretrained and not Path(cfg.model.pretrained).exists() and "://" not in cfg.model.pretrained:
        raise ConfigError(f"model.pretrained '{cfg.model.pretrained}' does not exist: give a diffusers folder or a .safetensors file")
    if cfg.lora.enabled and cfg.lora.base_dtype == "bf16" and p.mixed_precision != "bf16":
        raise ConfigError("lora.base_dtype = bf16 needs parallel.mixed_precision = bf16 (fp32 compute can't use a bf16 base)")
    if p.fp8 and p.fp8_all_gather and not p.fp8_recipe.startswith("tensorwise"):
        raise ConfigError(f"parallel.fp8_all_gather needs a tensorwise recipe (got parallel.fp8_recipe = "
                          f"{p.fp8_recipe}): set parallel.fp8_all_gather = false, or parallel.fp8_recipe = tensorwise")
    if cfg.lora.enabled and p.fp8:
        raise ConfigError("lora.enabled with parallel.fp8 is not supported yet: turn one of them off")
    if cfg.lora.enabled and cfg.lora.rank < 1:
        raise ConfigError(f"lora.rank must be ≥ 1 (got {cfg.lora.rank})")
    if t.compile_mode == "reduce-overhead":
        why = None
        if not t.compile:
            why = "train.compile is false"
        elif t.itc_weight > 0:
            why = "train.itc_weight > 0 (ITC's capture hook inside the compiled blocks is not proven under CUDA graphs)"
        elif t.grad_accum > 1:  # seen on an H200: "accessing tensor output of CUDAGraphs that has been overwritten"
            why = "train.grad_accum > 1 (the next micro-batch's replay overwrites outputs the backward still needs)"
        elif p.optimizer_offload:
            why = "parallel.optimizer_offload waits for each block's update in a hook outside the graphs"
        elif p.mixed_precision != "fp32" or p.cpu_offload:
            why = "FSDP's hooks can't run inside a CUDA graph, and bf16 or CPU offload train under FSDP"
        if why:
            raise ConfigError(f"train.compile_mode = reduce-overhead can't be used here: {why}; use "
                              "train.compile_mode = default")
    from fluxtrain.parallel.attention import check_backend

    dev = t.device if t.device != "auto" else ("cuda" if _cuda_available() else "cpu")
    problem = check_backend(cfg.model.attention_backend, dev, p.mixed_precision)
    if problem:
        raise ConfigError(problem)
    if not 0.0 < cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must be in (0, 1) (got {cfg.ema.decay})")
    if t.inject_nan_at_step is not None and t.inject_nan_at_step < 1:
        raise ConfigError("train.inject_nan_at_step must be ≥ 1")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate_world(cfg: Config, world_size: int, local_world_size: int) -> None:
    """Checks that need the launch geometry (still before the process group; `fluxtrain train --nproc-per-node N` also
    runs them before it starts torchrun, so that the error is one line, not one per rank and torchrun's traceback)."""
    p = cfg.parallel
    if p.strategy == "HYBRID_SHARD":
        shard = p.shard_size or local_world_size
        if world_size % shard:
            raise ConfigError(f"HYBRID_SHARD shard size {shard} does not divide the world size {world_size}: "
                              f"set parallel.shard_size to a divisor of {world_size}")


def to_dict(cfg: Config) -> dict[str, Any]:
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return clean(asdict(cfg))


def changes(saved: bytes, cfg: Config, ignore: tuple[str, ...] = ("checkpoint.resume",)) -> list[str]:
    """`section.key: old → new` for each setting of `cfg` that differs from a saved config.toml (a checkpoint's):
    a resume with another lr, batch or seed is allowed, and said."""
    try:
        old = tomllib.loads(saved.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ["(the checkpoint's config.toml is not valid TOML: not compared)"]
    new, out = to_dict(cfg), []
    for sec in sorted(set(old) | set(new)):
        a, b = old.get(sec, {}), new.get(sec, {})
        if not isinstance(a, dict) or not isinstance(b, dict):
            continue
        for key in sorted(set(a) | set(b)):
            name = f"{sec}.{key}"
            if name not in ignore and _norm(a.get(key)) != _norm(b.get(key)):
                out.append(f"{name}: {a.get(key)!r} → {b.get(key)!r}")
    return out


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def dumps(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


def save(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(dumps(cfg))


def config_hash(cfg: Config) -> str:
    import hashlib

    return hashlib.sha256(dumps(cfg).encode()).hexdigest()[:16]

