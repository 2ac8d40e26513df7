"""How minhub multiplies by a weight matrix on this CPU: the fastest exact way, measured once per machine.

Decoding multiplies a few activation rows by every weight matrix, so a token costs one read of all the weights, and
the kernel that reads them decides the speed. Which kernel reads fastest depends on the CPU. On an AVX2 AMD EPYC
(2 threads, torch 2.13) MKL's one-row product (GEMV) reads fp32 weights at 14-18 GB/s where a plain `.sum()` reads
the same bytes at 24-28; its 8-row product and PyTorch's bf16 and int8 ones are slower still. On an AVX-512 Xeon
MKL is close to the limit already. So minhub measures instead of guessing, per weight dtype and row count:

- "blas": PyTorch's own kernel (`F.linear`, for int8 `torch._weight_int8pack_mm`);
- "onednn": oneDNN's matmul on the same, unpacked weight (float32, 2-16 rows; packing would be a second copy);
- "minhub": minhub::linear (matmul.cpp, about 300 lines of C++): the threads take 256 kB chunks of the weights in
  turn and sum them against the activations, which stay in the L1 cache, with AVX2 FMA loops where the CPU has them,
  prefetching the next rows, so it reads W once at `.sum()`'s speed. It reads fp32 weights in either layout (the hub's
  GPT-2 (in, out) needs no transposing), bf16 and int8 (one scale per output row) row-major; sums in float32, with
  the same bits whichever thread takes which chunk. It is built once per kernel source, torch version and compiler,
  with the C++ compiler against the installed torch (about 10 s).

`plan()` times the candidates on GPT-2 124M-shaped matrices (110 MB in fp32, more than the caches hold) in paired
rounds, once per machine (CPU model, instruction sets, torch version, thread count, the kernel's source), and keeps
the result and the built kernel in $MINHUB_CACHE (default ~/.cache/minhub). A plan measured while other processes
kept the CPUs busy (more than BUSY of their time: the kernels then compete for cores and their order can turn over)
is provisional: a later process that finds the machine idle measures again. Every candidate computes the same sums
in another order: fp32 logits stay within 1e-4 of transformers'.

A prompt (more than 16 rows) is one more case, for bf16 weights only: where the CPU has no bf16 matrix product
(AVX2 CPUs), PyTorch's takes about as long per row as one decode step's product (0.22 ms a row for a 768 x 2304
matrix on the EPYC), and minhub::linear is 4-5x faster up to 128 rows; on CPUs with native bf16 (AVX-512 BF16, AMX)
PyTorch's should win. The plan measures both at MANY_ROWS rows. fp32 prompts stay on BLAS's blocked products.

`use_fastest(model)` applies the plan: every nn.Linear becomes a `CPULinear` (the same module, parameters and hooks,
with a forward that picks the kernel by dtype and row count). Only float32 and bfloat16 CPU inference changes path:
with gradients, other dtypes or devices, or for a float32 prompt, CPULinear is nn.Linear;
torch.compile traces minhub::linear and oneDNN's product as opaque calls. minhub's loaders call it, and
quantize_int8 reads the int8 choice; MINHUB_MATMUL=blas turns it all off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minhub import hardware
from minhub.files import write_atomically

log = logging.getLogger("minhub")

FEW_ROWS = 16  # up to this many rows count as decoding; more are a prompt (BLAS, except bf16 where measured)
MANY_ROWS = 64  # the prompt the bf16 "many rows" choice is measured on
BF16_PROMPT = "bfloat16 many rows"  # the plan's key for bf16 weights times more than FEW_ROWS rows
SOURCE = Path(__file__).with_name("matmul.cpp")
LIBRARY = "libminhub_matmul.so"
PLAN_VERSION = 7  # bump when the candidates or what a plan records change: older plans are measured again
BUSY = 0.15  # other processes' share of the CPUs above which a measurement is provisional
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int8: "int8"}  # weight dtypes with a choice


def choice_name(dtype: torch.dtype, one_row: bool) -> str:
    """The plan's key for weights of `dtype` and one row or 2 to FEW_ROWS rows, e.g. "float32 one row"."""
    return f"{DTYPES[dtype]} {'one row' if one_row else 'few rows'}"


@dataclass(frozen=True)
class MatmulPlan:
    """Which kernel multiplies activations by a weight matrix on this machine, and what was measured."""

    kernels: dict[str, str] = field(default_factory=dict)  # choice_name -> "minhub" or "onednn"; absent: "blas"
    library: str | None = None  # the built minhub::linear and minhub::attend, where the build succeeded
    library_sha256: str | None = None  # what the library's bytes were when measured: a changed file is rebuilt
    measured_gbs: dict[str, float] = field(default_factory=dict)  # weight bytes read per second, per candidate
    notes: tuple[str, ...] = ()  # why a candidate was not measured
    others_busy: float | None = None  # other processes' share of the CPUs while measuring; None: not known

    @property
    def provisional(self) -> bool:
        """Whether other processes kept the CPUs busy while this plan was measured (see the module docstring)."""
        return self.others_busy is not None and self.others_busy > BUSY

    def kernel(self, dtype: torch.dtype, one_row: bool) -> str:
        """"blas", "onednn" or "minhub" for weights of `dtype` times one row, or 2 to FEW_ROWS rows."""
        return self.kernels.get(choice_name(dtype, one_row), "blas") if dtype in DTYPES else "blas"

    def prompt_kernel(self, dtype: torch.dtype) -> str:
        """"blas" or "minhub" for weights of `dtype` times more than FEW_ROWS rows (only bf16 has a choice)."""
        return self.kernels.get(BF16_PROMPT, "blas") if dtype == torch.bfloat16 else "blas"

    def describe(self) -> str:
        """One line: the choices and the figures behind them."""
        choices = ", ".join(f"{name}: {self.kernel(dtype, one_row)}" for dtype in DTYPES for one_row in (True, False)
                            for name in [choice_name(dtype, one_row)])
        choices += f", {BF16_PROMPT}: {self.prompt_kernel(torch.bfloat16)}"
        figures = ", ".join(f"{k} {v:.1f}" for k, v in self.measured_gbs.items())
        loops = "" if self.library is None else f" (its {'AVX2' if avx2_loops() else 'portable'} loops)"
        busy = f"; provisional: measured while other processes used {self.others_busy:.0%} of the CPUs" \
            if self.provisional else ""
        return (f"{choices}{loops}; GB/s read: {figures or 'none'}" + "".join(f"; {n}" for n in self.notes) + busy)


def avx2_loops() -> bool:
    """Whether minhub::linear runs its AVX2 loops on this CPU (the portable ones otherwise)."""
    return {"avx2", "fma"} <= hardware.cpu_info().flags


def cache_dir() -> Path:
    """Where plans and kernels are kept: $MINHUB_CACHE, else $XDG_CACHE_HOME/minhub, else ~/.cache/minhub."""
    if os.environ.get("MINHUB_CACHE"):
        return Path(os.environ["MINHUB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minhub"


def machine_key() -> str:
    """What the plan depends on: CPU model and instruction sets, torch version, thread count, the plan's version and
    the kernel's source."""
    cpu = hardware.cpu_info()
    text = json.dumps([cpu.model, cpu.isa, sorted(cpu.flags), cpu.onednn, torch.__version__,
                       torch.get_num_threads(), PLAN_VERSION, sha256_once(SOURCE)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def library_path() -> Path:
    """Where minhub::linear is built: one library per kernel source, torch version and compiler, shared by the plans
    of every thread count."""
    text = json.dumps([sha256_once(SOURCE), torch.__version__, hardware.cpu_info().cxx])
    return cache_dir() / "kernels" / hashlib.sha256(text.encode()).hexdigest()[:16] / LIBRARY


@functools.cache
def sha256_once(path: Path) -> str:
    """A source file's hash, read once per process: a process keeps the kernel it measured (and the decode steps it
    compiled, minhub.precompiled), even if the file is edited while it runs."""
    return _sha256(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_plans: dict[str, MatmulPlan] = {}  # per process, by machine key


def setting() -> str:
    """MINHUB_MATMUL: "auto" (the default: measure once per machine) or "blas" (nn.Linear as it is); else ValueError."""
    value = os.environ.get("MINHUB_MATMUL", "auto")
    if value not in ("auto", "blas"):
        raise ValueError(f"MINHUB_MATMUL={value!r}: use auto (the fastest kernels, measured once per machine; the "
                         "default) or blas (PyTorch's own kernels always)")
    return value


def plan_for(dtype: torch.dtype, device: str | torch.device) -> MatmulPlan | None:
    """The plan for weights of `dtype` on `device`, or None where minhub.matmul changes nothing: other devices and
    dtypes, or MINHUB_MATMUL=blas."""
    if torch.device(device).type != "cpu" or dtype not in DTYPES or setting() == "blas":
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
        if cached.library is not None:
            load_library(cached.library, cached.library_sha256)  # one that is gone or changed is built again
        if not (cached.provisional and _machine_idle()):
            return cached
        log.warning("minhub: the saved matmul plan was measured while other processes used %.0f%% of the CPUs; "
                    "the machine is idle now: measuring again", 100 * cached.others_busy)
    except (FileNotFoundError, NotADirectoryError):  # the first load on this machine (or a cache that cannot exist)
        log.warning("minhub: measuring this CPU's matrix kernels, once per machine (about 15 s when it builds "
                    "minhub's); the result is kept in %s (delete it to measure again)", directory)
    except Exception as e:  # an unreadable plan or library: measure again rather than fail the load
        log.warning("minhub: the saved matmul plan in %s is unusable (%s: %s); measuring again", directory,
                    type(e).__name__, e)
        library_path().unlink(missing_ok=True)
    measured = measure(library_path())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(asdict(measured), indent=2).encode())
    except OSError as e:
        log.warning("minhub: could not save the matmul plan (%s): every process will measure again; point "
                    "MINHUB_CACHE at a writable directory", e)
    log.warning("minhub: %s", measured.describe())
    return measured


def _machine_idle(seconds: float = 0.2) -> bool:
    """Whether other processes leave the CPUs idle (at most BUSY of their time) over the next `seconds`."""
    start = hardware.cpu_times()
    time.sleep(seconds)
    share = hardware.others_share(start, hardware.cpu_times())
    return share is not None and share <= BUSY


# --------------------------------------------------------------------------------------------------------------------
# minhub::linear, the C++ kernel


def build_library(path: Path) -> None:
    """Compile matmul.cpp against the installed torch into the shared library at `path` (about 10 s)."""
    torch_dir = Path(torch.__file__).parent
    include, lib = torch_dir / "include", torch_dir / "lib"
    openmp = ["-fopenmp", "-lgomp"] if (lib / "libgomp.so.1").exists() else []  # torch's own OpenMP, not a second
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    command = [hardware.cpu_info().cxx or "c++", "-O3", "-shared", "-fPIC", "-std=c++20", "-w",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{include}",
               f"-I{include / 'torch/csrc/api/include'}", str(SOURCE), "-o", str(tmp), f"-L{lib}",
               f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch", *openmp]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(command[:2])} ... failed: {done.stderr.strip()[-500:]}")
    os.replace(tmp, path)


_checked_libraries: set[str] = set()  # libraries whose bytes this process has checked against their plan


def load_library(path: str, sha256: str | None) -> None:
    """Load the built library (minhub::linear, minhub::attend) once per process, after checking that its bytes are
    those measured (once per path: later calls return at once).

    Only the first library is loaded: a second one (another cache) would register the operator twice. Its source is
    the same (the library's path covers it), so the one loaded serves."""
    if path in _checked_libraries:
        return
    if sha256 != _sha256(Path(path)):
        raise ValueError(f"{path} changed since it was measured")
    if not _checked_libraries:
        torch.ops.load_library(path)
        # the output's shape and dtype without running it: torch.compile (compile_decode) traces through the op
        torch.library.register_fake("minhub::linear")(
            lambda x, weight, bias, scale=None, portable=False: x.new_empty((*x.shape[:-1], weight.shape[0])))
        torch.library.register_fake("minhub::attend")(lambda q, k, v, scale, portable=False: torch.empty_like(
            q, memory_format=torch.contiguous_format))
    _checked_libraries.add(path)


def minhub_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  scale: torch.Tensor | None = None, portable: bool = False) -> torch.Tensor:
    """x @ weight.T (* scale) (+ bias) by minhub::linear (see matmul.cpp for what it takes); the library must be
    loaded (plan() does it). portable=True runs the portable loops even where the AVX2 ones would."""
    return torch.ops.minhub.linear.default(x, weight, bias, scale, portable)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b by oneDNN's matmul on the plain weight tensor (no packed copy), inference only."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("minhub_onednn::linear", mutates_args=())
def onednn_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """onednn_linear as an operator torch.compile keeps as an opaque call: inductor lowers
    mkldnn._linear_pointwise only for weights it froze into constants, and the weights of a compiled decode step
    (minhub.fast.compile_decode) stay the model's own tensors."""
    return onednn_linear(x, weight, bias)


@onednn_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PyTorch's weight-only int8 product: x (m, k) bf16 times int8 weight (n, k) times bf16 scale (n,)."""
    return torch._weight_int8pack_mm(x, weight, scale)


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


def measure(library_file: Path, rounds: int = 5) -> MatmulPlan:
    """Build minhub::linear at `library_file` (unless it is there) if this machine can, time every candidate it can
    run on GPT-2 124M's matrix shapes (four layers), for each weight dtype at one row and at 8 rows, and bf16 at
    MANY_ROWS rows (one layer), and return the fastest of each."""
    info = hardware.cpu_info()
    notes, library, sha256 = [], None, None
    if info.cxx is None:
        notes.append("no minhub::linear: no C++ compiler (install g++, then delete the plan to measure again)")
    else:
        try:
            if not library_file.is_file():
                library_file.parent.mkdir(parents=True, exist_ok=True)
                build_library(library_file)
            library, sha256 = str(library_file), _sha256(library_file)
            load_library(library, sha256)
        except Exception as e:  # a broken toolchain must not stop loading: PyTorch's kernels still work
            library = None
            notes.append(f"no minhub::linear: building it failed ({type(e).__name__}: {str(e)[:300]})")
    if not info.onednn:
        notes.append("no oneDNN in this torch")

    start = hardware.cpu_times()  # after the build: the compiler's own processes do not count
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 4  # (out, in)
    seconds: dict[str, float] = {}
    kernels: dict[str, str] = {}
    with torch.inference_mode():
        # values do not matter for speed, but all-zero pages may all map to one physical page: fill them
        float32 = [torch.full(s[::-1], 0.01).t() for s in shapes]  # the hub's GPT-2 storage, (in, out)
        for dtype in DTYPES:
            if dtype == torch.float32:
                weights, scales = float32, None
            elif dtype == torch.bfloat16:
                weights, scales = [w.to(dtype).contiguous() for w in float32], None
            else:
                weights, scales = [torch.full(w.shape, 3, dtype=dtype) for w in float32], \
                    [torch.full(w.shape[:1], 0.01, dtype=torch.bfloat16) for w in float32]
            x_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
            biases = [torch.full(w.shape[:1], 0.01, dtype=x_dtype) for w in weights]
            for rows in (1, 8):
                x = {k: torch.full((rows, k), 0.5, dtype=x_dtype) for k in (768, 3072)}
                candidates = {}
                for name in ("blas", "onednn", "minhub"):
                    fn = _candidate(name, dtype, rows, library is not None, info.onednn)
                    if fn is not None:
                        candidates[f"{choice_name(dtype, rows == 1)}: {name}"] = _over_matrices(fn, x, weights,
                                                                                                biases, scales)
                seconds.update(_timed_rounds(candidates, rounds))
                best = min(candidates, key=seconds.get)
                if not best.endswith(": blas"):
                    kernels[choice_name(dtype, rows == 1)] = best.rpartition(": ")[2]
            if dtype == torch.bfloat16 and library is not None:  # a prompt, on one layer's matrices
                x = {k: torch.full((MANY_ROWS, k), 0.5, dtype=dtype) for k in (768, 3072)}
                prompt = {f"{BF16_PROMPT}: {name}": _over_matrices(_candidate(name, dtype, MANY_ROWS, True, False), x,
                                                                   weights[:4], biases[:4], None)
                          for name in ("blas", "minhub")}
                seconds.update(_timed_rounds(prompt, rounds))
                if seconds[f"{BF16_PROMPT}: minhub"] < seconds[f"{BF16_PROMPT}: blas"]:
                    kernels[BF16_PROMPT] = "minhub"
            del weights, scales, biases
    fp32_bytes = sum(s[0] * s[1] * 4 for s in shapes)
    per_dtype = {"float32": 1, "bfloat16": 2, "int8": 4}
    one_layer_bf16 = sum(s[0] * s[1] * 2 for s in shapes[:4])  # what the prompt candidates read
    bytes_read = {name: one_layer_bf16 if name.startswith(BF16_PROMPT) else fp32_bytes / per_dtype[name.split()[0]]
                  for name in seconds}
    measured = {name: bytes_read[name] / t / 1e9 for name, t in seconds.items()}
    # the library is kept even where no choice is "minhub": minhub::attend is in it, and every process that reads
    # this plan must load what the measuring one did (a decode step's package key depends on it)
    return MatmulPlan(kernels=kernels, library=library, library_sha256=sha256,
                      measured_gbs={k: round(v, 2) for k, v in measured.items()}, notes=tuple(notes),
                      others_busy=hardware.others_share(start, hardware.cpu_times()))


def _over_matrices(fn: Callable, x: dict[int, torch.Tensor], weights: list[torch.Tensor], biases: list[torch.Tensor],
                   scales: list[torch.Tensor] | None) -> Callable[[], list[torch.Tensor]]:
    """One call of fn(x, weight, bias, scale) per matrix, as a decode step makes them."""
    scales = scales or [None] * len(weights)
    return lambda: [fn(x[w.size(1)], w, b, s) for w, b, s in zip(weights, biases, scales)]


def _candidate(name: str, dtype: torch.dtype, rows: int, have_minhub: bool, have_onednn: bool):
    """How candidate `name` multiplies (x, weight, bias, scale) for weights of `dtype`, or None where it does not
    apply: oneDNN only for 2+ rows of float32; minhub::linear only where it was built."""
    if name == "minhub":
        return (lambda x, w, b, s: minhub_linear(x, w, b, s)) if have_minhub else None
    if name == "onednn":
        return (lambda x, w, b, s: onednn_linear(x, w, b)) if have_onednn and rows > 1 and dtype == torch.float32 \
            else None
    if dtype == torch.int8:
        return lambda x, w, b, s: int8_linear(x, w, s) + b
    return lambda x, w, b, s: F.linear(x, w, b)


# --------------------------------------------------------------------------------------------------------------------
# Applying the plan


class CPULinear(nn.Linear):
    """nn.Linear whose float32 and bfloat16 CPU inference runs the kernels this machine's MatmulPlan picked (see the
    module docstring); everything else, training included, is nn.Linear's forward."""

    plan: MatmulPlan | None = None  # set per instance by use_fastest, with what follows from it
    # (dtype, one row) -> "minhub" or "onednn", (dtype, None) -> the prompt's (more than FEW_ROWS); absent: BLAS
    kernels: dict[tuple[torch.dtype, bool | None], str] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        # the cheapest tests first: this runs for every matrix of every decoded token
        if not (self.kernels and x.is_cpu and weight.is_cpu and x.dtype == weight.dtype) \
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return F.linear(x, weight, bias)
        rows = x.numel() // self.in_features
        kernel = self.kernels.get((x.dtype, rows == 1) if rows <= FEW_ROWS else (x.dtype, None))
        # the layouts minhub::linear reads: row-major, or fp32 (in, out) seen as (out, in) (it checks the rest)
        if kernel == "minhub" and x.is_contiguous() and (weight.is_contiguous() or (
                x.dtype == torch.float32 and weight.stride(0) == 1)):
            return minhub_linear(x, weight, bias)
        if kernel == "onednn":
            return (onednn_linear_op if torch.compiler.is_compiling() else onednn_linear)(x, weight, bias)
        return F.linear(x, weight, bias)


def use_fastest(model: nn.Module, matmul_plan: MatmulPlan | None = None) -> nn.Module:
    """Make `model`'s float32 or bfloat16 CPU matrix products take this machine's fastest kernels (in place);
    return it.

    matmul_plan: default `plan_for` the model's dtype, measured once per machine. Every nn.Linear becomes a CPULinear
    (same parameters, hooks and state dict); bf16 weights are made row-major (minhub's loader reads GPT-2's weights
    so from the start). Models on other devices, in other or mixed dtypes, or under MINHUB_MATMUL=blas are returned
    as they are; one moved later takes nn.Linear's path.
    """
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1 or any(p.device.type != "cpu" for p in model.parameters()):
        return model
    dtype = dtypes.pop()
    matmul_plan = matmul_plan or plan_for(dtype, "cpu")
    if matmul_plan is None or dtype == torch.int8:
        return model
    if dtype == torch.bfloat16:
        # minhub::linear reads bf16 rows only, and PyTorch's bf16 matrix-vector product is ten times slower on the
        # hub's GPT-2 (in, out) layout; fp32 stays as loaded (every candidate reads either layout)
        make_row_major(model)
    if matmul_plan.library is not None:
        load_library(matmul_plan.library, matmul_plan.library_sha256)
    kernels = {(t, one_row): matmul_plan.kernel(t, one_row) for t in (torch.float32, torch.bfloat16)
               for one_row in (True, False)} | {(torch.bfloat16, None): matmul_plan.prompt_kernel(torch.bfloat16)}
    kernels = {key: kernel for key, kernel in kernels.items() if kernel != "blas"}
    for module in model.modules():
        if type(module) in (nn.Linear, CPULinear):
            module.__class__ = CPULinear  # the same module, parameters and hooks, with another forward
            module.plan = matmul_plan
            module.kernels = kernels if module.in_features > 0 else {}  # nothing to sum: nn.Linear's path
    return model


def make_row_major(model: nn.Module) -> None:
    """Store every nn.Linear weight of `model` row-major, (out, in), in place: same values, same parameters, one
    matrix at a time (memory grows by one matrix at most); a weight that already is stays as it is."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.contiguous()
