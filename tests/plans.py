"""Matmul plans forced on any CPU, so that every branch a measured plan can take is tested whatever this CPU's
measurement picks (minhub.matmul).

A plan picks a kernel per weight dtype for one activation row and for 2-16 rows: "blas" (PyTorch's), "onednn" (float32
at 2-16 rows only) or "minhub" (minhub::linear), and for bf16 prompts (more rows) "blas" or "minhub". PLANS holds
whole-machine plans that together take every kernel at each row count, including the mixed ones measured so far (an
AVX-512 EPYC: minhub at one row, oneDNN for fp32 at few rows, PyTorch's for bf16 and int8 at few rows). `force` makes
one of them this process's plan, so the loaders, quantize_int8 and everything after them take it; `per_layer` gives
each block of one model another plan, so that a single compiled step (one compile, not one per plan) contains every
kernel at its row count.


The references such tests compare with, in the precision of the path under test: transformers' greedy tokens, its
logits in bfloat16 with the distance bf16 costs transformers itself, and a transformers model holding the int8
weights dequantized.
"""

import copy

import pytest
import torch
import torch.nn as nn

from minhub import hardware, matmul
from minhub.matmul import MatmulPlan

CPU = hardware.cpu_info()

ALL_MINHUB = {matmul.choice_name(dtype, one_row): "minhub" for dtype in matmul.DTYPES for one_row in (True, False)}
ALL_MINHUB[matmul.BF16_PROMPT] = "minhub"  # bf16 prompts too
ONE_ROW_MINHUB = {name: "minhub" for name in ALL_MINHUB if name.endswith("one row")}
FEW_ROWS_MINHUB = {name: "minhub" for name in ALL_MINHUB if name.endswith("few rows")}
PLANS = {
    "blas": {},
    "minhub": ALL_MINHUB,
    "minhub + onednn": {**ALL_MINHUB, "float32 few rows": "onednn"},
    "blas + onednn": {"float32 few rows": "onednn"},
    "minhub one row + onednn": {**ONE_ROW_MINHUB, "float32 few rows": "onednn"},
    "blas one row + minhub few rows": FEW_ROWS_MINHUB,
}
# one plan per block of a 3-block model: each kernel of each dtype at one row and at few rows, in one model
PER_LAYER = ("minhub + onednn", "blas one row + minhub few rows", "blas")


def fake_cpu(monkeypatch, **changes) -> None:
    """Make every fast path see this CPU with `changes` until the test ends (e.g. onednn_bf16=False, as on AVX2-only
    CPUs; cxx=None, as without a compiler): the branch a CPU without the feature takes, tested on any CPU."""
    import dataclasses

    fake = dataclasses.replace(CPU, **changes)
    monkeypatch.setattr(hardware, "cpu_info", lambda: fake)


def library() -> tuple[str, str]:
    """The session's minhub::linear (built by the plan's measurement where a compiler exists), loaded: path, sha256."""
    if CPU.cxx is None:
        pytest.skip(f"minhub::linear needs a C++ compiler; {CPU.describe()}")
    matmul.plan()
    path = matmul.library_path()
    if not path.is_file():
        pytest.fail(f"a C++ compiler is here but minhub::linear was not built: {matmul.plan().describe()}")
    sha256 = matmul._sha256(path)
    matmul.load_library(str(path), sha256)
    return str(path), sha256


def forced_plan(name: str) -> MatmulPlan:
    """PLANS[name] as a MatmulPlan this CPU can run (skips where it needs what this torch or machine lacks)."""
    kernels = PLANS[name]
    if "onednn" in kernels.values() and not CPU.onednn:
        pytest.skip("needs a PyTorch built with oneDNN")
    if "minhub" in kernels.values():
        path, sha256 = library()
        return MatmulPlan(kernels=kernels, library=path, library_sha256=sha256)
    return MatmulPlan(kernels=kernels)


def force(monkeypatch, name: str) -> MatmulPlan:
    """Make PLANS[name] this process's plan until the test ends: what the measurement would have said."""
    plan = forced_plan(name)
    monkeypatch.delenv("MINHUB_MATMUL", raising=False)
    monkeypatch.setitem(matmul._plans, matmul.machine_key(), plan)
    return plan


def per_layer(model: nn.Module) -> nn.Module:
    """Give block i of a GPT-2 PER_LAYER[i]'s plan (in place; the lm_head takes the last): one model whose decode
    step runs every kernel at one row (batch 1) and at few rows (a batch)."""
    blocks = model.transformer.h
    assert len(blocks) == len(PER_LAYER), f"per_layer needs a {len(PER_LAYER)}-block model"
    for block, name in zip(blocks, PER_LAYER):
        matmul.use_fastest(block, forced_plan(name))
    matmul.use_fastest(model.lm_head, forced_plan(PER_LAYER[-1]))
    return model


def kernels_in(model: nn.Module, dtype, one_row: bool) -> set[str]:
    """The kernels `model`'s linears take for `dtype` at one row or at few rows."""
    return {m.kernels.get((dtype, one_row), "blas") for m in model.modules() if isinstance(m, matmul.CPULinear)}


def transformers_greedy(reference, prompt, new_tokens: int):
    """transformers' greedy continuation of `prompt` (one row, or rows of equal length without padding)."""
    return reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def dequantized_reference(quantized: nn.Module, reference: nn.Module) -> nn.Module:
    """A copy of the transformers GPT-2 `reference` whose matrices are `quantized`'s int8 weights times their scales
    (exactly, in float32) and whose biases are `quantized`'s: what weight-only int8 should compute, computed by
    transformers. The lm_head gets its own weight (quantize_int8 quantizes the tied one apart from the embedding)."""
    from minhub.speed import Int8Linear

    ref = copy.deepcopy(reference)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if not isinstance(module, Int8Linear):
                continue
            weight = module.weight.float() * module.scale.float()[:, None]  # (out, in)
            if name == "lm_head":
                ref.lm_head.weight = nn.Parameter(weight)
                continue
            target = ref.get_submodule(name)  # transformers' Conv1D stores (in, out)
            target.weight.copy_(weight.t())
            target.bias.copy_(module.bias.float())
    return ref


def bf16_reference(reference: nn.Module, idx: torch.Tensor, slack: float = 2.0) -> tuple[torch.Tensor, float]:
    """transformers' logits for `idx` with the model in bfloat16 (as float32), and how far ours may be from them:
    `slack` times the distance between transformers' own bfloat16 and float32 logits (bf16's rounding on this
    model and input; ours rounds as much, in another order, so the two distances add up to ~1.4x where independent)."""
    with torch.inference_mode():
        exact = reference(idx).logits
        rounded = copy.deepcopy(reference).to(torch.bfloat16)(idx).logits.float()
    return rounded, slack * (rounded - exact).abs().max().item()


def assert_close_in_bf16(ours: torch.Tensor, rounded: torch.Tensor, bound: float) -> None:
    """Our logits within `bound` of the bf16 reference's, and a different greedy token only where the reference's
    top two logits are within twice the bound of each other (a near-tie that rounding may flip)."""
    ours = ours.float()
    assert (ours - rounded).abs().max().item() <= bound
    top2 = rounded.topk(2, dim=-1).values
    flipped = ours.argmax(-1) != rounded.argmax(-1)
    assert ((top2[..., 0] - top2[..., 1])[flipped] <= 2 * bound).all()
