"""The default path's precompiled decode step (minhub.precompiled): equal to transformers, built once per machine and
shape and reused by later processes, bound to each model's own tensors at every call; where it cannot be built,
decoding is eager with one warning, remembered.

The tiny test models are below MIN_WEIGHT_BYTES, so these tests ask for it with MINHUB_DECODE=compiled; every other
test decodes eagerly (the "auto" setting leaves small models alone)."""

import dataclasses
import logging
import subprocess
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import hf_gpt2, save_checkpoint

from minhub import generate, generation, gpt2_from_pretrained, hardware, matmul, pad_left, precompiled
from minhub.fast import prepack

CPU = hardware.cpu_info()
needs_compiler = pytest.mark.skipif(not CPU.can_compile, reason=f"AOTInductor needs a C++ compiler; {CPU.describe()}")
CONFIG = dict(seed=7, n_positions=40, n_layer=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(hf_gpt2(**CONFIG), tmp_path_factory.mktemp("ckpt"), "openai")


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv("MINHUB_DECODE", "compiled")


def eager(model):
    """The same model decoding through its eager forward (a registered step takes precedence over the package)."""
    generation.use_decode_step(model, model.forward)
    return model


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
                       generate(eager(gpt2_from_pretrained(checkpoint)), prompt, 60, temperature=0))


@needs_compiler
def test_one_package_serves_every_model_of_its_shape_each_with_its_own_weights(checkpoint, tmp_path, compiled):
    other = save_checkpoint(hf_gpt2(**{**CONFIG, "seed": 8}), tmp_path / "other", "openai")
    a, b = gpt2_from_pretrained(checkpoint), gpt2_from_pretrained(other)
    assert precompiled.step_key(a) == precompiled.step_key(b)
    prompt = torch.tensor([[1, 2, 3]])
    expected_a = generate(eager(gpt2_from_pretrained(checkpoint)), prompt, 20, temperature=0)
    expected_b = generate(eager(gpt2_from_pretrained(other)), prompt, 20, temperature=0)
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
                       generate(eager(a), prompt, 20, temperature=0))


@needs_compiler
def test_a_later_process_loads_the_package_without_compiling(checkpoint, compiled):
    model = gpt2_from_pretrained(checkpoint)
    assert step_of(model) is not None
    assert precompiled.package_path(precompiled.step_key(model)).is_file()
    script = ("import sys, time, torch; from minhub import gpt2_from_pretrained, generate, precompiled\n"
              "m = gpt2_from_pretrained(sys.argv[1]); t = time.perf_counter()\n"
              "out = generate(m, torch.tensor([[1, 2, 3]]), 5, temperature=0)\n"
              "print(time.perf_counter() - t, m in precompiled._bound, len(precompiled._failed), out.tolist())")
    result = subprocess.run([sys.executable, "-c", script, str(checkpoint)], capture_output=True, text=True,
                            check=True)
    seconds, loaded, count, tokens = result.stdout.split(maxsplit=3)
    assert "compiling" not in result.stderr and loaded == "True" and count == "0"
    assert float(seconds) < 5  # a compile takes 10 s and more
    assert tokens.strip() == str(generate(eager(model), torch.tensor([[1, 2, 3]]), 5, temperature=0).tolist())


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
                       generate(eager(gpt2_from_pretrained(checkpoint)), prompt, 10, temperature=0))


@needs_compiler
def test_where_the_step_cannot_be_built_decoding_is_eager_and_it_is_told_once(checkpoint, tmp_path, monkeypatch,
                                                                              compiled, caplog):
    import torch._inductor.config

    monkeypatch.setenv("MINHUB_CACHE", str(tmp_path))
    monkeypatch.setattr(precompiled, "_failed", {})
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "false"))  # a compiler that always fails
    model = gpt2_from_pretrained(checkpoint)
    with caplog.at_level(logging.WARNING, logger="minhub"):
        assert step_of(model) is None
    assert "could not compile the decode step" in caplog.text and "decoding eagerly" in caplog.text
    failed = precompiled.package_path(precompiled.step_key(model)).with_suffix(".failed")
    assert failed.is_file() and "Delete" in caplog.text
    assert [f.name for f in failed.parent.iterdir()] == [failed.name]  # no half-written package left behind
    prompt = torch.tensor([[4, 5]])
    assert torch.equal(generate(model, prompt, 10, temperature=0),
                       generate(eager(gpt2_from_pretrained(checkpoint)), prompt, 10, temperature=0))
    # a later process (here: a fresh per-process table) reads the failure instead of compiling again
    monkeypatch.setattr(precompiled, "_failed", {})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minhub"):
        assert step_of(model) is None
    assert "compiling" not in caplog.text


@needs_compiler
def test_a_package_that_does_not_take_the_model_is_left_for_the_eager_step(checkpoint, tmp_path, monkeypatch,
                                                                            compiled, caplog):
    # a key that missed a difference: a package built for 2 layers meets a 3-layer model
    monkeypatch.setattr(precompiled, "step_key", lambda net: "one-key-for-two-shapes")
    monkeypatch.setattr(precompiled, "_failed", {})
    assert step_of(gpt2_from_pretrained(checkpoint)) is not None
    deeper = gpt2_from_pretrained(save_checkpoint(hf_gpt2(**{**CONFIG, "n_layer": 3}), tmp_path / "deeper", "openai"))
    with caplog.at_level(logging.WARNING, logger="minhub"):
        assert step_of(deeper) is None
    assert "does not take this model's tensors" in caplog.text and "decoding eagerly" in caplog.text
    prompt = torch.tensor([[4, 5]])
    assert torch.equal(generate(deeper, prompt, 10, temperature=0), generate(eager(deeper), prompt, 10, temperature=0))


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
        assert step_of(prepack(gpt2_from_pretrained(checkpoint), torch.float32)) is None
    monkeypatch.setenv("MINHUB_DECODE", "fast")
    with pytest.raises(ValueError, match="MINHUB_DECODE='fast': use auto .* eager .* or compiled"):
        step_of(model)
    monkeypatch.setenv("MINHUB_DECODE", "compiled")
    fake = dataclasses.replace(CPU, cxx=None)
    monkeypatch.setattr(hardware, "cpu_info", lambda: fake)
    with pytest.raises(hardware.CPUFeatureError, match="MINHUB_DECODE=compiled needs a C\\+\\+ compiler"):
        step_of(model)
    monkeypatch.setenv("MINHUB_DECODE", "auto")  # without a compiler, auto decodes eagerly, silently
    assert step_of(model) is None
    prompts, mask = pad_left([[1, 2, 3], [4]], pad_id=0)
    assert generate(model, prompts, 3, temperature=0, attention_mask=mask).shape == (2, 6)
