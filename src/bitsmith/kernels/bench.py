"""``bitsmith bench kernels``: time the fused kernels against fp16 ``F.linear`` and torch's int4
kernel (``torch.ops.aten._weight_int4pack_mm``, "tinygemm") in one run, on one CUDA device.

Timing (:func:`time_flushed`): warm-up, then per repetition the L2 is flushed (a 256 MiB buffer
zeroed, as ``triton.testing.do_bench`` does) and the call is bracketed by CUDA events; the median
is reported. That flush leaves the L2 full of dirty lines, whose write-back the timed call pays
while it reads; ``clean us`` is the same call after a flush that reads the buffer instead (clean
lines, dropped for free: what the other layers' weights leave in a model; see
:func:`bitsmith.kernels.qmm.l2_flusher`). The same with the call
replayed from a CUDA graph (:func:`time_graph`, launch overhead gone), and the host time of an eager
call (:func:`host_overhead`: a loop of calls without synchronisation, so the CPU cost of the Python
wrapper, the Triton launcher and any torch ops, not GPU time). Effective bandwidth counts the bytes
the call must read (runtime-layout weight, activations) and write (output), once each; % of copy is
against a device-to-device copy measured in the same run (bytes read + written).

Weights are ``0.02 * randn`` (as in issue #8's peer table) quantized min-max (affine) or to NF4;
timing does not depend on the values.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..formats.affine import AffineParams, encode_affine, pad_groups
from ..formats.codebook import CodebookParams, quantize_codebook
from ..formats.qtensor import QTensor
from .layout import repack
from .qmm import HAVE_TRITON, TUNE_FAILURES, TUNED, flushed_times_ms, quant_matmul

FLUSH_BYTES = 256 << 20
REST_CAP_S = 1.5  # the longest rest between a case's warm-up and its timed calls (Timer)
#: how long the timer runs a case again after its rest, so its timed calls do not start at the idle
#: clock: after a 1.5 s rest an H100 sat at 345 MHz, and W8A8 on 4096x4096 then read 222 us eager
#: against 74 without the rest (benchmarks/results/kernels_m2048_rest2b_h100.txt, clocks_rest_ab_h100.csv)
REWARM_S = 0.05

#: format name -> how to build it from a float weight
BENCH_FORMATS = {
    "int4_g64": ("affine", 4, 64),
    "int4_g128": ("affine", 4, 128),
    "nf4_g64": ("codebook", 16, 64),
    "int3_g64": ("affine", 3, 64),
    "int8_g128": ("affine", 8, 128),
    "int8_g64": ("affine", 8, 64),
    "int2_g64": ("affine", 2, 64),
}
DEFAULT_FORMATS = ("int4_g64", "int4_g128", "nf4_g64", "int3_g64", "int8_g128")
DEFAULT_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192))
DEFAULT_MS = (1, 16, 128, 2048)


def affine_minmax(w: torch.Tensor, bits: int, group_size: int) -> QTensor:
    """Min-max affine quantization with an integer zero (formats only, for benchmarks)."""
    params = AffineParams(bits=bits, group_size=group_size, zero="int")
    g = pad_groups(w.float(), group_size)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8).to(torch.float16)
    zero = (-lo / scale.float()).round().clamp(0, levels).to(torch.uint8)
    return encode_affine(w, scale, zero, params)


def make_qtensor(fmt: str, w: torch.Tensor) -> QTensor:
    kind, a, b = BENCH_FORMATS[fmt]
    if kind == "affine":
        return affine_minmax(w, a, b)
    return quantize_codebook(w, CodebookParams(levels=a, block_size=b, double_quant=True))


# --- timing -------------------------------------------------------------------------------------
class Timer:
    """CUDA-event timing with an L2 flush before every repetition. ``rest``: after the warm-up the
    timer idles ``rest`` times as long as the warm-up took (at most :data:`REST_CAP_S`), so that a
    call is not timed in the power state that the warm-up's work (a first call's tuning, a slow
    kernel timed before) left the GPU in, then runs the call again for :data:`REWARM_S`, so that it
    is not timed at the idle clock either; 0: no rest."""

    def __init__(self, device: torch.device, reps: int = 50, warmup: int = 5, rest: float = 0.0):
        self.flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
        self.reps, self.warmup, self.rest = reps, warmup, rest

    def _warm(self, call: Callable[[], object]) -> None:
        """The warm-up calls, then the rest and the calls after it."""
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(self.warmup):
            call()
        torch.cuda.synchronize()
        if self.rest:
            time.sleep(min(REST_CAP_S, self.rest * (time.perf_counter() - started)))
            self._rewarm(call)

    def _rewarm(self, call: Callable[[], object], most: int = 1000) -> None:
        """``call`` again, synchronized in batches of eight, until :data:`REWARM_S` of wall time and
        at least ``warmup`` calls have passed (at most ``most`` calls)."""
        started = time.perf_counter()
        calls = 0
        while calls < most and (calls < self.warmup or time.perf_counter() - started < REWARM_S):
            call()
            calls += 1
            if calls % 8 == 0:
                torch.cuda.synchronize()
        torch.cuda.synchronize()

    def _events(self, call: Callable[[], object], clean: bool = False) -> float:
        return statistics.median(flushed_times_ms(call, self.flush_buf, self.reps, clean=clean)) * 1e3  # us

    def time_flushed(self, fn: Callable[[], object], clean: bool = False) -> float:
        """Median microseconds of one eager call, L2 flushed (``clean``: by a read)."""
        self._warm(fn)
        return self._events(fn, clean)

    def time_graph(self, fn: Callable[[], object], clean: bool = False) -> float:
        """Median microseconds of one call replayed from a CUDA graph, L2 flushed (``clean``: by a read)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        self._warm(graph.replay)
        return self._events(graph.replay, clean)

    @staticmethod
    def host_overhead(fn: Callable[[], object], calls: int = 200) -> float:
        """Host microseconds per eager call (no synchronisation inside the loop)."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t = time.perf_counter() - t0
        torch.cuda.synchronize()
        return t / calls * 1e6


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (median of 20)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * nbytes / statistics.median(times)


# --- the benchmark ------------------------------------------------------------------------------
@dataclass
class BenchRow:
    n: int
    k: int
    m: int
    kernel: str
    us: float
    graph_us: float | None
    host_us: float | None
    bytes: int
    gbps: float
    pct_copy: float
    speedup: float | None = None  # vs fp16 F.linear, flushed
    speedup_graph: float | None = None
    clean_us: float | None = None  # eager, after a flush that leaves clean lines
    speedup_clean: float | None = None
    note: str = ""
    repack_ms: float | None = None
    rel_err: float | None = None  # vs float64 x @ W^T of the reference dequantization (quantized kernels)


@dataclass
class BenchResult:
    device: str
    copy_gbps: float
    rows: list[BenchRow] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"device": self.device, "copy_gbps": self.copy_gbps, "rows": [asdict(r) for r in self.rows]}


def _tinygemm(w: torch.Tensor, group: int = 64):
    """torch's int4 kernel on random codes (bfloat16 activations); ``None`` where unavailable."""
    n, k = w.shape
    try:
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=w.device)
        packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
        sz = (torch.rand(k // group, n, 2, device=w.device) * 0.01).to(torch.bfloat16)
        nbytes = n * k // 2 + sz.numel() * 2

        def run(x):
            return torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)

        run(torch.randn(1, k, device=w.device, dtype=torch.bfloat16))
        return run, nbytes
    except Exception as e:  # noqa: BLE001 - reported in the table as unavailable
        return str(e).splitlines()[0][:120], 0


def run_bench(
    shapes=DEFAULT_SHAPES,
    ms=DEFAULT_MS,
    formats=DEFAULT_FORMATS,
    graph_ms=(1, 16),
    w8a8: bool = True,
    tinygemm: bool = True,
    reps: int = 50,
    progress: Callable[[str], None] | None = None,
    rest: float = 0.0,
) -> BenchResult:
    """Time every kernel at every (shape, M); see the module docstring (``rest``: :class:`Timer`'s)."""
    if not (HAVE_TRITON and torch.cuda.is_available()):
        raise RuntimeError("bench kernels needs a CUDA device and triton")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    timer = Timer(dev, reps=reps, rest=rest)
    bw = copy_bandwidth(dev)
    res = BenchResult(torch.cuda.get_device_name(dev), bw / 1e9)
    say = progress or (lambda s: None)
    for n, k in shapes:
        w16 = (torch.randn(n, k, device=dev) * 0.02).to(torch.float16)
        say(f"shape {n}x{k}: quantizing")
        rws = {}
        refw = {}
        for fmt in formats:
            qt = make_qtensor(fmt, w16)
            rws[fmt] = repack(qt)
            refw[fmt] = qt.dequantize(torch.float32)
            del qt
        tg = _tinygemm(w16) if tinygemm else None
        wq = sq = None
        if w8a8:
            from .w8a8 import w8a8_linear

            sq = w16.float().abs().amax(1).clamp(min=1e-8) / 127
            wq = (w16.float() / sq[:, None]).round().clamp(-127, 127).to(torch.int8)
            w8_plans: dict = {}  # launch plans, as W8A8Linear keeps them
        for m in ms:
            say(f"shape {n}x{k} M={m}")
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xb = x.to(torch.bfloat16)
            io = (m * k + m * n) * 2
            cases: list[tuple[str, Callable[[], object], int, str]] = [("fp16", lambda: F.linear(x, w16), n * k * 2 + io, "")]
            if tg is not None:
                if callable(tg[0]):
                    run_tg = tg[0]
                    cases.append(("tinygemm_int4_g64", lambda: run_tg(xb), tg[1] + io, "bf16 activations"))
                else:
                    cases.append(("tinygemm_int4_g64", None, 0, f"unavailable: {tg[0]}"))
            for fmt, rw in rws.items():
                cases.append((fmt, (lambda rw=rw: quant_matmul(x, rw)), rw.nbytes + io,
                              "fragment layout" if rw.layout == "fragment" else ""))
            if w8a8:
                cases.append(("w8a8", lambda: w8a8_linear(x, wq, sq, plans=w8_plans), n * k + n * 4 + io + m * k,
                              "dynamic per-token"))
                if m > 16 and k % 8 == 0 and n % 8 == 0:
                    cases.append(("w8a8_int_mm", lambda: w8a8_linear(x, wq, sq, backend="int_mm"), n * k + n * 4 + io + m * k,
                                  "torch._int_mm + torch-op rescale"))
            base = base_g = base_c = None
            for name, fn, nbytes, note in cases:
                if fn is None:
                    res.rows.append(BenchRow(n, k, m, name, math.nan, None, None, 0, math.nan, math.nan, note=note))
                    continue
                try:
                    us = timer.time_flushed(fn)
                    clean_us = timer.time_flushed(fn, clean=True)
                    g_us = timer.time_graph(fn) if m in graph_ms else None
                    host = timer.host_overhead(fn) if m == 1 else None
                except Exception as e:  # noqa: BLE001 - one failing kernel must not hide the others
                    res.rows.append(BenchRow(n, k, m, name, math.nan, None, None, nbytes, math.nan, math.nan,
                                             note=f"failed: {str(e).splitlines()[0][:160]}"))
                    continue
                gbps = nbytes / (us * 1e-6) / 1e9
                row = BenchRow(n, k, m, name, us, g_us, host, nbytes, gbps, 100 * gbps / res.copy_gbps,
                               clean_us=clean_us, note=note)
                if name in rws:
                    row.repack_ms = rws[name].repack_seconds * 1e3
                    ref = x[:64].double() @ refw[name].double().t()
                    got = quant_matmul(x, rws[name])[:64].double()  # the tuned path of this M
                    row.rel_err = float((got - ref).norm() / ref.norm())
                if name == "fp16":
                    base, base_g, base_c = us, g_us, clean_us
                row.speedup = base / us if base else None
                row.speedup_clean = base_c / clean_us if base_c else None
                row.speedup_graph = base_g / g_us if (base_g and g_us) else None
                res.rows.append(row)
                say(f"  {name}: {us:.1f} us, graph {g_us if g_us is None else round(g_us, 1)} us, "
                    f"x fp16 {row.speedup:.2f}" + (f" / graph {row.speedup_graph:.2f}" if row.speedup_graph else ""))
        del w16, rws, wq, refw
        torch.cuda.empty_cache()
    return res


def render_rows(res: BenchResult) -> str:
    head = (f"{'N x K':>12} {'M':>5} {'kernel':<18} {'us':>9} {'graph us':>9} {'host us':>8} {'GB/s':>7} {'%copy':>6} "
            f"{'x fp16':>7} {'x graph':>7} {'clean us':>9} {'x clean':>7}  note")
    lines = [f"device: {res.device}; measured copy bandwidth {res.copy_gbps:.0f} GB/s (read + write)", head]

    def f(v, fmt):
        return fmt.format(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else "-"

    for r in res.rows:
        lines.append(
            f"{r.n:>6}x{r.k:<5} {r.m:>5} {r.kernel:<18} {f(r.us, '{:9.1f}'):>9} {f(r.graph_us, '{:9.1f}'):>9} "
            f"{f(r.host_us, '{:8.1f}'):>8} {f(r.gbps, '{:7.0f}'):>7} {f(r.pct_copy, '{:6.1f}'):>6} "
            f"{f(r.speedup, '{:7.2f}'):>7} {f(r.speedup_graph, '{:7.2f}'):>7} "
            f"{f(r.clean_us, '{:9.1f}'):>9} {f(r.speedup_clean, '{:7.2f}'):>7}  {r.note}"
        )
    return "\n".join(lines)


def tuned_configs() -> dict:
    """The autotuned launch configs of this process, JSON-able."""
    return {" ".join(map(str, key)): cfg for key, cfg in TUNED.items()}


def tuning_seconds() -> dict:
    """How long each tuning of this process took (wall time, compiling the candidates included) and
    how many configs it timed, JSON-able; none for configs taken from ``BITSMITH_TUNE_CACHE``."""
    from . import qmm

    return {" ".join(map(str, key)): dict(v) for key, v in qmm.TUNE_SECONDS.items()}  # the module's, as replaced


def render_tuning() -> str:
    """What the tunings of this process cost, one line each ("" when none ran)."""
    tuning = tuning_seconds()
    if not tuning:
        return ""
    lines = [f"tuning: {len(tuning)} tunings, {sum(v['seconds'] for v in tuning.values()):.1f} s in all "
             "(first call of each shape and M bucket; BITSMITH_TUNE_CACHE keeps the picks for later processes)"]
    lines += [f"  {key}: {v['candidates']} configs, {v['seconds']:.2f} s" for key, v in tuning.items()]
    return "\n".join(lines)


def tune_failures() -> list[dict]:
    """The tunings of this process where every candidate failed and the default config ran."""
    return list(TUNE_FAILURES)


__all__ = ["run_bench", "render_rows", "BenchResult", "BenchRow", "Timer", "copy_bandwidth", "make_qtensor",
           "BENCH_FORMATS", "DEFAULT_SHAPES", "DEFAULT_MS", "DEFAULT_FORMATS", "tuned_configs",
           "tune_failures", "tuning_seconds", "render_tuning"]
