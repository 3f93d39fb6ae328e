"""Every kernel configuration the dispatchers can pick compiles for sm_80 and sm_90a (no GPU needed),
uses tensor-core instructions for its MLP where it should, the step does not spill (but where
catalogue.SPILL_LIMITS says why), the backward stays within its spill ceilings, no loop has spill
traffic (but where catalogue.LOOP_SPILLS_ALLOWED says), and the published models' steps hold their
instruction budgets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from nca_fast.kernels import catalogue


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
    mlps = [r for r in rows if (not r["config"].startswith("finalize/") or "+ps" in r["config"])
            and not any(k in r["config"] for k in ("/perceive_vjp/", "/reduce/"))]  # (no MLP in these)
    assert any(r["config"].startswith(("lppn", "pixel_shuffle")) for r in mlps)  # decode configs too
    for r in mlps:  # wgmma needs 64-row tiles: the step's 32-cell border tiles use mma.sync on Hopper too
        want = "HGMMA" if r["target"] == "sm_90a" and r["cells_per_tile"] >= 64 else "HMMA"
        assert want in r["tensor_core"], r


def test_no_step_spills_beyond_its_limit(report):
    _, rows, _ = report
    steps = [r for r in rows if r["config"].startswith("step/")]
    assert steps
    for r in steps:  # (the limits are set on sm_90a; sm_80's spills are reported)
        if r["target"] == "sm_90a":
            assert r["spill_bytes"] <= catalogue.spill_limit(r), r
        if r["dtype"] != "ieee" and r["model"] in catalogue.PUBLISHED:  # (sm_80: 8 B with a head on the border)
            assert r["spill_bytes"] <= (0 if r["target"] == "sm_90a" else 16), r


def test_no_spill_traffic_in_loops(report):
    """No kernel loads or stores local memory inside its loop (where a spill costs per tile) but those
    that spill by design (catalogue.LOOP_SPILLS_ALLOWED: "ieee", the largest shape class); on sm_80 three
    texture kernels with a pixel-shuffle head have 1-2 such instructions."""
    _, rows, _ = report
    assert any(r["loop_spills"] for r in rows if catalogue.loop_spills_allowed(r))  # (the count sees spills)
    for r in rows:
        if not catalogue.loop_spills_allowed(r):
            assert r["loop_spills"] <= (2 if r["target"] == "sm_80" and "+ps" in r["config"] else 0), r


def test_backward_is_compiled_for_every_model_it_takes(report):
    """The step's backward: each published model in every precision (and the smallest shape class) on
    both targets, its spills within catalogue.BACKWARD_SPILL_LIMITS (none for the smallest models, nor
    for the growing model on sm_90a), and its transposed perception and weight-gradient reduction for
    each, without spills."""
    _, rows, _ = report
    back = [r for r in rows if r.get("kernel") == "step_backward"]
    vjp = [r for r in rows if r.get("kernel") == "perceive_vjp"]
    reduce = [r for r in rows if r.get("kernel") == "reduce_partials"]
    for model in (*catalogue.PUBLISHED, "min-4x16"):
        for target in ("sm_80", "sm_90a"):
            got = {r["dtype"] for r in back if r["model"] == model and r["target"] == target}
            assert got == {"tf32", "ieee", "fp16", "bf16"}, (model, target, got)
            assert any(r["model"] == model and r["target"] == target for r in vjp), (model, target)
            assert any(r["model"] == model and r["target"] == target for r in reduce), (model, target)
    assert all(r["spill_bytes"] == 0 for r in vjp + reduce), vjp + reduce
    for r in back:
        assert r["spill_bytes"] <= catalogue.backward_spill_limit(r), r
        if r["dtype"] != "ieee" and (r["model"] == "min-4x16" or (r["model"] == "growing-16x128"
                                                                  and r["target"] == "sm_90a")):
            assert r["spill_bytes"] == 0, r


def test_tf32_hidden_layer_stays_in_its_registers(report):
    """A TF32 hidden layer reaches the second dot where its accumulator left it (operand.py): the
    published models' interior steps and the pixel-shuffle decoders shuffle nothing per hidden
    value (before: 64 SHFL + 64 FSEL a thread a tile for 128 hidden units; what is left, in the
    growing model's rollout step only, is its alpha pools: the pre-update pool, a maximum across the
    threads that share a cell (4), and the pending window's parts, an OR across them (4 more))."""
    _, rows, _ = report
    tf32 = [r for r in rows if r["target"] == "sm_90a" and (
        r["kernel"] == "step" and r["interior"] and not r["head"] and r["model"] in catalogue.PUBLISHED
        and r["dtype"] in ("tf32", "ieee")
        or r["kernel"] == "pixel_shuffle" and r["dtype"] == "ieee" and not r["config"].endswith("/h0/ieee"))]
    assert len(tf32) >= 8
    for r in tf32:
        assert r["shuffles"] <= (8 if r["model"] == "growing-16x128" and r["phase"] == "rollout" else 0), r


@pytest.mark.skipif(not triton.__version__.startswith("3.9"), reason="budgets are set on triton 3.9's SASS")
def test_budgets(report):
    """Every budget of catalogue.BUDGETS applies to at least one interior step on sm_90a, and holds."""
    _, rows, _ = report
    hits = set()
    for r in rows:
        limits = catalogue.budget(r)
        if r["target"] != "sm_90a" or limits is None:
            continue
        hits.add(limits)
        wi, bars, ctas = limits
        assert r["warp_instructions_per_cell"] <= wi and r["barriers"] <= bars and r["resident_ctas"] >= ctas, r
    assert hits == set(catalogue.BUDGETS.values())


def test_dump_writes_cubins_and_configs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "nca_fast.cli", "kernels", "--target", "sm_90a", "--filter",
                           "step/growing-16x128/fp16/interior", "--dump", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    configs = json.loads((tmp_path / "configs.json").read_text())
    base = "step/growing-16x128/fp16/interior"
    assert {c["name"] for c in configs} == {f"{base}{phase}{loads}" for phase in ("", "/single", "/mask")
                                            for loads in ("", "/prefetch", "/tma")}
    for c in configs:
        assert c["kernel"] == "step" and c["model"] == "growing-16x128" and c["dtype"] == "fp16"
        assert c["loads"] == (c["name"].rsplit("/", 1)[1] if c["name"].endswith(("prefetch", "tma")) else "plain")
        assert c["interior"] is True and c["phase"] in ("rollout", "single")
        assert c["num_warps"] == 4 and c["cells_per_tile"] == 64 and c["shared_bytes"] > 0
        assert (tmp_path / c["cubin"]).read_bytes()[:4] == b"\x7fELF"


def test_register_cap_only_where_measured_free(monkeypatch):
    """config.register_cap: on triton 3.6-3.8 the texture model's TF32 step without a decoder head
    (plain interior loads, or border tiles) is capped at 168 registers, the catalogue compiles the cap
    the launch asks for, and nothing else is capped; on 3.9 nothing is."""
    from nca_fast.kernels import config as kconfig
    tex, grow = catalogue.PUBLISHED["texture-12x96"], catalogue.PUBLISHED["growing-16x128"]
    for release, want in (((3, 6), 168), ((3, 9), None)):
        monkeypatch.setattr(kconfig, "TRITON_RELEASE", release)
        plain, prefetch = kconfig.step_config(tex, "tf32", "plain"), kconfig.step_config(tex, "tf32", "prefetch")
        assert kconfig.register_cap(plain, True) == want and kconfig.register_cap(plain, False) == want
        assert plain.launch_options(True).get("maxnreg") == want
        assert kconfig.register_cap(plain, True, head=True) is None
        assert kconfig.register_cap(prefetch, True) is None and kconfig.register_cap(prefetch, False) == want
        for other in (kconfig.step_config(tex, "fp16"), kconfig.step_config(tex, "ieee"),
                      kconfig.step_config(grow, "tf32")):
            assert kconfig.register_cap(other, True) is None and kconfig.register_cap(other, False) is None
        capped = {c.name: c.maxnreg for c in catalogue.compile_configs() if c.maxnreg}
        if want:
            assert capped["step/texture-12x96/tf32/interior"] == 168 and capped["step/texture-12x96/tf32/border"] == 168
            assert all(n.startswith("step/texture-12x96/tf32/") and "+ps" not in n and "prefetch" not in n
                       and "tma" not in n for n in capped), capped
        else:
            assert not capped
    monkeypatch.setenv("NCA_FAST_REGISTER_CAP", "128")  # (gpu_check's occupancy-against-spills row)
    assert kconfig.step_config(grow, "tf32").launch_options(True)["maxnreg"] == 128
    for bad in ("127", "16", "256", "x", "-8"):
        monkeypatch.setenv("NCA_FAST_REGISTER_CAP", bad)
        with pytest.raises(ValueError, match="NCA_FAST_REGISTER_CAP must be a multiple of 8"):
            kconfig.step_config(grow, "tf32")


DEVICE_TRITON = "3.6.0"  # the device machines' image (README: "GPU"): what a GPU run compiles with
DEVICE_BUDGETS = {"step/growing-16x128/fp16/interior": 30.5, "step/growing-16x128/bf16/interior": 30.5,
                  "step/growing-16x128/tf32/interior": 44}  # (measured: 29.1, 29.3, 42.6)


def test_every_configuration_compiles_with_the_device_images_triton(tmp_path):
    """The GPU that a task may be lent runs triton 3.6 (CI: 3.9): every configuration must compile with
    it too, or the one device call fails at its first kernel. Installs that triton into a folder of its
    own (from the package index; skipped, saying so, where none is reachable) and runs the compile report
    with it first on the path. Its counts differ (the budgets hold for 3.9; here only the growing
    rollout steps' counts, DEVICE_BUDGETS; see benchmarks/results/compile-sm90a-triton3.6-vs-3.9-*.md)."""
    if triton.__version__ == DEVICE_TRITON:
        pytest.skip(f"this is triton {DEVICE_TRITON}: test_every_configuration_compiles covers it")
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                          f"triton=={DEVICE_TRITON}"], capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        pytest.skip(f"triton {DEVICE_TRITON} could not be installed: {pip.stderr.strip()[-300:]}")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(root)]), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "kernels.json"
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert version.stdout.strip() == DEVICE_TRITON, version.stdout + version.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "nca_fast.cli", "kernels", "--target", "sm_80", "--target", "sm_90a",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=3000)
    rows = json.loads(out.read_text())
    failed = [(r["target"], r["config"], r["error"]) for r in rows if not r["ok"]]
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    n = sum(len(c.targets) for c in catalogue.compile_configs())
    assert len(rows) == n
    # What a device run would time: the growing rollout steps, held to their 3.6 counts (sm_90a), so
    # that a change which helps 3.9 alone is seen here (e.g. the Philox draw on four threads a cell
    # without step.PIN_BY_LOOP: fp16 32.4, tf32 46.0).
    wi = {r["config"]: r["warp_instructions_per_cell"] for r in rows if r["target"] == "sm_90a"}
    for config, limit in DEVICE_BUDGETS.items():
        assert wi[config] <= limit, (config, wi[config], limit)
    # ... and the texture TF32 step's register cap (config.register_cap) buys its third CTA for free
    capped = [r for r in rows if r["config"] in ("step/texture-12x96/tf32/interior", "step/texture-12x96/tf32/border")]
    assert len(capped) == 4 and all(r["resident_ctas"] >= 3 and r["spill_bytes"] == 0 for r in capped), capped


def test_integer_arguments_are_never_specialised():
    """Every integer argument of every kernel is in its ``do_not_specialize``: the binary a launch
    compiles is the one reported here whatever the grid, step or batch offset (a value of 1 or a
    multiple of 16 would otherwise compile another, and a rollout's step offsets three)."""
    seen = set()
    for cfg in catalogue.compile_configs():
        ints = {n for n, t in cfg.signature.items() if t in ("i32", "i64")}
        fn = cfg.fn
        names = getattr(fn, "do_not_specialize", None)
        if names is None:  # (the interpreter's function keeps the decorator's arguments)
            names = fn.kwargs.get("do_not_specialize") or ()
        params = list(getattr(fn, "arg_names", None) or fn.fn.__code__.co_varnames)
        free = {n for n in ints if n not in names and params.index(n) not in names}
        assert not free, f"{cfg.name}: integer arguments specialised on their values: {sorted(free)}"
        seen.add(fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__)
    assert {"nca_step_kernel", "nca_finalize_kernel", "nca_step_backward_kernel", "perceive_vjp_kernel",
            "reduce_partials_kernel", "pixel_shuffle_kernel", "lppn_kernel"} <= seen


def test_every_launch_is_a_reported_configuration_compiled_once():
    """``tests/launch_catalogue.py``: every launch of the published models' public paths (steps with
    and without an explicit mask, rollouts, frames, the backward; two grids, step offsets 0-17) is a
    configuration this report compiles — same kernel, warps, stages, register cap, constexprs and argument types —
    and no configuration compiles twice (Triton's own binder, in a process without the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("launch_catalogue.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " 0 problems" in proc.stdout
