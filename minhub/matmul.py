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

`plan()` times the candidates on weight-sized matrices in paired rounds (well under a second), once per machine
(CPU model, instruction sets, torch version, thread count), and keeps the result and the kernel in
$MINHUB_CACHE (default ~/.cache/minhub). The first measurement on a machine also builds the kernel (10-30 s). Every
candidate computes the same sums in a different order: logits stay within 1e-4 of transformers' in fp32.

`use_fastest(model)` applies the plan: every nn.Linear becomes a `CPULinear` (the same module, parameters and hooks,
with a forward that picks the kernel by row count), and the weights become row-major if the kernel reads them. Only
float32 CPU inference changes path: with gradients, other dtypes, other devices, inside torch.compile, or for
more rows, CPULinear is nn.Linear. minhub's loaders call it; MINHUB_MATMUL=blas turns it off.
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
KERNEL_FILE = "one_row_reduction.pt2"
PLAN_VERSION = 1  # bump when the candidates or the kernel change: older plans are measured again


@dataclass(frozen=True)
class MatmulPlan:
    """Which kernel multiplies float32 activations by a weight matrix on this machine, and what was measured."""

    one_row: str = "blas"  # "blas" or "reduction"
    few_rows: str = "blas"  # "blas" or "onednn"
    kernel: str | None = None  # path of the reduction kernel's package, when one_row is "reduction"
    measured_gbs: dict[str, float] = field(default_factory=dict)  # weight bytes read per second, per candidate
    notes: tuple[str, ...] = ()  # why a candidate was not measured

    @property
    def row_major(self) -> bool:
        """The reduction kernel reads W (out, in) row by row; BLAS prefers the hub's (in, out) storage on some CPUs."""
        return self.one_row == "reduction"

    def describe(self) -> str:
        """One line: the choice and the figures behind it."""
        figures = ", ".join(f"{k} {v:.1f}" for k, v in self.measured_gbs.items())
        return (f"one row: {self.one_row}, {FEW_ROWS} rows or fewer: {self.few_rows} (GB/s read: {figures or 'none'})"
                + "".join(f"; {n}" for n in self.notes))


BLAS_ONLY = MatmulPlan(notes=("MINHUB_MATMUL=blas",))


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


def plan() -> MatmulPlan:
    """This machine's plan: from the disk cache, else measured now (and the kernel built) and written there."""
    if setting() == "blas":
        return BLAS_ONLY
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
        if cached.kernel is not None:
            load_kernel(cached.kernel)  # a kernel that is gone or no longer loads is built and measured again
        return cached
    except (FileNotFoundError, NotADirectoryError):
        pass  # the first load on this machine (or a cache that cannot exist: see below)
    except Exception as e:  # an unreadable plan or kernel: measure again rather than fail the load
        log.warning("minhub: the saved matmul plan in %s is unusable (%s: %s); measuring again", directory,
                    type(e).__name__, e)
        with contextlib.suppress(OSError):
            (directory / KERNEL_FILE).unlink(missing_ok=True)
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
    (1, 1, n); exported with symbolic n and k and compiled once."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, k = weight.shape
        # as_strided, unlike a broadcast, makes inductor read x from a buffer rather than inline its producer
        rows = torch.as_strided(x, (1, 1, n, k), (k, k, 0, 1))
        return (rows * weight).sum(-1) + bias


def build_kernel(path: Path) -> None:
    """Export OneRowReduction for every n and k, compile it to C++ with AOTInductor, and package it at `path`."""
    import torch._inductor

    n, k = torch.export.Dim("n", min=2), torch.export.Dim("k", min=2)
    example = (torch.ones(1, 1, 64), torch.ones(32, 64), torch.ones(32))
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
    [x (1, 1, k), W (n, k), b (n,)], all contiguous float32 CPU tensors, and returns [(1, 1, n)]."""
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
    """Time every candidate this machine can run on GPT-2 124M's matrix shapes (four layers, about 110 MB, more
    than the caches hold) and return the fastest for one row and for FEW_ROWS rows; builds the kernel if needed."""
    info = hardware.cpu_info()
    notes = []
    kernel_path = directory / KERNEL_FILE
    kernel = None
    if not info.can_compile:
        notes.append("no reduction kernel: " + ("no C++ compiler" if info.cxx is None else "no Python.h"))
    else:
        try:
            if not kernel_path.is_file():
                directory.mkdir(parents=True, exist_ok=True)
                build_kernel(kernel_path)
            kernel = load_kernel(str(kernel_path))
        except Exception as e:  # a broken toolchain must not stop loading: BLAS still works
            notes.append(f"no reduction kernel: building it failed ({type(e).__name__}: {str(e)[:200]})")
    if not info.onednn:
        notes.append("no oneDNN in this torch")

    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 4  # (out, in)
    with torch.inference_mode():
        # values do not matter for speed, but all-zero pages may all map to one physical page: fill them
        row_major = [torch.full(s, 0.01) for s in shapes]
        col_major = [w.t().contiguous().t() for w in row_major]  # the hub's GPT-2 storage, (in, out)
        biases = [torch.full(s[:1], 0.01) for s in shapes]
        one = {k: torch.full((1, 1, k), 0.5) for k in (768, 3072)}
        few = {k: torch.full((8, k), 0.5) for k in (768, 3072)}
        weight_bytes = sum(w.numel() * 4 for w in row_major)

        def run(fn, weights, x):
            return lambda: [fn(x[w.size(1)], w, b) for w, b in zip(weights, biases)]

        candidates = {"one row: blas": run(F.linear, col_major, one)}
        if kernel is not None:
            candidates["one row: reduction"] = run(lambda x, w, b: kernel([x, w, b]), row_major, one)
        one_row = _timed_rounds(candidates, rounds)
        best_one = min(one_row, key=one_row.get).removeprefix("one row: ")
        weights = row_major if best_one == "reduction" else col_major
        candidates = {"8 rows: blas": run(F.linear, weights, few)}
        if info.onednn:
            candidates["8 rows: onednn"] = run(onednn_linear, weights, few)
        few_rows = _timed_rounds(candidates, rounds)
        best_few = min(few_rows, key=few_rows.get).removeprefix("8 rows: ")
    del row_major, col_major
    measured = {name: weight_bytes / seconds / 1e9 for name, seconds in {**one_row, **few_rows}.items()}
    return MatmulPlan(one_row=best_one, few_rows=best_few, kernel=str(kernel_path) if best_one == "reduction" else None,
                      measured_gbs={k: round(v, 2) for k, v in measured.items()}, notes=tuple(notes))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b by oneDNN's matmul on the plain weight tensor (no packed copy), inference only."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# --------------------------------------------------------------------------------------------------------------------
# Applying the plan


class CPULinear(nn.Linear):
    """nn.Linear whose float32 CPU inference runs the kernels this machine's MatmulPlan picked (see the module
    docstring); everything else, training included, is nn.Linear's forward."""

    plan: MatmulPlan = BLAS_ONLY  # set per instance by use_fastest, with the two below
    one_row_kernel: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    kernel_bias: torch.Tensor | None = None  # the bias, or zeros: the kernel always adds one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        # the cheapest tests first: this runs for every matrix of every decoded token
        if not (x.is_cpu and x.dtype == torch.float32 and weight.is_cpu and weight.dtype == torch.float32) \
                or torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return F.linear(x, weight, self.bias)
        rows = x.numel() // self.in_features
        if rows == 1 and self.one_row_kernel is not None and x.dim() == 3 and x.is_contiguous() \
                and weight.is_contiguous():
            bias = self.kernel_bias if self.bias is None else self.bias
            return self.one_row_kernel([x, weight, bias])[0]
        if 1 < rows <= FEW_ROWS and self.plan.few_rows == "onednn":
            return onednn_linear(x, weight, self.bias)
        return F.linear(x, weight, self.bias)


def use_fastest(model: nn.Module, matmul_plan: MatmulPlan | None = None) -> nn.Module:
    """Make `model`'s float32 CPU matrix products take this machine's fastest kernels (in place); return it.

    matmul_plan: default `plan()`, measured once per machine. Every nn.Linear becomes a CPULinear (same parameters,
    hooks and state dict); its weight is made row-major when the plan's one-row kernel reads it so (one matrix at a
    time, so memory grows by one matrix at most). Models on other devices or in other dtypes are returned as they
    are; one moved later simply takes nn.Linear's path.
    """
    params = list(model.parameters())
    if not params or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return model
    matmul_plan = plan() if matmul_plan is None else matmul_plan
    if matmul_plan.one_row == matmul_plan.few_rows == "blas":
        return model  # nn.Linear already does that
    with torch.no_grad():
        for module in model.modules():
            if type(module) in (nn.Linear, CPULinear):
                if matmul_plan.row_major:
                    module.weight.data = module.weight.data.contiguous()  # no copy if it already is
                module.__class__ = CPULinear  # the same module, parameters and hooks, with another forward
                module.plan = matmul_plan
                if matmul_plan.one_row == "reduction" and min(module.weight.shape) >= 2:
                    module.one_row_kernel = load_kernel(matmul_plan.kernel)
                    module.kernel_bias = torch.zeros(module.out_features) if module.bias is None else None
    return model
