"""Images decode as a person would see them, whatever mode PIL opens them in, and folder layouts that
put images or classes in the wrong place are packed right or reported."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from arlab.data.datamodule import ImageDecoder
from arlab.data.images import decode_rgb
from arlab.data.pack import pack_imagefolder

from .common import make_imagefolder


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgba(colour, alpha) -> Image.Image:
    return Image.new("RGBA", (4, 4), (*colour, alpha))


CASES = {
    "RGB": (Image.new("RGB", (4, 4), (10, 200, 30)), (10, 200, 30)),
    "L": (Image.new("L", (4, 4), 77), (77, 77, 77)),
    "1": (Image.new("1", (4, 4), 1), (255, 255, 255)),
    "P": (Image.new("RGB", (4, 4), (250, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE), (250, 0, 0)),
    "RGBA opaque": (rgba((10, 20, 30), 255), (10, 20, 30)),
    "RGBA transparent": (rgba((0, 0, 0), 0), (255, 255, 255)),  # on white, not black
    "RGBA half": (rgba((0, 0, 0), 128), (127, 127, 127)),
    "LA transparent": (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
    "I;16 white": (Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),  # not clipped grey
    "I;16 mid": (Image.fromarray(np.full((4, 4), 32896, np.uint16)), (128, 128, 128)),
    "I 16-bit": (Image.fromarray(np.full((4, 4), 65535, np.int32)), (255, 255, 255)),
    "I 8-bit range": (Image.fromarray(np.full((4, 4), 200, np.int32)), (200, 200, 200)),
    "F unit": (Image.fromarray(np.full((4, 4), 0.5, np.float32)), (128, 128, 128)),
    "CMYK": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_mode_decodes_to_what_a_viewer_shows(name):
    im, want = CASES[name]
    fmt = "TIFF" if im.mode in ("F", "I", "CMYK") else "PNG"
    arr = decode_rgb(encode(im, fmt))
    assert arr.dtype == np.uint8 and arr.shape == (4, 4, 3)
    assert np.abs(arr.astype(int) - np.array(want)).max() <= 1, (name, arr[0, 0])


def test_palette_transparency_is_composited_on_white():
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    arr = decode_rgb(encode(im, "PNG", transparency=1))
    assert (arr == 255).all()


def test_exif_orientation_is_applied():
    """A camera JPEG stored sideways (orientation 6: rotate 90° clockwise to view) decodes upright."""
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8] = 255  # left half white as stored
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_rgb(encode(im, "JPEG", exif=exif, quality=95))
    assert out.shape == (16, 8, 3)  # width and height swapped
    assert out[:8].mean() > 200 and out[8:].mean() < 50  # the white half is now on top
    dec = ImageDecoder(16, 0.0, 0)({"__key__": "k", "jpg": encode(im, "JPEG", exif=exif, quality=95)}, 0)
    assert dec["image"].shape == (16, 16, 3)


def test_a_lone_split_folder_with_nested_class_folders_keeps_its_classes(tmp_path):
    """train/cat/sub/x.png alone: 'train' is the split, not a wrapper to strip (else classes become splits)."""
    for cls in ("cat", "dog"):
        d = tmp_path / "src" / "train" / cls / "images"
        d.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(d / f"{i}.png")
    m = pack_imagefolder(tmp_path / "src", tmp_path / "out", workers=1, progress=False)
    assert list(m["splits"]) == ["train"] and m["classes"] == ["cat", "dog"]


def test_images_outside_the_layout_and_class_like_splits_are_reported(tmp_path):
    src = make_imagefolder(tmp_path / "src", n=6)
    Image.new("RGB", (8, 8)).save(src / "train" / "stray.png")
    m = pack_imagefolder(src, tmp_path / "out", workers=1, progress=False)
    assert any("1 image(s) outside the split/class/image layout" in w for w in m["warnings"])
    flat = tmp_path / "flat"  # animals/cat/1.png, plants/fern/1.png: top folders that share no class
    for top, cls in (("animals", "cat"), ("plants", "fern")):
        (flat / top / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(flat / top / cls / "1.png")
    m = pack_imagefolder(flat, tmp_path / "out2", workers=1, progress=False)
    assert any("look like classes, not splits" in w for w in m["warnings"])
    (flat / "plants" / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(flat / "plants" / "cat" / "2.png")
    m = pack_imagefolder(flat, tmp_path / "out3", workers=1, progress=False)
    assert any("unusual names for splits" in w for w in m["warnings"])


def test_symlinked_class_folders_and_files_are_followed(tmp_path):
    src = make_imagefolder(tmp_path / "src", n=6)
    elsewhere = make_imagefolder(tmp_path / "else", n=3, classes=("z",))
    os.symlink(elsewhere / "train" / "z", src / "train" / "z")  # a class folder living elsewhere
    os.symlink(src / "train", src / "train" / "a" / "loop")  # a symlink loop must not hang
    m = pack_imagefolder(src, tmp_path / "out", workers=1, progress=False)
    assert m["splits"]["train"]["per_class"]["z"] == 3 and "z" in m["classes"]
