"""The ControlNet extension's API units (sdengine/webui_controlnet.py), read for a served export with
ControlNets: mapped onto the pipeline's ControlNet settings, and served end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_server import call, pixels, png

from sdengine.errors import InvalidArgumentError
from sdengine.pipeline import Pipeline
from sdengine.server import decode_image, serve_in_thread
from sdengine.webui_controlnet import control_settings, controlnet_name

SERVED = ["canny", "depth"]
RNG = np.random.default_rng(3)
EDGES, DEPTH = (RNG.random((64, 64, 3)).astype(np.float32) for _ in range(2))


def settings(scripts, served=SERVED, init=None, width=64, height=64):
    return control_settings(scripts, served, width, height, init, decode_image).settings


def records(scripts, served=SERVED, init=None):
    """The units' infotext records, read as the server reads them, at 64 x 64."""
    return control_settings(scripts, served, 64, 64, init, decode_image).infotexts


def units(*args):
    return {"controlnet": {"args": list(args)}}


def test_units_become_each_controlnets_image_weight_and_range():
    out = settings(
        units(
            {
                "image": png(DEPTH),
                "model": "depth [a1b2c3d4]",
                "weight": 0.5,
                "guidance_end": 0.6,
                "control_mode": 1,
            },
            {"image": png(EDGES), "model": "canny", "guidance_start": 0.2, "resize_mode": "Just Resize"},
        )
    )
    assert out["control_scale"] == [1.0, 0.5] and out["control_mode"] == ["balanced", "prompt"]
    assert "control_mode" not in settings(
        units({"image": png(EDGES), "model": "canny", "control_mode": "Balanced"})
    )
    assert out["control_start"] == [0.2, 0.0] and out["control_end"] == [1.0, 0.6]
    canny, depth = (np.asarray(image, np.float32) / 255 for image in out["control_image"])
    np.testing.assert_allclose(canny, EDGES, atol=0.5 / 255)
    np.testing.assert_allclose(depth, DEPTH, atol=0.5 / 255)


def test_a_controlnet_no_unit_names_runs_at_weight_zero_and_disabled_units_count_for_nothing():
    out = settings(units({"image": png(EDGES), "model": "depth", "enabled": False}))
    assert out["control_scale"] == [0.0, 0.0]
    assert all(np.asarray(image).shape == (64, 64, 3) for image in out["control_image"])
    assert settings(None)["control_scale"] == [0.0, 0.0]
    assert settings(None, served=[]) == {} and settings({}, served=[]) == {}


def test_images_are_resized_as_the_unit_asks_and_img2img_lends_its_init_image():
    wide = Image.fromarray((RNG.random((32, 96, 3)) * 255).astype(np.uint8))
    data = png(np.asarray(wide, np.float32) / 255)
    crop = settings(units({"image": data, "model": "canny"}), served=["canny"])["control_image"]
    stretch = settings(units({"image": data, "model": "canny", "resize_mode": 0}), served=["canny"])
    fill = settings(
        units({"image": data, "model": "canny", "resize_mode": "Resize and Fill"}), served=["canny"]
    )
    assert crop.size == stretch["control_image"].size == fill["control_image"].size == (64, 64)
    a, b, c = (np.asarray(x, np.float32) for x in (crop, stretch["control_image"], fill["control_image"]))
    assert np.abs(a - b).max() > 10 and np.abs(a - c).max() > 10  # three different resizes
    init = Image.fromarray((EDGES * 255).astype(np.uint8))
    lent = settings(units({"model": "canny"}), served=["canny"], init=init)["control_image"]
    assert lent is init


@pytest.mark.parametrize(
    ("scripts", "message"),
    [
        ({"adetailer": {"args": []}}, "alwayson_scripts: not supported: adetailer"),
        (
            units({"image": png(EDGES), "model": "openpose"}),
            "'openpose' is not served; the served ControlNets",
        ),
        (
            units({"image": png(EDGES), "model": "canny", "module": "depth_midas"}),
            "only the preprocessors none, canny, invert are run",
        ),
        (units({"image": png(EDGES), "model": "canny", "control_mode": 3}), "control_mode 3: use Balanced"),
        (units({"image": {"image": png(EDGES), "mask": png(EDGES)}, "model": "canny"}), "own mask"),
        (units({"model": "canny"}), "give the control image"),
        (units({"image": png(EDGES), "model": "canny", "weight": "1"}), "weight must be a number"),
        (units({"image": png(EDGES), "model": "canny", "resize_mode": 5}), "resize_mode 5"),
        (
            units({"image": png(EDGES), "model": "canny"}, {"image": png(EDGES), "model": "canny"}),
            "a second unit for ControlNet 'canny'",
        ),
        ({"controlnet": {"args": "x"}}, "must be a list of unit objects"),
    ],
)
def test_what_the_extension_does_and_this_does_not_is_refused_in_one_line(scripts, message):
    with pytest.raises(InvalidArgumentError, match=message) as info:
        settings(scripts)
    assert "\n" not in str(info.value)


def test_a_model_without_controlnets_refuses_units():
    with pytest.raises(InvalidArgumentError, match="has no ControlNet"):
        settings(units({"image": png(EDGES), "model": "canny"}), served=[])


def test_names_are_directories_or_the_files_converted_into_the_cache():
    assert controlnet_name("/models/sd-controlnet-canny") == "sd-controlnet-canny"
    assert controlnet_name("/cache/controlnets/control_v11p_sd15_canny-0123456789abcdef") == (
        "control_v11p_sd15_canny"
    )


@pytest.fixture(scope="module")
def controlled(tiny_checkpoint, tmp_path_factory):
    """An export with two random ControlNets in its UNet, named canny and depth."""
    from export.controlnet import write_random_controlnet
    from export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("webui-controlnet")
    nets = [write_random_controlnet(tiny_checkpoint, root / name, seed=i) for i, name in enumerate(SERVED)]
    export_checkpoint(
        tiny_checkpoint,
        root / "onnx",
        controlnets=nets,
        components=["text_encoder", "unet", "vae_decoder", "vae_encoder"],
    )
    return root / "onnx"


def test_the_server_runs_the_units_as_the_pipeline_does(controlled):
    served = Pipeline.load(controlled, backend="ort", device="cpu")
    server = serve_in_thread(served)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    body = {"prompt": "a house", "width": 64, "height": 64, "steps": 3, "seed": 5}
    mode = "ControlNet is more important"  # no control on the negative side, soft weights
    scripts = units(
        {"image": png(EDGES), "model": "canny", "weight": 0.8, "guidance_end": 0.6, "control_mode": mode}
    )
    try:
        listed = call(url, "/controlnet/model_list")[1]
        status, answer = call(url, "/sdapi/v1/txt2img", {**body, "alwayson_scripts": scripts})
        status_plain, plain = call(url, "/sdapi/v1/txt2img", body)
        status_bad, bad = call(url, "/sdapi/v1/txt2img", {**body, "alwayson_scripts": units({"model": "x"})})
    finally:
        server.shutdown()
    assert listed == {"model_list": SERVED}
    assert status == status_plain == 200 and status_bad == 422 and "is not served" in bad["detail"]
    direct = Pipeline.load(controlled, backend="ort", device="cpu")
    common = dict(width=64, height=64, steps=3, seed=5, guidance=7.0, scheduler="euler")
    common.update(prompt_weights="a1111", long_prompts=True)
    expected = direct(
        "a house",
        "",
        **common,
        control_image=[np.round(EDGES * 255) / 255, np.zeros((64, 64, 3), np.float32)],  # as sent: 8 bits
        control_scale=[0.8, 0.0],
        control_end=[0.6, 1.0],
        control_mode=["control", "balanced"],
    )
    np.testing.assert_allclose(pixels(answer["images"][0]), expected.array[0], atol=0.5 / 255)
    without = direct("a house", "", **common, control_image=[EDGES, EDGES], control_scale=0.0)
    np.testing.assert_allclose(pixels(plain["images"][0]), without.array[0], atol=0.5 / 255)
    assert np.abs(expected.array - without.array).max() > 0.05  # the unit did something
    info = json.loads(answer["info"])
    assert info["ignored_fields"] == []
    record = (
        "Module: none, Model: canny, Weight: 0.8, Resize Mode: Crop and Resize, Processor Res: 512, "
        "Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 0.6, Pixel Perfect: False, "
        "Control Mode: ControlNet is more important"
    )
    assert info["extra_generation_params"]["ControlNet 0"] == record
    assert f'ControlNet 0: "{record}", Version: ' in info["infotexts"][0]  # quoted, as the web UI quotes
    assert "ControlNet 0" not in json.loads(plain["info"])["infotexts"][0]


def test_units_with_inpainting_of_the_masks_box_alone_cut_their_images_to_the_box():
    """As the extension cuts them: each unit's image brought to the mask's size by the web UI's resize of
    the unit's mode, cut to the inpainting's box, resized and filled to the size generated, as the box's own
    image is; a unit without an image cuts the init image the same way."""
    from sdengine.mask_crop import MaskCrop, cover_resize, fill_resize
    from sdengine.server import generation_settings

    rng = np.random.default_rng(8)
    original, depth = rng.random((80, 96, 3)).astype(np.float32), rng.random((40, 48, 3)).astype(np.float32)
    mask = np.zeros((80, 96, 3), np.float32)
    mask[30:50, 40:70] = 1.0
    body = {"init_images": [png(original)], "mask": png(mask), "width": 64, "height": 64, "mask_blur": 0}
    body["alwayson_scripts"] = units({"image": png(depth), "model": "depth"}, {"model": "canny"})
    request = generation_settings(body, img2img=True, controlnets=SERVED)
    placement = request.inpainting.placement
    assert placement.box != (0, 0, 96, 80)  # a box inside the picture
    sent = decode_image(png(depth))
    want_depth = fill_resize(cover_resize(sent, 96, 80).crop(placement.box), 64, 64)
    want_canny = fill_resize(decode_image(png(original)).crop(placement.box), 64, 64)
    canny, depth_image = request.settings["control_image"]
    np.testing.assert_array_equal(np.asarray(depth_image), np.asarray(want_depth))
    np.testing.assert_array_equal(np.asarray(canny), np.asarray(want_canny))
    np.testing.assert_array_equal(np.asarray(canny), np.asarray(placement.inputs(64, 64)[0]))  # lines up
    assert isinstance(placement, MaskCrop) and request.settings["control_scale"] == [1.0, 1.0]
    whole = generation_settings({**body, "inpaint_full_res": False}, img2img=True, controlnets=SERVED)
    assert np.asarray(whole.settings["control_image"][1]).shape == (64, 64, 3)


def test_units_are_recorded_as_the_extension_records_them():
    """Numbered among the enabled units; eleven fields in the extension's order; numbers as its pydantic
    model gives them (floats as 1.0, the resolution an int); sliders out of range at their defaults, a
    pixel-perfect unit's resolution the one that brings its image to the generation's size."""
    pytest.importorskip("cv2")
    wide = png(RNG.random((32, 96, 3)).astype(np.float32))  # 96 x 32 to 64 x 64: k = max(2, 2 / 3)
    init = Image.fromarray((EDGES * 255).astype(np.uint8))  # lent to the units without an image
    recorded = records(
        units(
            {"model": "depth [0123abcd]", "enabled": False},
            {"model": "depth [0123abcd]", "weight": 1, "resize_mode": 2, "control_mode": 1},
            {"model": "canny", "processor_res": 768, "threshold_a": 100, "weight": None},
        ),
        init=init,
    )
    assert recorded == {
        "ControlNet 0": "Module: none, Model: depth [0123abcd], Weight: 1.0, Resize Mode: Resize and Fill, "
        "Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, "
        "Pixel Perfect: False, Control Mode: My prompt is more important",
        "ControlNet 1": "Module: none, Model: canny, Weight: 1.0, Resize Mode: Crop and Resize, "
        "Processor Res: 768, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, "
        "Pixel Perfect: False, Control Mode: Balanced",
    }
    perfect = {"model": "canny", "module": "canny", "threshold_a": 300, "image": wide, "pixel_perfect": True}
    assert records(units(perfect)) == {
        "ControlNet 0": "Module: canny, Model: canny, Weight: 1.0, Resize Mode: Crop and Resize, "
        "Processor Res: 64, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, "
        "Pixel Perfect: True, Control Mode: Balanced",
    }
    assert records(None) == {} and records(None, served=[]) == {}


def test_a_unit_s_record_reads_back_from_the_infotext():
    from sdengine.infotext import parameters_infotext, parse_infotext

    record = records(units({"model": "canny", "weight": 0.5, "image": png(EDGES)}))
    text = parameters_infotext({"prompt": "a house", "steps": 3, "script_fields": record})
    assert parse_infotext(text)["ControlNet 0"] == record["ControlNet 0"]


def _photo(height: int = 48, width: int = 80) -> Image.Image:
    """A smooth random picture, with edges for Canny to find."""
    rng = np.random.default_rng(11)
    base = Image.fromarray((rng.random((height // 4, width // 4, 3)) * 255).astype(np.uint8))
    return base.resize((width, height), Image.Resampling.BICUBIC)


def test_canny_is_the_extension_s(monkeypatch):
    """The unit's image scaled to the resolution on its short side, edge-padded to multiples of 64,
    OpenCV's Canny, the padding cut: written out here with OpenCV as the extension's source does it (by hand
    also checked identical to the extension's own function on 40 random images)."""
    cv2 = pytest.importorskip("cv2")
    from sdengine.webui_preprocessors import canny_map

    photo = _photo()
    for resolution, low, high in ((96, 100, 200), (40, 30, 120), (48, 100, 200)):
        pixels = np.asarray(photo)
        k = resolution / 48
        size = (int(np.round(80 * k)), int(np.round(48 * k)))
        scaled = cv2.resize(pixels, size, interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
        padded = np.pad(scaled, [(0, -size[1] % 64), (0, -size[0] % 64), (0, 0)], mode="edge")
        want = cv2.Canny(padded, low, high)[: size[1], : size[0]]
        got = np.asarray(canny_map(photo, resolution, low, high))
        assert got.shape == (*want.shape, 3) and (got == want[..., None]).all()
        assert set(np.unique(got)) == {0, 255}


def test_units_run_canny_and_invert_then_bring_the_map_to_size():
    pytest.importorskip("cv2")
    from sdengine.webui_detectmap import detected_map
    from sdengine.webui_preprocessors import canny_map

    photo = _photo()
    data = png(np.asarray(photo, np.float32) / 255)
    perfect = settings(
        units({"image": data, "model": "canny", "module": "canny", "pixel_perfect": True}), served=["canny"]
    )
    # pixel perfect, Crop and Resize: k = max(64 / 48, 64 / 80): the map comes out 107 x 64, then cropped
    want = np.asarray(canny_map(photo, 64, 100, 200))
    assert want.shape == (64, 107, 3)
    np.testing.assert_array_equal(np.asarray(perfect["control_image"]), want[:, 21:85])
    plain = settings(
        units({"image": data, "model": "canny", "module": "canny", "threshold_a": 0}), served=["canny"]
    )
    want = detected_map(
        canny_map(photo, 512, 100, 200), "Crop and Resize", 64, 64
    )  # threshold 0: its default
    np.testing.assert_array_equal(np.asarray(plain["control_image"]), np.asarray(want))
    label = "invert (from white bg & black line)"
    inverted = settings(
        units({"image": data, "model": "canny", "module": label, "resize_mode": 0}), served=["canny"]
    )
    np.testing.assert_array_equal(
        np.asarray(inverted["control_image"]),
        np.asarray(detected_map(Image.fromarray(255 - np.asarray(photo)), "Just Resize", 64, 64)),
    )


def test_canny_without_opencv_is_refused_in_one_line(monkeypatch):
    import sys

    from sdengine.webui_controlnet import preprocessors

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 fails
    with pytest.raises(InvalidArgumentError, match="pip install opencv-python-headless"):
        settings(units({"image": png(EDGES), "model": "canny", "module": "canny"}))
    assert preprocessors() == ["none", "invert"]


def test_the_module_list_names_the_preprocessors_run_here(controlled):
    pytest.importorskip("cv2")
    server = serve_in_thread(Pipeline.load(controlled, backend="ort", device="cpu"))
    try:
        listed = call(f"http://127.0.0.1:{server.server_address[1]}", "/controlnet/module_list")[1]
    finally:
        server.shutdown()
    assert listed["module_list"] == ["none", "canny", "invert"]


def test_the_server_inpaints_the_box_alone_with_units(controlled):
    from sdengine.server import generation_settings

    rng = np.random.default_rng(9)
    original = rng.random((80, 96, 3)).astype(np.float32)
    mask = np.zeros((80, 96, 3), np.float32)
    mask[30:50, 40:70] = 1.0
    body = {"prompt": "a house", "init_images": [png(original)], "mask": png(mask), "width": 64, "height": 64}
    body |= {"steps": 3, "seed": 4, "denoising_strength": 0.8}
    body["alwayson_scripts"] = units({"image": png(DEPTH), "model": "depth", "weight": 0.7})
    pipe = Pipeline.load(controlled, backend="ort", device="cpu")
    server = serve_in_thread(pipe)
    try:
        status, answer = call(f"http://127.0.0.1:{server.server_address[1]}", "/sdapi/v1/img2img", body)
    finally:
        server.shutdown()
    assert status == 200, answer
    request = generation_settings(body, img2img=True, controlnets=SERVED)
    settings = {k: v for k, v in request.settings.items() if k not in ("prompt", "negative_prompt")}
    direct = pipe("a house", **settings)
    np.testing.assert_allclose(
        pixels(answer["images"][0]), request.inpainting.placement.paste(direct.array)[0], atol=0.5 / 255
    )
