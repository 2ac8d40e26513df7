"""How minhub multiplies by a weight matrix on this CPU: the fastest exact way, measured once per machine.

Decoding multiplies a few activation rows by every weight matrix, so a token costs one read of all the weights, and
the kernel that reads them decides the speed. Which kernel reads fastest depends on the CPU. On an AVX2 AMD EPYC
(2 threads, torch 2.13) MKL's one-row product (GEMV) reads weights at 14-18 GB/s where a plain `.sum()` reads the
same bytes at 24-28, and MKL's 8-row product at 5-7 GB/s where oneDNN, given the very same weight tensor, reads at
9-11. On an AVX-512 Xeon MKL is close to the limit already. So minhub measures instead of guessing:

- one row (batch-1 decoding): BLAS (`F.linear`), or a reduction kernel, `y[n] = sum_k x[k] * W[n, k]`, that reads W
  row by row in one vectorised, multi-threaded loop at `.sum()`'s speed. The kernel is C++ that inductor generates
  and AOTInductor packages (one package for every matrix shape), built once per machine: it needs a C++ compiler.
- 2-16 rows (batched decoding): BLAS, or oneDNN's matmul on the same weight, unpacked (packing would be a second
  copy of the weights).
- bfloat16, one row: BLAS or the same reduction kernel built for bf16 (float32 sums). bf16 weights are always made
  row-major: PyTorch's bf16 matrix-vector product on the hub's (in, out) layout is ten times slower on AVX2.

`plan()` times the candidates on weight-sized matrices in paired rounds (well under a second), once per machine
(CPU model, instruction sets, torch version, thread count), and keeps the result and the kernel in
$MINHUB_CACHE (default ~/.cache/minhub). The first measurement on a machine also builds the kernel (10-30 s). Every
candidate computes the same sums in a different order: logits stay within 1e-4 of transformers' in fp32.

`use_fastest(model)` applies the plan: every nn.Linear becomes a `CPULinear` (the same module, parameters and hooks,
with a forward that picks the kernel by row count), and the weights become row-major if the kernel reads them. Only
float32 and bfloat16 CPU inference changes path: with gradients, other dtypes, other devices, inside torch.compile,
or for more rows, CPULinear is nn.Linear. minhub's loaders call it; MINHUB_MATMUL=blas turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minhub import hardware

log = logging.getLogger("minhub")

FEW_ROWS = 16  # up to this many rows count as "batched decoding"; more (a prompt) always go to BLAS
KERNEL_FILES = {torch.float32: "one_row_reduction.pt2", torch.bfloat16: "one_row_reduction_bf16.pt2"}
PLAN_VERSION = 3  # bump when the candidates or the kernel change: older plans are measured again


@dataclass(frozen=True)
class MatmulPlan:
    """Which kernel multiplies activations by a weight matrix on this machine, and what was measured."""

    kernel: str | None = None  # float32, one row: the reduction kernel's package, or None for BLAS
    kernel_bf16: str | None = None  # bfloat16, one row: the same, built for bf16
    few_rows: str = "blas"  # float32, 2 to FEW_ROWS rows: "blas" or "onednn"
    measured_gbs: dict[str, float] = field(default_factory=dict)  # weight bytes read per second, per candidate
    notes: tuple[str, ...] = ()  # why a candidate was not measured

    def kernel_for(self, dtype: torch.dtype) -> str | None:
        """The reduction kernel's package for one row of `dtype`, or None where BLAS does it."""
        return {torch.float32: self.kernel, torch.bfloat16: self.kernel_bf16}.get(dtype)

    def row_major_for(self, dtype: torch.dtype) -> bool:
        """Whether weights of `dtype` should be row-major, (out, in), rather than the hub's GPT-2 (in, out): the
        reduction kernel reads them row by row, and PyTorch's own bf16 matrix-vector product is several times
        faster on them; fp32 BLAS reads either (MKL prefers (in, out) on some CPUs)."""
        return dtype == torch.bfloat16 or self.kernel_for(dtype) is not None

    def describe(self) -> str:
        """One line: the choice and the figures behind it."""
        figures = ", ".join(f"{k} {v:.1f}" for k, v in self.measured_gbs.items())
        one_row = {None: "blas"}
        return (f"float32 one row: {one_row.get(self.kernel, 'reduction')}, {FEW_ROWS} rows or fewer: "
                f"{self.few_rows}; bfloat16 one row: {one_row.get(self.kernel_bf16, 'reduction')} (GB/s read: "
                f"{figures or 'none'})" + "".join(f"; {n}" for n in self.notes))


def cache_dir() -> Path:
    """Where plans and kernels are kept: $MINHUB_CACHE, else $XDG_CACHE_HOME/minhub, else ~/.cache/minhub."""
    if os.environ.get("MINHUB_CACHE"):
        return Path(os.environ["MINHUB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minhub"


def machine_key() -> str:
    """What the plan depends on: CPU model and instruction sets, torch version, thread count, the plan's version."""
    cpu = hardware.cpu_info()
    text = json.dumps([cpu.model, cpu.isa, sorted(cpu.flags), cpu.onednn, torch.__version__,
                       torch.get_num_threads(), PLAN_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_plans: dict[str, MatmulPlan] = {}  # per process, by machine key


def setting() -> str:
    """MINHUB_MATMUL: "auto" (the default: measure once per machine) or "blas" (nn.Linear as it is); else ValueError."""
    value = os.environ.get("MINHUB_MATMUL", "auto")
    if value not in ("auto", "blas"):
        raise ValueError(f"MINHUB_MATMUL={value!r}: use auto (the fastest kernels, measured once per machine; the "
                         "default) or blas (nn.Linear's BLAS always)")
    return value


def plan_for(dtype: torch.dtype, device: str | torch.device) -> MatmulPlan | None:
    """The plan for a model of `dtype` on `device`, or None where minhub.matmul changes nothing: other devices and
    dtypes, or MINHUB_MATMUL=blas."""
    if torch.device(device).type != "cpu" or dtype not in KERNEL_FILES or setting() == "blas":
        return None
    return plan()


def plan() -> MatmulPlan:
    """This machine's plan: from the disk cache, else measured now (and the kernel built) and written there."""
    key = machine_key()
    if key not in _plans:
        _plans[key] = _cached_or_measured(key)
    return _plans[key]


def _cached_or_measured(key: str) -> MatmulPlan:
    directory = cache_dir() / key
    path = directory / "plan.json"
    try:
        saved = json.loads(path.read_text())
        cached = MatmulPlan(**{**saved, "notes": tuple(saved.get("notes", ()))})
        for kernel in (cached.kernel, cached.kernel_bf16):
            if kernel is not None:
                load_kernel(kernel)  # a kernel that is gone or no longer loads is built and measured again
        return cached
    except (FileNotFoundError, NotADirectoryError):
        pass  # the first load on this machine (or a cache that cannot exist: see below)
    except Exception as e:  # an unreadable plan or kernel: measure again rather than fail the load
        log.warning("minhub: the saved matmul plan in %s is unusable (%s: %s); measuring again", directory,
                    type(e).__name__, e)
        for name in KERNEL_FILES.values():
            with contextlib.suppress(OSError):
                (directory / name).unlink(missing_ok=True)
    log.warning("minhub: measuring this CPU's matrix kernels, once per machine (up to 30 s when it builds one); "
                "the result is kept in %s (delete it to measure again)", directory)
    measured = measure(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(asdict(measured), indent=2).encode())
    except OSError as e:
        log.warning("minhub: could not save the matmul plan (%s): every process will measure again; point "
                    "MINHUB_CACHE at a writable directory", e)
    log.warning("minhub: %s", measured.describe())
    return measured


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")  # another process may be writing the same file
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
# The one-row reduction kernel


class OneRowReduction(nn.Module):
    """What the kernel computes: one token's activations x (1, 1, k) times W (n, k) row-major, plus b (n,), giving
    (1, 1, n), summed in float32 whatever the dtype (as BLAS does); exported with symbolic n and k and compiled once
    per dtype."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, k = weight.shape
        # as_strided, unlike a broadcast, makes inductor read x from a buffer rather than inline its producer
        rows = torch.as_strided(x, (1, 1, n, k), (k, k, 0, 1))
        return ((rows.float() * weight.float()).sum(-1) + bias.float()).to(x.dtype)


def build_kernel(path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Export OneRowReduction for every n and k in `dtype`, compile it to C++ with AOTInductor, package it at `path`."""
    import torch._inductor

    n, k = torch.export.Dim("n", min=2), torch.export.Dim("k", min=2)
    example = (torch.ones(1, 1, 64, dtype=dtype), torch.ones(32, 64, dtype=dtype), torch.ones(32, dtype=dtype))
    program = torch.export.export(OneRowReduction(), example,
                                  dynamic_shapes={"x": {2: k}, "weight": {0: n, 1: k}, "bias": {0: n}})
    tmp = path.with_name(f".{os.getpid()}.{path.name}")  # AOTInductor wants the .pt2 suffix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecation notices while packaging
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    os.replace(tmp, path)


@functools.cache
def load_kernel(path: str) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """The packaged kernel, loaded once per process (milliseconds: no inductor import, no compilation). It takes
    [x (1, 1, k), W (n, k), b (n,)], all contiguous CPU tensors of the dtype it was built for, and returns
    [(1, 1, n)]."""
    loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    return loader.run


# --------------------------------------------------------------------------------------------------------------------
# Measuring


def _timed_rounds(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each candidate, run in turn for `rounds` rounds (paired: noise hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm up: first-call set-up, page faults
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(directory: Path, rounds: int = 5) -> MatmulPlan:
    """Time every candidate this machine can run on GPT-2 124M's matrix shapes (four layers, about 110 MB in
    float32, more than the caches hold) and return the fastest for one row and for FEW_ROWS rows in float32, and for
    one row in bfloat16; builds the kernels if needed."""
    info = hardware.cpu_info()
    notes = []
    kernels = {}
    if not info.can_compile:
        notes.append("no reduction kernel: " + ("no C++ compiler" if info.cxx is None else "no Python.h"))
    else:
        for dtype, name in KERNEL_FILES.items():
            try:
                if not (directory / name).is_file():
                    directory.mkdir(parents=True, exist_ok=True)
                    build_kernel(directory / name, dtype)
                kernels[dtype] = load_kernel(str(directory / name))
            except Exception as e:  # a broken toolchain must not stop loading: BLAS still works
                notes.append(f"no {dtype} reduction kernel: building it failed ({type(e).__name__}: {str(e)[:200]})")
    if not info.onednn:
        notes.append("no oneDNN in this torch")

    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 4  # (out, in)
    seconds = {}
    with torch.inference_mode():
        # values do not matter for speed, but all-zero pages may all map to one physical page: fill them
        row_major = [torch.full(s, 0.01) for s in shapes]
        col_major = [w.t().contiguous().t() for w in row_major]  # the hub's GPT-2 storage, (in, out)
        biases = [torch.full(s[:1], 0.01) for s in shapes]
        one = {k: torch.full((1, 1, k), 0.5) for k in (768, 3072)}
        few = {k: torch.full((8, k), 0.5) for k in (768, 3072)}

        def run(fn, weights, x, bias=biases):
            return lambda: [fn(x[w.size(1)], w, b) for w, b in zip(weights, bias)]

        def fastest(candidates: dict[str, Callable[[], object]]) -> str:
            seconds.update(_timed_rounds(candidates, rounds))
            return min(candidates, key=seconds.get).rpartition(": ")[2]

        candidates = {"one row: blas": run(F.linear, col_major, one)}
        if torch.float32 in kernels:
            candidates["one row: reduction"] = run(lambda x, w, b: kernels[torch.float32]([x, w, b]), row_major, one)
        best_one = fastest(candidates)
        weights = row_major if best_one == "reduction" else col_major
        candidates = {"8 rows: blas": run(F.linear, weights, few)}
        if info.onednn:
            candidates["8 rows: onednn"] = run(onednn_linear, weights, few)
        best_few = fastest(candidates)
        del col_major, weights

        weights = [w.to(torch.bfloat16) for w in row_major]
        del row_major
        bf16_biases = [b.to(torch.bfloat16) for b in biases]
        one = {k: x.to(torch.bfloat16) for k, x in one.items()}
        candidates = {"bf16 one row: blas": run(F.linear, weights, one, bf16_biases)}
        if torch.bfloat16 in kernels:
            candidates["bf16 one row: reduction"] = run(lambda x, w, b: kernels[torch.bfloat16]([x, w, b]), weights,
                                                        one, bf16_biases)
        best_bf16 = fastest(candidates)
    fp32_bytes = sum(s[0] * s[1] * 4 for s in shapes)
    measured = {name: (fp32_bytes / 2 if name.startswith("bf16") else fp32_bytes) / t / 1e9
                for name, t in seconds.items()}
    return MatmulPlan(
        kernel=str(directory / KERNEL_FILES[torch.float32]) if best_one == "reduction" else None,
        kernel_bf16=str(directory / KERNEL_FILES[torch.bfloat16]) if best_bf16 == "reduction" else None,
        few_rows=best_few, measured_gbs={k: round(v, 2) for k, v in measured.items()}, notes=tuple(notes))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b by oneDNN's matmul on the plain weight tensor (no packed copy), inference only."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# --------------------------------------------------------------------------------------------------------------------
# Applying the plan


class CPULinear(nn.Linear):
    """nn.Linear whose float32 and bfloat16 CPU inference runs the kernels this machine's MatmulPlan picked (see the
    module docstring); everything else, training included, is nn.Linear's forward."""

    plan: MatmulPlan | None = None  # set per instance by use_fastest, with what follows from it
    one_row_kernels: dict[torch.dtype, Callable[[list[torch.Tensor]], list[torch.Tensor]]] = {}  # by dtype
    kernel_biases: dict[torch.dtype, torch.Tensor] = {}  # zeros where there is no bias: the kernel always adds one
    few_rows_onednn: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        # the cheapest tests first: this runs for every matrix of every decoded token
        if not (x.is_cpu and weight.is_cpu and x.dtype == weight.dtype) or torch.compiler.is_compiling() \
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return F.linear(x, weight, bias)
        rows = x.numel() // self.in_features
        if rows == 1:
            kernel = self.one_row_kernels.get(x.dtype)
            if kernel is not None and x.dim() == 3 and x.is_contiguous() and weight.is_contiguous():
                return kernel([x, weight, self.kernel_biases[x.dtype] if bias is None else bias])[0]
        elif rows <= FEW_ROWS and self.few_rows_onednn and x.dtype == torch.float32:
            return onednn_linear(x, weight, bias)
        return F.linear(x, weight, bias)


def use_fastest(model: nn.Module, matmul_plan: MatmulPlan | None = None) -> nn.Module:
    """Make `model`'s float32 or bfloat16 CPU matrix products take this machine's fastest kernels (in place);
    return it.

    matmul_plan: default `plan_for` the model's dtype, measured once per machine. Every nn.Linear becomes a CPULinear
    (same parameters, hooks and state dict); its weight is made row-major when the plan wants that for the model's
    dtype (minhub's loader reads GPT-2's weights so from the start). Models on other devices, in other or mixed
    dtypes, or under MINHUB_MATMUL=blas are returned as they are; one moved later takes nn.Linear's path.
    """
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1 or any(p.device.type != "cpu" for p in model.parameters()):
        return model
    dtype = dtypes.pop()
    matmul_plan = matmul_plan or plan_for(dtype, "cpu")
    if matmul_plan is None:
        return model
    if matmul_plan.row_major_for(dtype):
        make_row_major(model)
    kernels = {t: load_kernel(matmul_plan.kernel_for(t)) for t in KERNEL_FILES if matmul_plan.kernel_for(t)}
    for module in model.modules():
        if type(module) in (nn.Linear, CPULinear):
            module.__class__ = CPULinear  # the same module, parameters and hooks, with another forward
            module.plan = matmul_plan
            module.few_rows_onednn = matmul_plan.few_rows == "onednn"
            module.one_row_kernels = kernels if min(module.weight.shape) >= 2 else {}
            module.kernel_biases = {} if module.bias is not None else \
                {t: torch.zeros(module.out_features, dtype=t) for t in kernels}
    return model


def make_row_major(model: nn.Module) -> None:
    """Store every nn.Linear weight of `model` row-major, (out, in), in place: same values, same parameters, one
    matrix at a time (memory grows by one matrix at most); a weight that already is stays as it is."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.contiguous()
