"""The web UI's inpainting inputs (sdengine/webui_inpaint.py): its mask reading, OpenCV's blur level for
level, the masked-content fill, and the crop or overlay that puts the results back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdengine.errors import InvalidArgumentError
from sdengine.mask_crop import MaskCrop
from sdengine.webui_inpaint import WebUIInpaint, binary_mask, blur, fill, gaussian_taps

# A row blurred by OpenCV 4.10 (opencv-python-headless 4.10.0.84), as the web UI blurs masks:
# cv2.GaussianBlur(ROW, (21, 1), 4) and cv2.GaussianBlur(ROW, (11, 1), 2), printed there.
ROW = np.zeros((1, 24), np.uint8)
ROW[0, 6:15] = 255
ROW[0, 20] = 90
OPENCV_SIGMA_4 = [42, 44, 55, 70, 91, 114, 137, 158, 176, 186, 192, 187]
OPENCV_SIGMA_4 += [178, 160, 141, 117, 96, 74, 57, 42, 33, 25, 22, 19]
OPENCV_SIGMA_2 = [0, 2, 9, 26, 57, 102, 153, 198, 229, 246, 251, 246]
OPENCV_SIGMA_2 += [229, 198, 153, 102, 59, 32, 20, 18, 18, 17, 13, 12]


def test_blur_gives_opencvs_levels():
    row = Image.fromarray(ROW, "L")
    assert np.asarray(blur(row, 4, 0))[0].tolist() == OPENCV_SIGMA_4
    assert np.asarray(blur(row, 2, 0))[0].tolist() == OPENCV_SIGMA_2
    column = Image.fromarray(np.ascontiguousarray(ROW.T), "L")  # down, not across
    assert np.asarray(blur(column, 0, 4))[:, 0].tolist() == OPENCV_SIGMA_4
    assert np.asarray(blur(row, 0, 0)).tolist() == ROW.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_blur_equals_opencv_where_it_is_installed(seed):
    cv2 = pytest.importorskip("cv2")  # the dev extra installs it; the runtime does not need it
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(1, 120, 2))
    levels = rng.integers(0, 256, (height, width)).astype(np.uint8)
    sigma_x, sigma_y = (int(v) for v in rng.integers(1, 30, 2))
    expected = cv2.GaussianBlur(levels, (2 * int(2.5 * sigma_x + 0.5) + 1, 1), sigma_x)
    expected = cv2.GaussianBlur(expected, (1, 2 * int(2.5 * sigma_y + 0.5) + 1), sigma_y)
    np.testing.assert_array_equal(np.asarray(blur(Image.fromarray(levels), sigma_x, sigma_y)), expected)


@pytest.mark.parametrize("sigma", [1, 4, 11, 64])
def test_gaussian_taps(sigma):
    taps = gaussian_taps(sigma)
    assert len(taps) == 2 * int(2.5 * sigma + 0.5) + 1 and taps.sum() == 256
    assert taps.tolist() == taps[::-1].tolist()
    x = np.arange(len(taps)) - len(taps) // 2
    curve = np.exp(-(x**2) / (2 * sigma**2))
    assert np.abs(taps - 256 * curve / curve.sum()).max() <= 1


def test_binary_mask_reads_alpha_or_grey_levels():
    grey = np.array([[0, 128, 129, 255]], np.uint8)
    assert np.asarray(binary_mask(Image.fromarray(grey, "L"))).tolist() == [[0, 0, 255, 255]]
    rgba = np.zeros((1, 4, 4), np.uint8)
    rgba[..., 3] = grey  # black everywhere, the alpha marks
    assert np.asarray(binary_mask(Image.fromarray(rgba, "RGBA"))).tolist() == [[0, 0, 255, 255]]
    rgba[..., :3], rgba[..., 3] = grey[..., None], 255  # opaque: the grey levels mark
    assert np.asarray(binary_mask(Image.fromarray(rgba, "RGBA"))).tolist() == [[0, 0, 255, 255]]


def _mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    levels = np.zeros(size[::-1], np.uint8)
    left, top, right, bottom = box
    levels[top:bottom, left:right] = 255
    return Image.fromarray(levels, "L")


def test_fill_paints_the_mask_with_the_colours_around_it():
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:, :32] = (200, 30, 30)  # red left, blue right
    pixels[:, 32:] = (30, 30, 200)
    mask = _mask((64, 48), (8, 8, 56, 40))
    filled = np.asarray(fill(Image.fromarray(pixels), mask)).astype(int)
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(filled[keep], pixels[keep])  # what the mask keeps is untouched
    assert filled[24, 10, 0] > filled[24, 10, 2] + 50  # inside, near the red: red
    assert filled[24, 53, 2] > filled[24, 53, 0] + 50  # near the blue: blue
    assert abs(filled[24, 32, 0] - filled[24, 32, 2]) < 40  # between them: both
    uniform = Image.new("RGB", (64, 48), (90, 140, 60))
    error = np.abs(np.asarray(fill(uniform, mask)).astype(int) - (90, 140, 60))
    assert error.max() <= 5 and error.mean() < 0.5  # the blur's 8-bit premultiplied colour, thin at first


def test_settings_read_as_the_web_ui_reads_them():
    mask = _mask((64, 48), (20, 10, 40, 30))
    default = WebUIInpaint.from_body({}, mask)
    assert (default.blur_x, default.blur_y, default.fill, default.full_res, default.padding) == (
        4,
        4,
        0,
        True,
        0,
    )
    np.testing.assert_array_equal(np.asarray(default.mask), np.asarray(blur(mask, 4, 4)))
    both = WebUIInpaint.from_body({"mask_blur": 2, "mask_blur_x": 9, "inpainting_fill": 1}, mask)
    assert (both.blur_x, both.blur_y, both.fill) == (2, 2, 1)
    assert both.generation_params() == {
        "Mask blur": 2,
        "Masked content": "original",
        "Inpaint area": "Only masked",
        "Only masked padding, pixels": 0,
    }
    inverted = WebUIInpaint.from_body({"inpainting_mask_invert": True, "mask_blur": 0}, mask)
    np.testing.assert_array_equal(np.asarray(inverted.mask), 255 - np.asarray(mask))
    assert inverted.generation_params()["Mask mode"] == "Inpaint not masked"
    apart = WebUIInpaint.from_body({"mask_blur_x": 3, "mask_blur_y": 5, "inpaint_full_res": False}, mask)
    assert apart.generation_params()["Mask blur"] == "3x5" and not apart.full_res


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"inpainting_fill": 4},
            r"inpainting_fill must be 0 \(fill\), 1 \(original\), 2 \(latent noise\) or 3",
        ),
        ({"inpainting_fill": -1}, "got -1"),
        ({"mask_blur": -1}, "mask_blur must be a whole number >= 0"),
        ({"inpaint_full_res_padding": 2.5}, "inpaint_full_res_padding must be a whole number"),
        ({"inpainting_mask_invert": 2}, "inpainting_mask_invert must be 0 or 1"),
        ({"inpainting_mask_invert": 1, "_blank": False}, "repaints nothing"),
        ({"_blank": True}, "repaints nothing"),
    ],
)
def test_bad_settings_are_named(body, message):
    blank = body.pop("_blank", None)
    white = Image.new("L", (16, 16), 255)
    mask = {None: _mask((16, 16), (4, 4, 8, 8)), True: Image.new("L", (16, 16), 0), False: white}[blank]
    with pytest.raises(InvalidArgumentError, match=message):
        WebUIInpaint.from_body(body, mask)


def test_only_masked_repaints_the_masks_box_at_the_size_asked():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (80, 96, 3)).astype(np.uint8))
    inpaint = WebUIInpaint.from_body(
        {"inpaint_full_res_padding": 4, "inpainting_fill": 1}, _mask((96, 80), (30, 20, 50, 44))
    )
    placement, crop, mask = inpaint.prepare(image, 64, 64)
    expected = MaskCrop.around(image, inpaint.mask, 4, 64, 64)
    assert placement.box == expected.box
    np.testing.assert_array_equal(np.asarray(placement.original), np.asarray(image))
    reference = expected.inputs(64, 64)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(reference[0]))  # "original": as it is
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(reference[1]))
    filled = WebUIInpaint.from_body({"inpaint_full_res_padding": 4}, _mask((96, 80), (30, 20, 50, 44)))
    assert not np.array_equal(np.asarray(filled.prepare(image, 64, 64)[1]), np.asarray(crop))
    with pytest.raises(InvalidArgumentError, match="must be the same size"):
        inpaint.prepare(image.resize((48, 40)), 64, 64)


def test_whole_picture_resizes_and_lays_over_at_twice_the_mask():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (80, 96, 3)).astype(np.uint8))
    body = {"inpaint_full_res": False, "inpainting_fill": 1}
    inpaint = WebUIInpaint.from_body(body, _mask((48, 40), (10, 10, 30, 30)))  # any size: both are resized
    placement, resized, mask = inpaint.prepare(image, 64, 64)
    assert placement.box == (0, 0, 64, 64) and resized.size == mask.size == (64, 64)
    np.testing.assert_array_equal(
        np.asarray(resized), np.asarray(image.resize((64, 64), Image.Resampling.LANCZOS))
    )
    doubled = np.minimum(np.asarray(mask).astype(int) * 2, 255)
    np.testing.assert_array_equal(np.asarray(placement.mask), doubled)
    generated = np.ones((1, 64, 64, 3), np.float32)  # white where it repaints
    laid = placement.paste(generated)[0]
    keep = doubled == 0
    np.testing.assert_allclose(laid[keep], np.asarray(resized)[keep] / 255, atol=1e-6)
    np.testing.assert_allclose(laid[doubled == 255], 1.0)
