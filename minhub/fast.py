"""Faster CPU inference, opt-in and inference-only: packing weights once, int8 weights, compiling the decode step.

prepack: PyTorch's CPU matmul reorders ("packs") the weight into the kernel's blocked layout on every call when the
batch is small, and for bfloat16 weights that repacking costs as much as the multiply. Packing each nn.Linear once
with oneDNN removes it. Measured on a 2-core Xeon (bench/bench_gpt2.py, docs/speed.md), GPT-2 124M: bf16 packed
decodes 1.79x as fast as fp32 transformers at batch 1 and 2.52x at batch 8; fp32 packed helps batched decoding
(1.51x at batch 8, plain fp32 1.16x) but not batch 1 (0.97x, plain 1.17x).

quantize_int8: weight-only int8 as in pytorch-labs/gpt-fast (one scale per output row), a quarter of fp32's bytes per
token, through this machine's int8 kernel: minhub::linear with float32 activations where the plan (minhub.matmul)
picked it, else PyTorch's torch._weight_int8pack_mm with bf16 activations; teacher-forced top-1 agreement with fp32
92-94% on random weights (the benchmark prints it).

compile_decode: at batch 1 each weight matmul streams megabytes through the CPU caches, so every small op that follows
it (layer norm, residual add, attention, the Python between them) starts cold and costs tens of microseconds.
Compiling the one-token step into C++ (torch.compile, inductor, cpp_wrapper) removes most of what runs between them.
The matrix products inside stay this machine's choice (minhub.matmul): minhub::linear and oneDNN are opaque calls.
The default path already runs such a step at batch 1, compiled once per machine and model shape (minhub.precompiled);
compile_decode also covers batches, padded prompts and the models that one leaves eager, at a compile per process.

None of this is applied by default: each trades something (compile time, precision, memory) for speed. What is
applied by default, the fastest exact kernel per dtype and row count for this CPU, is minhub.matmul (measured once
per machine); quantize_int8 and compile_decode use its choices too.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minhub import generation, hardware, matmul
from minhub.gpt2 import GPT2


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


def prepack(model: nn.Module, dtype: torch.dtype = torch.bfloat16, batch_size: int = 1) -> nn.Module:
    """Convert `model` (in place) to `dtype` and replace every nn.Linear by a PackedLinear; return it.

    dtype: torch.bfloat16 (half the bytes per token; logits differ from fp32 by bf16 rounding, see the accuracy
    figures in docs/speed.md) or torch.float32 (same numbers as the plain model, faster for batched decoding).
    batch_size: the batch you will decode with, a layout hint. The model must be on the CPU; it becomes
    inference-only (call it under torch.inference_mode()).
    bf16 packing needs oneDNN's bf16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT): on other CPUs, such as AVX2-only
    ones, it raises minhub.hardware.CPUFeatureError before touching the model. fp32 packing runs on every CPU.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"prepack supports torch.float32 and torch.bfloat16, not {dtype}")
    if dtype == torch.bfloat16:
        hardware.require_onednn_bf16(
            "prepack(model, torch.bfloat16)",
            instead="use quantize_int8(model) (a quarter of fp32's bytes, runs on every CPU), the unpacked "
                    "model.to(torch.bfloat16), or prepack(model, torch.float32)")
    elif not hardware.cpu_info().onednn:
        raise hardware.CPUFeatureError("prepack needs a PyTorch built with oneDNN (mkldnn), and this one is not: "
                                       "use the model as it is")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("prepack is for CPU inference: move the model with model.cpu() first, or on a GPU simply "
                         "use model.to(torch.bfloat16)")
    generation.check_int("batch_size", batch_size, 1)
    return _replace_linears(model, lambda linear: PackedLinear(linear, dtype, batch_size), dtype)


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
        raise ValueError("the model is already packed by prepack: quantize a freshly loaded model instead")
    int8_plan = matmul.plan_for(torch.int8, "cpu")
    use_minhub = int8_plan is not None and all(int8_plan.kernel(torch.int8, one_row) == "minhub"
                                               for one_row in (True, False))
    dtype = torch.float32 if use_minhub else torch.bfloat16
    return _replace_linears(model, lambda linear: Int8Linear(linear, dtype, use_minhub), dtype)


def compile_decode(model: GPT2) -> GPT2:
    """Make minhub's generation engine run a compiled version of `model`'s one-token decode step (through
    generation.use_decode_step); return the model. Prefill, scoring and training keep the eager forward.

    The matrix products keep this machine's kernels (minhub.matmul's plan, traced as opaque calls); the weights keep
    their layout. Compilation happens lazily at the first decode step, once per kind of call (one row or several,
    with or without attention_mask): 20-40 s the first time on a 2-core CPU, about 10 s when inductor's on-disk cache
    already holds it. Needs a C++ compiler and Python.h on the CPU (inductor's requirement): without them it raises
    minhub.hardware.CPUFeatureError before changing the model. Outputs equal the eager step's to float rounding
    (logits within 1e-4 of transformers').
    Forward hooks are not called inside the compiled step.
    """
    if not isinstance(model, GPT2):
        raise TypeError(f"compile_decode is for minhub GPT2 models, not {type(model).__name__}")
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError("compile_decode does not combine with prepack: use one or the other")
    if any(p.device.type == "cpu" for p in model.parameters()):
        hardware.require_compiler("compile_decode")
    model.eval()
    options = {"cpp_wrapper": True}
    # dynamic=True: one graph for every cache position (and every batch size above 1), not one per position
    generation.use_decode_step(model, torch.compile(model.forward, dynamic=True, fullgraph=True, options=options))
    return model
