"""The device script runs end to end (CPU, Triton interpreter, tiny sizes): a GPU session must not
spend its minutes finding a Python error in it."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == [] and report["correctness"]["masks_bit_identical"]
    assert len(report["correctness"]["step"]) == 8  # growing: 4 precisions; texture, 64x256: tf32, fp16
    assert {r["provider"] for r in report["throughput"]} == {
        "reference", "triton-tf32 rollout", "triton-tf32 step", "triton-fp16 rollout", "triton-fp16 step"}
    assert all(r["compile_s"] >= 0 for r in report["throughput"]) and "compile_s" in report
    assert len(report["decoders"]) == 2
    assert "all checks passed" in (tmp_path / "gpu_check.md").read_text()
