"""Input conventions, query crop and multi-scale resize against hand computations and direct cv2 calls; the one
image reader: damaged, oversized (decompression bombs) and oddly named files, and parity with cv2.imread."""
import os

import cv2
import numpy as np
import pytest
import torch

from datasets.transforms import (
    crop_query,
    min_size_guard,
    multiscale_tensors,
    read_image,
    resize_scale,
    to_tensor,
)
from models.checkpoint import OFFICIAL_CONVENTION, TORCHVISION_CONVENTION, InputConvention


def _img(h=37, w=53, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_bgr_official_equals_rgb_as_rgb_after_flip():
    img = _img()
    bgr = to_tensor(img, OFFICIAL_CONVENTION)
    rgb = to_tensor(img, OFFICIAL_CONVENTION.as_rgb())
    assert bgr.dtype == torch.float32 and bgr.shape == (3, 37, 53)
    assert torch.equal(bgr.flip(0), rgb)


def test_to_tensor_values_by_hand():
    img = np.zeros((1, 2, 3), dtype=np.uint8)
    img[0, 0] = (255, 0, 51)  # B, G, R
    img[0, 1] = (0, 102, 255)
    t = to_tensor(img, OFFICIAL_CONVENTION)
    mean, std = (0.406, 0.456, 0.485), (0.225, 0.224, 0.229)  # BGR order
    expected = np.empty((3, 1, 2), dtype=np.float32)
    for c in range(3):
        for x in range(2):
            v = np.float32(img[0, x, c]) / np.float32(255.0)
            expected[c, 0, x] = (v - np.float32(mean[c])) / np.float32(std[c])
    assert np.array_equal(t.numpy(), expected)
    # pixel (0, 0) blue channel: (1 - 0.406) / 0.225
    assert t[0, 0, 0].item() == pytest.approx((1 - 0.406) / 0.225, rel=1e-6)
    # an RGB convention puts red first: pixel (0, 1) red = 255 with torchvision's red statistics
    t_rgb = to_tensor(img, TORCHVISION_CONVENTION)
    assert t_rgb[0, 0, 1].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-6)
    assert t_rgb[2, 0, 0].item() == pytest.approx((1 - 0.406) / 0.225, rel=1e-6)


def test_to_tensor_matches_release_style_numpy_pipeline():
    # transpose to CHW, float32, /255, then per-channel (x - mean) / std, as the release does in numpy
    img = _img(20, 30, seed=3)
    im = img.astype(np.float32).transpose(2, 0, 1) / 255.0
    for c, (m, s) in enumerate(zip(OFFICIAL_CONVENTION.mean, OFFICIAL_CONVENTION.std)):
        im[c] = (im[c] - m) / s
    assert np.array_equal(to_tensor(img, OFFICIAL_CONVENTION).numpy(), im)


def test_to_tensor_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((4, 4, 3), dtype=np.float32), OFFICIAL_CONVENTION)
    with pytest.raises(ValueError, match="H, W, 3"):
        to_tensor(np.zeros((4, 4), dtype=np.uint8), OFFICIAL_CONVENTION)
    with pytest.raises(ValueError):
        InputConvention("XYZ")


@pytest.mark.parametrize("scale,interp", [(0.7071, cv2.INTER_AREA), (1.4142, cv2.INTER_LINEAR)])
def test_resize_scale_matches_direct_cv2(scale, interp):
    img = _img(101, 77, seed=1)
    out = resize_scale(img, scale)
    ref = cv2.resize(img, dsize=(0, 0), fx=scale, fy=scale, interpolation=interp)
    assert out.dtype == np.uint8 and np.array_equal(out, ref)
    other = cv2.INTER_LINEAR if interp == cv2.INTER_AREA else cv2.INTER_AREA
    # the interpolation choice matters on random pixels, so this really pins it down
    assert not np.array_equal(out, cv2.resize(img, dsize=(0, 0), fx=scale, fy=scale, interpolation=other))
    assert out.shape[:2] == (round(101 * scale), round(77 * scale))


def test_resize_scale_one_is_identity_and_bad_scales_raise():
    img = _img()
    assert resize_scale(img, 1.0) is img
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            resize_scale(img, bad)
    with pytest.raises(ValueError, match="to nothing"):
        resize_scale(_img(1, 5), 0.1)


def test_multiscale_tensors_sizes_and_values():
    img = _img(64, 48, seed=2)
    scales = (0.7071, 1.0, 1.4142)
    ts = multiscale_tensors(img, scales, OFFICIAL_CONVENTION)
    assert len(ts) == 3
    for t, s in zip(ts, scales):
        assert torch.equal(t, to_tensor(resize_scale(img, s), OFFICIAL_CONVENTION))
    assert ts[1].shape == (3, 64, 48) and ts[0].shape == (3, 45, 34) and ts[2].shape == (3, 91, 68)


def test_crop_query_truncates_float_bbx():
    img = _img(50, 60)
    crop = crop_query(img, (10.9, 5.2, 30.99, 20.5))
    assert crop.shape == (15, 20, 3)  # rows 5..19, cols 10..29
    assert np.array_equal(crop, img[5:20, 10:30])
    assert np.array_equal(crop_query(img, np.array([0.0, 0.0, 60.0, 50.0])), img)
    # a stop past the border is clipped by slicing, as in the release
    assert crop_query(img, (50, 40, 70.5, 99)).shape == (10, 10, 3)


@pytest.mark.parametrize("bbx", [(10, 10, 10.7, 20), (5, 30, 20, 29), (70, 0, 80, 10), (-3, 0, 5, 5),
                                 (0, 0, 5), (0, float("nan"), 5, 5)])
def test_crop_query_rejects_bad_boxes(bbx):
    with pytest.raises(ValueError):
        crop_query(_img(50, 60), bbx)


def test_min_size_guard():
    big = _img(40, 50)
    assert min_size_guard(big, 32) is big
    assert min_size_guard(big, None) is big
    tiny = _img(8, 20)
    up = min_size_guard(tiny, 32)
    assert up.shape == (32, 80, 3)
    assert np.array_equal(up, cv2.resize(tiny, dsize=(80, 32), interpolation=cv2.INTER_LINEAR))
    tall = min_size_guard(_img(30, 3), 16)
    assert tall.shape == (160, 16, 3)


def test_read_image_bgr_and_errors(tmp_path):
    img = _img(12, 9)
    path = tmp_path / "x.png"  # lossless, so the round trip is exact
    cv2.imwrite(str(path), img)
    got = read_image(path)
    assert got.dtype == np.uint8 and np.array_equal(got, img)
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg.*dataset roxford5k"):
        read_image(tmp_path / "nope.jpg", dataset="roxford5k")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        read_image(bad)


# ---------------------------------------------------------------------------------------------- damaged files


def _photo(h=96, w=128, seed=0):
    # smooth content, so that the JPEG spans many bytes per row and a cut really loses rows
    return cv2.GaussianBlur(_img(h, w, seed), (5, 5), 0)


def _jpeg(img, **params):
    flags = [cv2.IMWRITE_JPEG_QUALITY, 95]
    if params.get("progressive"):
        flags += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    ok, buf = cv2.imencode(".jpg", img, flags)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_is_refused_naming_the_file(tmp_path, progressive):
    from datasets.folder import CorruptImageError

    data = _jpeg(_photo(), progressive=progressive)
    whole, cut = tmp_path / "whole.jpg", tmp_path / "cut.jpg"
    whole.write_bytes(data)
    cut.write_bytes(data[: len(data) // 2])
    assert read_image(whole).shape == (96, 128, 3)
    # what OpenCV alone does: a whole-looking image whose lost rows are flat grey, and a warning on stderr
    assert cv2.imread(str(cut), cv2.IMREAD_COLOR).shape == (96, 128, 3)
    with pytest.raises(CorruptImageError, match=r"cut\.jpg.*truncated.*dataset rparis6k") as err:
        read_image(cut, dataset="rparis6k")
    assert err.value.path == str(cut) and isinstance(err.value, ValueError)


def test_jpeg_checks_accept_trailers_and_see_past_embedded_thumbnails(tmp_path):
    from datasets.folder import CorruptImageError

    img = _photo(seed=4)
    data = _jpeg(img)
    # some cameras append data after the end-of-image marker (a preview, a video): still a whole image
    trailer = tmp_path / "trailer.jpg"
    trailer.write_bytes(data + b"\x00" * 100 + b"MotionPhoto" * 1000)
    assert np.array_equal(read_image(trailer), cv2.imread(str(trailer), cv2.IMREAD_COLOR))
    # an embedded thumbnail (here in a comment segment) holds its own end-of-image marker early in the file;
    # a cut after it must still be seen
    thumb = _jpeg(_photo(16, 16, seed=5))
    segment = b"\xff\xfe" + (len(thumb) + 2).to_bytes(2, "big") + thumb
    with_thumb = data[:2] + segment + data[2:]
    ok = tmp_path / "thumb.jpg"
    ok.write_bytes(with_thumb)
    assert np.array_equal(read_image(ok), cv2.imread(str(ok), cv2.IMREAD_COLOR))
    cut = tmp_path / "thumb_cut.jpg"
    cut.write_bytes(with_thumb[: len(segment) + len(data) // 2])
    with pytest.raises(CorruptImageError, match="thumb_cut.jpg"):
        read_image(cut)
    header_only = tmp_path / "header.jpg"
    header_only.write_bytes(data[:40])
    with pytest.raises(CorruptImageError, match="header.jpg"):
        read_image(header_only)


def test_truncated_png_is_refused_naming_the_file(tmp_path):
    from datasets.folder import CorruptImageError

    ok, buf = cv2.imencode(".png", _photo())
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(CorruptImageError, match=r"cut\.png") as err:
        read_image(cut)
    assert err.value.path == str(cut)


def test_training_datasets_report_a_truncated_jpeg_as_corrupt(tmp_path):
    # the training loops count and skip CorruptImageError (helpers.training's SkipCorrupt); a truncated file
    # must reach them as one, with its path
    from datasets.folder import CorruptImageError, ImageFolderDataset

    (tmp_path / "cls").mkdir()
    data = _jpeg(_photo())
    (tmp_path / "cls" / "a.jpg").write_bytes(data)
    (tmp_path / "cls" / "b.jpg").write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(tmp_path)
    assert ds[0][0].shape == (96, 128, 3)
    with pytest.raises(CorruptImageError) as err:
        ds[1]
    assert err.value.path == str(tmp_path / "cls" / "b.jpg")


# ---------------------------------------------------------------------------------------------- image sizes


def test_min_size_guard_respects_max_side():
    # 10 x 4000 would become 96 x 38400 under the short-side rule alone
    strip = _img(10, 400)
    assert min_size_guard(strip, 96).shape == (96, 3840, 3)  # unchanged default: no cap
    capped = min_size_guard(strip, 96, max_side=1024)
    assert capped.shape == (26, 1024, 3)  # enlarged as far as the long side allows: x2.56
    assert np.array_equal(capped, cv2.resize(strip, dsize=(1024, 26), interpolation=cv2.INTER_LINEAR))
    assert min_size_guard(_img(20, 30), 64, max_side=1024).shape == (64, 96, 3)  # cap not reached
    at_cap = _img(5, 1024)
    assert min_size_guard(at_cap, 96, max_side=1024) is at_cap  # no room to grow
    with pytest.raises(ValueError, match="max_side"):
        min_size_guard(_img(5, 10), 96, max_side=50)


def test_fit_sides_downscales_then_enlarges_within_max_side():
    from datasets.transforms import downscale_to_max_side, enlarge_within, fit_sides

    huge = _img(10, 4000)
    out = fit_sides(huge, min_side=96, max_side=1024)
    assert out.shape == (96, 1024, 3)  # 10 x 4000 -> 3 x 1024 (INTER_AREA), then padded to the short side
    down = cv2.resize(huge, dsize=(1024, 3), interpolation=cv2.INTER_AREA)
    assert np.array_equal(out[46:49], down) and (out[:46] == down[0]).all() and (out[49:] == down[-1]).all()
    assert fit_sides(_img(50, 800), min_side=96, max_side=1024).shape == (96, 1024, 3)
    assert fit_sides(_img(50, 500), min_side=96, max_side=1024).shape == (96, 960, 3)
    big = _img(2000, 1500)
    down, factor = downscale_to_max_side(big, 1024)
    assert factor == pytest.approx(1024 / 2000) and down.shape == (1024, 768, 3)
    assert np.array_equal(fit_sides(big, min_side=96, max_side=1024), down)
    mid = _img(300, 400)
    assert fit_sides(mid, min_side=96, max_side=1024) is mid
    assert fit_sides(mid, min_side=None, max_side=None) is mid
    assert fit_sides(_img(40, 30), min_side=96, max_side=None).shape == (128, 96, 3)
    wide = _img(40, 300)  # within the aspect limit: min_size_guard's enlargement, exactly
    assert np.array_equal(enlarge_within(wide, min_side=96, max_side=1024), min_size_guard(wide, 96))
    with pytest.raises(ValueError, match="max_side"):
        enlarge_within(wide, min_side=96, max_side=50)


def test_smallest_side_for_superglobal_is_what_the_model_needs():
    # the documented rule: with min_side None, an image whose short side is below SMALLEST_SIDE fails in
    # SuperGlobal's Regional-GeM (reflection padding of 2 needs a stage-4 map of at least 3 at scale 0.7071)
    from datasets.transforms import SMALLEST_SIDE
    from helpers.builders import build_model

    model = build_model("superglobal", seed=0, warn_random=False)
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, SMALLEST_SIDE, 120)).shape == (1, 2048)
        with pytest.raises(RuntimeError, match="[Pp]adding"):
            model(torch.zeros(1, 3, SMALLEST_SIDE - 1, 120))


# ---------------------------------------------------------------------------------------------- hostile files


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    """Issue 19.5: a 2.6 MB PNG of 30000 x 30000 pixels made a query peak at 6 GB. The header's pixel count is
    checked against the limit (a setting, default 2**27 pixels = 384 MiB of BGR) before the decoder runs."""
    from datasets.transforms import DEFAULT_MAX_PIXELS, CorruptImageError
    from tests.support.hostile_images import bomb_png

    assert DEFAULT_MAX_PIXELS * 3 < 1 << 30  # well under 1 GB of decoded pixels
    bomb = tmp_path / "bomb.png"
    bomb_png(bomb, 30000, 30000)
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded an image over the limit"))
    monkeypatch.setattr(cv2, "imread", lambda *a: pytest.fail("decoded an image over the limit"))
    with pytest.raises(CorruptImageError, match=r"bomb\.png: 30000 x 30000 = 900,000,000 pixels is over the limit "
                                                r"of 134,217,728") as caught:
        read_image(bomb)
    assert caught.value.path == str(bomb)
    monkeypatch.undo()
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), _img(30, 40))
    with pytest.raises(CorruptImageError, match="1,200 pixels is over the limit of 1,000"):
        read_image(small, max_pixels=1000)
    assert read_image(small, max_pixels=1200).shape == (30, 40, 3)


def test_every_decoder_error_is_a_corrupt_image_error(tmp_path):
    """Issue 19.6: a PNG over OpenCV's own pixel limit raised cv2.error, which --skip-unreadable did not skip.
    With the project's limit raised past OpenCV's, OpenCV's refusal still comes back as CorruptImageError."""
    from datasets.transforms import CorruptImageError
    from tests.support.hostile_images import bomb_png

    huge = tmp_path / "huge.png"
    bomb_png(huge, 40000, 40000)
    with pytest.raises(CorruptImageError, match=r"huge\.png: the decoder failed: .*pixels"):
        read_image(huge, max_pixels=2_000_000_000)
    unknown = tmp_path / "unknown.jpg"
    unknown.write_bytes(b"GIF87a is not what this is")
    with pytest.raises(CorruptImageError, match="unknown.jpg"):
        read_image(unknown)


def test_a_path_of_any_bytes_is_read(tmp_path):
    """Issue 19.4: cv2.imread on a file name that is not UTF-8 crashed the process (segmentation fault). The
    reader reads the bytes itself; run in a child process, so that a crash fails this test only."""
    import subprocess
    import sys
    from pathlib import Path

    img = _img(20, 24)
    name = os.fsencode(str(tmp_path)) + b"/bad\xff\xfe.png"
    ok, png = cv2.imencode(".png", img)
    with open(name, "wb") as f:
        f.write(png.tobytes())
    code = ("import os, sys; from datasets.transforms import read_image; "
            "sys.stdout.buffer.write(read_image(os.fsdecode(bytes.fromhex(sys.argv[1]))).tobytes())")
    done = subprocess.run([sys.executable, "-c", code, name.hex()], capture_output=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout == img.tobytes()


def test_reading_from_memory_keeps_opencvs_pixels_and_exif_orientation(tmp_path):
    """The reader decodes from memory (cv2.imdecode): the same pixels as the releases' cv2.imread, EXIF rotation
    included, for every format the folders are listed with."""
    from tests.support.hostile_images import exif_rotated_jpeg

    exif_rotated_jpeg(tmp_path / "rotated.jpg")
    got = read_image(tmp_path / "rotated.jpg")
    assert got.shape == (80, 40, 3) and np.array_equal(got, cv2.imread(str(tmp_path / "rotated.jpg")))
    img = _img(21, 34)
    for ext in (".jpg", ".png", ".bmp", ".webp", ".tif", ".ppm"):
        path = tmp_path / f"a{ext}"
        assert cv2.imwrite(str(path), img)
        assert np.array_equal(read_image(path), cv2.imread(str(path), cv2.IMREAD_COLOR)), ext
    gray = tmp_path / "g.pgm"
    assert cv2.imwrite(str(gray), img[:, :, 0])
    assert np.array_equal(read_image(gray), cv2.imread(str(gray), cv2.IMREAD_COLOR))
