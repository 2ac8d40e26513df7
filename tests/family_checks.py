"""Checks every single-file family (tests/test_llama.py, test_gpt_neox.py, test_gpt_bigcode.py) makes against
transformers' own class on the same tiny random weights. Each test file keeps its test functions and calls these with
what differs between families: the pair (transformers model, ours), the vocabulary size, the module's generate and
loader, the context window and the wording of the family's errors. Random inputs come from torch's global
generator, which tests/conftest.py seeds before each test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def randomised(model, seed: int, std: float, is_gain):
    """`model` (a transformers model) with random weights spread wider than its init, so that a mismapped weight,
    bias or norm changes the output; a parameter `is_gain(name)` names gets 1 added (norm gains near 1, not exactly)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if is_gain(name) else 0.0))
    return model.eval()


def hf_logits(ref, idx: torch.Tensor, **kwargs) -> torch.Tensor:
    """transformers' logits (B, T, V) for idx; kwargs go to its forward (attention_mask, position_ids)."""
    with torch.no_grad():
        return ref(idx, **kwargs).logits


def saved(ref, directory, **kwargs):
    """`directory`, after ref.save_pretrained wrote into it (kwargs: max_shard_size...)."""
    ref.save_pretrained(directory, **kwargs)
    return directory


def max_diff(model, ref, idx: torch.Tensor) -> float:
    """max |Δlogit| between ours and transformers on idx."""
    with torch.no_grad():
        return (model(idx) - hf_logits(ref, idx)).abs().max().item()


def left_padded(lengths, T: int, vocab_size: int):
    """Random rows of these lengths (ids >= 2: no BOS or EOS), left-padded with id 0 to T: (rows, idx, mask)."""
    rows = [torch.randint(2, vocab_size, (n,)) for n in lengths]
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        idx[b, T - len(row):], mask[b, T - len(row):] = row, 1
    return rows, idx, mask


def old_config_keys_are_read(ref, directory: Path, old_keys: dict, load, vocab_size: int, tol: float) -> None:
    """ref saved, its config.json's rope_parameters (what transformers 5 writes) replaced by the keys older
    checkpoints hold: `load` reads the same rotary settings, so ours gives transformers' logits."""
    saved(ref, directory)
    config = json.loads((directory / "config.json").read_text())
    assert "rope_parameters" in config  # else the older keys below would not replace anything
    del config["rope_parameters"]
    (directory / "config.json").write_text(json.dumps({**config, **old_keys}))
    model = load(directory)
    assert max_diff(model, ref, torch.randint(0, vocab_size, (2, 40))) <= tol


def sharded_bf16_loads_in_float32(ref, directory: Path, load, hf_class, vocab_size: int, tol: float,
                                  bf16_tol: float):
    """ref (in bf16) saved in more than two shards: `load` gives float32 by default, with transformers' float32
    logits; asked for bf16, it stays bf16 and is within bf16_tol of transformers' SDPA attention in bf16, which rounds
    as ours does (its eager attention rounds elsewhere). Returns (idx, float32 logits, our bf16 model, its logits)
    for a family's own checks."""
    saved(ref, directory, max_shard_size="20KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert not (directory / "model.safetensors").exists() and len(set(index["weight_map"].values())) > 2
    model = load(directory)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref32 = hf_class.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    idx = torch.randint(0, vocab_size, (2, 24))
    expected = hf_logits(ref32, idx)
    with torch.no_grad():
        assert (model(idx) - expected).abs().max().item() <= tol
    ours16 = load(directory, dtype=torch.bfloat16)
    ref16 = hf_class.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    with torch.no_grad():
        logits = ours16(idx)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - hf_logits(ref16, idx).float()).abs().max().item() <= bf16_tol
    return idx, expected, ours16, logits


def cache_steps_equal_a_full_forward(ref, model, vocab_size: int, kv_heads: int, head_size: int, tol: float) -> None:
    """A prompt, a chunk of three, then single tokens through the KV cache give transformers' full-forward logits; the
    cache holds kv_heads heads (not repeated per query head), is reused when it fits, and holds the keys and values
    transformers' own cache holds (rotated keys, where the family rotates)."""
    idx = torch.randint(0, vocab_size, (2, 20))
    expected = hf_logits(ref, idx)
    with torch.inference_mode():
        model.setup_cache(3, max_len=32)  # more rows than used: a forward of B rows uses the first B
        caches = model.kv_caches()
        assert len(caches) == 2 and caches[0].k.shape == (3, kv_heads, 32, head_size) and model.cache_len == 32
        chunks = [model(idx[:, :10], 0), model(idx[:, 10:13], 10)]  # the prompt, then a chunk of three
        chunks += [model(idx[:, t:t + 1], t) for t in range(13, 20)]  # then one token at a time
        model.setup_cache(3, max_len=32)
        assert model.kv_caches()[0] is caches[0] and model.cache_len == 32  # same shape, dtype, device, mode: reused
        last = model(idx[:, :20], 0, only_last=True)
    assert (torch.cat(chunks, dim=1) - expected).abs().max().item() <= tol
    assert last.shape == (2, 1, vocab_size) and (last[:, 0] - expected[:, -1]).abs().max().item() <= tol
    with torch.inference_mode():
        past = ref(idx[:, :10], use_cache=True).past_key_values
        model.setup_cache(2, max_len=16)
        model(idx[:, :10], 0)
    for layer, cache in enumerate(model.kv_caches()):
        assert (cache.k[:, :, :10] - past.layers[layer].keys).abs().max().item() <= 1e-5
        assert (cache.v[:, :, :10] - past.layers[layer].values).abs().max().item() <= 1e-5


def greedy_equals_transformers(ref, model, generate, vocab_size: int) -> None:
    """16 greedy tokens of `generate` (prompt once, then the KV cache) are transformers' generate's, token for token."""
    prompt = torch.randint(2, vocab_size, (2, 8))
    ours = generate(model, prompt, 16, temperature=0)
    with torch.no_grad():
        theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def slides_past_the_context_window(ref, model, generate, vocab_size: int, context: int) -> None:
    """Greedy generation from 4 tokens short of the context window to 4 past it: each token past the window is
    transformers' prediction from the last `context` tokens, re-numbered from position 0."""
    idx = torch.randint(2, vocab_size, (1, context - 4))
    ours = generate(model, idx, 8, temperature=0)
    for _ in range(8):  # a full forward each time: transformers has no sliding of its own
        idx = torch.cat((idx, hf_logits(ref, idx[:, -context:])[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(ours, idx)


def sampling_keeps_to_the_top_k(ref, model, generate, vocab_size: int) -> None:
    """With top_k=2, every sampled token is one of the two most likely (ours and transformers' agree which); at a
    high temperature the two are about equally likely, so both come up: top_k keeps them and nothing else."""
    prompt = torch.randint(2, vocab_size, (2, 5))
    with torch.no_grad():
        top2 = model(prompt)[:, -1].topk(2).indices
    assert torch.equal(top2.sort().values, hf_logits(ref, prompt)[:, -1].topk(2).indices.sort().values)
    for seed in range(5):  # the default temperature
        out = generate(model, prompt, 1, top_k=2, generator=torch.Generator().manual_seed(seed))
        assert all(out[b, -1] in top2[b] for b in range(2))
    seen = [set(), set()]
    for seed in range(12):  # without top_k, at temperature 50 nearly every one of the vocabulary would come up
        out = generate(model, prompt, 1, temperature=50.0, top_k=2, generator=torch.Generator().manual_seed(seed))
        for b in range(2):
            seen[b].add(out[b, -1].item())
    assert seen == [set(top2[0].tolist()), set(top2[1].tolist())]


def padded_batch_equals_each_row_alone(ref, model, vocab_size: int, tol: float) -> None:
    """A left-padded batch of rows of 12, 7 and 3 tokens: each row's logits are its own alone, a padding slot's are
    its token's alone (it sees only itself: in PyTorch's SDPA a query with every key hidden gives zeros, on other
    backends NaN), and the real slots are transformers' own padded batch's."""
    rows, idx, mask = left_padded([12, 7, 3], 12, vocab_size)
    with torch.no_grad():
        logits = model(idx, attention_mask=mask)
    assert not logits.isnan().any()
    for b, row in enumerate(rows):
        alone = hf_logits(ref, row[None])[0]
        assert (logits[b, 12 - len(row):] - alone).abs().max().item() <= tol
    for b, j in (~mask.bool()).nonzero().tolist():  # at position 0, like a row's first token
        assert (logits[b, j] - hf_logits(ref, idx[b, j].view(1, 1))[0, 0]).abs().max().item() <= tol
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' own padded batch, real positions only
    theirs = hf_logits(ref, idx, attention_mask=mask, position_ids=position_ids)
    assert ((logits - theirs).abs().amax(-1) * mask).max().item() <= tol


def a_hole_counts_only_real_tokens(ref, model, vocab_size: int, tol: float) -> None:
    """A row with two padding slots in its middle: its real tokens' logits are those of the row without them, so
    positions count real tokens only (rotary attention sees only position differences: left padding alone would not
    tell positions apart); the same row unmasked is the whole row's."""
    row = torch.randint(2, vocab_size, (9,))
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1], [1] * 9])
    with torch.no_grad():
        logits = model(torch.stack((row, row)), attention_mask=mask)
    real = mask[0].bool()
    assert (logits[0, real] - hf_logits(ref, row[real][None])[0]).abs().max().item() <= tol
    assert (logits[1] - hf_logits(ref, row[None])[0]).abs().max().item() <= tol


def cached_padded_decoding_equals_each_row_alone(ref, model, vocab_size: int, tol: float) -> None:
    """A left-padded prompt of rows of 9 and 4 tokens into the KV cache, then 5 single tokens with the mask grown by
    one each step: each row's 6 predictions are those of its tokens alone."""
    rows, idx, mask = left_padded([9, 4], 9, vocab_size)
    steps = torch.randint(2, vocab_size, (2, 5))
    model.setup_cache(2, max_len=20)
    with torch.inference_mode():
        outs = [model(idx, 0, mask)[:, -1]]
        for t in range(5):
            mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
            outs.append(model(steps[:, t:t + 1], 9 + t, mask)[:, -1])
    for b, row in enumerate(rows):
        alone = hf_logits(ref, torch.cat((row, steps[b]))[None])[0, len(row) - 1:]  # (6, V): the same predictions
        assert (torch.stack([o[b] for o in outs]) - alone).abs().max().item() <= tol


def overflows_are_errors(model, context: int, context_error: str) -> None:
    """More tokens than the context window, or than the KV cache holds, are refused with a message saying which
    (context_error: the family's, a regex); a chunk past both is refused for the window, which a larger cache would
    not cure."""
    with torch.no_grad():
        with pytest.raises(ValueError, match=context_error):
            model(torch.zeros(1, context + 1, dtype=torch.long))
        model.setup_cache(1, max_len=16)
        with pytest.raises(ValueError, match="holds 16 slots"):
            model(torch.zeros(1, 4, dtype=torch.long), 14)
        with pytest.raises(ValueError, match=context_error):
            model(torch.zeros(1, 4, dtype=torch.long), context - 2)


def wrong_model_type_fails_before_the_weights(directory: Path, config: dict, load, own: str, other: str,
                                              missing: str) -> None:
    """A config.json of another family's model_type is refused by name before any weight file is looked for; the
    family's own model_type, with no weight file, then fails with FileNotFoundError (message matching `missing`)."""
    (directory / "config.json").write_text(json.dumps({**config, "model_type": other}))
    with pytest.raises(ValueError, match=f"'{other}' checkpoint"):
        load(directory)
    (directory / "config.json").write_text(json.dumps({**config, "model_type": own}))
    with pytest.raises(FileNotFoundError, match=missing):
        load(directory)


def one_training_step_reaches_every_parameter(model, vocab_size: int) -> None:
    """A next-token loss in training mode back-propagates into every parameter (none detached or unused)."""
    idx = torch.randint(0, vocab_size, (2, 16))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def works_copied_alone(directory: Path, module: str, build: str) -> None:
    """minhub/<module>.py copied alone into `directory` builds a model (`build`, an expression of the module as `m`)
    and generates past its context, in a process without minhub, and imports none of the hub's libraries."""
    shutil.copy(Path(__file__).parents[1] / "minhub" / f"{module}.py", directory / f"{module}.py")
    script = (
        f"import sys, torch, {module} as m\n"
        f"model = {build}\n"
        "assert m.generate(model, torch.zeros(1, 6, dtype=torch.long), 4).shape == (1, 10)\n"
        "print(sorted(n for n in ('minhub', 'transformers', 'huggingface_hub', 'safetensors') if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=directory, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(directory)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # the hub's libraries are imported only inside the *_from_pretrained loader
