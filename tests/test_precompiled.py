"""The default path's precompiled decode step (minhub.precompiled): equal to transformers, built once per machine and
shape and reused by later processes, bound to each model's own tensors at every call; where it cannot be built,
decoding is eager with one warning, remembered.

The tiny test models are below MIN_WEIGHT_BYTES, so these tests ask for it with MINHUB_DECODE=compiled; every other
test decodes eagerly (the "auto" setting leaves small models alone)."""

import logging
import os
import shutil
import subprocess
import sys
import weakref
from unittest import mock
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import hf_gpt2, hub_checkpoint, save_checkpoint
from plans import (assert_close_in_bf16, bf16_reference, dequantized_reference, fake_cpu, force, kernels_in,
                   per_layer, transformers_greedy)

from minhub import generate, gpt2_from_pretrained, hardware, matmul, pad_left, precompiled
from minhub.speed import PackedLinear, quantize_int8
from minhub.tokenizer import tokenizer_from_pretrained

CPU = hardware.cpu_info()
needs_compiler = pytest.mark.skipif(not CPU.can_compile, reason=f"AOTInductor needs a C++ compiler; {CPU.describe()}")
CONFIG = dict(seed=7, n_positions=40, n_layer=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(hf_gpt2(**CONFIG), tmp_path_factory.mktemp("ckpt"), "openai")


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv("MINHUB_DECODE", "compiled")


def eager_generate(model, *args, **kwargs):
    """generate() through the model's eager forward (MINHUB_DECODE=eager for the call)."""
    with mock.patch.dict(os.environ, {"MINHUB_DECODE": "eager"}):
        return generate(model, *args, **kwargs)


def step_of(model, batch_size: int = 1, masked: bool = False):
    with torch.inference_mode():
        model.setup_cache(batch_size, model.config.n_positions + 1)  # the engine's cache
        return precompiled.step_for(model, batch_size, masked)


@needs_compiler
def test_the_compiled_step_matches_transformers_and_the_eager_engine(checkpoint, compiled):
    model = gpt2_from_pretrained(checkpoint)
    step = step_of(model)  # builds the package (or finds it in this session's cache)
    assert step is not None
    idx = torch.randint(0, 101, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf_gpt2(**CONFIG)(idx).logits[0]
        logits = torch.cat([model(idx[:, :1], 0)] + [step(idx[:, t:t + 1], t) for t in range(1, 30)], dim=1)[0]
        with torch.profiler.profile() as prof:
            step(idx[:, :1], 30)
    assert (logits - expected).abs().max().item() <= 1e-4
    ran = {e.key for e in prof.key_averages()}
    assert "aten::layer_norm" not in ran  # the eager forward did not run
    if matmul.plan().library is not None:  # attention for the one query goes to minhub::attend
        assert "minhub::attend" in ran and not any("scaled_dot_product" in key for key in ran)

    # through the engine: 60 new tokens with n_positions=40 fill every slot, then the window slides (eager rebuilds)
    prompt = idx[:, :5]
    reference = hf_gpt2(**CONFIG).generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=35,
                                           min_new_tokens=35, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, prompt, 35, temperature=0), reference)
    assert torch.equal(generate(model, prompt, 60, temperature=0),
                       eager_generate(gpt2_from_pretrained(checkpoint), prompt, 60, temperature=0))


@needs_compiler
def test_one_package_serves_every_model_of_its_shape_each_with_its_own_weights(checkpoint, tmp_path, compiled):
    other = save_checkpoint(hf_gpt2(**{**CONFIG, "seed": 8}), tmp_path / "other", "openai")
    a, b = gpt2_from_pretrained(checkpoint), gpt2_from_pretrained(other)
    assert precompiled.step_key(a) == precompiled.step_key(b)
    prompt = torch.tensor([[1, 2, 3]])
    expected_a = eager_generate(gpt2_from_pretrained(checkpoint), prompt, 20, temperature=0)
    expected_b = eager_generate(gpt2_from_pretrained(other), prompt, 20, temperature=0)
    assert not torch.equal(expected_a, expected_b)
    for _ in range(2):  # alternating: each call binds its model's tensors
        assert torch.equal(generate(a, prompt, 20, temperature=0), expected_a)
        assert torch.equal(generate(b, prompt, 20, temperature=0), expected_b)
    with ThreadPoolExecutor(2) as pool:  # at once, in two threads: each model has its own loader
        results = pool.map(lambda m: [generate(m, prompt, 20, temperature=0) for _ in range(5)], [a, b])
        for outputs, expected in zip(results, (expected_a, expected_b)):
            assert all(torch.equal(out, expected) for out in outputs)
    with torch.no_grad():  # weights changed in place after the first call are the ones the next call reads
        a.transformer.h[0].mlp.c_fc.weight.copy_(b.transformer.h[0].mlp.c_fc.weight)
    assert torch.equal(generate(a, prompt, 20, temperature=0),
                       eager_generate(a, prompt, 20, temperature=0))


@needs_compiler
def test_a_later_process_loads_the_package_without_compiling(checkpoint, compiled):
    model = gpt2_from_pretrained(checkpoint)
    assert step_of(model) is not None
    assert precompiled.package_path(precompiled.step_key(model)).is_file()
    # a second compile in the new process would end it with an error instead
    script = ("import sys, torch; from minhub import gpt2_from_pretrained, generate, precompiled\n"
              "precompiled._build = lambda *args: sys.exit('compiled again')\n"
              "m = gpt2_from_pretrained(sys.argv[1])\n"
              "out = generate(m, torch.tensor([[1, 2, 3]]), 5, temperature=0)\n"
              "print(m in precompiled._bound, len(precompiled._failed), out.tolist())")
    result = subprocess.run([sys.executable, "-c", script, str(checkpoint)], capture_output=True, text=True,
                            check=True)
    loaded, count, tokens = result.stdout.split(maxsplit=2)
    assert "compiling" not in result.stderr and loaded == "True" and count == "0"
    assert tokens.strip() == str(transformers_greedy(hf_gpt2(**CONFIG), torch.tensor([[1, 2, 3]]), 5).tolist())


@needs_compiler
def test_an_unreadable_package_is_built_again(checkpoint, monkeypatch, compiled, caplog):
    model = gpt2_from_pretrained(checkpoint)
    assert step_of(model) is not None  # built, or found in this session's cache
    path = precompiled.package_path(precompiled.step_key(model))
    monkeypatch.setattr(precompiled, "_bound", weakref.WeakKeyDictionary())  # as in a later process
    path.write_bytes(b"PK\x03\x04 not a package")
    with caplog.at_level(logging.WARNING, logger="minhub"):
        assert step_of(model) is not None
    assert "is unusable" in caplog.text and "building it again" in caplog.text
    prompt = torch.tensor([[4, 5]])
    assert torch.equal(generate(model, prompt, 10, temperature=0),
                       eager_generate(gpt2_from_pretrained(checkpoint), prompt, 10, temperature=0))


def failing_compiler(directory, monkeypatch) -> None:
    """Put a C++ compiler that always fails first on PATH, where inductor looks for it (torch's own configuration
    stays as it is)."""
    if os.path.isabs(os.environ.get("CXX", "")):
        pytest.skip(f"$CXX names a path ({os.environ['CXX']}): a compiler on PATH would not replace it")
    directory.mkdir()
    for name in {"g++", "c++", os.environ.get("CXX") or "g++"}:
        (directory / name).write_text("#!/bin/sh\nexit 1\n")
        (directory / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")


@needs_compiler
def test_where_the_step_cannot_be_built_decoding_is_eager_and_it_is_told_once(checkpoint, tmp_path, monkeypatch,
                                                                              compiled, caplog):
    monkeypatch.setenv("MINHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precompiled, "_failed", {})
    model = gpt2_from_pretrained(checkpoint)
    failing_compiler(tmp_path / "bin", monkeypatch)
    with caplog.at_level(logging.WARNING, logger="minhub"):
        assert step_of(model) is None
    assert "could not compile the decode step" in caplog.text and "decoding eagerly" in caplog.text
    failed = precompiled.package_path(precompiled.step_key(model)).with_suffix(".failed")
    assert failed.is_file() and "Delete" in caplog.text
    assert [f.name for f in failed.parent.iterdir()] == [failed.name]  # no half-written package left behind
    prompt = torch.tensor([[4, 5]])
    assert torch.equal(generate(model, prompt, 10, temperature=0),
                       eager_generate(gpt2_from_pretrained(checkpoint), prompt, 10, temperature=0))
    # a later process (here: a fresh per-process table) reads the failure instead of compiling again
    monkeypatch.setattr(precompiled, "_failed", {})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minhub"):
        assert step_of(model) is None
    assert "compiling" not in caplog.text


@needs_compiler
def test_a_package_that_does_not_take_the_model_is_left_for_the_eager_step(checkpoint, tmp_path, monkeypatch,
                                                                            compiled, caplog):
    # a key that missed a difference: the package built for 2 layers meets a 3-layer model
    model = gpt2_from_pretrained(checkpoint)
    assert step_of(model) is not None  # built, or found in this session's cache
    built = precompiled.package_path(precompiled.step_key(model))
    monkeypatch.setenv("MINHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precompiled, "step_key", lambda net: "one-key-for-two-shapes")
    monkeypatch.setattr(precompiled, "_failed", {})
    precompiled.package_path("one-key-for-two-shapes").parent.mkdir(parents=True)
    shutil.copy(built, precompiled.package_path("one-key-for-two-shapes"))
    assert step_of(gpt2_from_pretrained(checkpoint)) is not None
    deeper = gpt2_from_pretrained(save_checkpoint(hf_gpt2(**{**CONFIG, "n_layer": 3}), tmp_path / "deeper", "openai"))
    with caplog.at_level(logging.WARNING, logger="minhub"):
        assert step_of(deeper) is None
    assert "does not take this model's tensors" in caplog.text and "decoding eagerly" in caplog.text
    prompt = torch.tensor([[4, 5]])
    assert torch.equal(generate(deeper, prompt, 10, temperature=0), eager_generate(deeper, prompt, 10, temperature=0))


@needs_compiler
@pytest.mark.parametrize("variant", ["float32", "bfloat16", "int8 by minhub::linear", "int8 by PyTorch"])
def test_the_compiled_step_runs_each_one_row_kernel_as_transformers_computes(variant, compiled, tmp_path,
                                                                             monkeypatch):
    """Every kernel a plan can pick for one row, inside the compiled step: fp32 and bf16 models whose blocks take
    minhub::linear or PyTorch's kernel (tests/plans.py), and int8 through either int8 kernel; against transformers
    in the same precision (bf16: within 2x transformers' own bf16 error; int8: its dequantized weights, within
    3x that error where PyTorch's kernel rounds twice)."""
    reference = hf_gpt2(**{**CONFIG, "n_layer": 3})
    checkpoint = save_checkpoint(reference, tmp_path, "openai")
    if variant.startswith("int8"):
        force(monkeypatch, "minhub" if "minhub" in variant else "blas")
        model = quantize_int8(gpt2_from_pretrained(checkpoint))
        assert model.lm_head.use_minhub == ("minhub" in variant)
        reference = dequantized_reference(model, reference)
    else:
        model = per_layer(gpt2_from_pretrained(checkpoint, dtype=getattr(torch, variant)))
        assert kernels_in(model, model.lm_head.weight.dtype, one_row=True) == {"minhub", "blas"}
    step = step_of(model)
    assert step is not None
    idx = torch.randint(0, 101, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        exact = reference(idx).logits
        ours = torch.cat([model(idx[:, :1], 0)] + [step(idx[:, t:t + 1], t) for t in range(1, 30)], dim=1).float()
        with torch.profiler.profile() as prof:
            step(idx[:, :1], 30)
        if variant == "float32" or variant == "int8 by minhub::linear":
            assert (ours - exact).abs().max().item() <= 1e-4
        else:  # as in test_fast's int8_within_rounding: PyTorch's int8 kernel rounds twice
            assert_close_in_bf16(ours, *bf16_reference(reference, idx, 3.0 if variant.startswith("int8") else 2.0))
    ran = {e.key: e.count for e in prof.key_averages()}
    assert "aten::layer_norm" not in ran  # the compiled step ran, not the eager forward
    expected = {"float32": 4, "bfloat16": 4, "int8 by minhub::linear": 13, "int8 by PyTorch": 0}[variant]
    assert ran.get("minhub::linear", 0) == expected  # the linears of block 0, or every int8 one


def test_which_calls_get_a_compiled_step(checkpoint, monkeypatch):
    model = gpt2_from_pretrained(checkpoint)
    assert step_of(model) is None  # auto: this model is far below MIN_WEIGHT_BYTES
    monkeypatch.setenv("MINHUB_DECODE", "eager")
    monkeypatch.setattr(precompiled, "MIN_WEIGHT_BYTES", 0)
    assert step_of(model) is None
    monkeypatch.setenv("MINHUB_DECODE", "compiled")
    assert step_of(model, batch_size=2) is None  # batches and padded prompts decode eagerly
    assert step_of(model, masked=True) is None
    if CPU.onednn:  # oneDNN's packed weights are no plain tensors to bind
        packed = gpt2_from_pretrained(checkpoint)
        packed.lm_head = PackedLinear(packed.lm_head, torch.float32)
        assert step_of(packed) is None
    monkeypatch.setenv("MINHUB_DECODE", "fast")
    with pytest.raises(ValueError, match="MINHUB_DECODE='fast': use auto .* eager .* or compiled"):
        step_of(model)
    monkeypatch.setenv("MINHUB_DECODE", "compiled")
    fake_cpu(monkeypatch, cxx=None)
    with pytest.raises(hardware.CPUFeatureError, match="MINHUB_DECODE=compiled needs a C\\+\\+ compiler"):
        step_of(model)
    monkeypatch.setenv("MINHUB_DECODE", "auto")  # without a compiler, auto decodes eagerly, silently
    assert step_of(model) is None
    prompts, mask = pad_left([[1, 2, 3], [4]], pad_id=0)
    batched = generate(model, prompts, 3, temperature=0, attention_mask=mask)
    for row, prompt in zip(batched, ([1, 2, 3], [4])):
        assert torch.equal(row[-3:], transformers_greedy(hf_gpt2(**CONFIG), torch.tensor([prompt]), 3)[0, -3:])


@needs_compiler
def test_minhub_generate_as_users_run_it_gives_transformers_greedy_text(monkeypatch, capsys):
    """What a user runs: `minhub generate` on a checkpoint above MIN_WEIGHT_BYTES with no MINHUB_DECODE or
    MINHUB_MATMUL setting, so the plan this machine measured and the precompiled step decode it; the text is
    transformers' greedy continuation of the same weights."""
    from minhub.cli import main

    monkeypatch.delenv("MINHUB_DECODE", raising=False)
    monkeypatch.delenv("MINHUB_MATMUL", raising=False)
    reference = hf_gpt2(seed=9, vocab_size=50257, n_embd=192, n_head=4, n_layer=2, n_positions=64,
                        bos_token_id=50256, eos_token_id=50256)
    assert sum(p.numel() * 4 for p in reference.parameters()) >= precompiled.MIN_WEIGHT_BYTES
    hub_checkpoint("tests/default-path-gpt2", reference, "openai", tokenizer=True)
    taken = []  # what the engine got from minhub.precompiled
    step_for = precompiled.step_for
    monkeypatch.setattr(precompiled, "step_for", lambda *args: taken.append(step_for(*args)) or taken[-1])
    prompt = "The meaning of life is"
    assert main(["generate", "tests/default-path-gpt2", prompt, "--max-new-tokens", "20", "--temperature", "0",
                 "--ignore-eos"]) == 0
    assert len(taken) == 1 and taken[0] is not None
    tokenizer = tokenizer_from_pretrained("tests/default-path-gpt2")
    idx = torch.tensor([tokenizer.encode(prompt).ids])
    expected = transformers_greedy(reference, idx, 20)[0, idx.size(1):].tolist()
    assert capsys.readouterr().out == prompt + tokenizer.decode(expected) + "\n"
