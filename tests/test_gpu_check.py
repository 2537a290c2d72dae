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
    # 3 schedulers, image to image, inpainting, prompt editing, hires fix, LoRA, ControlNet, IP-Adapter,
    # fp16, fp16 with PyTorch's CPU noise; SDXL alone, in fp16 and refined
    assert len(psnr_rows) == 15 and all(v >= 40 for v in psnr_rows)
    assert set(report["latency"]["2"]["backends"]) == {"ort", "torch"}
    assert set(report["latency"]["2-ort-graphs"]["backends"]) == {"ort"}
    assert (out / "gpu_check_2_steps.txt").read_text().startswith("machine:")
    assert (out / "gpu_check_2_ort_graphs_steps.txt").is_file()
