"""The speed path, in one place and for every model that follows the contract (docs/contract.md).

One entry point, `optimize(model, ...)`, which minhub's loaders call with no options and the CLI and the server with
the user's; and `decode_step(model, ...)`, which the generation engine asks for the function to run for one new token.
Everything here works on nn.Linear modules and the contract's forward, never on a model's own classes.

- The matmul plan (minhub.matmul), always: every nn.Linear becomes a CPULinear (same parameters and state dict) that
  multiplies by the fastest exact kernel measured on this machine for its dtype and row count.
- The decode step at batch 1, by default: minhub.precompiled's, compiled ahead of time once per machine and model
  shape (fp32 GPT-2 124M on a 2-core EPYC: 34.6 tok/s against 30.5 eager and 32.1 for torch.compile in-process).
- `compile_batches=True`: batched and padded steps torch.compile'd in this process (20-40 s once per process), for
  servers and long batched runs: fp32 batch 8 127.1 against 116.5 tok/s, int8 257.4 against 220.2 (same EPYC).
- `weights="int8"`: weight-only int8, one scale per output row (as gpt-fast), a quarter of fp32's bytes per token:
  116.2 tok/s at batch 1 on the EPYC; teacher-forced top-1 agreement with fp32 92-94% on random weights.
- `weights="bf16-packed"`: bf16 weights packed once in oneDNN's blocked layout, for CPUs with oneDNN's bf16 kernels
  (AVX-512 BF16 or AMX): PyTorch's bf16 matmul repacks the weight at every call. On a 2-core Xeon, batch 8: 238.7
  tok/s, 2.52x transformers fp32 (docs/speed.md).
fp32 packing is gone: the matmul plan measures the same oneDNN kernel on the plain weight, and the packed copy was
slower than the default path on the EPYC (22.8 against 34.6 tok/s at batch 1, 110.4 against 116.5 at batch 8).
"""

from __future__ import annotations

import torch
import torch.nn as nn

import weakref
from typing import Callable

from minhub import hardware, matmul, precompiled

WEIGHTS = (None, "int8", "bf16-packed")
# the torch.compile'd step of each model optimized with compile_batches=True
_compiled_steps: weakref.WeakKeyDictionary[nn.Module, Callable[..., torch.Tensor]] = weakref.WeakKeyDictionary()


def optimize(model: nn.Module, *, weights: str | None = None, compile_batches: bool = False) -> nn.Module:
    """Make `model` (any model following the contract, on the CPU) take the fastest path this machine measured, in
    place; return it. Models on other devices keep their modules and decode eagerly.

    weights: None keeps the model's dtype (float32 or bfloat16); "int8" quantizes every nn.Linear (inference
        only); "bf16-packed" converts to bfloat16 packed for oneDNN (needs oneDNN's bf16 kernels: CPUFeatureError
        before any change otherwise). compile_batches: torch.compile the decode step of batches and padded prompts
        in this process (needs a C++ compiler: CPUFeatureError otherwise). See the module docstring for the figures.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if weights is not None and not on_cpu:
        raise ValueError(f"weights={weights!r} is for CPU inference: move the model with model.cpu() first")
    if compile_batches and on_cpu:
        hardware.require_compiler("compile_batches=True")
    if weights == "int8":
        quantize_int8(model)
    elif weights == "bf16-packed":
        prepack(model)
    else:
        matmul.use_fastest(model)
    if compile_batches:
        compile_decode(model)
    return model


def weights_for(model: nn.Module, *, int8: bool = False) -> str | None:
    """The `weights` option that is fastest for `model` as loaded: "int8" when asked, "bf16-packed" for a bfloat16
    model on a CPU with oneDNN's bf16 kernels (packing once is what makes them fast there), else None."""
    if int8:
        return "int8"
    params = list(model.parameters())
    if params and all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params) \
            and hardware.cpu_info().onednn_bf16:
        return "bf16-packed"
    return None


def decode_step(model: nn.Module, batch_size: int, masked: bool) -> Callable[..., torch.Tensor]:
    """What the engine calls as `step(tokens, cache_pos, attention_mask)` for one new token of every row against
    the KV cache: the precompiled step (one row, no mask), the step compile_batches compiled, or the model itself.
    Call it after setup_cache and before filling the cache: building the precompiled step sets the cache up again."""
    step = precompiled.step_for(model, batch_size, masked)
    if step is not None:
        return lambda tokens, cache_pos, attention_mask=None: step(tokens, cache_pos)
    return _compiled_steps.get(model, model)


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight lives in oneDNN's blocked layout, packed once at construction.

    Inference only: the packed weight has no gradient, cannot be trained, and is not in the state dict.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, batch_size: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(dtype).contiguous()  # (out, in)
        # batch_size only tunes the layout; any batch size works afterwards
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, batch_size),
                             persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.packed_weight.dtype}"


def prepack(model: nn.Module, batch_size: int = 1) -> nn.Module:
    """Convert `model` (in place) to bfloat16 and replace every nn.Linear by a PackedLinear; return it.

    batch_size: the batch you will decode with, a layout hint. The model must be on the CPU; it becomes
    inference-only. Needs oneDNN's bf16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT): elsewhere, such as on
    AVX2-only CPUs, it raises minhub.hardware.CPUFeatureError before touching the model.
    """
    from minhub.generation import check_int

    check_int("batch_size", batch_size, 1)
    hardware.require_onednn_bf16(
        "weights='bf16-packed'",
        instead="use weights='int8' (a quarter of fp32's bytes, runs on every CPU) or the model in bfloat16 as "
                "loaded (dtype=torch.bfloat16)")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("bf16 packing is for CPU inference: move the model with model.cpu() first, or on a GPU "
                         "simply use model.to(torch.bfloat16)")
    return _replace_linears(model, lambda linear: PackedLinear(linear, torch.bfloat16, batch_size), torch.bfloat16)


def _replace_linears(model: nn.Module, convert, dtype: torch.dtype) -> nn.Module:
    """Swap every nn.Linear of `model` for `convert(linear)`, in place, then move what is left (embeddings,
    LayerNorms, and with them the activations) to `dtype`."""
    model.eval()
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, convert(child))
        model.to(dtype)  # a KV cache already set up changes with it (its tensors are buffers)
    return model


class Int8Linear(nn.Module):
    """A frozen nn.Linear with int8 weights, one scale per output row (symmetric, weight-only quantization):
    y = (x @ q.T) * scale + bias. With use_minhub, minhub::linear multiplies (float32 or bfloat16 activations, sums in
    float32, any number of rows); otherwise torch._weight_int8pack_mm (bfloat16 activations: it is twenty times slower
    with float32 ones)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16, use_minhub: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()  # (out, in)
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # the largest weight of each row maps to +-127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8).contiguous(),
                             persistent=False)
        self.register_buffer("scale", scale.to(dtype), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.register_buffer("bias", bias, persistent=False)
        self.use_minhub = use_minhub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_minhub:
            return matmul.minhub_linear(x.contiguous(), self.weight, self.bias, self.scale)
        y = matmul.int8_linear(x.reshape(-1, self.in_features), self.weight, self.scale)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kernel = "minhub::linear" if self.use_minhub else "torch._weight_int8pack_mm"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, {kernel}"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by an Int8Linear; return it.

    Weight-only int8 with one scale per output row: a quarter of fp32's bytes per decoded token. The logits move
    further from fp32 than with bf16 (the benchmark prints top-1 agreement and max |dlogit|). The tied lm_head gets
    its own int8 copy. Where this machine's plan (minhub.matmul) multiplies int8 weights with minhub::linear, the
    rest of the model (embeddings, layer norms, attention, activations) stays float32: faster than bf16 on CPUs
    without native bf16, and closer to fp32. Elsewhere it runs in bfloat16 through torch._weight_int8pack_mm, as in
    pytorch-labs/gpt-fast. CPU only, inference only; combines with compile_decode.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("quantize_int8 is for CPU inference: move the model with model.cpu() first")
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError("the model is already packed (bf16-packed): quantize a freshly loaded model instead")
    int8_plan = matmul.plan_for(torch.int8, "cpu")
    use_minhub = int8_plan is not None and all(int8_plan.kernel(torch.int8, one_row) == "minhub"
                                               for one_row in (True, False))
    dtype = torch.float32 if use_minhub else torch.bfloat16
    return _replace_linears(model, lambda linear: Int8Linear(linear, dtype, use_minhub), dtype)


def compile_decode(model: nn.Module) -> nn.Module:
    """Make decode_step return a torch.compile'd version of `model`'s forward for one new token of a batch (with or
    without attention_mask); return the model. Prefill, scoring and training keep the eager forward.

    The matrix products keep this machine's kernels (the matmul plan's, traced as opaque calls). Compilation happens
    lazily at the first step, once per kind of call (one row or several, with or without a mask): 20-40 s the
    first time on a 2-core CPU. Needs a C++ compiler and Python.h on the CPU (inductor's requirement): without them
    it raises minhub.hardware.CPUFeatureError before changing the model. Outputs equal the eager step's to float
    rounding. Forward hooks are not called inside the compiled step.
    """
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError("compile_batches does not combine with bf16 packing: use one or the other")
    if any(p.device.type == "cpu" for p in model.parameters()):
        hardware.require_compiler("compile_batches=True")
    model.eval()
    # dynamic=True: one graph for every cache position (and every batch size above 1), not one per position
    _compiled_steps[model] = torch.compile(model.forward, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})
    return model
