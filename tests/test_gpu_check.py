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
    variants = [r["loads"] for r in report["interior_loads"] if r["dtype"] == "tf32"]
    assert variants == ["plain", "prefetch", "tma", "plain@128"], variants
    assert all(r["bit_identical_to_plain"] for r in report["interior_loads"])
    pre = report["precompile"]  # (the warm-up ran one task of each kind, in worker processes)
    assert {r["task"].split("/")[0] for r in pre["tasks"]} == {"forward", "backward", "decode", "masks"}
    assert pre["errors"] == [] and pre["workers"] == 2
    assert "all checks passed" in (tmp_path / "gpu_check.md").read_text()


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # (defines functions only; nothing runs at import)
    return module


def test_a_section_that_raises_does_not_cost_the_others(tmp_path):
    """One device call: a failing section is recorded (and fails the run), the next still runs, the
    report is on disk after every section, and sections past the deadline are listed, not run."""
    gc = _gpu_check_module()
    ran = []

    def section(name, fails=False):
        def fn():
            ran.append(name)
            if fails:
                raise RuntimeError(f"{name} broke")
            report[f"{name}_rows"] = [{"ok": True}]
        return name, fn

    def on_disk():
        return json.loads((tmp_path / "gpu_check.json").read_text())

    report = {"device": "test", "date": "today", "torch": "t", "triton": "t"}
    gc.run_sections(report, [section("correctness"), section("throughput", fails=True), section("training")],
                    tmp_path)
    assert ran == ["correctness", "throughput", "training"]
    saved = on_disk()
    assert saved["errors"][0]["section"] == "throughput" and "throughput broke" in saved["errors"][0]["traceback"]
    assert saved["failures"] == ["throughput raised RuntimeError: throughput broke"] and "training_rows" in saved
    assert "throughput raised" in (tmp_path / "gpu_check.md").read_text()

    report = {"device": "test", "date": "today", "torch": "t", "triton": "t", "deadline": 0.0, "deadline_s": 0.0}
    ran.clear()
    gc.run_sections(report, [section("correctness"), section("training")], tmp_path)
    assert ran == [] and on_disk()["skipped"] == ["correctness", "training"] and on_disk()["failures"] == []
    assert "Not run" in (tmp_path / "gpu_check.md").read_text()
