"""`fluxtrain eval`: prompt adherence of a model on the held-out synthetic prompts (shapes checker), optionally a
CLIP score; `fluxtrain eval checker`: the checker on existing (image, caption) pairs in WebDataset shards.

    fluxtrain eval --model DIR_OR_CKPT [--prompts FILE ...] [--out F.json] [--grid F.png] [--steps N]
                   [--resolution R] [--seed S] [--guidance G] [--limit N] [--batch B] [--clip CLIP_DIR]
                   [--train-shards GLOB]
    fluxtrain eval checker --shards GLOB [--out F.json] [--grid F.png] [--limit N]

JSON: {"overall", "n", "per_form", "per_split", "per_relation"} as `shapes_checker.summarize` (each group's entries
{"pass": fraction, "n": count}), plus
"train_overlap" (eval prompts whose meaning a training caption can have: see `train_overlap`), "n_unparsed"
(prompts outside the grammar: not checked, CLIP-scored only), "clip_score" (mean 100 × cosine, or null),
per-prompt "results" and the run's settings. The PNG shows the failures, each captioned with its prompt and the
checker's first reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from fluxtrain.argtypes import output_file, positive_int, resolution, torch_device
from fluxtrain.cli import _die
from fluxtrain.data.prompts import PROMPTS_DIR, canonical_key, heldout_keys, parse_prompt, read_prompts
from fluxtrain.eval.shapes_checker import check, summarize

DEFAULT_PROMPT_FILES = (PROMPTS_DIR / "simple.txt", PROMPTS_DIR / "complex.txt")


# ------------------------------------------------------------------------------------------------ scoring

def score_pairs(images: list, prompts: list[str]) -> tuple[dict, list[dict]]:
    """(summary as summarize over the prompts inside the grammar + "n_unparsed", per-pair results)."""
    results, scored = [], []
    for img, p in zip(images, prompts):
        try:
            spec = parse_prompt(p)
        except ValueError as err:
            results.append({"prompt": p, "passed": None, "reasons": [f"outside the grammar: {err}"]})
            continue
        r = check(img, p)  # once: check_many would run it again
        results.append({"prompt": p, "split": spec.split, "form": spec.form_name, "passed": r.passed,
                        "reasons": r.reasons})
        scored.append((spec, r.passed))
    summary = summarize(scored)
    summary["n_unparsed"] = len(prompts) - len(scored)
    return summary, results


class ClipScorer:
    """CLIP score with a local folder holding a transformers CLIPModel and CLIPProcessor: 100 × cosine of the
    image and text embeddings, per pair."""

    def __init__(self, clip_dir, device: torch.device | str | None = None):
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = CLIPModel.from_pretrained(str(clip_dir)).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(clip_dir))
        self.max_len = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def scores(self, images: list[Image.Image], texts: list[str], batch: int = 32) -> list[float]:
        out: list[float] = []
        for i in range(0, len(images), batch):
            ims = [im.convert("RGB") for im in images[i:i + batch]]
            inp = self.processor(text=list(texts[i:i + batch]), images=ims, return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_len)
            o = self.model(**{k: v.to(self.device) for k, v in inp.items()})
            img = torch.nn.functional.normalize(o.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(o.text_embeds.float(), dim=-1)
            out += (100.0 * (img * txt).sum(-1)).cpu().tolist()
        return out


def clip_score(clip_dir, images: list[Image.Image], texts: list[str], device=None) -> float:
    """Mean CLIP score (100 × cosine) of the pairs."""
    s = ClipScorer(clip_dir, device).scores(images, texts)
    return float(sum(s) / len(s)) if s else float("nan")


# ------------------------------------------------------------------------------------------------ generation

def generate_batched(transformer, text, vae, prompts: list[str], resolution: int, steps: int,
                     guidance: float | None, seed: int, batch: int = 16, true_cfg: float = 1.0,
                     cfg_interval: tuple[float, float] | None = None) -> list[Image.Image]:
    """grid.generate in chunks of `batch` prompts (bounded text-encoder/VAE memory); prompt i always uses seed + i."""
    from fluxtrain.eval.grid import generate

    images: list[Image.Image] = []
    for s in range(0, len(prompts), batch):
        images += generate(transformer, text, vae, prompts[s:s + batch], resolution, steps=steps, guidance=guidance,
                           seed=seed + s, true_cfg=true_cfg, cfg_interval=cfg_interval)
    return images


def adherence(transformer, text, vae, prompts: list[str], resolution: int, steps: int = 20,
              guidance: float | None = 3.5, seed: int = 0, batch: int = 16, score: bool = True,
              true_cfg: float = 1.0) -> dict:
    """For the trainer: generate one image per prompt and score them with the shapes checker. Every rank must call
    it (a sharded transformer runs collectives); pass score=False on ranks that don't need the numbers (returns {}).
    Returns {"overall", "n", "per_form", "per_split", "per_relation", "n_unparsed", "failed": [prompts]}.
    The caller switches the model to eval() and back, as around the sample grid."""
    images = generate_batched(transformer, text, vae, prompts, resolution, steps, guidance, seed, batch, true_cfg)
    if not score:
        return {}
    summary, results = score_pairs(images, prompts)
    summary["failed"] = [r["prompt"] for r in results if r["passed"] is False]
    return summary


def select_prompts(prompts: list[str], limit: int | None) -> list[str]:
    """`limit` prompts spread evenly over the list (so both sets and every form are represented), in order."""
    if not limit or limit >= len(prompts):
        return list(prompts)
    return [prompts[(i * len(prompts)) // limit] for i in range(limit)]


def train_overlap(prompts: list[str], train_shards: str | None = None) -> tuple[int, str]:
    """(count, basis). With train_shards: eval prompts (inside the grammar) whose meaning (canonical_key) is the
    caption of some training sample there. Without: eval prompts outside the held-out set, i.e. ones the
    synthetic training generator (which resamples held-out meanings away) may produce; 0 for the shipped sets."""
    keys = {}
    for p in prompts:
        try:
            keys[p] = canonical_key(parse_prompt(p))
        except ValueError:
            pass
    if train_shards:
        from fluxtrain.data.clean import caption_of, expand_shards, iter_samples

        seen = set()
        for s in iter_samples(expand_shards(train_shards)):
            c = caption_of(s)
            try:
                seen.add(canonical_key(parse_prompt(c))) if c else None
            except ValueError:
                pass
        return sum(k in seen for k in keys.values()), f"captions of {train_shards}"
    held = heldout_keys()
    return sum(k not in held for k in keys.values()), "held-out exclusion of the synthetic generator"


# ------------------------------------------------------------------------------------------------ failures grid

def save_failures(images: list[Image.Image], captions: list[str], out: str | Path, cols: int = 8,
                  title: str | None = None) -> Path:
    """A grid of images with wrapped captions underneath (an explanatory tile if there are none)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tile = min(256, max(128, images[0].size[0])) if images else 256
    chars = max(12, tile // 6)
    wrapped = [textwrap.wrap(c, chars)[:6] for c in captions]
    cap_h = 11 * max((len(w) for w in wrapped), default=1) + 4
    head = 14 if title else 0
    n = max(len(images), 1)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * tile, head + rows * (tile + cap_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((2, 1), title, fill=(0, 0, 0))
    if not images:
        draw.text((6, head + tile // 2), "no failures", fill=(0, 120, 0))
    for i, (im, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % cols) * tile, head + (i // cols) * (tile + cap_h)
        grid.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + tile + 2 + 11 * j), line, fill=(0, 0, 0))
    grid.save(out)
    return out


def _failure_panel(images, results, grid_path, title) -> Path:
    fails = [(im, r) for im, r in zip(images, results) if r["passed"] is False]
    caps = [r["prompt"] + (f" | {r['reasons'][0]}" if r["reasons"] else "") for _, r in fails]
    return save_failures([im for im, _ in fails], caps, grid_path, title=title)


# ------------------------------------------------------------------------------------------------ commands

def _write(report: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))


def _line(report: dict) -> str:
    splits = ", ".join(f"{k} {v['pass']:.3f} ({v['n']})" for k, v in report["per_split"].items())
    return f"adherence {report['overall']:.3f} on {report['n']} prompts" + (f" [{splits}]" if splits else "")


def _in_grammar(prompt: str) -> bool:
    try:
        parse_prompt(prompt)
        return True
    except ValueError:
        return False


def checker_main(argv: list[str]) -> int:
    from fluxtrain.data.clean import caption_of, expand_shards, image_of, iter_samples

    ap = argparse.ArgumentParser(prog="fluxtrain eval checker",
                                 description="score existing (image, caption) pairs of WebDataset shards")
    ap.add_argument("--shards", required=True, nargs="+", help="glob or brace pattern of .tar shards (quoted, or "
                    "the files the shell expanded it to)")
    ap.add_argument("--out", type=output_file, default=None, help="JSON report (default: print it)")
    ap.add_argument("--grid", type=output_file, default=None, help="PNG of the failing pairs")
    ap.add_argument("--limit", type=positive_int, default=None)
    a = ap.parse_args(argv)
    a.shards = " ".join(a.shards)
    t0 = time.time()
    try:
        shards = expand_shards(a.shards)
    except (FileNotFoundError, IsADirectoryError) as err:
        return _die(str(err))
    images, captions, keys, noisy, skipped, errors = [], [], [], [], 0, []
    for s in iter_samples(shards, errors):
        if a.limit and len(images) >= a.limit:
            break
        _, im = image_of(s)
        cap = caption_of(s)
        if im is None or cap is None:
            skipped += 1
            continue
        images.append(im)
        captions.append(cap)
        keys.append(s["__key__"])
        try:
            noisy.append(bool(json.loads(s["json"]).get("noisy")) if "json" in s else None)
        except (ValueError, AttributeError):
            noisy.append(None)
    if not images and errors:  # "adherence 0.000 on 0 prompts", exit 0, before
        return _die(f"no sample could be read from {a.shards}: all {len(shards)} shard(s) are damaged or not tar files "
                    f"(first: {Path(errors[0]['shard']).name}: {errors[0]['error']})")
    if not images:
        return _die(f"no sample of {a.shards} has both an image and a caption ({skipped} skipped): check the "
                    "shards' member names (KEY.png/.jpg with KEY.txt)")
    summary, results = score_pairs(images, captions)
    if not summary["n"]:  # "adherence 0.000 on 0 prompts", exit 0, before
        first = next(r for r in results if r["passed"] is None)
        return _die(f"none of the {len(captions)} captions of {a.shards} is in the shapes grammar (first: "
                    f"'{first['prompt'][:80]}': {first['reasons'][0]}); eval checker scores synthetic-shapes pairs")
    for r, k in zip(results, keys):
        r["key"] = k
    report = {**summary, "train_overlap": 0, "n_samples": len(images), "n_skipped": skipped,
              "shards": len(shards), "shard_errors": errors}
    labelled = [(r["passed"], nz) for r, nz in zip(results, noisy) if nz is not None and r["passed"] is not None]
    if labelled:  # synthetic shards say which captions were corrupted: how well does the checker find them?
        report["noise_detection"] = {
            "n_noisy": sum(nz for _, nz in labelled),
            "noisy_failed": sum((not p) and nz for p, nz in labelled),
            "clean_failed": sum((not p) and not nz for p, nz in labelled),
            "agreement": sum(p != nz for p, nz in labelled) / len(labelled)}
    report["results"] = results
    if a.grid:
        report["failures_png"] = str(_failure_panel(images, results, a.grid, f"checker failures: {a.shards}"))
    report["seconds"] = round(time.time() - t0, 2)
    _write(report, a.out)
    print(_line(report) + (f" -> {a.out}" if a.out else ""))
    if not a.out:
        print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "checker":
        return checker_main(argv[1:])
    if argv and not argv[0].startswith("-"):  # eval takes options only: a word first is a misspelt subcommand
        import difflib

        near = " (did you mean 'checker'?)" if difflib.get_close_matches(argv[0], ["checker"], n=1) else ""
        return _die(f"unknown eval subcommand '{argv[0]}'{near}: `fluxtrain eval checker --shards GLOB` scores "
                    "existing pairs, `fluxtrain eval --model M` generates and scores")
    ap = argparse.ArgumentParser(prog="fluxtrain eval", description="prompt adherence on held-out prompts "
                                 "(use `fluxtrain eval checker --shards GLOB` to score existing pairs)")
    ap.add_argument("--model", required=True, help="a diffusers FLUX folder or a checkpoint step-N folder or URL (s3://…)")
    ap.add_argument("--prompts", action="append", default=None,
                    help="prompt file (one a line; repeatable); default: the shipped simple and complex sets")
    ap.add_argument("--out", type=output_file, default="eval.json")
    ap.add_argument("--grid", type=output_file, default=None,
                    help="PNG of the failures (default: next to --out, *-failures.png)")
    ap.add_argument("--steps", type=positive_int, default=None, help="default: the run's eval.num_inference_steps, else 20")
    ap.add_argument("--resolution", type=resolution, default=None,
                    help="default: the run's data.resolution, else 64 for a ×4 VAE (tiny) and 512 otherwise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=None, help="default: the run's model.guidance, else 3.5")
    ap.add_argument("--max-text-tokens", type=positive_int, default=None,
                    help="T5 length prompts are padded to (default: the run's model.max_text_tokens, else 512); FLUX "
                         "attends to every padded token, so give the length the model trained with")
    ap.add_argument("--true-cfg", type=float, default=None,
                    help="classifier-free guidance scale against the empty prompt (default: the run's "
                         "eval.true_cfg_scale, else 1 = off)")
    ap.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="apply --true-cfg only at sampling steps whose σ (shifted; 1 = noise, 0 = image) is in "
                         "[LO, HI]; the others use the prompt alone (default: every step)")
    ap.add_argument("--limit", type=positive_int, default=None, help="evaluate this many prompts, spread over the sets")
    ap.add_argument("--batch", type=positive_int, default=16, help="prompts per generation chunk")
    ap.add_argument("--clip", default=None, help="local CLIP model folder: also report the mean CLIP score")
    ap.add_argument("--train-shards", default=None, help="count overlap against these shards' captions")
    ap.add_argument("--device", type=torch_device, default=None)
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.cfg_interval and not 0 <= a.cfg_interval[0] <= a.cfg_interval[1] <= 1:
        return _die(f"--cfg-interval {a.cfg_interval[0]} {a.cfg_interval[1]}: give 0 ≤ LO ≤ HI ≤ 1 "
                    "(σ: 1 is noise)")

    files = [Path(p) for p in (a.prompts or DEFAULT_PROMPT_FILES)]
    for f in files:
        if not f.is_file():
            return _die(f"prompt file '{f}' " + ("is a folder: give a text file, one prompt a line" if f.is_dir()
                                                 else "not found"))
    try:
        prompts = select_prompts([p for f in files for p in read_prompts(f)], a.limit)
    except ValueError as err:
        return _die(str(err))
    if not prompts:
        return _die(f"no prompts in {', '.join(map(str, files))} (one a line; '#' starts a comment)")
    # everything that can be wrong with the input is said now, not after the generation
    if not a.clip and not any(_in_grammar(p) for p in prompts):
        return _die(f"none of the {len(prompts)} prompts is in the shapes grammar (../shared/PROMPTS.md), so none "
                    "can be checked: give --clip DIR (a local CLIP model folder) to score them with CLIP")
    if a.clip and not (Path(a.clip) / "config.json").is_file():
        return _die(f"--clip {a.clip} is not a local CLIP model folder (no config.json there)")
    if a.train_shards:
        from fluxtrain.data.clean import expand_shards

        try:
            expand_shards(a.train_shards)
        except (FileNotFoundError, IsADirectoryError) as err:
            return _die(f"--train-shards: {err}")

    from fluxtrain.sample import load_for_inference

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, text, vae, trained = load_for_inference(a.model, device, a.max_text_tokens)
    res = a.resolution or trained.resolution
    steps = a.steps or trained.steps
    g = a.guidance if a.guidance is not None else trained.guidance
    guidance = g if model.config.guidance_embeds else None
    true_cfg = a.true_cfg if a.true_cfg is not None else trained.true_cfg
    images = generate_batched(model, text, vae, prompts, res, steps, guidance, a.seed, a.batch, true_cfg,
                              tuple(a.cfg_interval) if a.cfg_interval else None)
    summary, results = score_pairs(images, prompts)
    overlap, basis = train_overlap(prompts, a.train_shards)
    report = {**summary, "train_overlap": overlap, "train_overlap_basis": basis, "n_prompts": len(prompts),
              "clip_score": None, "model": str(a.model), "prompt_files": [str(f) for f in files],
              "steps": steps, "resolution": res, "guidance": guidance, "true_cfg": true_cfg,
              "max_text_tokens": trained.max_text_tokens,
              "cfg_interval": a.cfg_interval, "seed": a.seed, "limit": a.limit}
    if a.clip:
        report["clip_score"] = clip_score(a.clip, images, prompts, device)
        report["clip_model"] = str(a.clip)
    grid = Path(a.grid) if a.grid else Path(a.out).with_name(Path(a.out).stem + "-failures.png")
    report["failures_png"] = str(_failure_panel(images, results, grid,
                                                f"{a.model}: {report['overall']:.3f} of {report['n']} pass"))
    report["results"] = results
    report["seconds"] = round(time.time() - t0, 2)
    _write(report, a.out)
    clip = f", CLIP {report['clip_score']:.2f}" if report["clip_score"] is not None else ""
    print(_line(report) + clip + f" -> {a.out}, failures -> {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
