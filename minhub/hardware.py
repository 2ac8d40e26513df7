"""What this machine can run: the CPU's instruction sets, the kernels and compiler that minhub's fast paths need, and
which torch devices exist.

Every fast path asks `cpu_info()` (one cached probe) before doing any work, and either takes a path that works on
this CPU or raises `CPUFeatureError` naming what is missing and what to use instead. Tests replace `cpu_info` to
reach the branch their CPU would not take (`monkeypatch.setattr(minhub.hardware, "cpu_info", lambda: fake)`), so
callers look it up through the module at call time: `hardware.cpu_info()`, never a copy imported by name.

What depends on what (torch 2.13, CPU wheel):
- bf16 weights packed for oneDNN (`minhub.speed.prepack(model)`): oneDNN's bf16 matmul, which needs
  AVX-512 BW+VL+DQ or AVX-NE-CONVERT. AVX2-only CPUs (e.g. AMD EPYC Zen 2/3) lack both.
- a compiled decode step (`compile_decode`, `minhub train --compile` on the CPU): inductor writes C++ and builds it
  with $CXX or g++, including Python.h.
- the default path's own kernel, minhub::linear (minhub.matmul, built once per machine from matmul.cpp): $CXX or g++
  only; its AVX2 loops where the CPU has AVX2 and FMA, portable loops elsewhere. Without a compiler the default path
  measures PyTorch's kernels and oneDNN only.
- fp32 packing and int8 weights (`_weight_int8pack_mm`) run on every x86-64 CPU torch supports.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# the /proc/cpuinfo flags that decide which kernels run fast (or at all)
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
                  "avx_vnni", "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8")


class CPUFeatureError(RuntimeError):
    """A fast path needs an instruction set, kernel or compiler this machine does not have; the message names it
    and what to use instead."""


class DeviceError(ValueError):
    """The requested device does not exist in this torch build or on this machine; the message lists what does."""


@dataclass(frozen=True)
class CPUInfo:
    """What the CPU and this torch installation can run."""

    model: str  # e.g. "AMD EPYC 7B13"
    isa: str  # the kernels ATen dispatches to: "AVX512", "AVX2", "DEFAULT", ... (ATEN_CPU_CAPABILITY can lower it)
    flags: frozenset[str]  # the RELEVANT_FLAGS this CPU has (empty where /proc/cpuinfo does not exist)
    onednn: bool  # torch was built with oneDNN (mkldnn): packed weights are possible
    onednn_bf16: bool  # oneDNN's bf16 matmul runs here: needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT
    cxx: str | None  # the C++ compiler inductor would use, None if there is none
    python_headers: bool  # Python.h, which inductor's generated C++ includes

    @property
    def can_compile(self) -> bool:
        """torch.compile's CPU backend (inductor) can build its C++ here."""
        return self.cxx is not None and self.python_headers

    def describe(self) -> str:
        """One line for logs and benchmarks: model, ATen level, instruction sets, and what the fast paths find."""
        flags = " ".join(f for f in RELEVANT_FLAGS if f in self.flags) or "no AVX2/AVX-512 flags read"
        return (f"{self.model}; ATen {self.isa}; {flags}; oneDNN bf16 {'yes' if self.onednn_bf16 else 'no'}; "
                f"C++ compiler {self.cxx or 'none'}{'' if self.python_headers else ' (no Python.h)'}")


def _cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():  # one block per logical CPU: the first block says it all
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split()) & frozenset(RELEVANT_FLAGS)
    return model or platform.processor() or platform.machine(), flags


@functools.cache
def cpu_info() -> CPUInfo:
    """Probe the CPU once per process (cheap: no kernel is run, nothing is compiled)."""
    model, flags = _cpu_model_and_flags()
    onednn = torch.backends.mkldnn.is_available()
    # the same test torch's mkldnn_reorder_linear_weight applies before it refuses bf16
    onednn_bf16 = onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    # inductor's own search on Linux/macOS: $CXX, else g++ (clang++ on macOS); it does not fall back further
    cxx = shutil.which(os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++"))
    python_headers = (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()
    return CPUInfo(model=model, isa=torch.backends.cpu.get_cpu_capability(), flags=flags, onednn=onednn,
                   onednn_bf16=onednn_bf16, cxx=cxx, python_headers=python_headers)


@dataclass(frozen=True)
class CPUTimes:
    """One reading of how much CPU time the machine and this process have used, in seconds."""

    busy: float  # all CPUs, since boot: user, system, interrupts, stolen
    total: float  # busy plus idle and waiting for I/O
    own: float  # this process, every thread


def cpu_times() -> CPUTimes | None:
    """The machine's and this process's CPU time now, or None where /proc/stat does not exist (not Linux)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    busy = (user + nice + system + irq + softirq + steal) / tick
    return CPUTimes(busy=busy, total=busy + (idle + iowait) / tick, own=time.process_time())


def others_share(start: CPUTimes | None, end: CPUTimes | None) -> float | None:
    """The share of the machine's CPU time (0 to 1) that other processes used between two readings, or None where
    there are no readings: what a measurement of this process's speed must not share the CPUs with."""
    if start is None or end is None or end.total <= start.total:
        return None
    others = (end.busy - start.busy) - (end.own - start.own)
    return round(min(1.0, max(0.0, others / (end.total - start.total))), 3)


def require_compiler(what: str) -> None:
    """Raise CPUFeatureError if inductor cannot build C++ here; `what` names the feature that needs it."""
    info = cpu_info()
    if info.cxx is None:
        raise CPUFeatureError(
            f"{what} needs a C++ compiler (torch.compile builds C++ on the CPU) and none was found "
            f"({os.environ.get('CXX', 'g++')} is not on PATH): install g++ (e.g. apt-get install g++) or point $CXX at "
            "one, or leave the compiled path off")
    if not info.python_headers:
        raise CPUFeatureError(
            f"{what} needs Python's C headers (Python.h, for torch.compile's C++) and this Python has none: install "
            f"them (e.g. apt-get install python{sys.version_info.major}.{sys.version_info.minor}-dev) or leave the "
            "compiled path off")


def require_onednn_bf16(what: str, instead: str) -> None:
    """Raise CPUFeatureError unless oneDNN's bf16 matmul runs on this CPU; `instead` says what to use then."""
    info = cpu_info()
    if not info.onednn:
        raise CPUFeatureError(f"{what} needs a PyTorch built with oneDNN (mkldnn), and this one is not: {instead}")
    if not info.onednn_bf16:
        raise CPUFeatureError(
            f"{what} needs oneDNN's bf16 kernels, which need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; this CPU "
            f"({info.model}, {info.isa}) has neither: {instead}")


def available_devices() -> list[str]:
    """The devices this torch build sees here: 'cpu', then 'cuda:0' ... and 'mps' where present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str | torch.device | None) -> torch.device:
    """The torch.device for `device` (None means cpu), or DeviceError saying what exists instead."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"{device!r} is not a device name: use cpu, cuda, cuda:N or mps") from e
    available = ", ".join(available_devices())
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this PyTorch ({torch.__version__}) is built without CUDA: install a CUDA build of torch"
                   if torch.version.cuda is None and torch.version.hip is None
                   else "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            raise DeviceError(f"device {str(dev)!r} is not available: {why}. Available here: {available}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(dev)!r} does not exist: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s). Available here: {available}")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device 'mps' is not available (Apple-silicon GPUs only, with an MPS build of torch). "
                              f"Available here: {available}")
        return dev
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise DeviceError(f"device {str(dev)!r} is not available in this PyTorch. Available here: {available}")
    return dev
