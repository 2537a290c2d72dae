"""The benchmark end to end on the tiny checkpoint (a smoke test of the machinery, not a timing)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench import REPORT_STAGES, stage_totals_ms, summarise
from sdengine.backends.select import detect
from sdengine.cli import main


def tiny_run(model, *, runs: int, warmup: int) -> list[str]:
    """``sdengine bench`` on ``model`` at 64x64, 2 steps, on the CPU."""
    size = ["--steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]
    return ["bench", str(model), "--runs", str(runs), "--warmup", str(warmup), *size]


def test_bench_reports_every_stage_against_the_baseline(onnx_fp32, tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = main([*tiny_run(onnx_fp32, runs=2, warmup=1), "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    table = capsys.readouterr().out
    assert "speed-up over the torch baseline" in table and "PSNR vs torch" in table
    report = json.loads(out_json.read_text())
    assert set(report["backends"]) == {"ort", "torch"}
    assert report["machine"]["cores"] and report["matmul_gflops"] > 0
    assert set(report["flops_per_call"]) == {"text_encoder", "unet", "vae_decode"}
    ort = report["backends"]["ort"]
    assert set(ort["stages_ms"]) == set(REPORT_STAGES)
    assert len(ort["raw_runs_ns"]) == 2 and len(ort["warmup_total_ms"]) == 1
    assert ort["unet_calls_per_run"] == 3  # PNDM: steps + 1 model calls
    assert ort["psnr_vs_torch_db"] >= 40
    assert (
        ort["speedup_vs_torch"]["total"] > 0 and report["backends"]["torch"]["speedup_vs_torch"]["total"] == 1
    )
    assert out_png.stat().st_size > 0


def test_summary_arithmetic():
    ms = 1_000_000
    run = {
        "text_encoder": [2 * ms],
        "unet": [10 * ms, 10 * ms],
        "step": [ms, ms],
        "step_call": [11 * ms] * 2,
        "denoise": [23 * ms],
        "vae_decode": [5 * ms],
        "total": [40 * ms],
    }
    totals = stage_totals_ms(run)
    assert totals["other"] == pytest.approx(40 - 2 - 22 - 5)
    summary = summarise(
        {"runs": [run, run], "warmup": [], "load_s": 1.0, "peak_rss_mb": 1.0},
        {"text_encoder": 2e9, "unet": 1e9, "vae_decode": 5e9},
        peak_gflops=10.0,
    )
    assert summary["host_overhead_per_step_ms"]["median"] == pytest.approx(11 / 2)
    assert summary["gflops_per_s"]["unet"] == pytest.approx(2 * 1e9 / 0.020 / 1e9)
    assert summary["fraction_of_matmul_peak"]["vae_decode"] == pytest.approx(5e9 / 0.005 / 1e9 / 10)


@pytest.mark.parametrize("preset", ["sd15-512", "sdxl-1024"])
def test_gpu_preset_without_a_gpu_is_one_line(capsys, preset):
    if detect(torch_cuda=False).ort_cuda:
        pytest.skip("this machine has a CUDA GPU")
    assert main(["bench", preset]) == 1
    err = capsys.readouterr().err.strip()
    assert "runs on a CUDA GPU" in err and "\n" not in err


def test_host_overhead_benchmark_runs_the_real_step(capsys):
    from benchmarks.host_overhead import main as host_overhead

    assert host_overhead(["--steps", "5", "--runs", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("us/step") == 4 and "not included" in out


def test_bench_runs_pag_and_seamless_exports_against_the_same_baseline(tiny_checkpoint, tmp_path, capsys):
    """The baseline perturbs the export's layers with diffusers' PAG pipelines and wraps its convolutions
    as the export does: the images agree as closely as any other run's."""
    from export.onnx_export import export_checkpoint

    onnx = tmp_path / "onnx"
    components = ["text_encoder", "unet", "vae_decoder"]
    export_checkpoint(
        tiny_checkpoint, onnx, components=components, pag_layers=["down_blocks.1"], seamless=True
    )
    out = tmp_path / "r.json"
    assert main([*tiny_run(onnx, runs=1, warmup=0), "--pag-scale", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["backends"]["ort"]["psnr_vs_torch_db"] >= 40 and report["flops_per_call"] == {}
    assert main(["bench", "tiny", "--pag-scale", "3"]) == 1
    assert "the presets have none" in capsys.readouterr().err
