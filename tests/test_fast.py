"""The fast paths (prepacked weights, compiled decode step) compute what the plain model computes, and on a CPU
that cannot run one they refuse before touching the model.

Tests that need a CPU feature skip with the feature's name; the behaviour without it is tested everywhere by
replacing the capability probe (minhub.hardware.cpu_info) with one that lacks the feature."""

import dataclasses

import pytest
import torch
from helpers import hf_gpt2, save_checkpoint

from minhub import generate, generation, gpt2_from_pretrained, hardware, matmul, pad_left
from minhub.fast import Int8Linear, PackedLinear, compile_decode, prepack, quantize_int8

CPU = hardware.cpu_info()
pytestmark = pytest.mark.skipif(not CPU.onednn, reason="needs a PyTorch built with oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(
    not CPU.onednn_bf16, reason=f"needs oneDNN bf16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT); {CPU.describe()}")
needs_compiler = pytest.mark.skipif(not CPU.can_compile, reason=f"inductor needs a C++ compiler; {CPU.describe()}")


def fake_cpu(monkeypatch, **changes) -> None:
    """Make every fast path see this CPU with `changes` (e.g. onednn_bf16=False, as on AVX2-only CPUs)."""
    fake = dataclasses.replace(CPU, **changes)
    monkeypatch.setattr(hardware, "cpu_info", lambda: fake)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(hf_gpt2(seed=5, n_positions=40, n_layer=3), tmp_path_factory.mktemp("ckpt"), "openai")


@pytest.mark.parametrize("batch_size", [1, 4])
def test_fp32_packed_equals_the_plain_model(checkpoint, batch_size):
    plain = gpt2_from_pretrained(checkpoint)
    packed = prepack(gpt2_from_pretrained(checkpoint), torch.float32, batch_size)
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(packed.transformer.h[0].mlp.c_fc, PackedLinear)
    idx = torch.randint(0, 101, (batch_size, 40))
    with torch.inference_mode():
        assert (packed(idx) - plain(idx)).abs().max().item() <= 1e-4
    prompt = idx[:, :6]
    assert torch.equal(generate(packed, prompt, 60, temperature=0), generate(plain, prompt, 60, temperature=0))
    prompts, mask = pad_left([[1, 2, 3], [4]], pad_id=0)
    assert torch.equal(generate(packed, prompts, 20, temperature=0, attention_mask=mask),
                       generate(plain, prompts, 20, temperature=0, attention_mask=mask))


@needs_onednn_bf16
def test_bf16_packed_stays_close_to_fp32(checkpoint):
    plain = gpt2_from_pretrained(checkpoint)
    packed = prepack(gpt2_from_pretrained(checkpoint), torch.bfloat16)
    idx = torch.randint(0, 101, (2, 40))
    with torch.inference_mode():
        ref, ours = plain(idx), packed(idx).float()
    assert ours.dtype == torch.float32 and packed.transformer.wte.weight.dtype == torch.bfloat16
    assert (ours - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
    out = generate(packed, idx[:, :5], 10, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 15)


def test_prepack_refuses_what_it_cannot_do(checkpoint):
    model = gpt2_from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="supports torch.float32 and torch.bfloat16"):
        prepack(model, torch.float16)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        prepack(model, torch.float32, 0)


@needs_compiler
def test_compiled_decode_step_equals_the_eager_one(checkpoint):
    eager = gpt2_from_pretrained(checkpoint)
    compiled = compile_decode(gpt2_from_pretrained(checkpoint))
    with torch.inference_mode():
        idx = torch.randint(0, 101, (1, 6))
        for model in (eager, compiled):
            model.setup_cache(1, 41)  # as the engine does: the window (40) and one spare slot
            model(idx, 0)
        token = torch.tensor([[7]])
        step = generation.decode_step(compiled)
        assert step is not compiled  # the engine runs the compiled step for this model, the forward for others
        assert generation.decode_step(eager) is eager
        assert (step(token, 6) - eager(token, 6)).abs().max().item() <= 1e-4  # compiles
        # 60 new tokens with n_positions=40: every cache slot including the last, then the sliding window; one graph
        # serves every position (the KV cache's spare slot keeps the last one from recompiling)
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(generate(compiled, idx, 60, temperature=0), generate(eager, idx, 60, temperature=0))
        prompts, mask = pad_left([[1, 2, 3], [4]], pad_id=0)
        assert torch.equal(generate(compiled, prompts, 20, temperature=0, attention_mask=mask),
                           generate(eager, prompts, 20, temperature=0, attention_mask=mask))


@needs_compiler
def test_compiled_decode_step_matches_transformers_logits(checkpoint):
    model = compile_decode(gpt2_from_pretrained(checkpoint))
    reference = hf_gpt2(seed=5, n_positions=40, n_layer=3).eval()
    idx = torch.randint(0, 101, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(idx).logits[0]
        model.setup_cache(1, 41)
        step = generation.decode_step(model)
        logits = torch.cat([model(idx[:, :1], 0)] + [step(idx[:, t:t + 1], t) for t in range(1, 30)], dim=1)[0]
        with torch.profiler.profile() as prof:
            step(idx[:, :1], 30)
    assert (logits - expected).abs().max().item() <= 1e-4
    # inside the compiled step the matrix products keep this machine's kernel
    planned = matmul.plan().kernel(torch.float32, one_row=True)
    assert ("minhub::linear" in {e.key for e in prof.key_averages()}) == (planned == "minhub")


def test_without_onednn_bf16_prepack_bf16_refuses_before_touching_the_model(checkpoint, monkeypatch):
    fake_cpu(monkeypatch, onednn_bf16=False, isa="AVX2", model="an AVX2-only CPU")
    model = gpt2_from_pretrained(checkpoint)
    with pytest.raises(hardware.CPUFeatureError, match=r"AVX-512 \(BW, VL, DQ\) or AVX-NE-CONVERT; this CPU "
                                                        r"\(an AVX2-only CPU, AVX2\) has neither: use quantize_int8"):
        prepack(model, torch.bfloat16)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert isinstance(prepack(model, torch.float32).lm_head, PackedLinear)  # fp32 packing needs no AVX-512


def test_without_a_compiler_compile_decode_refuses_before_touching_the_model(checkpoint, monkeypatch):
    model = gpt2_from_pretrained(checkpoint)
    fake_cpu(monkeypatch, cxx=None)
    with pytest.raises(hardware.CPUFeatureError, match="compile_decode needs a C\\+\\+ compiler"):
        compile_decode(model)
    fake_cpu(monkeypatch, python_headers=False)
    with pytest.raises(hardware.CPUFeatureError, match="Python's C headers"):
        compile_decode(model)
    assert generation.decode_step(model) is model  # the engine still runs the eager forward


def test_compile_decode_refuses_what_it_cannot_do(checkpoint):
    with pytest.raises(ValueError, match="does not combine with prepack"):
        compile_decode(prepack(gpt2_from_pretrained(checkpoint), torch.float32))
    with pytest.raises(TypeError, match="compile_decode is for minhub GPT2 models"):
        compile_decode(torch.nn.Linear(2, 2))


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
    assert (out.float() - expected).abs().max().item() <= 0.02 * expected.abs().max().item()


def test_int8_model_stays_close_to_fp32(checkpoint):
    plain = gpt2_from_pretrained(checkpoint)
    quantized = quantize_int8(gpt2_from_pretrained(checkpoint))
    # the rest of the model stays float32 where minhub::linear multiplies the int8 weights, else bfloat16
    rest = torch.float32 if quantized.lm_head.use_minhub else torch.bfloat16
    assert isinstance(quantized.lm_head, Int8Linear) and quantized.transformer.wte.weight.dtype == rest
    idx = torch.randint(0, 101, (2, 40))
    with torch.inference_mode():
        ref, ours = plain(idx), quantized(idx).float()
    assert (ours - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.85
    out = generate(quantized, idx[:, :5], 10, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 15)
    with pytest.raises(ValueError, match="already packed by prepack"):
        quantize_int8(prepack(gpt2_from_pretrained(checkpoint), torch.float32))


@needs_compiler
def test_compiled_int8_decode_step_stays_with_the_eager_one(checkpoint):
    eager = quantize_int8(gpt2_from_pretrained(checkpoint))
    compiled = compile_decode(quantize_int8(gpt2_from_pretrained(checkpoint)))
    idx, token = torch.randint(0, 101, (1, 6)), torch.tensor([[7]])
    with torch.inference_mode():
        for model in (eager, compiled):
            model.setup_cache(1, 41)
            model(idx, 0)
        ref, ours = eager(token, 6).float(), generation.decode_step(compiled)(token, 6).float()
    assert (ours - ref).abs().max().item() <= 0.02 * ref.abs().max().item()  # bf16 rounding, fused differently
