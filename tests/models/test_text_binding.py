"""The tiny T5 trained to bind (fluxtrain.models.tiny.train_text_binding): labels, and what a probe reads."""

import filecmp
import itertools

import pytest
import torch

from fluxtrain.data.prompts import COLORS, SHAPES
from fluxtrain.models.encoders import TextEncoders
from fluxtrain.models.tiny import _binding_labels, tiny_folder, train_text_binding


def test_binding_labels_give_each_object_phrase_its_colour_shape_count_and_role():
    cap = "a red circle to the left of a blue triangle and three green squares"
    a, b, c = (0, 0, 0, 1), (2, 2, 0, 5), (1, 1, 2, 0)  # left of: role 1 + 0 for A, 5 + 0 for B; three → count 2
    assert _binding_labels(cap) == [a] * 3 + [None] * 4 + [b] * 3 + [None] + [c] * 3
    assert _binding_labels("a white square above a black circle") == [(6, 1, 0, 3)] * 3 + [None] + [(7, 0, 0, 7)] * 3


def _noun_colour_probe(folder) -> float:
    """Held-out accuracy of a linear probe reading the second object's colour from its noun's T5 vector, over all
    prompts "a C1 S1 and a C2 S2" (half to fit, half to test)."""
    enc = TextEncoders(folder, max_tokens=24)
    art = {c: "an" if c[0] in "aeiou" else "a" for c in COLORS}
    rows = [(f"{art[c1]} {c1} {s1} and {art[c2]} {c2} {s2}", list(COLORS).index(c2))
            for c1, s1, c2, s2 in itertools.product(COLORS, SHAPES, COLORS, SHAPES) if (c1, s1) != (c2, s2)]
    rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    seq, _ = enc([r[0] for r in rows])
    tok = enc.tokenizer_2([r[0] for r in rows], padding="max_length", max_length=24, return_tensors="pt")
    x = torch.stack([seq[b, tok.word_ids(b).index(6)] for b in range(len(rows))])  # word 6: the second noun
    y = torch.tensor([r[1] for r in rows])
    n = len(rows) // 2
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], 8, requires_grad=True)
    opt = torch.optim.Adam([w], 0.05)
    for _ in range(300):
        opt.zero_grad()
        (torch.nn.functional.cross_entropy(x[:n] @ w, y[:n]) + 1e-3 * w.pow(2).sum()).backward()
        opt.step()
    return ((x[n:] @ w).argmax(1) == y[n:]).float().mean().item()


@pytest.fixture(scope="module")
def bound(tmp_path_factory):
    out = tmp_path_factory.mktemp("bind") / "tiny-bind"
    return train_text_binding(tiny_folder(), out, steps=150, batch=64, log=lambda *a: None)


def test_a_trained_t5_carries_each_nouns_colour_where_the_shipped_random_one_does_not(bound):
    shipped, trained = _noun_colour_probe(tiny_folder()), _noun_colour_probe(bound)
    assert shipped < 0.7, shipped  # measured 0.41 (chance 0.125)
    assert trained > 0.95, trained  # measured 1.00


def test_only_the_t5_changes(bound):
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "tokenizer_2"):
        cmp = filecmp.dircmp(tiny_folder() / part, bound / part)
        assert not (cmp.diff_files or cmp.left_only or cmp.right_only), part
    assert not filecmp.cmp(tiny_folder() / "text_encoder_2" / "model.safetensors",
                           bound / "text_encoder_2" / "model.safetensors", shallow=False)


def test_it_refuses_to_overwrite_its_source_or_the_shipped_folder(tmp_path):
    with pytest.raises(ValueError, match="writes a copy"):
        train_text_binding(tiny_folder(), tiny_folder(), steps=1)
    assert (tiny_folder() / "text_encoder_2" / "model.safetensors").is_file()
