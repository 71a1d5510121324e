import pytest

from fluxtrain import config as C


def test_defaults_and_overrides():
    cfg = C.load("configs/tiny.toml", ["--train.steps", "7", "--optim.lr=3e-4", "--optim.betas", "[0.9, 0.95]"])
    assert cfg.train.steps == 7 and cfg.optim.lr == pytest.approx(3e-4) and tuple(cfg.optim.betas) == (0.9, 0.95)
    assert cfg.model.preset == "tiny"


def test_guide_aliases():
    cfg = C.load(None, ["--use_fsdp", "--mixed_precision", "fp32", "--gradient_accumulation_steps", "4"])
    assert (cfg.parallel.strategy, cfg.parallel.mixed_precision, cfg.train.grad_accum) == ("FULL_SHARD", "fp32", 4)


@pytest.mark.parametrize("argv, needle", [
    (["--train.stepz", "3"], "did you mean 'steps'"),
    (["--trian.steps", "3"], "did you mean 'train'"),
    (["--parallel.strategy", "FOO"], "must be one of"),
    (["--train.steps", "abc"], "train.steps"),
    (["--parallel.strategy", "NO_SHARD", "--parallel.cpu_offload", "true"], "cpu_offload"),
    (["--parallel.optimizer_offload", "true", "--parallel.cpu_offload", "true"], "choose one"),
    (["--parallel.optimizer_offload", "true", "--optim.fused", "false"], "optim.fused = true"),
    (["--parallel.optimizer_offload", "true", "--parallel.optimizer_offload_buffer_gib", "-1"], "must be >= 0"),
    (["--parallel.optimizer_offload_dtype", "bf16"], "applies to offloaded moments only"),
    (["--data.resolution", "70"], "multiple of 16"),
    (["--data.source", "webdataset"], "needs data.path"),
    (["--data.resolution", "16"], "synthetic needs data.resolution ≥ 32"),
    (["--train.steps", "0"], "≥ 1"),
    (["--train.itc_sigma_scale", "0"], "itc_sigma_scale must be in (0, 1]"),
    (["--train.itc_sigma_scale", "1.5"], "itc_sigma_scale must be in (0, 1]"),
    # each of these was a traceback (or, lr 0, a run that trained nothing) after the model was built
    (["--optim.lr", "0"], "optim.lr must be > 0"),
    (["--optim.lr", "-1"], "optim.lr must be > 0"),
    (["--model.max_text_tokens", "0"], "model.max_text_tokens must be ≥ 1"),
    (["--ema.every", "0"], "ema.every must be ≥ 1"),
    (["--eval.num_inference_steps", "0"], "eval.num_inference_steps must be ≥ 1"),
    (["--data.num_workers", "-1"], "data.num_workers must be ≥ 0"),
    (["--checkpoint.resume", "/nonexistent/step-1"], "checkpoint.resume '/nonexistent/step-1' does not exist"),
    # the third audit: each trained, silently wrong (NaN steps saved, clipping or ITC off, the run in the working
    # folder), or failed after the model was built or after the last step
    (["--optim.lr", "--train.steps", "2"], "--optim.lr needs a value: --optim.lr <float>"),  # was lr 1.0
    (["--train.steps"], "--train.steps needs a value"),
    (["--train.logit_std", "nan"], "train.logit_std must be a finite number ≥ 0"),
    (["--optim.grad_clip", "-1"], "optim.grad_clip must be a finite number ≥ 0"),
    (["--train.itc_weight", "nan"], "train.itc_weight must be a finite number ≥ 0"),
    (["--checkpoint.keep", "-1"], "checkpoint.keep must be"),
    (["--model.guidance", "inf"], "model.guidance must be a finite number"),
    (["--optim.min_lr_ratio", "2"], "optim.min_lr_ratio must be in [0, 1]"),
    (["--optim.betas", "[1.5, 0.9]"], "optim.betas must be in [0, 1)"),
    (["--optim.eps", "-1"], "optim.eps > 0"),
    (["--lora.dropout", "2"], "lora.dropout must be in [0, 1)"),
    (["--parallel.nccl_timeout_s", "0"], "parallel.nccl_timeout_s must be ≥ 1"),
    (["--train.output_dir", ""], "train.output_dir is empty"),
    (["--eval.prompts", "[]"], "eval.prompts needs at least one prompt"),
    (["--eval.prompts", '["a red circle", " "]'], "eval.prompts needs at least one prompt and no empty one"),
])
def test_errors_are_one_line(argv, needle):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_hybrid_shard_size_must_divide_world():
    cfg = C.load(None, ["--parallel.strategy", "HYBRID_SHARD", "--parallel.shard_size", "3"])
    with pytest.raises(C.ConfigError, match="does not divide"):
        C.validate_world(cfg, 4, 4)
    C.validate_world(cfg, 6, 3)


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load("configs/tiny.toml", ["--train.steps", "11"])
    C.save(cfg, tmp_path / "c.toml")
    again = C.load(tmp_path / "c.toml")
    assert again == cfg


def test_unknown_key_in_file(tmp_path):
    (tmp_path / "bad.toml").write_text("[train]\nbatchsize = 3\n")
    with pytest.raises(C.ConfigError, match="did you mean 'batch_size'"):
        C.load(tmp_path / "bad.toml")


def test_shipped_configs_load():
    for name in ("tiny", "flux-dev", "flux-schnell"):
        C.load(f"configs/{name}.toml")


def test_accelerate_env_is_honoured():
    from fluxtrain.launch import accelerate_overrides

    env = {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "bf16", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP",
           "FSDP_OFFLOAD_PARAMS": "true", "FSDP_ACTIVATION_CHECKPOINTING": "true",
           "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}
    cfg = C.load(None, accelerate_overrides(env))
    p = cfg.parallel
    assert (p.strategy, p.mixed_precision, p.cpu_offload, p.activation_checkpointing, cfg.train.grad_accum) == \
        ("SHARD_GRAD_OP", "bf16", True, "full", 2)


def test_accelerate_fsdp2_reshard_flag_wins_over_default_strategy():
    from fluxtrain.launch import accelerate_overrides

    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
           "FSDP_RESHARD_AFTER_FORWARD": "false"}
    assert C.load(None, accelerate_overrides(env)).parallel.strategy == "SHARD_GRAD_OP"


def test_shipped_tiny_folder_resolves_from_any_directory(tmp_path, monkeypatch):
    from pathlib import Path

    cfg_file = Path("configs/tiny.toml").resolve()
    monkeypatch.chdir(tmp_path)
    cfg = C.load(cfg_file)
    assert Path(cfg.model.pretrained).is_absolute() and (Path(cfg.model.pretrained) / "model_index.json").is_file()
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(cfg_file, ["--model.pretrained", "no/such/folder"])


def test_a_bad_command_line_value_is_not_blamed_on_the_file(tmp_path):
    with pytest.raises(C.ConfigError, match=r"^command line: train\.steps"):
        C.load("configs/tiny.toml", ["--train.steps", "abc"])
    (tmp_path / "c.toml").write_text('[train]\nsteps = "abc"\n')
    with pytest.raises(C.ConfigError, match=r"c\.toml: train\.steps"):
        C.load(tmp_path / "c.toml", ["--train.batch_size", "2"])


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(C.ConfigError, match="is a file, not a folder"):
        C.load(None, ["--train.output_dir", str(tmp_path / "f")])


def test_a_name_on_the_command_line_stays_a_string(tmp_path, monkeypatch):
    # 2024-06-01 was read as a TOML date, 2024 as a number: "Input should be a valid string"
    monkeypatch.chdir(tmp_path)
    cfg = C.load(None, ["--train.output_dir", "2024-06-01", "--log.wandb_project", "2024", "--train.compile"])
    assert (cfg.train.output_dir, cfg.log.wandb_project, cfg.train.compile) == ("2024-06-01", "2024", True)
