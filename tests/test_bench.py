"""The benchmark suite: providers verified against the reference, a wrong one rejected, the CLI end to end."""
import importlib.util
import json

import pytest
import torch

from nca_fast import bench, cli, reference
from nca_fast.bench import providers as P
from nca_fast.bench import suite, timing
from nca_fast.bench.cases import Case, default_model, realistic_state

HAS_CAX = all(importlib.util.find_spec(m) for m in ("jax", "cax", "flax"))


@pytest.fixture(scope="module", params=["growing", "texture"])
def model(request):
    return default_model(request.param)


def _prepared(name, model, x):
    prov = P.all_providers()[name]
    reason = prov.unavailable(model, x)
    if reason:
        pytest.skip(f"{name}: {reason}")
    return prov.prepare(model, x)


CAX = pytest.param("cax", marks=pytest.mark.skipif(not HAS_CAX, reason="JAX/CAX not installed"))


@pytest.mark.parametrize("name", ["reference", "cpu", "triton-tf32", "triton-fp16", CAX])
def test_provider_equivalent(name, model):
    x = realistic_state(model, 2, 13)  # odd size, batch 2
    runner = _prepared(name, model, x)
    err = P.verify(runner, model, x)
    assert 0 <= err <= P.TOLERANCE[runner.precision]
    y = runner.step(x.to(runner.dtype), 4)
    assert tuple(y.shape[:1]) == (2,) and bool(torch.isfinite(torch.as_tensor(y.tolist())).all())


def test_compile_provider_equivalent():
    model = default_model("growing")
    x = realistic_state(model, 1, 9)
    runner = _prepared("compile", model, x)
    assert P.verify(runner, model, x) <= 1e-4
    assert runner.compile_s and runner.compile_s > 0


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_stochastic_step_is_the_reference_step(name, model):
    """The timed step draws the same Philox mask as the reference: same function, not just same shape."""
    x = realistic_state(model, 2, 11, seed=3)
    runner = _prepared(name, model, x)
    with torch.no_grad():
        want = model.step(x, seed=P.SEED, step=7, backend="reference")
    torch.testing.assert_close(runner.step(x, 7), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["triton-tf32", "triton-fp16"])
def test_fused_rollout_provider_is_the_reference_rollout(name, model):
    """The fused providers time ROLLOUT_STEPS steps per call (step counters k*S ... k*S + S-1)."""
    x = realistic_state(model, 1, 5, seed=3)
    reason = P.all_providers()[name].unavailable(model, x)
    if reason:
        pytest.skip(f"{name}: {reason}")
    runner = _prepared(name, model, x)
    S = runner.steps_per_call
    assert S == P.TritonProvider.ROLLOUT_STEPS
    with torch.no_grad():
        want = model.rollout(x, S, seed=P.SEED, start_step=2 * S, backend="reference")
    tol = 2e-3 if name == "triton-tf32" else 3e-2  # TF32 / fp16 operands, 8 steps
    torch.testing.assert_close(runner.step(x.to(runner.dtype), 2).float(), want, atol=tol, rtol=tol)


class WrongProvider(P.Provider):
    """Deliberately computes something else: the reference with a slightly perturbed first layer."""

    name = "wrong"

    def prepare(self, model, x):
        params = {k: v.detach().clone() for k, v in model.params().items()}
        params["w1"][0, 0] += 0.05
        step = lambda x, mask: reference.step(x, params, model.spec, mask)
        return P.Runner(lambda x, k: step(x, None), step)


def test_wrong_provider_rejected(model):
    x = realistic_state(model, 1, 12)
    with pytest.raises(AssertionError, match="differs from the reference"):
        P.verify(WrongProvider().prepare(model, x), model, x)
    r = suite.run_one(Case("m", 12), model, WrongProvider(), torch.device("cpu"),
                      bench.Settings.for_mode(False, repeats=1), bandwidth=1e10, log=lambda s: None)
    assert r.status == "rejected" and "not equivalent" in r.reason and r.samples_s == []


def test_nan_provider_rejected():
    model = default_model("growing")
    x = realistic_state(model, 1, 8)
    runner = P.Runner(lambda x, k: x, lambda x, mask: torch.full_like(x, float("nan")))
    with pytest.raises(AssertionError):
        P.verify(runner, model, x)


def test_realistic_state_stays_bounded(model):
    x = realistic_state(model, 1, 32, seed=1)
    spec = model.spec
    if spec.alive_channel is not None:
        assert (x[:, spec.alive_channel] > spec.alive_threshold).all()  # fully alive
    assert x.std() > 0.05  # not an easy constant state
    with torch.no_grad():
        y = model.rollout(x, 30, seed=0)
    assert torch.isfinite(y).all() and y.abs().max() < 10
    if spec.alive_channel is not None:
        assert (y[:, spec.alive_channel] > spec.alive_threshold).float().mean() > 0.5


def test_measure_and_memory():
    calls = []
    s = timing.measure(calls.append, device=torch.device("cpu"), sync=lambda: None, warmup=2,
                       min_time=0.0, min_repeats=4, max_repeats=4)
    assert len(s.seconds) == 4 and calls == list(range(6)) and s.min <= s.median <= s.max
    with timing.PeakMemory(torch.device("cpu")) as mem:
        big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    assert mem.bytes is not None and mem.bytes >= big.numel()
    assert timing.rotation_count(1 << 30, torch.device("cpu")) == 1
    assert timing.rotation_count(1 << 10, torch.device("cpu")) == 64


def test_unknown_provider_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown providers"):
        bench.run([], {}, ["nope"], torch.device("cpu"), bench.Settings())
    with pytest.raises(ValueError, match="grid sizes"):
        bench.make_cases(["growing"], [0])


def test_cli_end_to_end(tmp_path, capsys):
    rc = cli.main(["bench", "--sizes", "32", "--repeats", "2", "--device", "cpu", "--out", str(tmp_path),
                   "--providers", "reference,cpu", "--batches", "1", "8"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "reference" in out and "cell-upd/s" in out
    (js,) = tmp_path.glob("*.json")
    report = json.loads(js.read_text())
    assert {"machine", "device", "versions", "results", "settings"} <= set(report)
    assert report["versions"]["torch"] == torch.__version__ and report["device"]["copy_bandwidth_bytes_per_s"] > 0
    cases = {(r["model"], r["size"], r["batch"]) for r in report["results"]}
    assert cases == {("growing", 32, 1), ("growing", 32, 8), ("texture", 32, 1), ("texture", 32, 8)}
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"reference", "cpu"}
    for r in ok:
        assert len(r["samples_s"]) == 2 and r["verify_error"] <= 1e-4 and r["peak_mem_bytes"] > 0
    png = js.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert js.with_suffix(".md").read_text().startswith("# nca-fast bench")
    render = {r["pipeline"]: r for r in report["render"]}
    assert set(render) == {"step", "step+pixel_shuffle", "step+lppn"}
    assert all(r["frames_per_s"] > 0 and r["output"] == "320x192" for r in render.values())
    assert "Rendering at scale 8" in js.with_suffix(".md").read_text()


def test_a_second_run_keeps_the_first_runs_files(tmp_path):
    """The default stem is per device and day: a rerun that day gets -2, -3, ...; --name overwrites."""
    report = {"device": {"type": "cpu", "name": "cpu", "copy_bandwidth_bytes_per_s": 1e10},
              "machine": {"cpu": "x", "cpus_usable": 2, "torch_threads": 2}, "versions": {},
              "nca_fast": "0", "created": "2026-12-02T10:00:00", "results": [], "render": []}
    first = bench.report.write_all(report, tmp_path, plot_png=False)
    second = bench.report.write_all({**report, "created": "2026-12-02T11:00:00"}, tmp_path, plot_png=False)
    assert first["json"].name == "cpu-2core-2026-12-02.json" and second["json"].name == "cpu-2core-2026-12-02-2.json"
    assert json.loads(first["json"].read_text())["created"].endswith("10:00:00")
    (tmp_path / "cpu-2core-2026-12-02-3.png").write_bytes(b"")  # any of the three files claims the stem
    assert bench.report.unused_stem(tmp_path, "cpu-2core-2026-12-02") == "cpu-2core-2026-12-02-4"
    again = bench.report.write_all(report, tmp_path, "cpu-2core-2026-12-02", plot_png=False)
    assert again["json"] == first["json"]


def test_default_providers_include_the_peers():
    """The default run compares what a user would pick instead: eager PyTorch, torch.compile, CAX."""
    assert {"reference", "compile", "cax"} <= set(bench.DEFAULT_CPU_PROVIDERS) <= set(bench.PROVIDER_NAMES)
    assert {"reference", "compile", "cax"} <= set(bench.DEFAULT_GPU_PROVIDERS) <= set(bench.PROVIDER_NAMES)
    assert "cpu" in bench.DEFAULT_CPU_PROVIDERS and any(p.startswith("triton") for p in bench.DEFAULT_GPU_PROVIDERS)


def test_cli_model_file_missing(tmp_path, capsys):
    assert cli.main(["bench", "--model", str(tmp_path / "none.json"), "--sizes", "8"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--sizes", "100000"], "more than the"),
    (["--sizes", "0"], "--sizes must be ints >= 3"),
    (["--train", "--sizes", "0"], "--sizes must be ints >= 3"),
    (["--distributed", "--ranks", "0"], "--ranks must be ints >= 1"),
    (["--device", "foo"], "not a torch device"),
    (["--name", "sub/x"], "a file stem, not a path"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--model-name", "mondrian"], "--model-name needs --model"),
])
def test_bad_arguments_are_refused_before_anything_runs(extra, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["bench", "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # the output folder is made only for a run that starts


def test_train_bench_times_and_compares_loss_curves(tmp_path, capsys):
    """``bench --train`` on a tiny case: the reference, the CPU path and torch.compile side by side with
    equal loss curves (float32 on a CPU), files written. (The fused provider: gpu_check's dry run.)"""
    rc = cli.main(["bench", "--train", "--providers", "reference,cpu,compile", "--sizes", "12", "--batches", "2",
                   "--repeats", "1", "--device", "cpu", "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| reference |" in out and "| compile |" in out and "| cpu |" in out
    report = json.loads((tmp_path / "t.json").read_text())
    rows = {r["provider"]: r for r in report["rows"]}
    assert rows["compile"]["loss_rel_diff"] < 1e-4 and rows["cpu"]["loss_rel_diff"] < 1e-4
    assert rows["reference"]["seconds"] > 0
    assert len(rows["compile"]["losses"]) == 2 and rows["compile"]["losses"][0] > 0
    assert (tmp_path / "t.md").read_text().count("|") > 10
