"""Index-based batches rendered by DataLoader workers (data.num_workers > 0 with the synthetic source) are the
batches rendered in-process, in order, for every rank, and resume at the position a checkpoint saved."""

import torch

from fluxtrain import config as C
from fluxtrain.data.loader import IndexedBatches, build_loader
from fluxtrain.data.synthetic import SyntheticShapes


def _same(a: dict, b: dict) -> bool:
    return (torch.equal(a["pixels"], b["pixels"]) and a["captions"] == b["captions"]
            and torch.equal(a["indices"], b["indices"]))


def test_workers_give_the_in_process_batches_for_every_rank():
    src = SyntheticShapes(size=32, complex_frac=0.5, seed=3)
    for rank in (0, 1):
        plain = IndexedBatches(src, 4, rank, 2)
        pooled = IndexedBatches(src, 4, rank, 2, workers=2)
        for _ in range(5):
            assert _same(next(plain), next(pooled))
        assert pooled.pos == plain.pos == 5 * 4 * 2


def test_workers_resume_at_the_saved_position():
    src = SyntheticShapes(size=32, complex_frac=0.5, seed=4)
    whole = [next(b) for b in [IndexedBatches(src, 4, 0, 1)] for _ in range(6)]
    run = IndexedBatches(src, 4, 0, 1, workers=2)
    for i in range(3):
        assert _same(next(run), whole[i])
    state = run.state_dict()
    resumed = IndexedBatches(src, 4, 0, 1, workers=2)
    resumed.load_state_dict(state)
    assert _same(next(resumed), whole[3]) and _same(next(resumed), whole[4])
    run.load_state_dict({"pos": 4})  # rewound under running workers that had rendered ahead
    assert _same(next(run), whole[1])


def test_the_config_hands_its_workers_to_the_synthetic_source():
    cfg = C.load(None, ["--data.source", "synthetic", "--data.num_workers", "2", "--train.batch_size", "4",
                        "--data.resolution", "32"])
    loader = build_loader(cfg, 0, 1)
    assert loader.workers == 2 and next(loader)["pixels"].shape == (4, 3, 32, 32)
