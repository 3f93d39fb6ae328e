"""The CPU fast path that ``backend='auto'`` runs for float32 states on a CPU.

Same contract as :func:`nca_fast.reference.step` (and tested against it), reorganised for a CPU's
caches and cores instead of written for clarity:

* The grid is cut into bands of whole rows (``BAND_CELLS`` cells) whose working set stays in the
  cache. A band is copied once into a padded scratch ``[F, C, rows+2, W+2]`` (slot of the identity
  filter: the band itself; other slots: the other filters, by shifted multiply-adds, separable ones
  in two 1-D passes), and run through the MLP as two matmuls in channels-first layout
  (``[hidden, F*C] @ [F*C, n]``, then ``[C, hidden] @ [hidden, n]``) over the padded width: the
  identity filter costs no copy, the two pad columns cost 2/(W+2) more arithmetic, and the update
  comes out in the layout of the state, added, masked and clamped straight into the output's rows.
* Without a perception clamp, filter scales move into the columns of ``w1`` (perception is linear),
  so that each 1-D pass has a unit coefficient and needs one fewer op.
* Bands run on a persistent pool of Python threads, one per torch thread, whose torch ops are
  single-threaded: torch ops release the GIL, so the threads compute in parallel, with no OpenMP
  fork/join per op (for a band's small ops that overhead costs more than the arithmetic, and on a
  loaded machine each join waits for a descheduled thread). Threads take the next band from a
  shared counter, so a core slowed by other work takes fewer bands. A grid of at most
  ``POOL_BANDS_PER_THREAD`` bands a thread runs on the calling thread instead (see there).
* The alive mask of a band needs its neighbours' new rows: each band leaves the row max of its new
  alive channel in a shared plane, and is finished (masked) by whichever thread completes the last
  of the three bands it depends on, while the band is still in cache.
* Scratch tensors belong to the thread and are kept between steps; a step allocates its output
  (unless given ``out``; a large one on transparent huge pages) and, for alive models, two
  single-channel planes.

The eager reference allocates ``[B, hidden, H, W]`` and ``[B, F*C, H, W]`` every step; for large grids
glibc serves those by ``mmap`` and the kernel zero-fills every page again, which alone costs more than
the arithmetic. Banding keeps every intermediate small and hot.
"""
from __future__ import annotations

import functools
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from . import reference
from .spec import Filter, NCASpec

# Cells per band. A band's working set is ~250 floats per cell for the growing model (padded input
# and perception, hidden, update): ~16 MiB at 16384 cells, in L3, while the ~20 Python-dispatched ops
# of a band stay small next to its arithmetic (~4 ms per band per core). Measured on a 2-core Xeon
# (2 MiB L2 per core): 16384 cells beat 4096 by 1.3-1.5x from 128^2 to 1024^2, and 32768 or more.
BAND_CELLS = 16384
# The worker pool takes a grid only when it has more than this many bands' cells a thread; a
# smaller one runs on the calling thread, whose large ops (the GEMMs) torch spreads over the cores
# itself. The workers run Python between a band's ops, which needs the GIL, and each contended
# hand-over waits for a thread to wake. Measured on 2 cores (2026-12-01, the two interleaved): the
# calling thread 1.0-1.35x faster from 64^2 to 256^2 (96^2: 2.50 against 3.46 ms; 8 x 64^2 1.1x),
# the pool 1.02-1.11x faster from 320^2 and 8 x 128^2 up.
POOL_BANDS_PER_THREAD = 2
# Worker threads; None: as many as torch's intra-op threads (torch.set_num_threads).
THREADS: Optional[int] = None

_local = threading.local()


# ---- perception, compiled once per filter bank ----------------------------------------------------
class _Pass(NamedTuple):
    """``dst = sum(coef * src shifted by (dy, dx))`` over ``terms = ((dy, dx, coef), ...)``."""
    terms: Tuple[Tuple[int, int, float], ...]


class _FilterPlan(NamedTuple):
    kind: str  # "input": the padded band itself; "zero"; "separable": vertical then horizontal; "taps"
    passes: Tuple[_Pass, ...]
    scale: float  # this slot holds filter(x) / scale; w1's columns are multiplied by it


def _unit_first(terms, free_scale: bool):
    """Order terms so that a unit coefficient comes first (``out = a + k*b`` is then one op); with
    ``free_scale``, divide by the largest coefficient to make one. Returns (terms, divisor)."""
    g = max((t[2] for t in terms), key=abs) if free_scale else 1.0
    return tuple(sorted(((dy, dx, c / g) for dy, dx, c in terms), key=lambda t: t[2] != 1.0)), g


@functools.lru_cache(maxsize=32)
def _compile_filters(filters: Tuple[Filter, ...], free_scale: bool) -> Tuple[int, Tuple[_FilterPlan, ...]]:
    """Per filter, how to compute its slot; and the slot of the padded input (``len(filters)`` when
    no filter is the identity, an extra slot outside the matmul)."""
    plans, input_slot = [], len(filters)
    for f, filt in enumerate(filters):
        t = filt.taps
        nz = [(r - 1, c - 1, v) for r in range(3) for c in range(3) if (v := t[r][c]) != 0.0]
        if not nz:
            plans.append(_FilterPlan("zero", (), 1.0))
            continue
        if (input_slot == len(filters) and len(nz) == 1 and nz[0][:2] == (0, 0)
                and (free_scale or nz[0][2] == 1.0)):
            input_slot = f
            plans.append(_FilterPlan("input", (), nz[0][2]))
            continue
        # rank one: taps[r][c] == col[r] * row[c] (exactly, up to rounding)
        pr, pc = max(((r, c) for r in range(3) for c in range(3)), key=lambda rc: abs(t[rc[0]][rc[1]]))
        col = [t[r][pc] for r in range(3)]
        row = [t[pr][c] / t[pr][pc] for c in range(3)]
        scale = max(abs(v) for _, _, v in nz)
        if all(abs(col[r] * row[c] - t[r][c]) <= 1e-12 * scale for r in range(3) for c in range(3)):
            vert, gv = _unit_first(tuple((r - 1, 0, v) for r, v in enumerate(col) if v), free_scale)
            hori, gh = _unit_first(tuple((0, c - 1, v) for c, v in enumerate(row) if v), free_scale)
            plans.append(_FilterPlan("separable", (_Pass(vert), _Pass(hori)), gv * gh))
        else:
            taps, g = _unit_first(tuple(nz), free_scale)
            plans.append(_FilterPlan("taps", (_Pass(taps),), g))
    return input_slot, tuple(plans)


def hidden_range(spec: NCASpec) -> Tuple[float, Optional[float]]:
    """relu then clamp(lo, hi) is one clamp(max(lo, 0), hi), for any lo <= hi: its bounds."""
    hc = spec.hidden_clamp
    return (0.0, None) if hc is None else (max(hc[0], 0.0), hc[1])


def _lincomb(out: torch.Tensor, srcs: Sequence[torch.Tensor], coefs: Sequence[float]) -> None:
    """``out = sum(coef * src)``; the first coefficient 1 saves one op (see :func:`_unit_first`)."""
    if coefs[0] == 1.0 and len(srcs) > 1:
        torch.add(srcs[0], srcs[1], alpha=coefs[1], out=out)
        rest = 2
    else:
        out.copy_(srcs[0]) if coefs[0] == 1.0 else torch.mul(srcs[0], coefs[0], out=out)
        rest = 1
    for s, c in zip(srcs[rest:], coefs[rest:]):
        out.add_(s, alpha=c)


class _BandScratch:
    """One thread's scratch tensors for bands of ``rows`` rows of width ``W``, with every view a band
    needs made once: per band only the views into the state and the output are new."""

    def __init__(self, C: int, W: int, rows: int, hidden: int, input_slot: int,
                 plans: Tuple[_FilterPlan, ...], dtype, device):
        F, Wp = len(plans), W + 2
        n = rows * Wp  # matmul columns: the band's rows over the padded width
        # zeros: the pad columns of the filter slots are never written and must be finite
        self.slots = torch.zeros(max(F, input_slot + 1), C, rows + 2, Wp, dtype=dtype, device=device)
        self.padded = self.slots[input_slot]  # [C, rows+2, W+2]: rows r0-1 .. r1 of the band
        self.inner = self.padded[:, 1:rows + 1, 1:W + 1]  # the band itself, [C, rows, W]
        self.p = self.slots[:F].view(F * C, (rows + 2) * Wp)[:, Wp:(rows + 1) * Wp]  # [F*C, n]
        self.h = torch.empty(hidden, n, dtype=dtype, device=device)
        self.dx = torch.empty(C, n, dtype=dtype, device=device)
        self.dx_inner = self.dx.view(C, rows, Wp)[:, :, 1:W + 1]  # [C, rows, W]
        # the perception clamp skips the pad columns, which must keep the padding
        self.p_inner = self.p.view(F * C, rows, Wp)[:, :, 1:W + 1]
        # alive pools: the alive channel of the new rows with padded columns (-inf: ignored cells)
        self.alive_row = torch.full((rows, Wp), float("-inf"), dtype=dtype, device=device)
        self.pool_tmp = torch.empty(rows, Wp, dtype=dtype, device=device)
        self.pool = torch.empty(rows, W, dtype=dtype, device=device)
        self.alive_pad = torch.full((1, rows + 2, Wp), float("-inf"), dtype=dtype, device=device)
        tmp = torch.empty(C, rows, Wp, dtype=dtype, device=device)  # a separable filter's 1st pass

        def shifted(src, dy, dx, r, w):  # [C, r, w] window of src at offset (1+dy, 1+dx)
            return src[:, 1 + dy: 1 + dy + r, 1 + dx: 1 + dx + w]

        self.ops = []  # (out, srcs, coefs) for _lincomb, in order
        for f, plan in enumerate(plans):
            dst = self.slots[f][:, 1:rows + 1, 1:W + 1]
            if plan.kind == "separable":
                vert, hori = plan.passes
                self.ops.append((tmp, [self.padded[:, 1 + dy: 1 + dy + rows] for dy, _, _ in vert.terms],
                                 [c for _, _, c in vert.terms]))
                self.ops.append((dst, [tmp[:, :, 1 + dx: 1 + dx + W] for _, dx, _ in hori.terms],
                                 [c for _, _, c in hori.terms]))
            elif plan.kind == "taps":
                (taps,) = plan.passes
                self.ops.append((dst, [shifted(self.padded, dy, dx, rows, W) for dy, dx, _ in taps.terms],
                                 [c for _, _, c in taps.terms]))

    def perceive(self) -> None:
        for out, srcs, coefs in self.ops:
            _lincomb(out, srcs, coefs)


def _scratch(key: tuple, rows: int) -> _BandScratch:
    """This thread's :class:`_BandScratch` for ``key`` (see :class:`_Step`) and ``rows`` (made once,
    kept: a zero-padded scratch keeps its zero pad columns)."""
    cache: Dict = _local.__dict__.setdefault("scratch", {})
    s = cache.get((key, rows))
    if s is None:
        if len(cache) >= 8:  # bounded: a few shapes in turn stay cached
            cache.clear()
        filters, free_scale, _, C, hidden, W, dtype, device = key
        input_slot, plans = _compile_filters(filters, free_scale)
        s = cache[(key, rows)] = _BandScratch(C, W, rows, hidden, input_slot, plans, dtype, device)
    return s


def _buffer(name: str, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A per-thread scratch tensor reused across steps (its contents are garbage)."""
    cache: Dict = _local.__dict__.setdefault("buffers", {})
    key = (name, like.dtype, like.device)
    numel = 1
    for s in shape:
        numel *= s
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)


def _pad_band(img: torch.Tensor, r0: int, r1: int, padding: str, fill: float,
              out: torch.Tensor) -> torch.Tensor:
    """Rows ``r0-1 .. r1`` of ``img [K, H, W]`` padded by one cell: ``out [K, r1-r0+2, W+2]``.

    Cells outside the grid follow ``padding``; with ``"zeros"`` they are ``fill`` (0 for perception,
    -inf for the alive pool, which ignores them), and the pad columns are left as they are: the
    scratch tensors are made with them filled, and only this function writes them.
    """
    _, H, W = img.shape
    lo, hi = max(r0 - 1, 0), min(r1 + 1, H)
    out[:, 1 + lo - r0: 1 + hi - r0, 1:W + 1].copy_(img[:, lo:hi])
    for dst, src in ((0, r0 - 1), (r1 - r0 + 1, r1)):  # halo rows outside the grid
        if 0 <= src < H:
            continue
        if padding == "zeros":
            out[:, dst, 1:W + 1].fill_(fill)
        else:
            out[:, dst, 1:W + 1].copy_(img[:, src % H if padding == "circular" else min(max(src, 0), H - 1)])
    # columns last, over every row, so that the corners come out right
    if padding == "circular":
        out[:, :, 0].copy_(out[:, :, W])
        out[:, :, W + 1].copy_(out[:, :, 1])
    elif padding == "replicate":
        out[:, :, 0].copy_(out[:, :, 1])
        out[:, :, W + 1].copy_(out[:, :, W])
    return out


def _max3x3(a: torch.Tensor, tmp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """3x3 max pool of a padded plane ``a [r+2, w+2]`` into ``out [r, w]`` (``tmp [r, w+2]``):
    separable, rows then columns (CPU ``max_pool2d`` is several times slower)."""
    torch.maximum(torch.maximum(a[:-2], a[1:-1], out=tmp), a[2:], out=tmp)
    return torch.maximum(torch.maximum(tmp[:, :-2], tmp[:, 1:-1], out=out), tmp[:, 2:], out=out)


def _clamp_(t: torch.Tensor, r) -> None:
    if r is not None:
        t.clamp_(r[0], r[1])


# ---- the worker threads ---------------------------------------------------------------------------
_pool_lock = threading.Lock()
_pool: Optional[Tuple[int, int, ThreadPoolExecutor]] = None  # (pid, threads, executor)


def _pin_single_threaded(started: threading.Barrier) -> None:
    """Worker initializer: make this thread's torch ops single-threaded.

    ``torch.set_num_threads`` sets this thread's OpenMP and MKL thread counts, but also a process-wide
    default that each thread copies on its first parallel op: ``get_num_threads`` makes that copy now,
    while the default is 1, and the pool's creator restores the default once every worker is pinned.
    """
    try:
        torch.set_num_threads(1)
        torch.get_num_threads()
    finally:
        started.wait()


def _workers(n: int) -> ThreadPoolExecutor:
    """The persistent pool of ``n`` single-threaded workers (made again after a fork or for a new n)."""
    global _pool
    with _pool_lock:
        if _pool is not None and _pool[:2] == (os.getpid(), n):
            return _pool[2]
        if _pool is not None and _pool[0] == os.getpid():
            _pool[2].shutdown(wait=False)
        keep = torch.get_num_threads()
        started = threading.Barrier(n + 1)
        ex = ThreadPoolExecutor(n, thread_name_prefix="nca_fast.cpu", initializer=_pin_single_threaded,
                                initargs=(started,))
        for _ in range(n):  # no worker is idle before the barrier, so each submit starts a thread
            ex.submit(int)
        started.wait()
        torch.set_num_threads(keep)
        _pool = (os.getpid(), n, ex)
        return ex


def clear_buffers() -> None:
    """Free the scratch tensors: this thread's, and the worker pool's (its threads end)."""
    global _pool
    _local.__dict__.pop("buffers", None)
    _local.__dict__.pop("scratch", None)
    with _pool_lock:
        if _pool is not None and _pool[0] == os.getpid():
            _pool[2].shutdown(wait=True)
        _pool = None


# ---- one step -------------------------------------------------------------------------------------
class _Step:
    """One step over all bands; :meth:`work` is what each thread runs."""

    def __init__(self, x, params, spec: NCASpec, fire_mask, out, band_rows: int, keep=None):
        self.x, self.spec, self.out, self.keep = x, spec, out, keep
        B, C, H, W = x.shape
        self.bands: List[Tuple[int, int, int]] = [(b, r0, min(H, r0 + band_rows))
                                                  for b in range(B) for r0 in range(0, H, band_rows)]
        self.per_image = -(-H // band_rows)
        free_scale = spec.perception_clamp is None
        # the alive pool's padding in _pad_band's terms ("zeros" filled with -inf: outside cells ignored)
        self.apad = {"ignore": "zeros"}.get(spec.alive_pool_padding, spec.alive_pool_padding)
        self.scratch_key = (spec.filters, free_scale, (spec.padding, self.apad), C, spec.hidden, W, x.dtype,
                            x.device)
        _, plans = _compile_filters(spec.filters, free_scale)
        scales = torch.tensor([p.scale for p in plans], dtype=x.dtype, device=x.device)
        self.w1 = (params["w1"].reshape(-1, len(plans), C) * scales[:, None]).view(-1, len(plans) * C)
        self.w2 = params["w2"]
        b1, b2 = params.get("b1"), params.get("b2")
        self.b1 = None if b1 is None else b1[:, None]  # [hidden, 1], broadcast over a band's cells
        self.b2 = None if b2 is None else b2[:, None]
        self.hidden_range = hidden_range(spec)
        self.fire = None if fire_mask is None else fire_mask.reshape(B, H, W)
        self.counter = itertools.count()
        if spec.alive_channel is not None:
            # alive(x) of every cell, and for alive(y) the 3-wide row max of the new alive channel
            # before masking, with a padding row above and below: a band's mask reads its neighbours'.
            self.x_alive = torch.empty(B, H, W, dtype=torch.bool, device=x.device)
            self.y_rowmax = torch.empty(B, H + 2, W, dtype=x.dtype, device=x.device)
            if self.apad == "zeros":
                self.y_rowmax[:, 0].fill_(float("-inf"))
                self.y_rowmax[:, H + 1].fill_(float("-inf"))
            self.lock = threading.Lock()
            self.updated = [False] * len(self.bands)
            self.finished = [False] * len(self.bands)

    @torch.no_grad()  # (grad mode is per thread: a worker does not inherit its caller's no_grad)
    def work(self) -> None:
        """Take bands from the shared counter until none is left."""
        for i in iter(self.counter.__next__, None):
            if i >= len(self.bands):
                return
            self.update(i)
            if self.spec.alive_channel is not None:
                for k in self._now_finishable(i):
                    self.finish(k)

    def update(self, i: int) -> None:
        """``out`` rows of band ``i`` before the alive mask."""
        b, r0, r1 = self.bands[i]
        x, spec = self.x, self.spec
        s = _scratch(self.scratch_key, r1 - r0)
        _pad_band(x[b], r0, r1, spec.padding, 0.0, s.padded)
        if spec.alive_channel is not None:
            self._alive_x(s, b, r0, r1)
        s.perceive()
        if spec.perception_clamp is not None:
            s.p_inner.clamp_(*spec.perception_clamp)
        torch.mm(self.w1, s.p, out=s.h) if self.b1 is None else torch.addmm(self.b1, self.w1, s.p, out=s.h)
        s.h.clamp_(*self.hidden_range)
        torch.mm(self.w2, s.h, out=s.dx) if self.b2 is None else torch.addmm(self.b2, self.w2, s.h, out=s.dx)
        _clamp_(s.dx, spec.update_clamp)
        # the band's old state is in cache in the padded copy, unless the perception clamp changed it
        old = s.inner if spec.perception_clamp is None else x[b, :, r0:r1]
        y = self.out[b, :, r0:r1]
        if self.fire is None:
            torch.add(old, s.dx_inner, alpha=spec.step_size, out=y)
        else:
            torch.addcmul(old, s.dx_inner, self.fire[b, r0:r1], value=spec.step_size, out=y)
        _clamp_(y, spec.state_clamp)
        if spec.alive_channel is not None:
            self._y_rowmax(s, y[spec.alive_channel], b, r0, r1)

    def _alive_x(self, s: _BandScratch, b: int, r0: int, r1: int) -> None:
        """alive(x) of the band's cells, from its padded copy where the two paddings agree (zero
        padding is the pool's -inf padding unless the threshold is negative)."""
        a, spec = self.spec.alive_channel, self.spec
        if spec.padding != self.apad or (self.apad == "zeros" and spec.alive_threshold < 0):
            plane = _pad_band(self.x[b, a:a + 1], r0, r1, self.apad, float("-inf"), s.alive_pad)[0]
        else:
            plane = s.padded[a]
        torch.gt(_max3x3(plane, s.pool_tmp, s.pool), spec.alive_threshold, out=self.x_alive[b, r0:r1])

    def _y_rowmax(self, s: _BandScratch, ya: torch.Tensor, b: int, r0: int, r1: int) -> None:
        """The 3-wide row max of the band's new alive channel ``ya [rows, W]`` into ``y_rowmax``,
        and the padding rows that copy the band's first or last row."""
        W, H = ya.shape[1], self.x.shape[2]
        row = s.alive_row  # [rows, W+2]; with zero padding its pad columns stay -inf
        row[:, 1:W + 1].copy_(ya)
        if self.apad == "circular":
            row[:, 0].copy_(ya[:, W - 1])
            row[:, W + 1].copy_(ya[:, 0])
        elif self.apad == "replicate":
            row[:, 0].copy_(ya[:, 0])
            row[:, W + 1].copy_(ya[:, W - 1])
        m = self.y_rowmax[b]
        torch.maximum(torch.maximum(row[:, :-2], row[:, 1:-1], out=m[1 + r0:1 + r1]), row[:, 2:],
                      out=m[1 + r0:1 + r1])
        if self.apad != "zeros":
            first, last = (H + 1, 0) if self.apad == "circular" else (0, H + 1)
            if r0 == 0:
                m[first].copy_(m[1])
            if r1 == H:
                m[last].copy_(m[H])

    def _near(self, k: int) -> List[int]:
        """Band ``k`` and the bands holding the rows just above and below it (its image's only; with
        circular padding the first and last band of an image are neighbours)."""
        per = self.per_image
        first, j = k - k % per, k % per
        if self.apad == "circular":
            return sorted({first + (j - 1) % per, k, first + (j + 1) % per})
        return list(range(first + max(j - 1, 0), first + min(j + 2, per)))

    def _now_finishable(self, i: int) -> List[int]:
        """Mark band ``i`` updated; the bands whose neighbours are now all updated (the alive mask
        of a band reads its neighbours' rows before masking)."""
        ready = []
        with self.lock:
            self.updated[i] = True
            for k in self._near(i):
                if not self.finished[k] and all(self.updated[j] for j in self._near(k)):
                    self.finished[k] = True
                    ready.append(k)
        return ready

    def finish(self, i: int) -> None:
        """Apply the alive mask (alive before and after the update) to ``out`` rows of band ``i``."""
        b, r0, r1 = self.bands[i]
        m = self.y_rowmax[b]
        pool = _buffer("pool", (r1 - r0, m.shape[1]), m)
        torch.maximum(torch.maximum(m[r0:r1], m[r0 + 1:r1 + 1], out=pool), m[r0 + 2:r1 + 2], out=pool)
        keep = torch.gt(pool, self.spec.alive_threshold, out=None if self.keep is None else self.keep[b, r0:r1])
        keep.logical_and_(self.x_alive[b, r0:r1])
        if not keep.all():  # (multiplying by ones changes nothing, not even NaNs)
            self.out[b, :, r0:r1].mul_(keep)


_HUGE_PAGE = 2 << 20
_madvise = None  # libc madvise, once found (False: not available)


def _new_output(x: torch.Tensor) -> torch.Tensor:
    """``empty_like(x)``, on transparent huge pages where Linux allows it (``madvise`` mode).

    A large output is fresh memory every step (glibc serves it by ``mmap``): its first touch costs a
    page fault per 4 KiB page, ~35 ms of CPU time for a 1024^2 state; with 2 MiB pages, ~10 ms.
    """
    global _madvise
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if y.nbytes < 4 * _HUGE_PAGE or y.device.type != "cpu":
        return y
    if _madvise is None:
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            _madvise = libc.madvise
            _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _madvise = False
    if _madvise:
        start = -(-y.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # whole huge pages inside the tensor
        end = (y.data_ptr() + y.nbytes) // _HUGE_PAGE * _HUGE_PAGE
        _madvise(start, end - start, 14)  # MADV_HUGEPAGE; a refusal (EINVAL, old kernel) is harmless
    return y


def _band_rows(H: int, W: int) -> int:
    """Rows per band: ``BAND_CELLS`` cells (at least one row, at most the image)."""
    return max(1, min(H, BAND_CELLS // W))


def _on_pool(cells: int, threads: int) -> bool:
    """Whether a step of ``cells`` cells runs on the worker pool (else on the calling thread)."""
    return threads > 1 and cells > threads * POOL_BANDS_PER_THREAD * BAND_CELLS


def is_faster(x: torch.Tensor) -> bool:
    """Whether this path beats the reference for state ``x``: float32 on a CPU (it does at every size
    of the default benchmark, 16^2 to 512^2, batch 1 and 8; see README)."""
    return x.device.type == "cpu" and x.dtype == torch.float32


def _check_keep(keep: torch.Tensor, x: torch.Tensor, spec: NCASpec, records: bool) -> None:
    """``keep`` must be a contiguous bool ``[B, H, W]`` on x's device, for a model with an alive mask,
    in a step that does not record autograd (which runs the reference, that fills no ``keep``)."""
    B, _, H, W = x.shape
    if spec.alive_channel is None:
        raise ValueError("keep= receives the alive mask, but this model has no alive channel")
    if records:
        raise ValueError("keep= is filled only by a step autograd does not record "
                         "(use nca_fast.cpu_backward.step for a step with a backward)")
    if (keep.dtype != torch.bool or keep.shape != (B, H, W) or keep.device != x.device
            or not keep.is_contiguous()):
        raise ValueError(f"keep must be a contiguous bool tensor of shape {(B, H, W)} on {x.device}, "
                         f"got {keep.dtype} {tuple(keep.shape)} on {keep.device}")


def step(x: torch.Tensor, params: Mapping[str, torch.Tensor], spec: NCASpec,
         fire_mask: Optional[torch.Tensor], *, out: Optional[torch.Tensor] = None,
         keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One NCA step ``[B, C, H, W] -> [B, C, H, W]``, as :func:`nca_fast.reference.step`.

    ``fire_mask`` (bool ``[B, 1, H, W]``) selects the cells that update; None = all. ``out`` (a
    contiguous tensor like ``x`` that does not overlap it) receives the result instead of a new
    tensor: reusing it saves a large grid's page faults. Any dtype and device work, but only float32
    on a CPU is what this path is made for. When autograd has to record the step (grad enabled and
    ``x`` or a weight requires grad) it runs the reference instead; :func:`nca_fast.cpu_backward.step`
    is this step with a backward of its own. ``keep`` (bool ``[B, H, W]``, alive models) receives the
    alive mask applied (alive before and after the update), which that backward reuses.
    """
    if out is not None:
        if (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device
                or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on "
                             f"{x.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
        if out.data_ptr() < x.data_ptr() + x.nbytes and x.data_ptr() < out.data_ptr() + out.nbytes:
            raise ValueError("out overlaps the state x: bands read their neighbours' old rows")
    records = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params.values()))
    if keep is not None:
        _check_keep(keep, x, spec, records)
    if records:
        y = reference.step(x, params, spec, fire_mask)
        return y if out is None else out.copy_(y)
    B, C, H, W = x.shape
    x = x.contiguous()
    out = _new_output(x) if out is None else out
    threads = THREADS or torch.get_num_threads()
    job = _Step(x, params, spec, fire_mask, out, band_rows=_band_rows(H, W), keep=keep)
    if not _on_pool(B * H * W, threads) or x.device.type != "cpu":
        job.work()
    else:
        pool = _workers(threads)
        for f in [pool.submit(job.work) for _ in range(min(threads, len(job.bands)))]:
            f.result()
    return out
