"""The prepared GPU check, rehearsed on the CPU: the script must not waste a lent GPU's minutes on a bug."""

from __future__ import annotations

import json

from benchmarks.gpu_check import main


def test_gpu_check_rehearsal_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    code = main(
        ["--rehearse", "--steps", "2", "--runs", "1", "--out", str(out), "--work", str(tmp_path / "w")]
    )
    assert code == 0
    report = json.loads((out / "gpu_check.json").read_text())
    parity = report["parity"]
    graph_rows = [v for k, v in parity.items() if "graphs vs no graphs" in k]
    assert len(graph_rows) == 6 and all(v == 0 for v in graph_rows)
    assert parity["step graphs refused"] == parity["ort graphs refused"] == "no"
    psnr_rows = [v for k, v in parity.items() if "PSNR" in k]
    # 3 schedulers, image to image, inpainting, prompt editing, composable prompts, adaptive projected
    # guidance, Align Your Steps' sigmas, hires fix, LoRA, ControlNet, IP-Adapter, perturbed-attention
    # guidance, inpainting from latent noise, a tiny VAE and its previews, DeepCache, FreeU (fp16), fp16, fp16
    # with PyTorch's CPU noise; SDXL alone, in fp16 and refined
    assert len(psnr_rows) == 24 and all(v >= 40 for v in psnr_rows)
    # the float32 draws that sdengine's PyTorch CPU noise reproduces are the float16 ones on this torch
    assert parity["torch's CPU randn: float16 draws vs float32 draws, max |diff|"] == 0
    assert set(report["latency"]["2"]["backends"]) == {"ort", "torch"}
    assert set(report["latency"]["2-ort-graphs"]["backends"]) == {"ort"}
    assert (out / "gpu_check_2_steps.txt").read_text().startswith("machine:")
    assert (out / "gpu_check_2_ort_graphs_steps.txt").is_file()


def test_a_failing_row_is_recorded_as_one_line_and_the_next_still_runs():
    from benchmarks.gpu_check import attempt

    def broken() -> float:
        raise RuntimeError("CUDA failure 700: an illegal memory access\nmore detail")

    results: dict = {}
    attempt(results, "broken", broken)
    attempt(results, "fine", lambda: 42.0)
    assert results == {
        "broken": "failed: RuntimeError: CUDA failure 700: an illegal memory access",
        "fine": 42.0,
    }


def test_prepare_reuses_a_finished_background_preparation(tmp_path, monkeypatch):
    import benchmarks.gpu_check as gpu_check

    (tmp_path / "tiny-fp16.done.json").write_text(json.dumps({"unet": 3.5}))
    monkeypatch.setattr("export.checkpoint.write_random_checkpoint", lambda *a, **k: 1 / 0)  # never called
    ckpt, onnx_dir, export_s = gpu_check.prepare(tmp_path, "tiny")
    assert (ckpt, onnx_dir, export_s) == (tmp_path / "tiny", tmp_path / "tiny-fp16", {"unet": 3.5})


def test_prepare_makes_what_a_dead_background_process_left_and_the_checkpoint_once(tmp_path, monkeypatch):
    import benchmarks.gpu_check as gpu_check

    (tmp_path / "tiny-fp16-cuda.pid").write_text("999999999")  # no such process
    made, exported = [], []
    monkeypatch.setattr("export.checkpoint.write_random_checkpoint", lambda path, *a, **k: made.append(path))

    class Manifest:
        components = {"unet": type("R", (), {"export_seconds": 1.0})()}

    def export(ckpt, out, **kwargs):
        exported.append((out.name, kwargs["target"]))
        return Manifest()

    monkeypatch.setattr("export.onnx_export.export_checkpoint", export)
    assert gpu_check.prepare(tmp_path, "tiny", "cuda") == (
        tmp_path / "tiny",
        tmp_path / "tiny-fp16-cuda",
        {"unet": 1.0},
    )
    assert gpu_check.prepare(tmp_path, "tiny")[2] == {"unet": 1.0}
    assert made == [tmp_path / "tiny"]  # one checkpoint for both targets
    assert exported == [("tiny-fp16-cuda", "cuda"), ("tiny-fp16", "portable")]
    assert not list(tmp_path.glob("*.pid"))
    assert json.loads((tmp_path / "tiny-fp16-cuda.done.json").read_text()) == {"unet": 1.0}


def test_with_the_fused_part_its_export_leads_the_latency_runs_and_the_extras_follow_the_headline(
    tmp_path, monkeypatch
):
    """The order a lent GPU's minutes go in, with the exports and the timing replaced."""
    import argparse

    import benchmarks.gpu_check as gpu_check
    from sdengine.backends.select import Availability

    def prepare(work, preset, target="portable"):
        return work / preset, work / f"{preset}-{target}", {"unet": 1.0}

    runs = []

    def run_benchmark(config, flops):
        runs.append((config.onnx_dir.name, config.steps, config.backends, config.graphs, config.cuda_options))
        if config.steps == 20:
            raise RuntimeError("out of memory")  # recorded; the next run still goes
        return {"backends": {}}

    monkeypatch.setattr(gpu_check, "prepare", prepare)
    monkeypatch.setattr(gpu_check, "stage_flops", lambda *a, **k: {})
    monkeypatch.setattr(gpu_check, "run_benchmark", run_benchmark)
    monkeypatch.setattr(gpu_check, "format_report", lambda result: "table")
    report: dict = {"latency": {}}
    order = []
    args = argparse.Namespace(rehearse=False, steps="50,20", runs=3)
    parts = {"fused", "latency", "ort-graphs"}
    gpu_check.latencies(
        args,
        parts,
        tmp_path,
        "sd15",
        512,
        "cuda",
        Availability(ort_cuda=True),
        report,
        tmp_path,
        lambda: order.append(len(runs)),
    )
    assert runs == [
        ("sd15-cuda", 50, ("ort", "torch"), "step", ()),
        ("sd15-cuda", 20, ("ort", "torch"), "step", ()),
        ("sd15-portable", 50, ("ort",), "step", ()),
        ("sd15-portable", 50, ("ort",), "step", ("prefer_nhwc=1",)),
        ("sd15-portable", 50, ("ort",), "ort", ()),
    ]
    assert order == [1]  # the other parity rows right after the headline
    assert list(report["latency"]) == ["50-fused", "20-fused", "50", "50-nhwc", "50-ort-graphs"]
    assert report["latency"]["20-fused"] == {"failed": "failed: RuntimeError: out of memory"}
    assert report["export_s_fused"] == {"unet": 1.0}
