"""Every kernel configuration the dispatchers can pick compiles for sm_80 and sm_90a (no GPU needed),
uses tensor-core instructions for its MLP where it should, and the step keeps its spills small."""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "nca_fast.cli", "kernels", "--target", "sm_80",
                           "--target", "sm_90a", "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=3000)
    print(proc.stdout[-5000:], proc.stderr[-3000:])
    assert out.exists(), proc.stderr[-3000:]
    return proc.returncode, json.loads(out.read_text()), proc.stdout


def test_every_configuration_compiles(report):
    rc, rows, stdout = report
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    assert rc == 0
    for prefix in ("step/", "finalize/"):
        for target in ("sm_80", "sm_90a"):
            assert any(r["config"].startswith(prefix) and r["target"] == target for r in rows)


def test_tensor_core_mlp(report):
    """Every MLP runs on tensor cores (the step's two layers, the decoders' heads and sine layers),
    the fp32-accurate "ieee" variants too (three TF32 passes)."""
    _, rows, _ = report
    mlps = [r for r in rows if not r["config"].startswith("finalize/") or "+ps" in r["config"]]
    assert any(r["config"].startswith(("lppn", "pixel_shuffle")) for r in mlps)  # decode configs too
    for r in mlps:
        want = "HGMMA" if r["target"] == "sm_90a" else "HMMA"
        assert want in r["tensor_core"], r
