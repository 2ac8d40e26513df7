"""Top-k sampling with GPT-2, one step at a time.

`minhub.generate` does all of this (plus a KV cache, batching and a sliding window); here the loop is written out so
that every step is visible. Run:  python examples/generate_gpt2.py "The meaning of life is" --model gpt2
"""

import argparse

import torch

from minhub import gpt2_from_pretrained, tokenizer_from_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="The meaning of life is")
    parser.add_argument("--model", default="gpt2", help="hub repo id or local directory")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # 1. Load the model and the tokenizer it was trained with, from the same commit.
    model = gpt2_from_pretrained(args.model)
    tokenizer = tokenizer_from_pretrained(args.model, model.commit_hash)
    eos = model.config.eos_token_id  # <|endoftext|>, 50256 for GPT-2
    generator = torch.Generator().manual_seed(args.seed)

    # 2. Encode: text -> token ids, as a batch of one sequence, shape (1, T).
    idx = torch.tensor([tokenizer.encode(args.prompt).ids])

    with torch.inference_mode():
        for _ in range(args.max_new_tokens):
            # 3. Forward: the model scores every vocabulary entry as the next token, at every position.
            #    Only the last position matters here. GPT-2 sees at most n_positions tokens, so crop the context.
            context = idx[:, -model.config.n_positions:]
            logits = model(context)[:, -1, :]  # (1, vocab_size)

            # 4. Temperature: < 1 sharpens the distribution, > 1 flattens it.
            logits = logits / args.temperature

            # 5. Keep the top k logits and forget the rest: unlikely tokens can never be picked.
            top_logits, top_ids = torch.topk(logits, args.top_k)  # (1, k) each, largest first

            # 6. Softmax turns the k logits into probabilities that sum to 1.
            probs = torch.softmax(top_logits, dim=-1)

            # 7. Sample one of the k candidates in proportion to its probability, and map it back to a token id.
            choice = torch.multinomial(probs, num_samples=1, generator=generator)  # (1, 1), index into the top k
            next_id = top_ids.gather(-1, choice)  # (1, 1), a vocabulary id

            # 8. Stop at end-of-text; otherwise append the token and go round again.
            if next_id.item() == eos:
                break
            idx = torch.cat([idx, next_id], dim=1)

    # 9. Decode: token ids -> text.
    print(tokenizer.decode(idx[0].tolist()))


if __name__ == "__main__":
    main()
