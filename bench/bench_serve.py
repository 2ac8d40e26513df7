"""`minhub serve` under load: aggregate tokens/s at 1, 4 and 16 concurrent clients, next to transformers' `generate`
running the same requests one after another. Loopback only; the server runs in this process and is stopped at the
end. Run from the repo root:  python bench/bench_serve.py   (needs the test extra: openai, starlette, uvicorn)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpt2 import machine, print_table, write_random_gpt2  # noqa: E402

TOKENIZER = Path(__file__).parents[1] / "tests" / "fixtures" / "gpt2-tokenizer" / "tokenizer.json"
PROMPTS = ["The meaning of life is", "Once upon a time there was", "In the beginning", "The quick brown fox",
           "It was a dark and stormy night", "Call me Ishmael. Some years ago", "To be, or not to be",
           "All happy families are alike"]


def load_test(port: int, model_name: str, args: argparse.Namespace) -> dict[int, float]:
    """Aggregate completion tokens/s with 1, 4 and 16 clients, each sending args.requests requests in turn."""
    import openai

    print(f"machine: {machine()}; server max batch {args.max_batch}, {args.max_tokens} new tokens per request, "
          "greedy, no EOS stop (random weights)")

    def one_client(k: int) -> int:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        tokens = 0
        for r in range(args.requests):
            result = client.completions.create(model=model_name, prompt=PROMPTS[(k + r) % len(PROMPTS)],
                                               max_tokens=args.max_tokens, temperature=0)
            tokens += result.usage.completion_tokens
        return tokens

    one_client(0)  # warm up
    rates = {}
    for clients in (1, 4, 16):
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(one_client, range(clients)))
        rates[clients] = tokens / (time.perf_counter() - start)
        print(f"{clients:2d} concurrent clients x {args.requests} requests: {rates[clients]:.1f} tok/s aggregate "
              f"({rates[clients] / rates[1]:.2f}x one client)", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: random GPT-2 124M shapes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import GPT2LMHeadModel

    from minhub.serve import BackgroundServer, build_app

    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else write_random_gpt2(Path(tmp.name) / "gpt2")
    if not (model_dir / "tokenizer.json").exists():
        (model_dir / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    app = build_app(str(model_dir), max_batch=args.max_batch)
    with BackgroundServer(app) as running:
        rates = load_test(running.port, str(model_dir), args)

    ref = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    start, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for r in range(args.requests * 4):
            idx = torch.tensor([tokenizer.encode(PROMPTS[r % len(PROMPTS)]).ids])
            out = ref.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=args.max_tokens,
                               min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=50256)
            tokens += out.size(1) - idx.size(1)
    theirs = tokens / (time.perf_counter() - start)
    print(f"transformers generate, requests one after another: {theirs:.1f} tok/s")
    print()
    print_table(["concurrent clients", "minhub serve (tok/s, aggregate)", "vs one client",
                 "vs transformers sequential"],
                [[str(clients), f"{rate:.1f}", f"{rate / rates[1]:.2f}x", f"{rate / theirs:.2f}x"]
                 for clients, rate in rates.items()])


if __name__ == "__main__":
    main()
