"""The real openai-community/gpt2 from the hub: opt-in, since it needs the network (MINHUB_NETWORK_TESTS=1)."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ORIGINAL_ENV

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(os.environ.get("MINHUB_NETWORK_TESTS") != "1", reason="set MINHUB_NETWORK_TESTS=1 to run"),
]


def test_real_gpt2_matches_transformers():
    # a fresh process: the test session runs huggingface_hub offline against a temporary cache
    script = textwrap.dedent("""
        import torch
        from transformers import GPT2LMHeadModel
        from minhub import generate, gpt2_from_pretrained, tokenizer_from_pretrained
        model = gpt2_from_pretrained("gpt2")
        tok = tokenizer_from_pretrained("gpt2", model.commit_hash)
        n_parameters = sum(p.numel() for p in model.parameters())  # the tied lm_head once
        assert n_parameters == 124_439_808, n_parameters
        assert tok.encode("Hello world ").ids == [15496, 995, 220]
        ref = GPT2LMHeadModel.from_pretrained("gpt2", revision=model.commit_hash).eval()
        idx = torch.tensor([tok.encode("The meaning of life is").ids])
        with torch.no_grad():
            diff = (model(idx) - ref(idx).logits).abs().max().item()
        assert diff <= 1e-4, diff
        ours = generate(model, idx, 30, temperature=0)
        theirs = ref.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=30, do_sample=False)
        assert torch.equal(ours, theirs), (tok.decode(ours[0].tolist()), tok.decode(theirs[0].tolist()))
        print("ok", diff)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ORIGINAL_ENV}
    env.update({k: v for k, v in ORIGINAL_ENV.items() if v is not None})
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
