"""A ControlNet unit's image brought to size as the web UI's ControlNet extension brings it
(sdengine/webui_detectmap.py): its geometry and fill, its choice of filter, two-colour maps kept two-coloured
by Otsu's threshold (checked against OpenCV's where it is installed)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdengine.errors import InvalidArgumentError
from sdengine.webui_detectmap import detected_map, map_resize, otsu_threshold, resize

RNG = np.random.default_rng(7)
PHOTO = (RNG.random((32, 96, 3)) * 255).astype(np.uint8)  # many colours


def test_crop_and_resize_scales_by_the_larger_ratio_and_cuts_the_middle() -> None:
    got = np.asarray(detected_map(Image.fromarray(PHOTO), "Crop and Resize", 64, 64))
    scaled = map_resize(PHOTO, 192, 64)  # k = max(64 / 32, 64 / 96) = 2
    np.testing.assert_array_equal(got, scaled[:, 64:128])


def test_resize_and_fill_scales_by_the_smaller_ratio_onto_the_border_s_median() -> None:
    got = np.asarray(detected_map(Image.fromarray(PHOTO), "Resize and Fill", 64, 64))
    scaled = map_resize(PHOTO, 64, 21)  # k = min(2, 2 / 3): 96 x 32 -> 64 x 21.3, rounded
    border = np.concatenate([PHOTO[0], PHOTO[-1], PHOTO[:, 0], PHOTO[:, -1]])
    median = np.median(border, axis=0).astype(np.uint8)
    np.testing.assert_array_equal(got[21:42], scaled)  # placed at (64 - 21) // 2
    assert (got[:21] == median).all() and (got[42:] == median).all()


def test_just_resize_stretches() -> None:
    got = np.asarray(detected_map(Image.fromarray(PHOTO), "Just Resize", 48, 80))
    np.testing.assert_array_equal(got, map_resize(PHOTO, 48, 80))
    assert got.shape == (80, 48, 3)


def test_the_filter_follows_the_map() -> None:
    # many colours: area averaging when shrinking, bicubic when enlarging
    np.testing.assert_array_equal(map_resize(PHOTO, 48, 16), resize(PHOTO, 48, 16, "area"))
    np.testing.assert_array_equal(map_resize(PHOTO, 192, 64), resize(PHOTO, 192, 64, "cubic"))
    # a few colours (a segmentation map): nearest, so no new colours
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9], [200, 100, 50]], np.uint8)
    labels = palette[RNG.integers(0, 5, (16, 16))]
    colours = {tuple(c) for c in map_resize(labels, 40, 40).reshape(-1, 3)}
    assert colours <= {tuple(c) for c in palette}
    # two colours, dark and bright (an edge map): still two colours after a bicubic enlargement
    edges = np.zeros((16, 16, 3), np.uint8)
    edges[8, :] = 255
    enlarged = map_resize(edges, 40, 40)
    assert set(np.unique(enlarged)) == {0, 255} and (enlarged[19:23] == 255).any()
    assert map_resize(PHOTO, 96, 32) is PHOTO  # the right size already: as it is


def test_otsu_threshold_is_opencv_s() -> None:
    cv2 = pytest.importorskip("cv2")  # the dev extra installs it; the runtime does not need it
    rng = np.random.default_rng(3)
    for _ in range(50):
        dark = rng.normal(rng.uniform(0, 120), rng.uniform(2, 40), 500)
        bright = rng.normal(rng.uniform(120, 255), rng.uniform(2, 40), 300)
        grey = np.clip(np.concatenate([dark, bright]), 0, 255).astype(np.uint8).reshape(-1, 8)
        threshold, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert otsu_threshold(grey) == int(threshold)


def test_otsu_threshold_of_two_levels_lies_between_them() -> None:
    grey = np.array([[10] * 30 + [230] * 70], np.uint8)
    assert 10 <= otsu_threshold(grey) < 230


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="resize mode must be one of Just Resize"):
        detected_map(Image.fromarray(PHOTO), "Envelope", 64, 64)


def _blobs(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth grey image and its 0/255 cut: thick shapes for the thinning."""
    grey = np.asarray(
        Image.fromarray((rng.random((height // 4 + 1, width // 4 + 1)) * 255).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
    )
    return grey, np.where(grey > 128, 255, 0).astype(np.uint8)


def test_thinning_patterns_fit_where_opencv_s_hit_or_miss_says() -> None:
    """Each thinning and pruning pattern fits where OpenCV's ``MORPH_HITMISS`` (the extension's lvmin_thin
    calls it) says, edges of the image included; the whole thinning was checked by hand equal to the
    extension's own module on 120 images."""
    cv2 = pytest.importorskip("cv2")
    from sdengine.webui_detectmap import PRUNING, THINNING, _hit_or_miss, thin_edges

    rng = np.random.default_rng(5)
    for _ in range(10):
        _, binary = _blobs(rng, *rng.integers(12, 60, 2))
        for pattern in (*THINNING, *PRUNING):
            want = cv2.morphologyEx(binary, cv2.MORPH_HITMISS, pattern.astype(np.int32)) > 127
            np.testing.assert_array_equal(_hit_or_miss(binary, pattern), want)
        thinned = thin_edges(binary, prune=False)
        assert not any(_hit_or_miss(thinned, pattern).any() for pattern in THINNING)  # thinned to the end
        assert (thinned <= binary).all() and thinned.any()


def test_nms_keeps_the_maxima_along_any_of_four_lines() -> None:
    cv2 = pytest.importorskip("cv2")
    from sdengine.webui_detectmap import directional_nms

    lines = [np.zeros((3, 3), np.uint8) for _ in range(4)]
    lines[0][1, :] = lines[1][:, 1] = 1
    np.fill_diagonal(lines[2], 1)
    np.fill_diagonal(np.fliplr(lines[3]), 1)
    rng = np.random.default_rng(6)
    for _ in range(20):
        grey, _ = _blobs(rng, *rng.integers(12, 60, 2))
        want = np.zeros_like(grey)
        for line in lines:
            np.putmask(want, cv2.dilate(grey, line) == grey, grey)
        np.testing.assert_array_equal(directional_nms(grey), want)


def test_enlarged_one_pixel_edges_stay_one_pixel_wide() -> None:
    edges = np.zeros((16, 16, 3), np.uint8)
    edges[8, 2:14] = 255  # a one-pixel line
    enlarged = map_resize(edges, 48, 48)[..., 0]
    columns = (enlarged[:, 12:36] > 0).sum(axis=0)
    assert (columns == 1).all()  # thinned back to one pixel (a bicubic enlargement alone makes it ~3 wide)
    thick = np.zeros((16, 16, 3), np.uint8)
    thick[4:12, 4:12] = 255  # a filled square: not edges, so not thinned
    assert (map_resize(thick, 48, 48)[20:28, 20:28] == 255).all()


def test_resizes_are_opencv_s_where_it_is_installed_and_pillow_s_without(monkeypatch) -> None:
    import sys

    cv2 = pytest.importorskip("cv2")
    flags = {"nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC}
    for kind, size in (("area", (48, 16)), ("cubic", (150, 50)), ("nearest", (150, 50))):
        np.testing.assert_array_equal(
            resize(PHOTO, *size, kind), cv2.resize(PHOTO, size, interpolation=flags[kind])
        )
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 fails: Pillow's filters
    pillow = {"area": Image.Resampling.BOX, "cubic": Image.Resampling.BICUBIC}
    for kind, size in (("area", (48, 16)), ("cubic", (150, 50))):
        want = np.asarray(Image.fromarray(PHOTO).resize(size, pillow[kind]))
        np.testing.assert_array_equal(resize(PHOTO, *size, kind), want)


def test_transparency_is_laid_over_white_as_the_extension_lays_it() -> None:
    from sdengine.webui_detectmap import over_white

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[..., 3] = [[255, 0], [128, 64]]
    got = np.asarray(over_white(Image.fromarray(rgba, "RGBA")))[..., 0]
    alpha = rgba[..., 3].astype(np.float64) / 255
    want = (100 * alpha + 255 * (1 - alpha)).astype(np.uint8)  # cut, not rounded
    np.testing.assert_array_equal(got, want)
    photo = Image.fromarray(PHOTO)
    assert over_white(photo) is photo
    assert over_white(photo.convert("L")).mode == "RGB"
