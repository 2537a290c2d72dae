"""TensorRT engine build logic on the CPU: profiles, content keys, reuse/rebuild, load-time refusals.

TensorRT itself is never imported here: the build step takes an injected builder function, and the one
function that calls TensorRT is exercised against a small stand-in module that records the calls.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import types
from dataclasses import asdict
from pathlib import Path

import pytest

from export import trt_build
from export.trt_build import (
    CUDA_MISSING,
    TRT_MISSING,
    PhaseBars,
    add_build_parser,
    build_engines,
    build_serialized_engine,
    check_network_inputs,
    cmd_build,
    compute_capability,
    import_tensorrt,
)
from sdengine.engine_keys import (
    ENGINE_MANIFEST_NAME,
    TIMING_CACHE_NAME,
    BuildEnv,
    EngineEntry,
    EngineManifest,
    ProfileRequest,
    batch_runs,
    check_engine,
    check_unet_fits,
    covering_request,
    engine_key,
    engine_profiles,
    onnx_digest,
    profile_to_json,
    resolve_engine,
)
from sdengine.errors import (
    BackendUnavailableError,
    CorruptModelError,
    InvalidArgumentError,
    ModelDirectoryError,
    SDEngineError,
    UnsupportedConfigError,
)
from sdengine.manifest import file_sha256
from sdengine.model_specs import Architecture

SD15 = Architecture()  # 4 latent channels, 768 hidden, 77 tokens, VAE factor 8
ENV = BuildEnv(trt_version="10.7.0", compute_capability="8.9")


# --- profiles


def test_static_profile_doubles_text_encoder_and_unet_batch_for_guidance():
    unet = engine_profiles(SD15, "unet", ProfileRequest(batch=1, height=512, width=768))
    assert unet == {
        "sample": ((2, 4, 64, 96),) * 3,
        "encoder_hidden_states": ((2, 77, 768),) * 3,
    }  # the scalar timestep has no run-time size and needs no profile
    assert engine_profiles(SD15, "text_encoder", ProfileRequest(batch=3)) == {"input_ids": ((6, 77),) * 3}
    assert engine_profiles(SD15, "vae_decoder", ProfileRequest(batch=3)) == {
        "latent_sample": ((3, 4, 64, 64),) * 3
    }
    no_cfg = engine_profiles(SD15, "unet", ProfileRequest(batch=1, cfg=False))
    assert no_cfg["sample"] == ((1, 4, 64, 64),) * 3


def test_parts_widen_only_the_unet_batch_to_one_copy_per_part_beside_the_negative():
    unet = engine_profiles(SD15, "unet", ProfileRequest(batch=2, parts=3))
    assert unet["sample"] == ((4, 4, 64, 64), (4, 4, 64, 64), (8, 4, 64, 64))  # 2 x 2 ... (1 + 3) x 2
    assert unet["encoder_hidden_states"][2] == (8, 77, 768)
    # the text encoder runs any number of texts in batches it takes; the VAE sees the images alone
    assert engine_profiles(SD15, "text_encoder", ProfileRequest(batch=2, parts=3)) == {
        "input_ids": ((4, 77),) * 3
    }
    assert engine_profiles(SD15, "vae_decoder", ProfileRequest(batch=2, parts=3))["latent_sample"][2][0] == 2
    # without guidance a composable prompt still runs its negative side: 1 ... 1 + parts copies
    assert engine_profiles(SD15, "unet", ProfileRequest(cfg=False, parts=2))["sample"][0::2] == (
        (1, 4, 64, 64),
        (3, 4, 64, 64),
    )
    dynamic = ProfileRequest(batch=2, dynamic=True, min_batch=1, max_batch=3, parts=2)
    assert [shape[0] for shape in engine_profiles(SD15, "unet", dynamic)["sample"]] == [2, 4, 9]
    assert engine_profiles(SD15, "unet", ProfileRequest(parts=1)) == engine_profiles(SD15, "unet")


def test_parts_are_in_the_rebuild_command_and_old_manifests_read_as_one_part():
    assert ProfileRequest(parts=3).cli_args()[-2:] == ["--parts", "3"]
    assert "--parts" not in ProfileRequest().cli_args()
    old = {k: v for k, v in asdict(ProfileRequest()).items() if k != "parts"}  # written before --parts
    assert ProfileRequest(**old).parts == 1


def test_covering_request_moves_a_static_profile_and_widens_a_dynamic_one():
    static = ProfileRequest(batch=1, height=512, width=512)
    assert covering_request(static, batch=2, height=512, width=768, parts=2) == ProfileRequest(
        batch=2, height=512, width=768, parts=2
    )
    assert covering_request(ProfileRequest(parts=4), batch=1, height=512, width=512, parts=2).parts == 4
    dynamic = ProfileRequest(dynamic=True, max_batch=2, min_height=256, max_height=768)
    wider = covering_request(dynamic, batch=3, height=1024, width=512, parts=1)
    assert wider.bounds() == {"batch": (1, 1, 3), "height": (256, 512, 1024), "width": (256, 512, 1024)}
    assert wider.min_height == 256 and wider.dynamic


def _entry(request: ProfileRequest) -> EngineEntry:
    profile = engine_profiles(SD15, "unet", request)
    return EngineEntry(
        component="unet",
        file="unet.0.plan",
        key="0",
        onnx_sha256="0",
        precision="fp16",
        profile=profile_to_json(profile),
        optimization_level=3,
        trt_version=ENV.trt_version,
        compute_capability=ENV.compute_capability,
        request=asdict(request),
        size_bytes=1,
        build_seconds=0.0,
    )


def _fits(request: ProfileRequest, **run) -> str | None:
    run = {"batch": 1, "height": 512, "width": 512, "copies": 2, "parts": 0, **run}
    try:
        check_unet_fits(_entry(request), "engines/sd15", "onnx", SD15, **run)
    except UnsupportedConfigError as error:
        assert "\n" not in str(error)
        return str(error)
    return None


def test_a_run_outside_the_unet_profile_is_refused_with_the_build_that_fits():
    static = ProfileRequest()
    assert _fits(static) is None and _fits(ProfileRequest(parts=2), copies=3, parts=2) is None
    assert _fits(ProfileRequest(parts=2), copies=2, parts=1) is None  # fewer parts fit too
    message = _fits(static, copies=3, parts=2)
    assert "takes 2-2 rows of 512x512 to 512x512 pixels a call" in message
    assert "needs 3 rows (1 image(s) x 3 copies (the negative prompt and 2 parts)) of 512x512" in message
    assert message.endswith(
        "rebuild: sdengine build onnx --output engines/sd15 --components unet --batch 1 --height 512 "
        "--width 512 --parts 2 --optimization-level 3"
    )
    # another size or batch: every engine is rebuilt (the VAE takes the images' batch and size too)
    message = _fits(static, batch=2, height=768)
    assert "needs 4 rows (2 image(s) x 2 copies) of 768x512" in message
    assert "--components" not in message and "--batch 2 --height 768 --width 512" in message
    no_cfg = _fits(ProfileRequest(cfg=False), copies=2)  # guidance on engines built without it
    assert "needs 2 rows" in no_cfg and "--no-cfg" not in no_cfg and "--components" not in no_cfg
    unguided = _fits(static, copies=1)  # guidance 1 on engines built for guidance: not the same build again
    assert "needs 1 rows (1 image(s) x 1 copies)" in unguided and "--no-cfg" in unguided
    assert unguided.endswith("(engines for guidance 1 only; or run with guidance > 1)")
    dynamic = ProfileRequest(dynamic=True, max_batch=2)
    assert _fits(dynamic, batch=2, copies=2) is None
    assert "--dynamic --max-batch 2 --parts 3" in _fits(dynamic, batch=2, copies=4, parts=3)


def test_dynamic_profile_spans_min_opt_max():
    request = ProfileRequest(
        batch=2,
        height=512,
        width=768,
        dynamic=True,
        min_batch=1,
        max_batch=4,
        min_height=256,
        max_height=1024,
        min_width=256,
        max_width=1024,
    )
    unet = engine_profiles(SD15, "unet", request)
    assert unet["sample"] == ((2, 4, 32, 32), (4, 4, 64, 96), (8, 4, 128, 128))
    assert unet["encoder_hidden_states"] == ((2, 77, 768), (4, 77, 768), (8, 77, 768))
    vae = engine_profiles(SD15, "vae_decoder", request)
    assert vae["latent_sample"] == ((1, 4, 32, 32), (2, 4, 64, 96), (4, 4, 128, 128))


def test_dynamic_defaults_widen_to_include_the_optimum():
    vae = engine_profiles(SD15, "vae_decoder", ProfileRequest(batch=6, height=1536, width=128, dynamic=True))
    assert vae["latent_sample"] == ((1, 4, 32, 16), (6, 4, 192, 16), (6, 4, 192, 128))


def test_profiles_follow_the_architecture():
    arch = Architecture(latent_channels=8, text_hidden_size=1024, text_max_length=64, vae_scale_factor=16)
    unet = engine_profiles(arch, "unet", ProfileRequest(batch=1, height=512, width=256))
    assert unet["sample"][1] == (2, 8, 32, 16)
    assert unet["encoder_hidden_states"][1] == (2, 64, 1024)
    inpainting = engine_profiles(Architecture(conditioning_channels=5), "unet", ProfileRequest())
    assert inpainting["sample"][1] == (2, 9, 64, 64)  # latents, mask, masked image latents


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        (dict(height=500), "height must be a positive multiple of 8, got 500"),
        (dict(width=0), "width must be a positive multiple of 8, got 0"),
        (dict(batch=0), "batch must be at least 1, got 0"),
        (dict(dynamic=True, min_batch=0), "min batch must be at least 1, got 0"),
        (dict(dynamic=True, max_width=1020, width=512), "max width must be a positive multiple of 8"),
        (dict(dynamic=True, min_height=768), "need min <= opt <= max for height, got 768 <= 512 <= 1024"),
        (dict(dynamic=True, max_batch=2, batch=3), "need min <= opt <= max for batch, got 1 <= 3 <= 2"),
        (dict(min_batch=1, max_height=1024), "--min-batch, --max-height only apply with --dynamic"),
    ],
)
def test_invalid_profiles_are_refused_in_one_line(request_args, message):
    with pytest.raises(InvalidArgumentError) as info:
        engine_profiles(SD15, "unet", ProfileRequest(**request_args))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_component_is_refused():
    with pytest.raises(InvalidArgumentError, match="unknown component 'safety_checker'"):
        engine_profiles(SD15, "safety_checker")


# --- keys

KEY_INPUTS = dict(
    component="unet",
    onnx_sha256="a" * 64,
    profile=engine_profiles(SD15, "unet"),
    precision="fp16",
    optimization_level=3,
    trt_version="10.7.0",
    compute_capability="8.9",
)


def test_key_is_stable():
    again = dict(KEY_INPUTS, profile={k: tuple(v) for k, v in reversed(KEY_INPUTS["profile"].items())})
    assert engine_key(**KEY_INPUTS) == engine_key(**again)
    assert len(engine_key(**KEY_INPUTS)) == 64


@pytest.mark.parametrize(
    "change",
    [
        dict(onnx_sha256="b" * 64),
        dict(profile=engine_profiles(SD15, "unet", ProfileRequest(height=768))),
        dict(profile=engine_profiles(SD15, "unet", ProfileRequest(cfg=False))),
        dict(profile=engine_profiles(SD15, "unet", ProfileRequest(dynamic=True))),
        dict(precision="fp32"),
        dict(optimization_level=4),
        dict(trt_version="10.8.0"),
        dict(compute_capability="9.0"),
        dict(component="vae_decoder"),
    ],
)
def test_key_changes_with_each_input(change):
    assert engine_key(**{**KEY_INPUTS, **change}) != engine_key(**KEY_INPUTS)


def test_onnx_digest_covers_external_data_but_not_configs(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    model = folder / "model.onnx"
    model.write_bytes(b"graph")
    (folder / "config.json").write_text("{}")
    plain = onnx_digest(model)
    assert plain == file_sha256(model)  # the same digest as the export manifest records
    (folder / "config.json").write_text('{"changed": true}')
    assert onnx_digest(model) == plain
    (folder / "model.onnx.data").write_bytes(b"weights")
    with_data = onnx_digest(model)
    assert with_data != plain
    (folder / "model.onnx.data").write_bytes(b"weights, retrained")
    assert onnx_digest(model) not in (plain, with_data)


# --- build: reuse or rebuild


class FakeBuilder:
    """Stands in for the TensorRT build: records each call and writes a small plan file."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, onnx_path, plan_path, profile, *, optimization_level, timing_cache, progress):
        self.calls.append(
            dict(
                onnx_path=onnx_path,
                plan_path=plan_path,
                profile=profile,
                optimization_level=optimization_level,
                timing_cache=timing_cache,
                progress=progress,
            )
        )
        plan_path.write_bytes(b"plan of " + onnx_path.read_bytes()[:16])
        timing_cache.write_bytes(b"cache")

    @property
    def components(self) -> list[str]:
        return [call["onnx_path"].parent.name for call in self.calls]


@pytest.fixture()
def onnx_dir(onnx_fp32, tmp_path) -> Path:
    copy = tmp_path / "onnx"
    shutil.copytree(onnx_fp32, copy)
    return copy


def _build(onnx_dir, engine_dir, builder, **kwargs):
    kwargs = {"height": 64, "width": 64, "env": ENV, "progress": False, **kwargs}
    return build_engines(onnx_dir, engine_dir, builder=builder, **kwargs)


def test_first_build_names_files_by_key_and_passes_the_timing_cache(onnx_dir, tmp_path):
    engines = tmp_path / "engines"
    builder = FakeBuilder()
    manifest = _build(onnx_dir, engines, builder, optimization_level=2)
    assert builder.components == ["text_encoder", "unet", "vae_decoder"]
    for call in builder.calls:
        assert call["timing_cache"] == engines / TIMING_CACHE_NAME
        assert call["optimization_level"] == 2 and call["progress"] is False
    assert builder.calls[1]["profile"]["sample"][0][0] == 2  # the UNet runs on the guidance-doubled batch
    assert set(manifest.engines) == {"text_encoder", "unet", "vae_decoder"}
    for name, entry in manifest.engines.items():
        assert entry.file == f"{name}.{entry.key[:16]}.plan"
        assert (engines / entry.file).stat().st_size == entry.size_bytes
        assert entry.onnx_sha256 == file_sha256(onnx_dir / name / "model.onnx")
        assert entry.precision == "fp32" and entry.trt_version == "10.7.0"
        assert entry.compute_capability == "8.9"
    assert EngineManifest.read(engines) == manifest
    assert not list(engines.glob("*.partial"))


def test_unchanged_inputs_reuse_and_changed_ones_rebuild(onnx_dir, tmp_path):
    engines = tmp_path / "engines"
    first = _build(onnx_dir, engines, FakeBuilder())

    again = FakeBuilder()
    assert _build(onnx_dir, engines, again) == first
    assert again.calls == []

    unet_onnx = onnx_dir / "unet" / "model.onnx"
    unet_onnx.write_bytes(unet_onnx.read_bytes() + b"\0")
    changed = FakeBuilder()
    after = _build(onnx_dir, engines, changed)
    assert changed.components == ["unet"]
    assert after.engines["unet"].key != first.engines["unet"].key
    assert not (engines / first.engines["unet"].file).exists()  # the stale plan is removed
    assert (engines / after.engines["unet"].file).is_file()
    assert after.engines["vae_decoder"] == first.engines["vae_decoder"]

    level = FakeBuilder()
    _build(onnx_dir, engines, level, optimization_level=5)
    assert level.components == ["text_encoder", "unet", "vae_decoder"]

    other_gpu = FakeBuilder()
    _build(onnx_dir, engines, other_gpu, optimization_level=5, env=BuildEnv("10.7.0", "9.0"))
    assert len(other_gpu.calls) == 3


def test_profile_change_rebuilds_only_what_it_touches(onnx_dir, tmp_path):
    engines = tmp_path / "engines"
    _build(onnx_dir, engines, FakeBuilder())
    no_cfg = FakeBuilder()
    _build(onnx_dir, engines, no_cfg, cfg=False)
    assert no_cfg.components == ["text_encoder", "unet"]  # the VAE decoder's batch is not doubled anyway


def test_building_a_subset_keeps_the_other_entries(onnx_dir, tmp_path):
    engines = tmp_path / "engines"
    first = _build(onnx_dir, engines, FakeBuilder())
    builder = FakeBuilder()
    manifest = _build(onnx_dir, engines, builder, components=["vae_decoder"], height=128)
    assert builder.components == ["vae_decoder"]
    assert manifest.engines["unet"] == first.engines["unet"]
    assert manifest.engines["vae_decoder"].shapes["latent_sample"][1] == (1, 4, 16, 8)


def test_deleted_or_truncated_plan_is_rebuilt(onnx_dir, tmp_path):
    engines = tmp_path / "engines"
    first = _build(onnx_dir, engines, FakeBuilder())
    (engines / first.engines["unet"].file).unlink()
    (engines / first.engines["vae_decoder"].file).write_bytes(b"x")
    builder = FakeBuilder()
    _build(onnx_dir, engines, builder)
    assert builder.components == ["unet", "vae_decoder"]


def test_failed_build_leaves_no_plan_and_keeps_the_manifest(onnx_dir, tmp_path):
    engines = tmp_path / "engines"
    first = _build(onnx_dir, engines, FakeBuilder())

    def failing(onnx_path, plan_path, profile, **kwargs):
        plan_path.write_bytes(b"half a plan")
        raise SDEngineError("TensorRT could not build an engine")

    with pytest.raises(SDEngineError):
        _build(onnx_dir, engines, failing, optimization_level=1)
    assert not list(engines.glob("*.partial"))
    assert EngineManifest.read(engines) == first


def test_build_arguments_are_checked_before_looking_for_tensorrt(onnx_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(InvalidArgumentError, match="height must be a positive multiple of 8"):
        build_engines(onnx_dir, tmp_path / "e", height=60, width=64)
    with pytest.raises(InvalidArgumentError, match="optimization level must be 0 to 5, got 7"):
        build_engines(onnx_dir, tmp_path / "e", optimization_level=7)
    with pytest.raises(InvalidArgumentError, match="unknown component"):
        build_engines(onnx_dir, tmp_path / "e", components=["unet", "refiner"])
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        build_engines(tmp_path / "nowhere", tmp_path / "e")
    with pytest.raises(BackendUnavailableError) as info:
        build_engines(onnx_dir, tmp_path / "e", height=64, width=64)
    assert str(info.value) == TRT_MISSING
    assert not (tmp_path / "e").exists()


# --- TensorRT and cuda-python missing


def test_missing_tensorrt_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError) as info:
        import_tensorrt()
    assert str(info.value) == TRT_MISSING
    assert "pip install 'sdengine[trt]'" in TRT_MISSING and "\n" not in TRT_MISSING


def test_missing_cuda_python_is_one_clear_error(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError) as info:
        compute_capability()
    assert str(info.value) == CUDA_MISSING


def test_compute_capability_reads_major_and_minor(monkeypatch):
    class Err:
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    values = {"major": 8, "minor": 6}
    runtime = types.SimpleNamespace(
        cudaDeviceAttr=types.SimpleNamespace(
            cudaDevAttrComputeCapabilityMajor="major", cudaDevAttrComputeCapabilityMinor="minor"
        ),
        cudaError_t=Err,
        cudaDeviceGetAttribute=lambda attr, device: (Err.cudaSuccess, values[attr]),
    )
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    assert compute_capability() == "8.6"
    runtime.cudaDeviceGetAttribute = lambda attr, device: (Err.cudaErrorNoDevice, 0)
    with pytest.raises(BackendUnavailableError, match="no usable NVIDIA GPU"):
        compute_capability()


# --- loading side: refusing stale, foreign and undocumented engines


@pytest.fixture()
def built(onnx_dir, tmp_path):
    engines = tmp_path / "engines"
    _build(onnx_dir, engines, FakeBuilder())
    return onnx_dir, engines


def test_matching_engine_resolves(built):
    onnx_dir, engines = built
    entry = check_engine(engines, "unet", onnx_dir, env=ENV)
    assert resolve_engine(engines, "unet", onnx_dir, env=ENV) == engines / entry.file
    assert entry.profile_request.height == 64


def _refusal(error_type, engines, onnx_dir, component="unet", env=ENV) -> str:
    with pytest.raises(error_type) as info:
        check_engine(engines, component, onnx_dir, env=env)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_stale_engine_is_refused(built):
    onnx_dir, engines = built
    onnx = onnx_dir / "unet" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    message = _refusal(ModelDirectoryError, engines, onnx_dir)
    assert "stale" in message and str(onnx) in message
    assert f"sdengine build {onnx_dir} --output {engines} --components unet" in message
    assert "--height 64 --width 64" in message


def test_engine_from_other_tensorrt_is_refused(built):
    onnx_dir, engines = built
    message = _refusal(BackendUnavailableError, engines, onnx_dir, env=BuildEnv("10.8.0", "8.9"))
    assert "built with TensorRT 10.7.0, this machine has TensorRT 10.8.0" in message
    assert "rebuild here: sdengine build" in message


def test_engine_for_other_gpu_is_refused(built):
    onnx_dir, engines = built
    message = _refusal(BackendUnavailableError, engines, onnx_dir, env=BuildEnv("10.7.0", "9.0"))
    assert "compute capability 8.9, this GPU has 9.0" in message


def test_missing_or_corrupt_manifest_is_refused(built, tmp_path):
    onnx_dir, engines = built
    (engines / ENGINE_MANIFEST_NAME).write_text("{not json")
    message = _refusal(CorruptModelError, engines, onnx_dir)
    assert "not a valid sdengine engine manifest" in message and "sdengine build" in message
    (engines / ENGINE_MANIFEST_NAME).unlink()
    message = _refusal(ModelDirectoryError, engines, onnx_dir)
    assert "has no engine manifest" in message and f"sdengine build {onnx_dir} --output {engines}" in message
    message = _refusal(ModelDirectoryError, tmp_path / "nowhere", onnx_dir)
    assert "does not exist" in message


def test_missing_component_or_plan_is_refused(built):
    onnx_dir, engines = built
    message = _refusal(ModelDirectoryError, engines, onnx_dir, component="vae_encoder")
    assert "has no vae_encoder engine" in message and "--components vae_encoder" in message
    manifest = EngineManifest.read(engines)
    plan = engines / manifest.engines["unet"].file
    plan.write_bytes(plan.read_bytes()[:-1])
    assert "truncated" in _refusal(CorruptModelError, engines, onnx_dir)
    plan.unlink()
    assert "is missing" in _refusal(ModelDirectoryError, engines, onnx_dir)


def test_hand_edited_entry_is_refused(built):
    onnx_dir, engines = built
    path = engines / ENGINE_MANIFEST_NAME
    data = json.loads(path.read_text())
    data["engines"]["unet"]["trt_version"] = "10.8.0"  # claims another TensorRT without a new key
    path.write_text(json.dumps(data))
    message = _refusal(CorruptModelError, engines, onnx_dir, env=BuildEnv("10.8.0", "8.9"))
    assert "does not match its key" in message
    data["engines"]["unet"]["request"]["colour"] = "blue"
    path.write_text(json.dumps(data))
    assert "not a valid sdengine engine manifest" in _refusal(CorruptModelError, engines, onnx_dir)


def test_check_without_tensorrt_says_so(built, monkeypatch):
    onnx_dir, engines = built
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        check_engine(engines, "unet", onnx_dir)


# --- command line


def _parse(argv):
    parser = argparse.ArgumentParser(prog="sdengine")
    add_build_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_builds_at_the_native_size_and_reuses(onnx_dir, tmp_path, monkeypatch, capsys):
    builder = FakeBuilder()
    monkeypatch.setattr(trt_build, "build_serialized_engine", builder)
    monkeypatch.setattr(trt_build, "detect_build_env", lambda: ENV)
    engines = tmp_path / "engines"
    args = _parse(["build", str(onnx_dir), "--output", str(engines), "--components", "unet,vae_decoder"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "unet: built unet." in out and f"wrote {engines / ENGINE_MANIFEST_NAME}" in out
    entry = EngineManifest.read(engines).engines["unet"]
    assert entry.request["height"] == entry.request["width"] == 64  # the tiny model's native size
    assert builder.components == ["unet", "vae_decoder"]
    assert cmd_build(args) == 0
    assert "unet: unchanged, reusing" in capsys.readouterr().out
    assert len(builder.calls) == 2


def test_cli_flags_reach_the_profile(onnx_dir, tmp_path, monkeypatch):
    builder = FakeBuilder()
    monkeypatch.setattr(trt_build, "build_serialized_engine", builder)
    monkeypatch.setattr(trt_build, "detect_build_env", lambda: ENV)
    argv = ["build", str(onnx_dir), "--output", str(tmp_path / "e"), "--components", "unet", "--dynamic"]
    argv += ["--batch", "2", "--height", "64", "--width", "96", "--min-batch", "1", "--max-batch", "3"]
    argv += ["--min-height", "32", "--max-height", "128", "--min-width", "32", "--max-width", "128"]
    argv += ["--optimization-level", "4", "--no-cfg"]
    args = _parse(argv)
    cmd_build(args)
    (call,) = builder.calls
    assert call["profile"]["sample"] == ((1, 4, 4, 4), (2, 4, 8, 12), (3, 4, 16, 16))
    assert call["optimization_level"] == 4
    builder.calls.clear()
    cmd_build(_parse([*argv, "--parts", "2"]))
    (call,) = builder.calls
    assert call["profile"]["sample"][2] == (9, 4, 16, 16)  # (1 + 2) x max batch 3
    assert EngineManifest.read(tmp_path / "e").engines["unet"].profile_request.parts == 2
    with pytest.raises(InvalidArgumentError, match="--parts must be at least 1, got 0"):
        cmd_build(_parse([*argv, "--parts", "0"]))


def test_cli_explicit_zero_size_is_refused_not_replaced(onnx_dir, tmp_path):
    args = _parse(["build", str(onnx_dir), "--output", str(tmp_path / "e"), "--height", "0"])
    with pytest.raises(InvalidArgumentError, match="height must be a positive multiple of 8, got 0"):
        cmd_build(args)


def test_cli_without_tensorrt_fails_in_one_line(onnx_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    args = _parse(["build", str(onnx_dir), "--output", str(tmp_path / "e")])
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        cmd_build(args)


# --- the TensorRT-calling function, against a stand-in module


def _fake_tensorrt(version, inputs, *, parse_ok=True, result=b"PLAN", cache_ok=True):
    """A stand-in ``tensorrt`` module with the documented names; records what the build did."""
    seen = types.SimpleNamespace()

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            seen.severity = severity

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs = [Tensor(n, s) for n, s in inputs.items()]

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            return self.inputs[index]

    class ParserError:
        def desc(self):
            return "no importer for op Foo"

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            seen.parsed = path
            return parse_ok

        def get_error(self, index):
            return ParserError()

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+"

    class Config:
        def __init__(self):
            self.builder_optimization_level = 3
            self.progress_monitor = None
            self.profiles = []
            self.flags = 0

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return 0

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            seen.ignore_mismatch = ignore_mismatch
            ok = cache_ok or cache.data == b""
            if ok:
                seen.cache = cache
            return ok

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            seen.network = Network(flags)
            return seen.network

        def create_builder_config(self):
            seen.config = Config()
            return seen.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            monitor = config.progress_monitor
            if monitor is not None:
                monitor.phase_start("Building", None, 2)
                monitor.phase_start("Tactics", "Building", 3)
                for step in range(3):
                    seen.keep_going = monitor.step_complete("Tactics", step)
                monitor.phase_finish("Tactics")
                monitor.step_complete("Building", 0)
                monitor.phase_finish("Building")
            return result

    class IProgressMonitor:
        def __init__(self):
            seen.monitor_base_init = True

    module = types.ModuleType("tensorrt")
    module.__version__ = version
    module.Logger, module.Builder, module.OnnxParser = Logger, Builder, OnnxParser
    module.IProgressMonitor = IProgressMonitor
    module.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    module.seen = seen
    return module


def _network_inputs(arch, component):
    spec = arch.specs()[component]
    return {t.name: tuple(-1 if isinstance(d, str) else d for d in t.dims) for t in spec.inputs}


@pytest.mark.parametrize(("version", "flags"), [("10.7.0", 1 << 1), ("11.1.0", 0)])
def test_trt_build_function_sets_up_a_strongly_typed_profiled_build(tmp_path, monkeypatch, version, flags):
    profile = engine_profiles(SD15, "unet", ProfileRequest(dynamic=True))
    trt = _fake_tensorrt(version, _network_inputs(SD15, "unet"))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    (tmp_path / "unet").mkdir()
    onnx, plan, cache = tmp_path / "unet" / "model.onnx", tmp_path / "unet.plan", tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    build_serialized_engine(onnx, plan, profile, optimization_level=5, timing_cache=cache, progress=True)
    seen = trt.seen
    assert seen.network.flags == flags  # TensorRT 10: STRONGLY_TYPED; 11: always strongly typed
    assert seen.parsed == str(onnx)
    assert seen.config.builder_optimization_level == 5
    assert seen.config.flags == 0  # no fp16/tf32 builder flags: precision comes from the ONNX types
    (opt_profile,) = seen.config.profiles
    assert opt_profile.shapes == profile
    assert seen.ignore_mismatch is False
    assert seen.monitor_base_init and seen.keep_going is True
    assert plan.read_bytes() == b"PLAN"
    assert cache.read_bytes() == b"old+"  # the timing cache was loaded and written back


def test_trt_build_function_replaces_a_foreign_timing_cache(tmp_path, monkeypatch):
    trt = _fake_tensorrt("10.7.0", _network_inputs(SD15, "vae_decoder"), cache_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    profile = engine_profiles(SD15, "vae_decoder")
    build_serialized_engine(
        tmp_path / "model.onnx",
        tmp_path / "p",
        profile,
        optimization_level=3,
        timing_cache=cache,
        progress=False,
    )
    assert trt.seen.config.progress_monitor is None
    assert cache.read_bytes() == b"+"


def test_trt_build_function_reports_parse_and_build_failures(tmp_path, monkeypatch):
    profile = engine_profiles(SD15, "vae_decoder")
    inputs = _network_inputs(SD15, "vae_decoder")
    kwargs = dict(optimization_level=3, timing_cache=tmp_path / "c", progress=False)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.7.0", inputs, parse_ok=False))
    with pytest.raises(CorruptModelError, match="TensorRT cannot parse .*no importer for op Foo"):
        build_serialized_engine(tmp_path / "model.onnx", tmp_path / "p", profile, **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.7.0", inputs, result=None))
    with pytest.raises(SDEngineError, match="TensorRT could not build an engine"):
        build_serialized_engine(tmp_path / "model.onnx", tmp_path / "p", profile, **kwargs)
    assert not (tmp_path / "p").exists() and not (tmp_path / "c").exists()
    wrong = dict(inputs, latent_sample=(-1, 4, -1))
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.7.0", wrong))
    with pytest.raises(CorruptModelError, match="input latent_sample has rank 3, sdengine expects 4"):
        build_serialized_engine(tmp_path / "model.onnx", tmp_path / "p", profile, **kwargs)


def test_network_inputs_must_match_the_profile():
    profile = engine_profiles(SD15, "unet")
    inputs = _network_inputs(SD15, "unet")
    check_network_inputs(Path("m.onnx"), inputs, profile)
    with pytest.raises(CorruptModelError, match="has no input encoder_hidden_states"):
        check_network_inputs(Path("m.onnx"), {"sample": (-1, 4, -1, -1), "timestep": ()}, profile)
    with pytest.raises(CorruptModelError, match="input timestep has run-time dimensions"):
        check_network_inputs(Path("m.onnx"), {**inputs, "timestep": (-1,)}, profile)


def test_phase_bars_follow_tensorrt_phases():
    out = io.StringIO()
    bars = PhaseBars("unet", file=out)
    bars.phase_start("Building engine", None, 2)
    bars.phase_start("Timing", "Building engine", 4)
    assert bars._bars["Timing"].pos in (1, -1)  # nested below its parent
    for step in range(4):
        assert bars.step_complete("Timing", step) is True
    assert bars._bars["Timing"].n == 4
    bars.phase_finish("Timing")
    assert "Timing" not in bars._bars
    bars.step_complete("Building engine", 1)
    assert bars._bars["Building engine"].n == 2
    bars.close()
    assert "unet: Building engine" in out.getvalue()
    bars.cancelled = True
    assert bars.step_complete("anything", 0) is False


@pytest.mark.parametrize(
    ("rows", "low", "high", "runs"),
    [
        (2, 2, 2, [(0, 2, 2)]),  # a static engine for one image with guidance: its two texts at once
        (3, 2, 2, [(0, 2, 2), (2, 3, 2)]),  # an edited prompt's third text, padded to the engine's two
        (1, 2, 2, [(0, 1, 2)]),  # one text (a weighted prompt's empty one), padded
        (9, 1, 4, [(0, 4, 4), (4, 8, 4), (8, 9, 1)]),  # a dynamic engine: runs of up to four
    ],
)
def test_texts_run_in_batches_the_engine_takes(rows, low, high, runs):
    assert batch_runs(rows, low, high) == runs
    assert all(low <= size <= high and stop - start <= size for start, stop, size in runs)
    with pytest.raises(ValueError, match="need 1 <= low <= high"):
        batch_runs(rows, 3, 2)
