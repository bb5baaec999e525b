"""The diffusion runner's own arithmetic, without a model: the size stable-diffusion.cpp is
asked for, and the image cut (or, should a model give less, scaled) to the exact size asked."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from xllm.engine.diffusion_runner import encode, fit, up


@pytest.mark.parametrize(("n", "want"), [(1, 16), (16, 16), (17, 32), (70, 80), (100, 112)])
def test_sizes_go_up_to_multiples_of_16(n: int, want: int) -> None:
    assert up(n) == want


def test_a_larger_image_is_cut_to_its_centre() -> None:
    image = Image.new("RGB", (112, 80), (0, 0, 255))
    image.paste((255, 0, 0), (6, 5, 106, 75))  # the centre 100x70 is red, the margin blue
    image.info["prompt"] = "kept out of the file"
    out = fit(image, 100, 70)
    assert out.size == (100, 70) and out.mode == "RGB"
    assert out.getcolors() == [(100 * 70, (255, 0, 0))]
    assert out.info == {}


def test_a_smaller_image_is_scaled_up() -> None:
    out = fit(Image.new("RGB", (16, 16), (9, 9, 9)), 20, 18)
    assert out.size == (20, 18)


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_every_format_encodes(fmt: str, pil: str) -> None:
    data = encode(Image.new("RGB", (33, 17), (1, 2, 3)), fmt, 50 if fmt != "png" else None)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == (pil, (33, 17))


def test_png_bytes_depend_on_the_pixels_only() -> None:
    a = Image.new("RGB", (8, 8), (5, 6, 7))
    b = Image.new("RGB", (8, 8), (5, 6, 7))
    b.info["seed"] = 42
    assert encode(fit(a, 8, 8), "png", None) == encode(fit(b, 8, 8), "png", None)
