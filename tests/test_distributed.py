"""Sharded rollouts on torch.distributed (gloo, CPU processes): bit for bit the single-process
rollout for 2 and 4 ranks, zeros and circular padding, alive and texture models, heights not divisible
by the ranks; sharded checkpoints that resume on another number of ranks; a dead rank stops the others
with an error within the timeout."""
import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nca_fast as nf
from nca_fast.distributed import Layout, block_of, load_rows, row_blocks, sharded_rollout, steps_per_exchange
from nca_fast.distributed import rollout as rollout_module
from nca_fast.distributed.__main__ import main as distributed_main
from nca_fast.distributed.blocks import max_steps_per_exchange

pytest.importorskip("safetensors", reason="sharded states are safetensors files (the formats extra)")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

MODELS = {
    "growing-zeros": nf.growing_spec(channels=8, hidden=16),
    "growing-circular": nf.growing_spec(channels=8, hidden=16, padding="circular"),
    "texture": nf.texture_spec(hidden=24),
}


def _init(rank, world, tmp, timeout=60.0):
    torch.set_num_threads(1)  # (the reference's 1x1 convolutions split their work by thread count)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def _state(spec, B, H, W):
    g = torch.Generator().manual_seed(H * 100 + W)
    x = torch.rand(B, spec.channels, H, W, generator=g) - 0.4
    if spec.alive_channel is not None:
        x[:, spec.alive_channel] = (torch.rand(B, H, W, generator=g) < 0.4).float()
    return x


def _rollout_worker(rank, world, tmp, name, H, W, steps, backend, k, untagged=False):
    try:
        _init(rank, world, tmp)
        if untagged:  # NCCL's matching: a pair of ranks' messages by order, tags ignored
            real = dist.P2POp
            rollout_module.dist.P2POp = lambda op, t, peer, group=None, tag=0: real(op, t, peer, group=group)
        spec = MODELS[name]
        model = nf.NCA(spec, init_seed=5).requires_grad_(False)
        lay = Layout.make(H, W, rank, world, spec.padding == "circular")
        stats = {}
        out = sharded_rollout(model, block_of(_state(spec, 2, H, W), lay), lay, steps, seed=7, start_step=3,
                              backend=backend, steps_per_exchange_=k, stats=stats)
        torch.save({"block": out, "rows": torch.tensor([lay.r0, lay.r1]), "rounds": torch.tensor(stats["rounds"]),
                    "k": torch.tensor(stats["steps_per_exchange"])}, f"{tmp}/rank{rank}.pt")
        dist.destroy_process_group()
    except Exception:
        open(f"{tmp}/error{rank}.txt", "w").write(traceback.format_exc())
        raise


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("world, H, k", [(2, 13, None), (4, 19, 2), (2, 16, 1)])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sharded_rollout_is_the_single_process_rollout(tmp_path, name, world, H, k, backend):
    W, steps = 10, 7
    spec = MODELS[name]
    torch.set_num_threads(1)
    model = nf.NCA(spec, init_seed=5).requires_grad_(False)
    want = model.rollout(_state(spec, 2, H, W), steps, seed=7, start_step=3, backend=backend)
    mp.spawn(_rollout_worker, args=(world, str(tmp_path), name, H, W, steps, backend, k), nprocs=world)
    rows = []
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        r0, r1 = got["rows"].tolist()
        rows.append((r0, r1))
        assert torch.equal(got["block"], want[:, :, r0:r1]), (r, (got["block"] - want[:, :, r0:r1]).abs().max())
        if k is not None:  # (capped where the blocks are too short for k * radius-row halos)
            k_used = min(k, max_steps_per_exchange(spec, H, world))
            assert int(got["k"]) == k_used and int(got["rounds"]) == -(-steps // k_used)
    assert rows == row_blocks(H, world)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the fused path on CPU ranks needs the interpreter")
@pytest.mark.parametrize("name", ["growing-circular", "texture"])
def test_sharded_fused_rollout_matches_the_single_device_one(tmp_path, name):
    """The fused path on each rank (Triton interpreter, CPU processes): the blocks and their halo
    strips step through the fused kernels, which split a strip into interior and border tiles unlike
    the whole grid's, so the result agrees to float tolerance (bit for bit where the kernels are)."""
    world, H, W, steps = 2, 13, 10, 4
    spec = MODELS[name]
    model = nf.NCA(spec, init_seed=5).requires_grad_(False)
    want = model.rollout(_state(spec, 2, H, W), steps, seed=7, start_step=3, backend="triton")
    mp.spawn(_rollout_worker, args=(world, str(tmp_path), name, H, W, steps, "triton", 2), nprocs=world)
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        r0, r1 = got["rows"].tolist()
        torch.testing.assert_close(got["block"], want[:, :, r0:r1], atol=1e-5, rtol=1e-5)


def test_two_circular_ranks_pair_their_halos_by_order_not_tag(tmp_path):
    """2 ranks with circular padding are each other's up and down neighbour; NCCL ignores tags, so the
    halos must pair by the order of the batch: with every tag dropped the result is still bit for bit."""
    name, world, H, W, steps = "growing-circular", 2, 12, 10, 5
    model = nf.NCA(MODELS[name], init_seed=5).requires_grad_(False)
    want = model.rollout(_state(MODELS[name], 2, H, W), steps, seed=7, start_step=3, backend="cpu")
    mp.spawn(_rollout_worker, args=(world, str(tmp_path), name, H, W, steps, "cpu", 2, True), nprocs=world)
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        r0, r1 = got["rows"].tolist()
        assert torch.equal(got["block"], want[:, :, r0:r1]), r


def _cli_worker(rank, world, tmp, argv):
    try:
        _init(rank, world, tmp)
        assert distributed_main(argv) == 0
    except Exception:
        open(f"{tmp}/error{rank}.txt", "w").write(traceback.format_exc())
        raise


def _cli_failing_worker(rank, world, tmp, argv):
    _init(rank, world, tmp)
    assert distributed_main(argv) == 2


def test_cli_checkpoints_resume_on_other_ranks_bit_for_bit(tmp_path, capfd):
    """4 steps on 2 ranks with a checkpoint every 2 (the last step's too); resumed from it on 3 ranks
    to step 8: the single-process rollout's state, bit for bit, the image as one tile per rank. Rerun
    on 2 ranks into the same folder, it leaves no third rank's shard or tile behind; resuming to fewer
    steps than the checkpoint's fails."""
    a = tmp_path / "a"
    base = ["growing", "--size", "14x9", "--seed", "3", "--backend", "cpu", "--out", str(a)]
    a.mkdir()
    for n in range(4):
        (tmp_path / f"r{n}").mkdir()
    mp.spawn(_cli_worker, args=(2, str(tmp_path / "r0"), base + ["--steps", "4", "--checkpoint-every", "2",
                                                                 "--steps-per-exchange", "1"]), nprocs=2)
    assert json.loads((a / "checkpoint" / "index.json").read_text())["step"] == 4
    assert json.loads((a / "run.json").read_text())["rank0_exchange"]["rounds"] == 4  # (both segments')
    mp.spawn(_cli_worker, args=(3, str(tmp_path / "r1"), base + ["--steps", "8", "--resume"]), nprocs=3)
    got, index = load_rows(a / "state", 0, 14)
    model = nf.NCA(nf.growing_spec(name="growing"))
    with torch.no_grad():
        want = model.rollout(model.seed(1, 14, 9), 8, seed=3, backend="cpu")
    assert index["step"] == 8 and json.loads((a / "run.json").read_text())["resumed_from"] == 4
    assert torch.equal(got, want)
    assert sorted(p.name for p in (a / "tiles").iterdir()) == [f"tile-{r:05d}.png" for r in range(3)]
    mp.spawn(_cli_worker, args=(2, str(tmp_path / "r2"), base + ["--steps", "4"]), nprocs=2)
    assert sorted(p.name for p in (a / "tiles").iterdir()) == [f"tile-{r:05d}.png" for r in range(2)]
    assert sorted(p.name for p in (a / "state").iterdir()) == ["index.json"] + [f"shard-{r:05d}.safetensors"
                                                                                 for r in range(2)]
    capfd.readouterr()
    mp.spawn(_cli_failing_worker, args=(1, str(tmp_path / "r3"), base + ["--steps", "3", "--resume"]), nprocs=1)
    assert "is at step 4, beyond --steps 3" in capfd.readouterr().err


def _dying_worker(rank, world, tmp):
    _init(rank, world, tmp, timeout=5.0)
    spec = MODELS["growing-zeros"]
    model = nf.NCA(spec, init_seed=5).requires_grad_(False)
    lay = Layout.make(20, 8, rank, world, False)
    dist.barrier()  # (both connected: gloo's mesh set-up would fail on a peer dying during it instead)
    if rank == 1:
        os._exit(3)  # dies before its first exchange
    t = time.perf_counter()
    try:
        sharded_rollout(model, block_of(_state(spec, 1, 20, 8), lay), lay, 6, backend="cpu")
    except RuntimeError as e:
        open(f"{tmp}/rank0.txt", "w").write(f"{time.perf_counter() - t:.1f} {e}")
        os._exit(0)
    os._exit(1)


def test_a_dead_rank_stops_the_others_within_the_timeout(tmp_path):
    ctx = mp.start_processes(_dying_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    t = time.perf_counter()
    for p in ctx.processes:
        p.join(60)
    assert time.perf_counter() - t < 60 and all(not p.is_alive() for p in ctx.processes)
    assert ctx.processes[0].exitcode == 0 and ctx.processes[1].exitcode == 3
    seconds, message = (tmp_path / "rank0.txt").read_text().split(" ", 1)
    assert float(seconds) < 30 and message


def test_steps_per_exchange_cost_model():
    spec = nf.growing_spec()
    assert steps_per_exchange(spec, 64, 4096, 4) > steps_per_exchange(spec, 16384, 4096, 4)
    assert steps_per_exchange(spec, 64, 40, 4, latency_s=1.0) == 2  # capped: blocks of 10 rows, radius 2
    with pytest.raises(ValueError, match="cannot split 3 rows across 4 ranks"):
        row_blocks(3, 4)


def test_bench_distributed_reports_scaling_and_exchange_volume(tmp_path, capsys):
    from nca_fast import cli

    assert cli.main(["bench", "--distributed", "--ranks", "1", "2", "--sizes", "16", "--repeats", "2",
                     "--out", str(tmp_path), "--name", "d"]) == 0
    report = json.loads((tmp_path / "d.json").read_text())
    assert [r["ranks"] for r in report["strong"]] == [1, 2] and report["weak"][1]["grid"] == "32x16"
    assert report["strong"][0]["halo_bytes_per_step_per_rank"] == 0
    assert report["strong"][1]["halo_bytes_per_step_per_rank"] > 0 and report["strong"][0]["efficiency"] == 1.0
    assert "| weak | 2 | 32x16 |" in capsys.readouterr().out


def test_bad_arguments_fail_before_any_process_group(tmp_path, capsys):
    base = ["growing", "--size", "8x8", "--out", str(tmp_path / "o")]
    for extra, message in ((["--steps", "2", "--checkpoint-every", "0"], "--checkpoint-every"),
                           (["--steps", "-1"], "--steps"), (["--steps", "2", "--timeout", "0"], "--timeout"),
                           (["--steps", "2", "--size", "0x8"], "size")):
        assert distributed_main(base + extra) == 2
        assert message in capsys.readouterr().err
        assert not dist.is_initialized()
    assert not (tmp_path / "o").exists()


def test_shard_inputs_are_checked(tmp_path):
    from nca_fast.utils.files import InputFileError

    model = nf.NCA(MODELS["texture"]).requires_grad_(False)
    lay = Layout.make(10, 6, 0, 2, True)
    with pytest.raises(ValueError, match=r"block must be \[B, C, 5, 6\]"):
        sharded_rollout(model, torch.zeros(1, 12, 4, 6), lay, 1)
    (tmp_path / "index.json").write_text('{"shards": [["../x", 0, 5]]}')
    with pytest.raises(InputFileError, match="not a shard index"):
        load_rows(tmp_path, 0, 5)
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "missing", 0, 5)
