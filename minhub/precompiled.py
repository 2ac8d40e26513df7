"""The default path's one-token decode step on the CPU, compiled ahead of time once per machine and model shape.

It is built from the contract's forward (docs/contract.md), so every model file gets it. Why: at batch 1 a GPT-2
step is ~50 weight matrix products and ~500 small ops. Run eagerly, the small ops and the Python between them cost
2-4 ms a token: a sixth of an fp32 token of GPT-2 124M on a 2-core CPU, a third of an int8 one. Exported
(torch.export) and compiled by AOTInductor, they become a few fused C++ loops; the matrix products stay
minhub.matmul's kernels (minhub::linear is an opaque call in the graph), and attention for the one new query goes to
minhub::attend (attend_one_query).

What is compiled is the step's code, not its tensors: the package (a few MB) holds no weights, and at every generate()
call the model's own weights and KV cache are bound to it as "user-managed constants" (no copy). A package is built
once per machine, torch version, model shape and weight layout, matmul kernels and source of the traced code, in
<cache>/steps/<key>.pt2 (3-4 s a layer on 2 cores, with a message); later processes load it in milliseconds.

The engine (minhub.generation, through minhub.speed) takes it for one prompt (batch 1, no attention mask) of a model on
the CPU whose weights are at least MIN_WEIGHT_BYTES (below that, a compile is never paid back), on a machine with a C++
compiler. MINHUB_DECODE=eager turns it off, MINHUB_DECODE=compiled takes it for any size. Where it cannot be built
(remembered on disk, so that later processes do not try again) or does not take the model's tensors, decoding is eager,
with one warning saying why.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from minhub import hardware, matmul
from minhub.files import write_atomically

log = logging.getLogger("minhub")

MIN_WEIGHT_BYTES = 32 * 2**20
STEP_VERSION = 2  # bump when what is exported changes in a way the key does not see

# per process: each model's key, its package's loader and the names of the tensors that takes; and for a key whose
# package could not be built or bound, why
_bound: weakref.WeakKeyDictionary[nn.Module, tuple[str, object, list[str]]] = weakref.WeakKeyDictionary()
_failed: dict[str, str] = {}


def setting() -> str:
    """MINHUB_DECODE: "auto" (the default), "eager" (never compile) or "compiled" (for any model size); else
    ValueError."""
    value = os.environ.get("MINHUB_DECODE", "auto")
    if value not in ("auto", "eager", "compiled"):
        raise ValueError(f"MINHUB_DECODE={value!r}: use auto (a compiled step for models of "
                         f"{MIN_WEIGHT_BYTES >> 20} MB and more; the default), eager (never compile) or compiled "
                         "(for any size)")
    return value


class DecodeStep(nn.Module):
    """What is exported: the model's forward for one new token of one row at a cache position. The position comes
    as the length of `past` (a view of that many elements), because torch.export keeps a tensor's size symbolic but
    not yet an int argument: one package serves every position."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, past.size(0))


def step_for(net: nn.Module, batch_size: int, masked: bool) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """The compiled `step(tokens (1, 1), cache_pos) -> logits (1, 1, V)` for the model `net` with its current KV
    cache, or None where the engine should run the model eagerly. Builds the package the first time on this machine
    (which sets the cache up again: call it before filling the cache)."""
    if masked or batch_size != 1 or net.training:
        return None
    mode = setting()
    if mode == "eager":
        return None
    tensors = named_tensors(net)
    if any(t.device.type != "cpu" or t.layout != torch.strided or t.requires_grad and torch.is_grad_enabled()
           for t in tensors.values()):  # oneDNN's packed weights (bf16-packed) have no plain storage
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    if mode == "auto" and weight_bytes < MIN_WEIGHT_BYTES:
        return None
    cpu = hardware.cpu_info()
    if not cpu.can_compile:
        if mode == "compiled":
            hardware.require_compiler("MINHUB_DECODE=compiled")
        return None
    key = step_key(net)
    if key in _failed:  # the reason it could not be built, already told
        return None
    if _bound.get(net, (None,))[0] != key:
        # a loader per model (4 ms), not per key: two models of one shape may decode in two threads at once
        loaded = _load_or_build(net, key)
        if isinstance(loaded, str):
            _failed[key] = loaded
            return None
        _bound[net] = (key, *loaded)
        tensors = named_tensors(net)  # building set the cache up again
    _, loader, fqns = _bound[net]
    # bind this model's own tensors at every call: the cache changes with setup_cache, the weights with the user
    try:
        # the key should make a misfit impossible; a step that ran on part of the model's tensors would be worse
        unknown = [fqn for fqn in fqns if fqn.removeprefix("model.") not in tensors]
        bound = {id(tensors[fqn.removeprefix("model.")]) for fqn in fqns if fqn not in unknown}
        unbound = [name for name, t in _parameters_and_buffers(net) if id(t) not in bound]
        if unknown or unbound:
            raise ValueError(f"it takes {_some(unknown)} the model lacks and not {_some(unbound)}")
        loader.load_constants({fqn: tensors[fqn.removeprefix("model.")] for fqn in fqns}, False, True, True)
    except Exception as e:  # a package that does not fit the model after all: decode eagerly rather than fail
        _failed[key] = f"{type(e).__name__}: {e}"
        del _bound[net]
        log.warning("minhub: the compiled decode step %s does not take this model's tensors (%s); decoding eagerly",
                    package_path(key), _failed[key])
        return None
    past = torch.empty(net.cache_len, dtype=torch.int8)

    def step(tokens: torch.Tensor, cache_pos: int) -> torch.Tensor:
        return loader.run([tokens, past[:cache_pos]])[0]

    return step


def _parameters_and_buffers(net: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(net.named_parameters()) + list(net.named_buffers())


def _some(names: list[str]) -> str:
    return "nothing" if not names else ", ".join(names[:3]) + (f" ({len(names)} in all)" if len(names) > 3 else "")


def named_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `net` (the KV cache included) by name, a tied weight under each of its names,
    and the tensors modules hold as plain attributes (such as rotary frequencies kept out of model.to(dtype)), which
    torch.export lifts into constants too."""
    tensors = dict(net.named_parameters(remove_duplicate=False)) | dict(net.named_buffers(remove_duplicate=False))
    for prefix, module in net.named_modules(remove_duplicate=False):
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not name.startswith("_"):
                tensors[f"{prefix}.{name}" if prefix else name] = value
    return tensors


def step_key(net: nn.Module) -> str:
    """What a package depends on: the machine and its matmul plan, torch, the model's config, every tensor's shape,
    strides and dtype, every module's class and kernels, whether minhub::attend is there, and the source of the classes
    traced."""
    named = list(net.named_modules())
    modules = [(name, type(m).__qualname__, sorted(map(str, getattr(m, "kernels", {}).items()))) for name, m in named]
    tensors = [(name, tuple(t.shape), t.stride(), str(t.dtype)) for name, t in named_tensors(net).items()]
    text = json.dumps([STEP_VERSION, matmul.machine_key(), torch.__version__, sys.version_info[:2],
                       type(net).__qualname__, repr(net.config), net.cache_len, hasattr(torch.ops.minhub, "attend"),
                       modules, tensors, _sources({type(m) for _, m in named})])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sources(classes: set[type]) -> list[str]:
    """The hashes of the files defining `classes` and of this one (each file read once per process)."""
    files = sorted({inspect.getsourcefile(c) for c in classes} | {__file__})
    return [matmul.sha256_once(Path(f)) for f in files]


def package_path(key: str) -> Path:
    """Where the package for `key` is kept."""
    return matmul.cache_dir() / "steps" / f"{key}.pt2"


def _load_or_build(net: nn.Module, key: str) -> tuple[object, list[str]] | str:
    """The loaded package for `key`, built first if the cache lacks it; or, where that fails, the reason (a str)."""
    path = package_path(key)
    failed = path.with_suffix(".failed")
    if failed.exists():
        return failed.read_text()
    if path.exists():
        try:
            return _load(path)
        except Exception as e:  # truncated or from another build: build it again
            log.warning("minhub: the compiled decode step %s is unusable (%s); building it again", path, e)
    layers = len(net.kv_caches())  # the compile's time grows with the layers: 3-4 s each on a 2-core EPYC
    log.warning("minhub: compiling the decode step of %s (%d layers) for this CPU and model shape, once (about "
                "%d-%d s on 2 cores); kept in %s (MINHUB_DECODE=eager skips it)", type(net).__name__, layers,
                5 * layers // 2 + 5, 4 * layers + 15, path.parent)
    start = time.perf_counter()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _build(net, path)
        loaded = _load(path)
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        log.warning("minhub: could not compile the decode step (%s); decoding eagerly. Delete %s to try again",
                    reason, failed)
        try:
            write_atomically(failed, reason.encode())
        except OSError:
            pass
        return reason
    log.warning("minhub: decode step compiled in %.0f s", time.perf_counter() - start)
    return loaded


def _load(path: Path) -> tuple[object, list[str]]:
    """(the package's C++ loader, the names of the tensors it takes). torch._inductor.aoti_load_package wraps the same
    loader but imports inductor first (1.3 s)."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    return loader, loader.get_constant_fqns()


def _build(net: nn.Module, path: Path) -> None:
    import torch._inductor
    from torch.export import Dim

    # the last position a one-token step can take: the context's, or the cache's (the engine keeps a slot spare)
    cache_len = net.cache_len
    last = min(net.config.context_length, cache_len - 1) - 1
    # export traces with autograd on, which refuses inference tensors: a cache of ordinary tensors meanwhile
    try:
        with torch.inference_mode(False), torch.no_grad():
            net.setup_cache(1, cache_len)
            past = torch.empty(cache_len, dtype=torch.int8)
            example = (torch.zeros(1, 1, dtype=torch.long), past[:max(2, last // 2)])
            program = torch.export.export(DecodeStep(net), example, strict=True, dynamic_shapes={
                "tokens": None, "past": {0: Dim("cache_pos", min=1, max=last)}})
    finally:  # a cache of the caller's kind again (inference tensors under inference mode)
        net.setup_cache(1, cache_len)
    with torch.inference_mode(False), torch.no_grad():
        attend_one_query(program)
        partial = path.with_name(f".{path.stem}.{os.getpid()}.pt2")  # inductor wants the suffix
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs={
                "aot_inductor.package_constants_in_so": False})
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)  # what a failed or interrupted compile left


def attend_one_query(program: torch.export.ExportedProgram) -> None:
    """Route the step's attention (one query, no mask, no dropout; grouped-query too) to minhub::attend, in place:
    PyTorch's SDPA
    prepares blocks for many queries and costs 2-5x as much for one (135 us a layer in bf16 on a 2-core AVX2 CPU)."""
    if not hasattr(torch.ops.minhub, "attend"):  # minhub's library is not built on this machine
        return
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.scaled_dot_product_attention.default:
            continue
        q, k, v, *rest = node.args
        options = dict(zip(("attn_mask", "dropout_p", "is_causal"), rest)) | node.kwargs
        groups_fit = q.meta["val"].shape[1] == k.meta["val"].shape[1] or options.get("enable_gqa")
        if options.get("attn_mask") is not None or options.get("dropout_p") or options.get("is_causal") \
                or not groups_fit or q.meta["val"].shape[2] != 1:
            continue
        scale = options.get("scale") or q.meta["val"].shape[-1] ** -0.5
        with graph.inserting_after(node):
            attend = graph.call_function(torch.ops.minhub.attend.default, (q, k, v, float(scale)))
        attend.meta = dict(node.meta)
        node.replace_all_uses_with(attend)
        graph.erase_node(node)
    program.graph_module.recompile()
