"""Image decoding decisions and the pure estimator functions, against hand computations."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from svc_helpers import image_bytes

from service.api.images import ImageError, ImageTooLarge, decode_base64, decode_image, encode_png, grid_png
from service.artifacts import Preprocessing
from service.estimators import bits_per_dim, iw_estimate, iw_estimates, logsumexp
from service.families.noise import prior_latents, rows_eps, sample_eps

NOISE_PNG = image_bytes(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8))
GREY = Preprocessing("L", 8, 8, "bilinear", None)
RGB = Preprocessing("RGB", 8, 8, "bilinear", None)


# -- images ----------------------------------------------------------------------------------------------
def test_png_round_trip_is_exact() -> None:
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    x = decode_image(image_bytes(pixels), GREY, 10_000)
    assert x.shape == (1, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], (pixels / 255.0).astype(np.float32))
    np.testing.assert_array_equal(decode_image(encode_png(x), GREY, 10_000), x)


def test_rgb_is_converted_with_luma_and_resized() -> None:
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    x = decode_image(image_bytes(red), GREY, 10_000)
    assert x.shape == (1, 8, 8)
    np.testing.assert_allclose(x, round(0.299 * 255) / 255.0, atol=1 / 255)  # ITU-R 601-2 luma
    assert decode_image(image_bytes(red), RGB, 10_000).shape == (3, 8, 8)


def test_transparency_is_composited_over_black() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:4, :, 3] = 255  # top half opaque white, bottom half transparent white
    x = decode_image(image_bytes(rgba), GREY, 10_000)[0]
    assert (x[:4] == 1.0).all() and (x[4:] == 0.0).all()
    palette = Image.fromarray(rgba).convert("P")
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)
    assert decode_image(buf.getvalue(), GREY, 10_000).shape == (1, 8, 8)


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    x = decode_image(buf.getvalue(), GREY, 10_000)
    np.testing.assert_allclose(x[0], deep / 65535.0, atol=1e-6)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (255, 0)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    x = decode_image(buf.getvalue(), GREY, 10_000)
    assert x.min() > 0.9


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((8, 8), np.uint8)
    pixels[0, :] = 255  # a white top row
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=100)
    x = decode_image(buf.getvalue(), GREY, 10_000)[0]
    assert x[:, -1].mean() > 0.8 and x[0, :4].mean() < 0.5  # the top row became the right column


def test_jpeg_and_bmp_and_webp_decode() -> None:
    pixels = np.full((8, 8), 128, np.uint8)
    for fmt in ("JPEG", "BMP", "WEBP"):
        x = decode_image(image_bytes(pixels, fmt=fmt), GREY, 10_000)
        np.testing.assert_allclose(x, 128 / 255.0, atol=3 / 255.0)


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x89PNG\r\n\x1a\n" + b"\0" * 30,
                                  NOISE_PNG[:len(NOISE_PNG) // 2]])
def test_undecodable_bytes_raise_image_error(data: bytes) -> None:
    with pytest.raises(ImageError):
        decode_image(data, GREY, 10_000)


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(ImageError, match="supported"):
        decode_image(image_bytes(np.zeros((8, 8), np.uint8), fmt="TIFF"), GREY, 10_000)


def test_declared_size_is_checked_before_decoding() -> None:
    """A PNG header declaring 100000 x 100000 pixels is refused without decoding anything."""
    huge = image_bytes(np.zeros((8, 8), np.uint8))
    ihdr = huge.index(b"IHDR")
    import struct
    import zlib

    chunk = b"IHDR" + struct.pack(">II", 100_000, 100_000) + huge[ihdr + 12:ihdr + 17]
    header = huge[:ihdr - 4] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    bomb = header + huge[ihdr + 21:]
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, GREY, 16_000_000)
    with pytest.raises(ImageTooLarge):
        decode_image(image_bytes(np.zeros((20, 20), np.uint8)), GREY, 399)


def test_base64_is_strict_and_accepts_data_urls() -> None:
    assert decode_base64("aGk=") == b"hi"
    assert decode_base64("data:image/png;base64,aGk=") == b"hi"
    for bad in ("a", "!!!!", "data:image/png;base64"):
        with pytest.raises(ImageError):
            decode_base64(bad)


def test_grid_tiles_and_upscales() -> None:
    grid = Image.open(io.BytesIO(grid_png(np.ones((5, 1, 8, 8), np.float32))))
    assert grid.size == (3 * 32 + 4, 2 * 32 + 3)  # 3 columns, 2 rows of 32-pixel cells, 1-pixel gaps


# -- estimators ------------------------------------------------------------------------------------------
def test_iw_estimate_matches_hand_computation() -> None:
    log_w = np.array([-100.0, -101.0, -102.5, -99.0])
    e = iw_estimate(log_w)
    assert e.log_likelihood == pytest.approx(math.log(np.exp(log_w).mean()), abs=1e-12)
    assert e.elbo == pytest.approx(log_w.mean())
    w = np.exp(log_w - log_w.max())
    assert e.standard_error == pytest.approx(w.std(ddof=1) / (2 * w.mean()))
    assert e.log_likelihood >= e.elbo and e.k == 4


def test_iw_estimate_is_stable_at_extreme_magnitudes() -> None:
    e = iw_estimate(np.array([-1e5, -1e5 + 1.0]))
    assert e.log_likelihood == pytest.approx(-1e5 + math.log((math.e + 1) / 2))
    assert iw_estimate(np.array([-3.0])).standard_error is None
    assert logsumexp(np.array([-np.inf, -np.inf])) == -np.inf


def test_bits_per_dim() -> None:
    assert bits_per_dim(-64 * math.log(2), 64) == pytest.approx(1.0)


def test_iw_estimates_of_many_rows_match_each_row() -> None:
    log_w = np.random.default_rng(0).normal(-90.0, 3.0, size=(5, 40))
    log_w[2, 0] = -1e5  # one negligible weight
    out = iw_estimates(log_w)
    for i, row in enumerate(log_w):
        e = iw_estimate(row)
        assert out["log_likelihood"][i] == pytest.approx(e.log_likelihood, abs=1e-12)
        assert out["elbo"][i] == pytest.approx(e.elbo)
        assert out["standard_error"][i] == pytest.approx(e.standard_error)
    assert np.isnan(iw_estimates(log_w[:, :1])["standard_error"]).all()  # undefined for k = 1


def test_noise_depends_on_seed_image_and_sample_only() -> None:
    a = sample_eps(7, 0, 0, 300, 5)
    assert a.shape == (300, 5) and a.dtype == np.float32
    np.testing.assert_array_equal(a, sample_eps(7, 0, 0, 300, 5))
    # Any range of samples is drawn directly: how the work is cut does not change a number.
    np.testing.assert_array_equal(a[128:256], sample_eps(7, 0, 128, 128, 5))
    np.testing.assert_array_equal(a[37:38], sample_eps(7, 0, 37, 1, 5))
    keys = np.array([[7, 0, 0], [7, 0, 100], [7, 0, 200]])
    np.testing.assert_array_equal(rows_eps(keys, 100, 5).reshape(300, 5), a)
    assert not np.array_equal(a, sample_eps(7, 1, 0, 300, 5))
    assert not np.array_equal(a, sample_eps(8, 0, 0, 300, 5))
    z = prior_latents(3, 5, 4, temperature=0.5)
    np.testing.assert_array_equal(z[2], prior_latents(3, 3, 4, temperature=0.5)[2])  # independent of n
    np.testing.assert_allclose(prior_latents(3, 5, 4, temperature=1.0), 2 * z, rtol=1e-6)


def test_noise_is_standard_normal() -> None:
    eps = sample_eps(1, 0, 0, 50_000, 4).astype(np.float64).ravel()  # 200k draws
    assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1.0) < 0.01
    # Tail masses of N(0, 1): P(|e| > 1.96) = 0.05, P(|e| > 3) = 0.0027.
    assert abs((np.abs(eps) > 1.96).mean() - 0.05) < 0.003
    assert abs((np.abs(eps) > 3.0).mean() - 0.0027) < 0.0006
    # Latent dimensions are uncorrelated.
    corr = np.corrcoef(sample_eps(2, 0, 0, 20_000, 4).T)
    assert np.abs(corr - np.eye(4)).max() < 0.03


@pytest.mark.parametrize("mode, interlace", [("L", 0), ("L", 1), ("RGB", 0), ("RGB", 1)])
def test_libspng_decodes_plain_pngs_to_exactly_pillows_pixels(mode: str, interlace: int) -> None:
    """The fast PNG path (libspng) and Pillow's path give bit-identical model inputs."""
    from service.api import images

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (8, 8) if mode == "L" else (8, 8, 3), dtype=np.uint8)
    data = image_bytes(pixels, mode=mode, interlace=interlace)
    prep = GREY if mode == "L" else RGB
    opened = images.open_image(data)
    assert isinstance(opened, images.PlainPng) and opened.size == (8, 8) and opened.mode == mode
    fast = decode_image(data, prep, 10_000)
    slow = decode_image(Image.open(io.BytesIO(data)), prep, 10_000)  # Pillow's path
    assert fast.dtype == slow.dtype == np.float32 and fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)


def test_pngs_that_need_pillows_pipeline_do_not_take_the_fast_path() -> None:
    from service.api import images

    grey = np.full((8, 8), 200, np.uint8)
    transparent = image_bytes(grey, transparency=200)  # tRNS: Pillow's path decides what transparency means
    assert images.plain_png(transparent) is None
    palette = image_bytes(grey, mode="P", transparency=0)
    assert images.plain_png(palette) is None
    sixteen_bit = image_bytes(np.full((8, 8), 40000, np.uint16), mode="I;16")
    assert images.plain_png(sixteen_bit) is None
    assert images.plain_png(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30) is None
    too_big = image_bytes(np.zeros((200, 200), np.uint8))
    with pytest.raises(ImageTooLarge):
        decode_image(too_big, GREY, 1000)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 8, 5), (1, 1, 1)])
def test_png_encoder_round_trips_through_pillow(shape: tuple[int, int, int]) -> None:
    """The service's own PNG writer gives files Pillow reads back as exactly the rounded pixels."""
    from service.api.images import encode_png, to_uint8

    x = np.random.default_rng(1).random(shape).astype(np.float32)
    x.flat[0] = 1.5  # clipped to 255
    im = Image.open(io.BytesIO(encode_png(x)))
    im.load()
    assert im.format == "PNG" and im.mode == ("L" if shape[0] == 1 else "RGB") and im.size == shape[:0:-1]
    np.testing.assert_array_equal(np.asarray(im), to_uint8(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_uint8_rounds_clips_and_maps_nan_to_black(dtype: type) -> None:
    from service.api.images import to_uint8

    x = np.array([[[np.nan, np.inf, -np.inf, 1.5, -0.2, 0.5, 0.501, 1.0 / 255.0]]], dtype)  # (1, 1, 8)
    np.testing.assert_array_equal(to_uint8(x), [[0, 255, 0, 255, 0, 128, 128, 1]])
    rgb = np.stack([x, 1.0 - x, np.zeros_like(x)], axis=0)[:, 0]  # (3, 1, 8) -> (1, 8, 3)
    assert to_uint8(rgb).shape == (1, 8, 3) and to_uint8(rgb)[0, 3].tolist() == [255, 0, 0]


def test_without_libspng_pillow_decodes_every_png(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyspng is optional (no wheels on some platforms): without it the same file gives the same pixels."""
    from service.api import images

    data = image_bytes(np.random.default_rng(4).integers(0, 256, (8, 8), dtype=np.uint8))
    fast = decode_image(data, GREY, 10_000)
    monkeypatch.setattr(images, "pyspng", None)
    assert images.plain_png(data) is None
    np.testing.assert_array_equal(decode_image(data, GREY, 10_000), fast)
