"""Sample from the GPT4-style decoder with top-k filtering.

With --model DIR (a directory written by GPT4.save_pretrained or `minhub train --model gpt4`), the trained weights
and the run's tokenizer are used and the text is printed. Without it, a small randomly initialised model shows the
API: the tokens are noise, but every option (ALiBi heads, xPos, multi-query attention, QK-norm, KV cache) runs.

    python examples/gpt4_generate.py                                   # random weights, token ids
    python examples/gpt4_generate.py --model runs/shakespeare-gpt4 --prompt "ROMEO:"
"""

import argparse
from pathlib import Path

import torch

from minhub import GPT4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="directory or hub repo written by GPT4.save_pretrained")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--k", type=int, default=10, help="top-k: sample among the k most likely tokens")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    tokenizer = None
    if args.model:
        model = GPT4.from_pretrained(args.model)
        if (Path(args.model) / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    else:
        # the GPT4 architecture at toy size: 8 heads of 32, the first 4 with ALiBi, one key/value head
        model = GPT4(num_tokens=256, max_seq_len=128, dim=256, depth=4, dim_head=32, heads=8, alibi_num_heads=4)
    model.eval()

    ids = tokenizer.encode(args.prompt).ids if tokenizer else list(args.prompt.encode("utf-8"))[:8]
    prompt = torch.tensor([ids])
    new = model.generate(prompt, args.new_tokens, temperature=args.temperature, filter_logits_fn="top_k",
                         filter_kwargs={"k": args.k}, generator=torch.Generator().manual_seed(args.seed))
    if tokenizer:
        print(args.prompt + tokenizer.decode(new[0].tolist()))
    else:
        print(f"{sum(p.numel() for p in model.parameters()):,} parameters; prompt {ids} ->")
        print(new[0].tolist())


if __name__ == "__main__":
    main()
