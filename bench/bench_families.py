"""Decode speed of the model families beside transformers, in one run: a random checkpoint of a real model's shapes,
saved by transformers, loaded by `minhub.from_pretrained` (the default speed path) and by transformers.

    python bench/bench_families.py                    # SmolLM2-135M's shapes (Llama: 30 layers, GQA 9/3, tied)
    python bench/bench_families.py --shape pythia-160m        # GPT-NeoX; santacoder-160m: GPT-BigCode

It checks that minhub's fp32 greedy tokens equal transformers' first, then times batch 1 (fp32 and bf16, each set
against its matrix-read limit: reading the model's own weight matrices one after another, fp32 or bf16, timed in the
same rounds; bf16 also against half the fp32 bytes at the fp32 rate) and
batch 8 (fp32), in paired rounds, and prints the machine, absolute figures and ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpt2 import decode_rate, machine, matrix_read_gbs, paired, print_table  # noqa: E402

import minhub  # noqa: E402

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M's config.json, random weights
    "smollm2-135m": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)),
    # EleutherAI/pythia-160m's config.json, random weights
    "pythia-160m": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)),
    # SantaCoder's architecture (multi-query attention, learned positions) at Pythia-160M's size
    "santacoder-160m": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(
        vocab_size=49280, n_embd=768, n_layer=12, n_head=12, n_positions=2048, multi_query=True,
        activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0)),
}


def write_checkpoint(shape: str, directory: Path) -> Path:
    import transformers

    config_class, model_class, kwargs = SHAPES[shape]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    model.save_pretrained(directory)
    return directory


def greedy(model, idx: torch.Tensor, new: int, reference: bool) -> torch.Tensor:
    if reference:
        return model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
    return minhub.generate(model, idx, new, temperature=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    import transformers

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        directory = write_checkpoint(args.shape, Path(tmp))
        ref = getattr(transformers, SHAPES[args.shape][1]).from_pretrained(directory).eval()
        fp32 = minhub.from_pretrained(directory)
        bf16 = minhub.from_pretrained(directory, dtype=torch.bfloat16)
        matrices = [m.weight for m in fp32.modules() if isinstance(m, torch.nn.Linear)]
        fp32_bytes = sum(w.numel() * 4 for w in matrices)
        print(f"{args.shape}: {sum(p.numel() for p in fp32.parameters()) / 1e6:.1f}M parameters, weight matrices "
              f"{fp32_bytes / 1e6:.0f} MB in fp32", flush=True)
        g = torch.Generator().manual_seed(0)
        rows = []
        for batch in (1, 8):
            idx = torch.randint(0, SHAPES[args.shape][2]["vocab_size"], (batch, 32), generator=g)
            assert torch.equal(greedy(fp32, idx, 16, False), greedy(ref, idx, 16, True)), "greedy tokens differ"
            variants = {"minhub fp32": (fp32, False), "transformers fp32": (ref, True)}
            if batch == 1:
                variants["minhub bf16"] = (bf16, False)
            for model, is_ref in variants.values():
                greedy(model, idx, 4, is_ref)  # warm up (the first batch-1 generate builds the decode step)
            fns = {name: (lambda m=m, r=r: decode_rate(lambda n: greedy(m, idx, n, r), args.new_tokens)[0] * batch)
                   for name, (m, r) in variants.items()}
            if batch == 1:
                fns["limit"] = lambda: matrix_read_gbs(fp32, rounds=1, passes=args.new_tokens - 1) * 1e9 / fp32_bytes
                # the bf16 model's own: reading its bf16 matrices, which AVX2 CPUs convert as they read
                fns["bf16 limit"] = lambda: matrix_read_gbs(bf16, rounds=1, passes=args.new_tokens - 1) * 2e9 / \
                    fp32_bytes
            result = paired(fns, args.rounds)
            base = result["transformers fp32"]
            print(f"batch {batch} (tok/s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()), flush=True)
            for name in ("minhub fp32", "minhub bf16"):
                if name in result:
                    rows.append([f"batch {batch}, {name.split()[1]}", f"{result[name]:.1f}", f"{base:.1f}",
                                 f"{result[name] / base:.2f}x"])
            if batch == 1:
                limit = result["limit"]
                rows.append(["batch 1, fp32, share of the matrix-read limit", f"{result['minhub fp32'] / limit:.0%}",
                             f"{base / limit:.0%}", ""])
                rows.append(["batch 1, bf16, share of its limit (reading its bf16 matrices)",
                             f"{result['minhub bf16'] / result['bf16 limit']:.0%}", "", ""])
                rows.append(["batch 1, bf16, share of half the fp32 limit's bytes",
                             f"{result['minhub bf16'] / (2 * limit):.0%}", "", ""])
        print()
        print_table([f"{args.shape}, random weights, greedy (tok/s)", "minhub", "transformers fp32", "ratio"], rows)


if __name__ == "__main__":
    main()
