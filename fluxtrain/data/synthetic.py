"""Synthetic compositional shapes: render scenes of the prompt grammar, write WebDataset shards, and an index-based
source for the trainer (`data.source = synthetic`)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from fluxtrain.data.augment import augment_caption
from fluxtrain.data.prompts import (BACKGROUND, COLORS, Scene, Spec, check_room, corrupt_caption, format_spec,
                                    layout, parse_prompt, read_prompts, sample_spec)


def _shape_mask(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    # Sample at pixel centres (+0.5): hard edges, so every pixel is exactly a palette colour.
    x, y = xs + 0.5 - cx, ys + 0.5 - cy
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (np.abs(x) <= r) & (np.abs(y) <= r)
    # Upward triangle filling the bounding box: apex at top centre, base along the bottom.
    return (y <= r) & (np.abs(x) <= (y + r) / 2)


def render(scene: Scene) -> Image.Image:
    """Flat colours on grey, no antialiasing."""
    s = scene.size
    img = np.empty((s, s, 3), np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        x0, y0 = max(int(o.cx - o.r) - 1, 0), max(int(o.cy - o.r) - 1, 0)
        x1, y1 = min(int(o.cx + o.r) + 2, s), min(int(o.cy + o.r) + 2, s)
        ys, xs = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1][_shape_mask(o.shape, o.cx, o.cy, o.r, xs, ys)] = COLORS[o.color]
    return Image.fromarray(img, "RGB")


def _rng(seed: int, i: int) -> random.Random:
    # String seeds hash with SHA-512: stable across processes and Python runs (unlike hash()).
    return random.Random(f"fluxtrain-synthetic:{seed}:{i}")


class SyntheticShapes:
    """Index-based source: item i is a pure function of (seed, i). Captions never hit the held-out eval set.
    With caption_augment, that fraction of captions is composed from the scene instead (data/augment.py): the same
    scenes, also described through relations and counts the sampled caption did not state."""

    def __init__(self, size: int, complex_frac: float = 0.0, seed: int = 0, caption_augment: float = 0.0):
        check_room(size)
        self.size, self.complex_frac, self.seed, self.caption_augment = size, complex_frac, seed, caption_augment

    def __len__(self) -> int:
        return 10**9

    def spec_scene(self, i: int, spec: Spec | None = None) -> tuple[random.Random, Spec, Scene]:
        rng = _rng(self.seed, i)
        spec = spec if spec is not None else sample_spec(rng, self.complex_frac)
        return rng, spec, layout(spec, self.size, rng)

    def __getitem__(self, i: int) -> dict:
        _, _, scene = self.spec_scene(i)
        meta = scene.to_json()
        caption, _ = augment_caption(meta, scene.caption, self.caption_augment, self.seed, i)
        return {"image": render(scene), "caption": caption, "scene": meta}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # no metadata chunks: same pixels → same bytes
    return buf.getvalue()


def write_shards(out_dir, num: int, size: int = 64, complex_frac: float = 0.0, noise_frac: float = 0.0, seed: int = 0,
                 prompts_file=None, per_shard: int = 1000) -> list[str]:
    """Render `num` samples into out_dir/shard-%06d.tar (WebDataset). Sample i: key "{seed:04d}-{i:08d}", png, txt
    (the caption, corrupted for planted label noise) and json (the true scene + caption_true, noisy). Exactly
    round(noise_frac * num) samples are noisy. With prompts_file, its prompts are rendered in turn instead of
    sampled ones. Same arguments → byte-identical shards (fixed tar mtime/owner, deterministic PNG)."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fixed = [parse_prompt(p) for p in read_prompts(prompts_file)] if prompts_file else None
    if fixed == []:
        raise ValueError(f"no prompts in {prompts_file}")
    noisy = set(random.Random(f"fluxtrain-noise:{seed}").sample(range(num), round(noise_frac * num)))
    src = SyntheticShapes(size, complex_frac, seed)
    files: list[str] = []
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0, encoder=False, mtime=0,
                         user="fluxtrain", group="fluxtrain", post=files.append) as sink:
        for i in range(num):
            rng, spec, scene = src.spec_scene(i, fixed[i % len(fixed)] if fixed else None)
            caption = format_spec(corrupt_caption(spec, rng)) if i in noisy else scene.caption
            meta = {**scene.to_json(), "caption_true": scene.caption, "noisy": i in noisy, "split": spec.split}
            sink.write({"__key__": f"{seed:04d}-{i:08d}", "png": _png(render(scene)), "txt": caption.encode(),
                        "json": json.dumps(meta, sort_keys=True).encode()})
    return files
