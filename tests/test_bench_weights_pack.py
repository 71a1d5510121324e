"""bench/weights_pack.py: a model folder packed (bf16 safetensors as byte planes, the high one compressed) and
unpacked byte for byte; other files as they are; a tar with a path outside its folder is refused."""

import io
import tarfile

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import load_bench


def test_pack_and_unpack_restore_every_byte_and_shrink_bf16_weights(tmp_path):
    wp = load_bench("weights_pack")
    src = tmp_path / "model"
    (src / "transformer").mkdir(parents=True)
    (src / "vae").mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"a.weight": (torch.randn(256, 512, generator=g) * 0.02).bfloat16(),
               "b.bias": torch.randn(512, generator=g).bfloat16()}, str(src / "transformer" / "m.safetensors"))
    save_file({"w": torch.randn(64, 64, generator=g)}, str(src / "vae" / "fp32.safetensors"))  # not bf16: as is
    (src / "model_index.json").write_text('{"a": 1}')
    r = wp.pack(src, tmp_path / "out" / "base.pack")
    assert r["files"] == 3 and r["split"] == 1
    assert r["bytes_out"] < 0.85 * r["bytes_in"]  # the exponent plane of bf16 weights compresses
    dst = tmp_path / "back"
    assert wp.unpack(tmp_path / "out" / "base.pack", dst) == 3
    for p in src.rglob("*"):
        if p.is_file():
            assert (dst / p.relative_to(src)).read_bytes() == p.read_bytes(), p


def test_a_pack_with_a_path_outside_its_folder_is_refused(tmp_path):
    wp = load_bench("weights_pack")
    bad = tmp_path / "bad.pack"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("../escape.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(SystemExit, match="not a plain relative file"):
        wp.unpack(bad, tmp_path / "dst")
    assert not (tmp_path / "escape.json").exists()
