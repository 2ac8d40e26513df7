"""The speed path's options (bf16 packed weights, weight-only int8, compiled batched decode steps) compute what
transformers computes in the same precision, under every kernel a matmul plan can pick, and on a CPU that cannot run
one they refuse before touching the model.

Every kernel is forced on any CPU (tests/plans.py): a model whose blocks take different plans runs, in one compiled
step, each kernel at one row (batch 1) and at 2-16 rows (a batch). References: transformers' GPT-2 in float32, in
bfloat16, and with the int8 weights dequantized. Reduced-precision tolerances are a small multiple of the error the
reference itself makes in that precision, measured in the test. Tests that need a CPU feature skip with the
feature's name; the behaviour without it is tested everywhere by replacing the capability probe
(minhub.hardware.cpu_info) with one that lacks the feature."""


import pytest
import torch
from helpers import hf_gpt2, save_checkpoint
from plans import (assert_close_in_bf16, bf16_reference, dequantized_reference, fake_cpu, force, kernels_in,
                   per_layer, transformers_greedy)

from minhub import generate, gpt2_from_pretrained, hardware, matmul, pad_left, speed
from minhub.speed import Int8Linear, PackedLinear, compile_decode, prepack, quantize_int8

CPU = hardware.cpu_info()
pytestmark = pytest.mark.skipif(not CPU.onednn, reason="needs a PyTorch built with oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(
    not CPU.onednn_bf16, reason=f"needs oneDNN bf16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT); {CPU.describe()}")
needs_compiler = pytest.mark.skipif(not CPU.can_compile, reason=f"inductor needs a C++ compiler; {CPU.describe()}")
CONFIG = dict(seed=5, n_positions=40, n_layer=3)


@pytest.fixture(scope="module")
def reference():
    return hf_gpt2(**CONFIG)


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    return save_checkpoint(reference, tmp_path_factory.mktemp("ckpt"), "openai")


def stepwise(forward, model, idx, masked: bool = False):
    """Teacher-forced logits (B, T, V): the prompt's first token by the model, then one token at a time by
    `forward` (the model's decode step) against the KV cache, with tensors laid out as the engine's: inference
    tensors, one per token, and (masked) an all-ones attention mask cut from a window-wide buffer. A compiled step
    guards on all of that, so it runs here as it runs in generate()."""
    with torch.inference_mode():
        tokens = [idx[:, t:t + 1].clone(memory_format=torch.contiguous_format) for t in range(idx.size(1))]
        mask = torch.ones(idx.size(0), model.config.n_positions, dtype=torch.long) if masked else None
        model.setup_cache(idx.size(0), model.config.n_positions + 1)

        def call(fn, t):
            return fn(tokens[t], t) if mask is None else fn(tokens[t], t, mask[:, :t + 1])

        return torch.cat([call(model, 0)] + [call(forward, t) for t in range(1, idx.size(1))], dim=1)


def counted(fn, *args, **kwargs) -> dict[str, int]:
    """How many times each operator ran in fn(*args, **kwargs), which must not compile anything (a compile would
    run the operators while tracing): a recompile is an error. Inside a compiled step PyTorch's own matrix
    products call their kernels directly, unseen by the profiler: they are the linears the counted ones leave."""
    with torch._dynamo.config.patch(error_on_recompile=True), torch.profiler.profile() as prof:
        fn(*args, **kwargs)
    return {event.key: event.count for event in prof.key_averages()}


def linears_taking(model, kernel: str, dtype, one_row: bool) -> int:
    return sum(m.kernels.get((dtype, one_row), "blas") == kernel for m in model.modules()
               if isinstance(m, matmul.CPULinear))


# --------------------------------------------------------------------------------------------------------------------
# prepack


@needs_onednn_bf16
def test_bf16_packed_stays_within_bf16_rounding_of_transformers_bf16(checkpoint, reference):
    packed = speed.optimize(gpt2_from_pretrained(checkpoint), weights="bf16-packed")
    assert packed.transformer.wte.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 101, (2, 40))
    rounded, bound = bf16_reference(reference, idx)
    with torch.inference_mode():
        assert_close_in_bf16(packed(idx), rounded, bound)
        assert_close_in_bf16(stepwise(packed, packed, idx), rounded, bound)


def test_optimize_refuses_what_it_cannot_do(checkpoint):
    model = gpt2_from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="weights must be one of .*'int8', 'bf16-packed'.*got 'fp16'"):
        speed.optimize(model, weights="fp16")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        prepack(model, 0)
    assert isinstance(model.lm_head, matmul.CPULinear) and model.lm_head.weight.dtype == torch.float32


def test_without_onednn_bf16_prepack_bf16_refuses_before_touching_the_model(checkpoint, monkeypatch):
    fake_cpu(monkeypatch, onednn_bf16=False, isa="AVX2", model="an AVX2-only CPU")
    model = gpt2_from_pretrained(checkpoint)
    with pytest.raises(hardware.CPUFeatureError, match=r"AVX-512 \(BW, VL, DQ\) or AVX-NE-CONVERT; this CPU "
                                                        r"\(an AVX2-only CPU, AVX2\) has neither: use weights='int8'"):
        speed.optimize(model, weights="bf16-packed")
    assert isinstance(model.lm_head, matmul.CPULinear) and model.lm_head.weight.dtype == torch.float32
    # where bf16 packing is not fastest (no oneDNN bf16), a bf16 model keeps the matmul plan's kernels
    assert speed.weights_for(model.to(torch.bfloat16)) is None and speed.weights_for(model, int8=True) == "int8"


# --------------------------------------------------------------------------------------------------------------------
# compile_batches (compile_decode), with every kernel at one row and at few rows


@needs_compiler
def test_a_compiled_fp32_step_runs_every_kernel_with_transformers_numbers(checkpoint, reference):
    model = compile_decode(per_layer(gpt2_from_pretrained(checkpoint)))
    assert kernels_in(model, torch.float32, one_row=True) == {"minhub", "blas"}
    assert kernels_in(model, torch.float32, one_row=False) == {"onednn", "minhub", "blas"}
    with torch.inference_mode():  # inference tensors, as the engine's
        idx = torch.randint(0, 101, (1, 30), generator=torch.Generator().manual_seed(1))
    step = speed.decode_step(model, 2, True)
    assert step is not model and speed.decode_step(gpt2_from_pretrained(checkpoint), 2, True) is not step
    with torch.inference_mode():
        assert (stepwise(step, model, idx) - reference(idx).logits).abs().max().item() <= 1e-4
    # 29 compiled steps and the eager first token: block 0 through minhub::linear, the rest through BLAS
    assert counted(stepwise, step, model, idx).get("minhub::linear") == 4 * 30
    # 60 new tokens with n_positions=40: every cache slot including the last, then the sliding window; one graph
    # serves every position (the KV cache's spare slot keeps the last one from recompiling)
    prompt = idx[:, :5]
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):  # as the steps above ran
        assert torch.equal(generate(model, prompt, 35, temperature=0), transformers_greedy(reference, prompt, 35))
        assert torch.equal(generate(model, prompt, 60, temperature=0),
                           generate(per_layer(gpt2_from_pretrained(checkpoint)), prompt, 60, temperature=0))

    # a padded batch: oneDNN, minhub::linear and PyTorch's kernel at few rows, in one compiled step
    prompts = [[1, 2, 3, 4], [5], [6, 7]]
    padded, mask = pad_left(prompts, pad_id=0)
    batched = generate(model, padded, 12, temperature=0, attention_mask=mask)
    for row, prompt in zip(batched, prompts):
        assert torch.equal(row[-12:], transformers_greedy(reference, torch.tensor([prompt]), 12)[0, -12:])
    ran = counted(generate, model, padded, 12, temperature=0, attention_mask=mask)
    # 11 compiled steps: block 0 through oneDNN, block 1 through minhub::linear (also in the eager prefill)
    assert ran.get("minhub_onednn::linear") == 4 * 11 and ran.get("minhub::linear") == 4 * 12


@needs_compiler
def test_a_compiled_bf16_step_runs_every_kernel_within_bf16_rounding_of_transformers(checkpoint, reference):
    model = compile_decode(per_layer(gpt2_from_pretrained(checkpoint, dtype=torch.bfloat16)))
    for one_row in (True, False):
        assert kernels_in(model, torch.bfloat16, one_row) == {"minhub", "blas"}
    idx = torch.randint(0, 101, (3, 30), generator=torch.Generator().manual_seed(2))
    rounded, bound = bf16_reference(reference, idx)
    step = speed.decode_step(model, 2, True)
    for row in range(3):  # batch 1: the one-row kernels
        assert_close_in_bf16(stepwise(step, model, idx[row:row + 1]), rounded[row:row + 1], bound)
    # block 0 through minhub::linear at one row, the rest through BLAS
    assert counted(stepwise, step, model, idx[:1]).get("minhub::linear") == 4 * 30
    # three rows at once: the few-row kernels (an all-ones mask: nothing to pad, so transformers' logits hold)
    assert_close_in_bf16(stepwise(step, model, idx, masked=True), rounded, bound)
    # blocks 0 and 1 through minhub::linear at few rows (the eager first token too), block 2 and lm_head BLAS
    assert counted(stepwise, step, model, idx, masked=True).get("minhub::linear") == 8 * 30


# --------------------------------------------------------------------------------------------------------------------
# quantize_int8: minhub::linear (float32 around it) or PyTorch's int8 kernel (bfloat16 around it), as the plan says


def test_int8_linear_is_the_dequantized_weight_times_the_input():
    linear = torch.nn.Linear(48, 20)
    with torch.no_grad():
        linear.weight.normal_(0, 0.3)
    quantized = Int8Linear(linear)
    dequantized = quantized.weight.float() * quantized.scale.float()[:, None]
    # rounding to the nearest of 255 levels per row: at most half a step (plus the scale's bf16 rounding) off
    step = linear.weight.abs().amax(1, keepdim=True) / 127
    assert ((dequantized - linear.weight).abs() <= 0.5 * step + 0.01 * linear.weight.abs()).all()
    x = torch.randn(3, 5, 48).bfloat16()
    expected = torch.nn.functional.linear(x.float(), dequantized, linear.bias.bfloat16().float())
    with torch.inference_mode():
        out = quantized(x)
    assert out.shape == (3, 5, 20) and out.dtype == torch.bfloat16
    # float32 sums of the same products, rounded to bfloat16 before and after the scale and the bias
    assert ((out.float() - expected).abs() <= 2 ** -7 * expected.abs() + 1e-3).all()


def int8_within_rounding(quantized, reference, idx, forward=None, masked: bool = False):
    """Our int8 logits against transformers with the same dequantized weights: to float32 rounding where the rest
    of the model stays float32 (minhub::linear), else within 3x transformers' own bfloat16 error (PyTorch's int8
    kernel rounds to bfloat16 before and after the scale: 1.2-1.7x measured on an AVX2 EPYC)."""
    dequantized = dequantized_reference(quantized, reference)
    ours = stepwise(forward or quantized, quantized, idx, masked).float()
    if quantized.lm_head.use_minhub:
        with torch.inference_mode():
            assert (ours - dequantized(idx).logits).abs().max().item() <= 1e-4
    else:
        assert_close_in_bf16(ours, *bf16_reference(dequantized, idx, slack=3.0))


@pytest.mark.parametrize("plan_name", ["minhub", "blas", "minhub one row + onednn"])
def test_int8_model_computes_its_dequantized_weights(checkpoint, reference, plan_name, monkeypatch):
    plan = force(monkeypatch, plan_name)
    quantized = quantize_int8(gpt2_from_pretrained(checkpoint))
    # minhub::linear where the plan picks it at every row count; else PyTorch's kernel, which wants bf16 around it
    on_minhub = all(plan.kernel(torch.int8, one_row) == "minhub" for one_row in (True, False))
    assert quantized.lm_head.use_minhub == on_minhub
    assert quantized.transformer.wte.weight.dtype == (torch.float32 if on_minhub else torch.bfloat16)
    idx = torch.randint(0, 101, (2, 40))
    int8_within_rounding(quantized, reference, idx)
    ran = counted(stepwise, quantized, quantized, idx)
    assert ran.get("minhub::linear" if on_minhub else "aten::_weight_int8pack_mm") == 13 * 40  # 4 a block, lm_head
    packed = gpt2_from_pretrained(checkpoint)
    packed.lm_head = PackedLinear(packed.lm_head, torch.float32)
    with pytest.raises(ValueError, match=r"already packed \(bf16-packed\)"):
        quantize_int8(packed)


@needs_compiler
@pytest.mark.parametrize("plan_name,batch", [("minhub", 1), ("blas", 2)])
def test_a_compiled_int8_step_computes_the_dequantized_weights(checkpoint, reference, plan_name, batch, monkeypatch):
    force(monkeypatch, plan_name)
    quantized = compile_decode(quantize_int8(gpt2_from_pretrained(checkpoint)))
    idx = torch.randint(0, 101, (batch, 30))
    step = speed.decode_step(quantized, 2, True)
    int8_within_rounding(quantized, reference, idx, step, masked=batch > 1)
    if quantized.lm_head.use_minhub:  # every int8 matrix through minhub::linear, in the compiled steps too
        assert counted(stepwise, step, quantized, idx, batch > 1).get("minhub::linear") == 13 * 30


# --------------------------------------------------------------------------------------------------------------------
# what a CPU without a feature gets


def test_without_a_compiler_compile_decode_refuses_before_touching_the_model(checkpoint, monkeypatch):
    model = gpt2_from_pretrained(checkpoint)
    fake_cpu(monkeypatch, cxx=None)
    with pytest.raises(hardware.CPUFeatureError, match="compile_batches=True needs a C\\+\\+ compiler"):
        speed.optimize(model, compile_batches=True)
    fake_cpu(monkeypatch, python_headers=False)
    with pytest.raises(hardware.CPUFeatureError, match="Python's C headers"):
        compile_decode(model)
    assert speed.decode_step(model, 2, True) is model  # the engine still runs the eager forward


def test_compile_batches_refuses_bf16_packed_weights(checkpoint):
    packed = gpt2_from_pretrained(checkpoint)
    packed.lm_head = PackedLinear(packed.lm_head, torch.float32)
    with pytest.raises(ValueError, match="does not combine with bf16 packing"):
        compile_decode(packed)
