"""Batches for the trainer, from any source, with a resumable position.

Index-based sources (synthetic, cache) give the same global batch at a given step whatever the world size:
micro-step k of the run takes global samples [k·G, (k+1)·G) and rank r the r-th slice of it.
"""

from __future__ import annotations

import numpy as np
import torch

from fluxtrain.config import Config


def u8_to_pixels(u8: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] uint8 → [B, 3, H, W] float in [-1, 1]."""
    return u8.permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0)  # uint8 transpose: 100× faster


def to_pixels(images) -> torch.Tensor:
    """PIL images (RGB, one size) → float tensor [B, 3, H, W] in [-1, 1]."""
    return u8_to_pixels(torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])))


class IndexedBatches:
    """Stateful iterator of local micro-batches from an index-based source."""

    def __init__(self, source, batch_size: int, rank: int, world_size: int):
        self.source, self.bs, self.rank, self.world = source, batch_size, rank, world_size
        self.pos = 0  # global samples consumed
        self.skipped = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.pos + self.rank * self.bs
        idx = list(range(start, start + self.bs))
        self.pos += self.bs * self.world
        items = [self.source[i] for i in idx]
        return {"pixels": to_pixels([it["image"] for it in items]), "captions": [it["caption"] for it in items],
                "indices": torch.tensor(idx, dtype=torch.long)}

    def state_dict(self) -> dict:
        return {"pos": self.pos, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.skipped = int(state["pos"]), int(state.get("skipped", 0))


def build_loader(cfg: Config, rank: int, world_size: int):
    d = cfg.data
    if d.source == "synthetic":
        from fluxtrain.data.synthetic import SyntheticShapes

        src = SyntheticShapes(size=d.resolution, complex_frac=d.complex_frac, seed=d.seed,
                              caption_augment=d.caption_augment)
        return IndexedBatches(src, cfg.train.batch_size, rank, world_size)
    if d.source == "webdataset":
        from fluxtrain.data.webdataset import build_webdataset_loader

        return build_webdataset_loader(cfg, rank, world_size)
    if d.source == "cache":
        from fluxtrain.data.cache import build_cache_loader

        return build_cache_loader(cfg, rank, world_size)
    raise ValueError(d.source)
