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
    assert all(v == 0 for k, v in parity.items() if "graph vs eager" in k)
    assert parity["UNet CUDA graphs refused by ONNX Runtime"] == "no"
    assert all(v >= 40 for k, v in parity.items() if "PSNR" in k)
    latency = report["latency"]["2"]
    assert set(latency["backends"]) == {"ort", "torch"}
    assert (out / "gpu_check_2_steps.txt").read_text().startswith("machine:")
