"""The `minhub` command line: `minhub generate MODEL PROMPT`."""

from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "bfloat16", "float16")


def generate_command(args: argparse.Namespace) -> int:
    """Load MODEL and its tokenizer from one commit, then stream the continuation of PROMPT to stdout."""
    import torch

    from minhub.gpt2 import LoadError, gpt2_from_pretrained, tokenizer_from_pretrained
    from minhub.streaming import stream_text

    try:
        model = gpt2_from_pretrained(args.model, args.revision, dtype=getattr(torch, args.dtype), device=args.device)
        # the model's commit, not the branch name: model and tokenizer come from the same files
        tokenizer = tokenizer_from_pretrained(args.model, model.commit_hash or args.revision)
    except (LoadError, ValueError) as e:
        print(f"minhub: {e}", file=sys.stderr)
        return 2
    if args.dtype == "bfloat16" and model.transformer.wte.weight.device.type == "cpu":
        from minhub.fast import prepack

        prepack(model, torch.bfloat16)  # bf16 matmuls on CPU are only fast with weights packed once
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        print(f"minhub: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
              f"{model.config.vocab_size}: they do not belong together", file=sys.stderr)
        return 2
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=model.transformer.wte.weight.device).manual_seed(args.seed)
    eos = None if args.ignore_eos else model.config.eos_token_id
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    try:
        for piece in stream_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k or None, top_p=args.top_p, eos_token_id=eos, generator=generator):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ValueError as e:
        print(f"\nminhub: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minhub", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="continue a prompt with a GPT-2 checkpoint, streaming the text")
    gen.add_argument("model", help="hub repo id (gpt2, gpt2-medium, distilgpt2, org/name) or a local directory")
    gen.add_argument("prompt", help="text to continue ('' starts from <|endoftext|>)")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy decoding (default 1.0)")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 disables")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    gen.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    gen.add_argument("--revision", default=None, help="branch, tag or commit sha on the hub")
    gen.add_argument("--dtype", choices=DTYPES, default="float32")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    gen.add_argument("--ignore-eos", action="store_true", help="keep going after <|endoftext|>")
    gen.set_defaults(run=generate_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `minhub` console script and `python -m minhub`."""
    args = build_parser().parse_args(argv)
    return args.run(args)
