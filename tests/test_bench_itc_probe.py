"""bench/itc_probe.probe: a head trained on frozen features reads captions where the features carry them and not
where they don't (the measurement behind train.itc_sigma_scale can fail both ways)."""

from types import SimpleNamespace

import torch

from tests.helpers import load_bench


def test_the_probe_reads_captions_only_from_features_that_carry_them():
    probe = load_bench("itc_probe").probe
    model = SimpleNamespace(config=SimpleNamespace(num_attention_heads=2, attention_head_dim=8))  # features of 16
    g = torch.Generator().manual_seed(0)
    words = torch.randn(32, 12, generator=g)  # 32 captions' pooled text vectors
    codes = torch.randn(32, 16, generator=g)  # and an image code per caption
    ids_tr, ids_te = torch.randint(0, 32, (512,), generator=g), torch.arange(32)
    caps = [f"c{i}" for i in ids_te.tolist()]
    tr_t, te_t = words[ids_tr], words[ids_te]
    readable = probe(model, codes[ids_tr] + 0.1 * torch.randn(512, 16, generator=g), tr_t,
                     codes[ids_te] + 0.1 * torch.randn(32, 16, generator=g), te_t, caps, 200, 0)
    unreadable = probe(model, torch.randn(512, 16, generator=g), tr_t, torch.randn(32, 16, generator=g), te_t, caps,
                       200, 0)
    assert readable["chance_top1"] == unreadable["chance_top1"] == 1 / 32
    assert readable["top1"] > 0.9 and readable["itc_loss"] < 0.5 * readable["uniform_loss"]
    assert unreadable["top1"] < 0.25 and unreadable["itc_loss"] > readable["uniform_loss"] * 0.8
