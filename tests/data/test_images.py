"""Image decoding: every mode PIL opens comes out as the 8-bit RGB picture a viewer shows
(16-bit and float grayscale scaled, not clipped to white; transparency on white; CMYK; EXIF
orientation; the first frame of an animation), through the readers and ``Record.load_image``
alike; a directory, a missing file and an over-large image are each named as such."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from aimkp.data import Record, load_dataset
from aimkp.data.images import open_image, to_rgb, unreadable_reason
from aimkp.errors import DataError


def _rgb(path) -> np.ndarray:
    return np.asarray(Record(id="r", text="t", keyphrases=["k"], image_path=str(path)).load_image())


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path) -> None:
    a = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # what PIL opens it as
    got = _rgb(tmp_path / "g16.png")
    assert got.shape == (1, 4, 3)
    np.testing.assert_array_equal(got[0, :, 0], [0, 64, 128, 255])  # PIL's convert: 0,255,255,255
    assert (got[..., 0] == got[..., 2]).all()


def test_32bit_float_is_scaled(tmp_path) -> None:
    a = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(a, "F").save(tmp_path / "f.tiff")
    np.testing.assert_array_equal(_rgb(tmp_path / "f.tiff")[0, :, 1], [0, 128, 255])


def test_cmyk_jpeg(tmp_path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    px = _rgb(tmp_path / "c.jpg")[4, 4]
    assert px[0] > 240 and px[1] < 15 and px[2] < 15  # red


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_white_and_opaque_ones_kept(tmp_path, mode) -> None:
    im = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (0, 0, 0, 255))  # opaque black beside a transparent (black) pixel
    if mode == "LA":
        im = im.convert("LA")
    elif mode == "P":
        im = im.convert("P")
        im.info["transparency"] = im.getpixel((0, 0))
    im.save(
        tmp_path / "t.png", **({"transparency": im.info["transparency"]} if mode == "P" else {})
    )
    got = _rgb(tmp_path / "t.png")
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [0, 0, 0]


def test_animated_gif_first_frame(tmp_path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(tmp_path / "a.gif") as im:
        im.seek(1)  # left on another frame
        assert to_rgb(im).getpixel((0, 0))[0] > 200
    assert _rgb(tmp_path / "a.gif")[0, 0, 0] > 200


def test_exif_orientation_is_applied(tmp_path) -> None:
    im = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    im.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert _rgb(tmp_path / "o.jpg").shape == (4, 2, 3)


def test_grayscale_and_bilevel_and_palette(tmp_path) -> None:
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    Image.new("1", (2, 2), 1).save(tmp_path / "b.png")
    Image.new("RGB", (2, 2), (255, 0, 0)).convert("P").save(tmp_path / "p.png")
    assert _rgb(tmp_path / "l.png")[0, 0].tolist() == [77, 77, 77]
    assert _rgb(tmp_path / "b.png")[0, 0].tolist() == [255, 255, 255]
    assert _rgb(tmp_path / "p.png")[0, 0].tolist() == [255, 0, 0]


def test_a_directory_missing_file_and_oversized_image_are_named(tmp_path, monkeypatch) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match="image path is a directory"):
        open_image(tmp_path / "dir.png")
    with pytest.raises(DataError, match="missing image"):
        open_image(tmp_path / "none.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # bombs: over twice this
    with pytest.raises(DataError, match="image too large"):
        open_image(tmp_path / "big.png")
    assert unreadable_reason(tmp_path / "big.png") == "image too large"


def test_the_readers_name_a_directory_as_one(tmp_path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"id": "a", "text": "t", "keyphrases": ["k"], "image": "img"}) + "\n"
    )
    with pytest.raises(DataError, match="d.jsonl:1: image path is a directory"):
        load_dataset(str(tmp_path / "d.jsonl"), "test")


def test_the_image_processor_gets_the_same_pixels(tmp_path) -> None:
    """The adapters' path (in-memory images: corrupted suites, hf bytes) decodes alike."""
    a = np.array([[32768]], dtype=np.uint16)
    im = Image.fromarray(a)
    rec = Record(id="r", text="t", keyphrases=["k"], image=im)
    assert np.asarray(rec.load_image())[0, 0].tolist() == [128, 128, 128]
