"""The shared image decode: 16-bit greyscale scaled, not clipped to white; EXIF orientation applied."""

import io

import numpy as np
from PIL import Image

from fluxtrain.data.clean import image_of
from fluxtrain.data.images import decode_rgb
from fluxtrain.data.webdataset import decode_sample


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_16_bit_greyscale_keeps_its_levels():
    a = np.zeros((64, 64), np.uint16)
    a[16:48, 16:48] = 32768  # mid grey; convert("RGB") made every non-zero pixel 255
    data = _bytes(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    for im in (decode_rgb(data), image_of({"png": data})[1]):
        rgb = np.asarray(im)
        assert rgb.shape == (64, 64, 3) and rgb[32, 32].tolist() == [128, 128, 128] and rgb[0, 0].tolist() == [0, 0, 0]


def test_exif_orientation_is_applied_before_the_bucket_is_chosen():
    # stored landscape (red left, blue right) with "rotate 90° clockwise to view": seen as portrait, red on top
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = (255, 0, 0)
    a[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _bytes(Image.fromarray(a), "JPEG", exif=exif, quality=95)
    im = decode_rgb(data)
    assert im.size == (32, 64)
    top, bottom = np.asarray(im)[4, 16], np.asarray(im)[60, 16]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0], (top, bottom)
    kind, bucket, *_ = decode_sample({"jpg": data, "txt": b"a red circle above a blue circle"},
                                     [(64, 32), (32, 64), (64, 64)])
    assert kind == "ok" and bucket == 0  # (height 64, width 32): the portrait bucket
