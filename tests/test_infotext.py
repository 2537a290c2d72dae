"""The web UI's infotext (sdengine/infotext.py): written as the web UI writes it, from the parameters a PNG
records, and put where the web UI's PNG Info reads it, beside sdengine's own JSON."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from sdengine import __version__
from sdengine.images import read_png_parameters, save_png
from sdengine.infotext import infotext, parameters_infotext, parse_infotext, quote


def test_infotext_is_written_as_the_web_ui_writes_it():
    parameters = {"Steps": 20, "Sampler": "DPM++ 2M", "Seed": None, "Size": "512x512", "Note": "a, b: c"}
    assert (
        infotext("a cat", "", parameters)
        == 'a cat\nSteps: 20, Sampler: DPM++ 2M, Size: 512x512, Note: "a, b: c"'
    )
    assert infotext("a cat", "blur", {"Steps": 2}) == "a cat\nNegative prompt: blur\nSteps: 2"
    assert quote("line\nbreak") == '"line\\nbreak"' and quote(7.5) == "7.5"


def test_recorded_parameters_read_in_the_web_uis_words():
    recorded = {
        "prompt": ["a (red:1.2) cat"],
        "negative_prompt": ["blurry"],
        "steps": 25,
        "guidance": 6.5,
        "scheduler": "dpmpp_2m_karras",
        "seed": 42,
        "height": 512,
        "width": 768,
        "image": "supplied",
        "strength": 0.6,
        "clip_skip": 1,
        "noise_source": "torch-cpu",
        "variation_seed": 7,
        "variation_strength": 0.2,
        "model": "models/sd15-onnx/",
    }
    assert parameters_infotext(recorded) == (
        "a (red:1.2) cat\nNegative prompt: blurry\nSteps: 25, Sampler: DPM++ 2M, Schedule type: Karras, "
        "CFG scale: 6.5, Seed: 42, Size: 768x512, Model: sd15-onnx, Variation seed: 7, Variation seed "
        f"strength: 0.2, Denoising strength: 0.6, Clip skip: 2, RNG: CPU, Version: sdengine {__version__}"
    )
    hires = {"prompt": ["a"], "scheduler": "euler_a", "hires_scale": 2.0, "hires_steps": 10}
    hires.update(hires_strength=0.5, hires_upscale="image", width=64, height=64)
    assert "\nSampler: Euler a, Schedule type: Automatic, " in parameters_infotext(hires)
    assert ", Denoising strength: 0.5, Hires upscale: 2.0, Hires steps: 10, Hires upscaler: Lanczos, " in (
        parameters_infotext(hires)
    )
    assert parameters_infotext({"prompt": ["a"], "mask": "supplied", "mask_crop": 32}).startswith(
        "a\nInpaint area: Only masked, Only masked padding, pixels: 32, "
    )


def test_a_png_holds_the_infotext_and_the_json(tmp_path):
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    recorded = {"prompt": ["a cat"], "steps": 3, "scheduler": "ddim", "seed": 1, "width": 8, "height": 8}
    path = save_png(image, tmp_path / "a.png", recorded)
    with Image.open(path) as png:
        assert png.text["parameters"] == parameters_infotext(recorded)
        assert png.text["parameters"].startswith("a cat\nSteps: 3, Sampler: DDIM, ")
    assert read_png_parameters(path) == recorded
    older = tmp_path / "older.png"  # sdengine's earlier PNGs kept the JSON in the parameters chunk
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(recorded))
    image.save(older, pnginfo=info)
    assert read_png_parameters(older) == recorded


def test_an_infotext_reads_back_as_the_web_ui_reads_it():
    written = infotext(
        "a cat,\nin a hat", "blurry", {"Steps": 20, "Note": "a, b: c", "Size": "768x512", "CFG scale": 7.0}
    )
    assert parse_infotext(written) == {
        "Prompt": "a cat,\nin a hat",
        "Negative prompt": "blurry",
        "Steps": "20",
        "Note": "a, b: c",
        "Size": "768x512",
        "Size-1": "768",
        "Size-2": "512",
        "CFG scale": "7.0",
    }
    assert parse_infotext("a cat: the best") == {"Prompt": "a cat: the best", "Negative prompt": ""}
    odd = parse_infotext('a\nSteps: 2, Note: "not \\x JSON", Seed: 1')  # a quoted value kept as written
    assert odd["Note"] == '"not \\x JSON"' and odd["Seed"] == "1"
