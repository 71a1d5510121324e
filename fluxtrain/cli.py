"""`fluxtrain <command>`: the command line of DESIGN.md. Errors are one line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

from fluxtrain.argtypes import fraction, grammar_prompts, output_dir, positive_int, prompt_text, resolution, synth_size


def _die(msg: str) -> int:
    print(f"fluxtrain: error: {msg}", file=sys.stderr)
    return 2


def cmd_train(argv: list[str]) -> int:
    from fluxtrain import config as C

    cfg_path, rest, nproc = None, [], 0
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" or a.startswith("--config="):
            cfg_path, i = (a.split("=", 1)[1], i + 1) if "=" in a else (_value(argv, i, "a TOML file"), i + 2)
        elif a in ("--nproc-per-node", "--nproc_per_node") or a.startswith(("--nproc-per-node=", "--nproc_per_node=")):
            val, i = (a.split("=", 1)[1], i + 1) if "=" in a else (_value(argv, i, "a number or 'auto'"), i + 2)
            nproc = _nproc(val)
        else:
            rest.append(a)
            i += 1
    cfg = C.load(cfg_path, _accelerate_overrides() + rest)
    nproc = nproc or cfg.parallel.nproc_per_node
    if nproc > 1 and "RANK" not in os.environ:
        C.validate_world(cfg, nproc, nproc)  # one node: the world is the local world
        if cfg.data.source == "webdataset":  # a glob that matches nothing: one line here, not one per rank
            from fluxtrain.data.webdataset import resolve_shards

            resolve_shards(cfg.data.path)
        return _spawn_torchrun(nproc, argv)
    from fluxtrain.train import train

    out = train(cfg)
    return 0 if out is not None else 1


def _value(argv: list[str], i: int, what: str) -> str:
    """The value after option argv[i]; a missing one is an error (`--config` alone trained the defaults)."""
    from fluxtrain.config import ConfigError

    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise ConfigError(f"{argv[i]} needs a value: {argv[i]} <{what}>")
    return argv[i + 1]


def _nproc(val: str) -> int:
    """`auto`: every GPU when there are some, else 2 CPU ranks (the demo's default)."""
    from fluxtrain.config import ConfigError

    if val == "auto":
        import torch

        return torch.cuda.device_count() or 2
    if not val.isdigit() or int(val) < 1:
        raise ConfigError(f"--nproc-per-node must be a positive number or 'auto' (got '{val}')")
    return int(val)


def _accelerate_overrides() -> list[str]:
    """`accelerate launch` exports its config as environment variables; honour the ones we have keys for."""
    from fluxtrain.launch import accelerate_overrides

    return accelerate_overrides(os.environ)


def _spawn_torchrun(nproc: int, argv: list[str]) -> int:
    """torchrun's agent in this process, so that a rank's failure ends as the rank's own error, not as torchrun's
    ChildFailedError traceback and report after it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "fluxtrain", "train",
                        *_strip_nproc(argv)]))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode == 2:  # bad input: the rank printed its one-line error
            return 2
        how = (f"was killed by {failure.signal_name()}" + (" (out of host memory?)" if failure.exitcode == -9 else "")
               if failure.exitcode < 0 else f"exited with code {failure.exitcode}")
        print(f"fluxtrain: error: rank {rank} {how}: its log is above", file=sys.stderr)
        return 1
    except SignalException as err:  # Ctrl-C or a scheduler's SIGTERM: torchrun has stopped the ranks
        return 128 + int(err.sigval)
    return 0


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc-per-node", "--nproc_per_node", "--parallel.nproc_per_node"):  # and its value
            skip = True
            continue
        if a.startswith(("--nproc-per-node=", "--nproc_per_node=", "--parallel.nproc_per_node=")):
            continue
        out.append(a)
    return out


def cmd_data(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fluxtrain data")
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("synth", help="render the synthetic compositional-shapes set into WebDataset shards")
    s.add_argument("--out", type=output_dir, required=True)
    s.add_argument("--num", type=positive_int, required=True)
    s.add_argument("--size", type=synth_size, default=64)
    s.add_argument("--complex-frac", type=fraction, default=0.0)
    s.add_argument("--noise-frac", type=fraction, default=0.0)
    s.add_argument("--prompts", type=grammar_prompts, default=None, help="render these prompts in turn")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--per-shard", type=positive_int, default=1000)
    c = sub.add_parser("clean", help="drop label noise and broken samples, write clean shards and a report")
    c.add_argument("--in", dest="inp", required=True)
    c.add_argument("--out", type=output_dir, required=True)
    a = ap.parse_args(argv)
    if a.what == "synth":
        from fluxtrain.data.synthetic import write_shards

        files = write_shards(a.out, a.num, size=a.size, complex_frac=a.complex_frac, noise_frac=a.noise_frac,
                             seed=a.seed, prompts_file=a.prompts, per_shard=a.per_shard)
        print(f"wrote {a.num} samples in {len(files)} shards to {a.out}")
        return 0
    from fluxtrain.data.clean import main as clean_main

    return clean_main(a.inp, a.out)


def cmd_sample(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fluxtrain sample")
    ap.add_argument("--model", required=True, help="a diffusers FLUX folder, or a checkpoint step-N folder or URL (s3://…)")
    ap.add_argument("--prompt", action="append", required=True, type=prompt_text)
    ap.add_argument("--out", type=output_dir, required=True)
    ap.add_argument("--resolution", type=resolution, default=None)
    ap.add_argument("--steps", type=positive_int, default=None,
                    help="default: the run's eval.num_inference_steps, else 20")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-text-tokens", type=positive_int, default=None, help="as fluxtrain eval's")
    ap.add_argument("--true-cfg", type=float, default=None, help="as fluxtrain eval's")
    a = ap.parse_args(argv)
    from fluxtrain.sample import sample_to_dir

    paths = sample_to_dir(a.model, a.prompt, a.out, resolution=a.resolution, steps=a.steps, guidance=a.guidance,
                          seed=a.seed, max_text_tokens=a.max_text_tokens, true_cfg=a.true_cfg)
    print(f"wrote {len(paths)} images and grid.png to {a.out}")
    return 0


def cmd_doctor(argv: list[str]) -> int:
    from fluxtrain.doctor import main

    return main(argv)


COMMANDS = {
    "train": cmd_train,
    "data": cmd_data,
    "sample": cmd_sample,
    "doctor": cmd_doctor,
}


def _lazy(module: str, func: str = "main"):
    def run(argv):
        import importlib

        return getattr(importlib.import_module(module), func)(argv)

    return run


COMMANDS.update({
    "eval": _lazy("fluxtrain.eval.evaluate"),
    "export": _lazy("fluxtrain.export"),
    "cache": _lazy("fluxtrain.data.cache"),
    "plan": _lazy("fluxtrain.plan"),
    "report": _lazy("fluxtrain.report"),
    "trace": _lazy("fluxtrain.trace_summary"),
    "verify": _lazy("fluxtrain.digests"),
})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fluxtrain {" + ",".join(COMMANDS) + "} ...\n\n" + __doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(cmd, COMMANDS, n=1)
        return _die(f"unknown command '{cmd}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                    + f"; commands: {', '.join(COMMANDS)}")
    from fluxtrain.config import ConfigError

    try:
        return int(COMMANDS[cmd](rest) or 0)
    except ConfigError as err:
        return _die(str(err))
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("fluxtrain."):
            return _die(f"'fluxtrain {cmd}' is not available in this version ({err.name} missing)")
        raise
    except (RuntimeError, ValueError) as err:
        if type(err).__name__ == "PeerFailed" and "RANK" in os.environ:
            return 1  # the rank that failed first printed its error; torchrun reports that one
        if not isinstance(err, _input_errors()):
            raise
        if getattr(err, "agreed", False) and os.environ.get("RANK", "0") != "0":
            return 2  # every rank raised the same error: rank 0's line is the one
        return _die(str(err))
    except OSError as err:
        # a path that can't be written or read (an output folder under a file, no permission, a disk full): the
        # path and the reason are the message; an OSError without a path is not about the user's input
        if err.filename is None:
            raise
        return _die(f"{err.filename}: {err.strerror or err} (check the path and its permissions)")


def _input_errors() -> tuple[type, ...]:
    """The errors that are about the user's input (checkpoint, data, weights, adapters): one line, no traceback.
    Looked up only in modules already imported: importing fluxtrain.checkpoint (torch) here would cost every light
    command (plan, report) 2 s."""
    where = {"fluxtrain.checkpoint": "CheckpointError", "fluxtrain.data.webdataset": "DataError",
             "fluxtrain.models.flux": "WeightsError", "fluxtrain.lora": "LoraError"}
    return tuple(getattr(sys.modules[m], name) for m, name in where.items() if m in sys.modules)


if __name__ == "__main__":
    raise SystemExit(main())
