"""Inpainting only the mask's box (``mask_crop``): the box, the resized inputs and the overlay against
diffusers' image processor's own functions, and whole runs against diffusers' pipeline with the same
inputs, its overlay laying the result back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_img2img import picture

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError
from sdengine.images import mask_array, psnr, read_png_parameters
from sdengine.mask_crop import MaskCrop, crop_box
from sdengine.pipeline import Pipeline

PROMPT = "a lighthouse at dusk"


def processors():
    from diffusers.image_processor import VaeImageProcessor

    image = VaeImageProcessor(vae_scale_factor=8)
    mask = VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    return image, mask


def random_masks(count: int = 60):
    """Grey masks of random sizes with one to three random rectangles, some at the borders."""
    rng = np.random.default_rng(0)
    for _ in range(count):
        height, width = rng.integers(16, 120, size=2)
        mask = np.zeros((height, width), np.uint8)
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, height), rng.integers(0, width)
            mask[top : top + rng.integers(1, height), left : left + rng.integers(1, width)] = rng.integers(
                1, 256
            )
        yield (
            Image.fromarray(mask, "L"),
            int(rng.integers(0, 40)),
            rng.choice([64, 96, 128, 200]),
            rng.choice([64, 96, 128]),
        )


def test_the_box_is_diffusers_crop_region():
    image_processor, _ = processors()
    for mask, padding, width, height in random_masks():
        expected = image_processor.get_crop_region(mask, int(width), int(height), pad=padding)
        assert crop_box(mask, int(width), int(height), padding) == tuple(expected), (mask.size, padding)


def test_the_inputs_are_diffusers_fill_resized_crops_pixel_for_pixel():
    image_processor, mask_processor = processors()
    rng = np.random.default_rng(1)
    for mask, padding, width, height in random_masks(25):
        width, height = int(width), int(height)
        pixels = rng.integers(0, 256, (*mask.size[::-1], 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        crop = MaskCrop.around(image, mask, padding, width, height)
        ours_image, ours_mask = crop.inputs(width, height)
        box = crop.box
        theirs = image_processor.preprocess(image, height, width, resize_mode="fill", crops_coords=box)
        np.testing.assert_array_equal(
            np.round((np.asarray(ours_image, np.float32) / 255) * 2 - 1, 5),
            np.round(theirs[0].permute(1, 2, 0).numpy(), 5),
        )
        theirs_mask = mask_processor.preprocess(mask, height, width, resize_mode="fill", crops_coords=box)
        np.testing.assert_array_equal(mask_array(ours_mask, height, width)[0], theirs_mask[0, 0].numpy())


def test_the_overlay_is_diffusers_within_a_level():
    image_processor, _ = processors()
    rng = np.random.default_rng(2)
    for mask, padding, width, height in random_masks(25):
        width, height = int(width), int(height)
        original = Image.fromarray(rng.integers(0, 256, (*mask.size[::-1], 3), dtype=np.uint8), "RGB")
        crop = MaskCrop.around(original, mask, padding, width, height)
        generated = rng.random((1, height, width, 3)).astype(np.float32)
        ours = crop.paste(generated)[0]
        theirs = image_processor.apply_overlay(
            mask, original, Image.fromarray(np.round(generated[0] * 255).astype(np.uint8)), crop.box
        )
        assert ours.shape == (original.height, original.width, 3)
        assert np.abs(ours * 255 - np.asarray(theirs, np.float32)).max() <= 1.01


def small_mask(height: int = 96, width: int = 160) -> np.ndarray:
    """A mask (H, W) repainting a small rectangle off-centre: its box is a fraction of the image."""
    mask = np.zeros((height, width), np.float32)
    mask[20:45, 90:130] = 1
    return mask


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_a_cropped_inpainting_matches_diffusers(ort_pipe_fp32, torch_pipe, strength):
    image = picture(96, 160)
    settings = dict(
        steps=5, seed=3, scheduler="euler", image=image, mask=small_mask(), mask_crop=8, strength=strength
    )
    settings |= {"height": 64, "width": 64}
    ours, ref = ort_pipe_fp32(PROMPT, "blurry", **settings), torch_pipe(PROMPT, "blurry", **settings)
    assert ours.array.shape == ref.array.shape == (1, 96, 160, 3)  # the original's size
    assert ours.latents.shape[-2:] == (8, 8)  # made at the size asked for
    assert psnr(ours.array, ref.array) >= 60  # (92 dB: the overlays round apart by a level; a box one
    # pixel off gives 31 dB)
    outside = small_mask() == 0  # kept as it was, pixel for pixel
    np.testing.assert_array_equal(ours.array[0][outside], np.round(image[0][outside] * 255) / np.float32(255))
    mask = Image.fromarray((small_mask() * 255).astype(np.uint8))
    assert ours.request.mask_crop.box == crop_box(mask, 64, 64, 8)
    assert ours.request.parameters()["mask_crop"] == 8


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mask_crop": 4}, "give an image and a mask"),
        ({"image": picture(96, 160), "mask_crop": 4}, "give an image and a mask"),
        ({"image": picture(96, 160), "mask": small_mask(64, 64), "mask_crop": 4}, "must be the image's size"),
        ({"image": picture(96, 160), "mask": np.zeros((96, 160)), "mask_crop": 4}, "repaints nothing"),
        ({"image": picture(96, 160), "mask": small_mask(), "mask_crop": -1}, "whole number of pixels"),
        (
            {"image": np.concatenate([picture(96, 160)] * 2), "mask": small_mask(), "mask_crop": 4},
            "one image",
        ),
    ],
)
def test_bad_crops_are_refused(ort_pipe_fp32, settings, message):
    with pytest.raises(InvalidArgumentError, match=message):
        ort_pipe_fp32.request(PROMPT, **settings)


def test_cli_mask_crop(onnx_fp32, tmp_path, capsys):
    image = Image.fromarray(np.round(picture(96, 160)[0] * 255).astype(np.uint8))
    mask = Image.fromarray((small_mask() * 255).astype(np.uint8))
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = ["generate", str(onnx_fp32), PROMPT, "--steps", "2", "--image", str(tmp_path / "in.png")]
    args += ["--mask", str(tmp_path / "mask.png"), "--mask-crop", "8", "--height", "64", "--width", "64"]
    assert main([*args, "--output", str(out)]) == 0
    with Image.open(out) as written:
        assert written.size == (160, 96)
    assert read_png_parameters(out)["mask_crop_box"] == list(crop_box(mask, 64, 64, 8))
