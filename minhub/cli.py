"""The `minhub` command line: `minhub generate MODEL PROMPT`, `minhub chat MODEL`, `minhub perplexity|score MODEL FILE`,
`minhub serve MODEL`, `minhub train`, `minhub plot RUN`."""

from __future__ import annotations

import argparse
import math
import sys

DTYPES = ("float32", "bfloat16", "float16")


def _check_generate_args(args: argparse.Namespace) -> None:
    """Every argument that can be checked without the model, before anything is loaded or printed."""
    from minhub import hardware
    from minhub.generation import Sampling

    Sampling(args.temperature, args.top_k or None, args.top_p)  # checks them
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    device = hardware.check_device(args.device)
    if args.int8 and (args.dtype != "float32" or device.type != "cpu"):
        raise ValueError("--int8 is CPU-only and picks its own dtypes (int8 weights, activations as this CPU runs "
                         "them best): drop --dtype and --device")
    if args.compile and args.dtype == "bfloat16" and device.type == "cpu":
        raise ValueError("--compile does not combine with --dtype bfloat16 on the CPU (it is for float32 and "
                         "--int8): drop one of the two")
    if args.compile and device.type == "cpu":
        hardware.require_compiler("--compile")


def _load_for_generation(args: argparse.Namespace, revision: str | None):
    """MODEL and its tokenizer from one commit, on the speed path `minhub generate` takes; None (the error printed
    in one line) if an argument, a file or the hardware does not allow it."""
    import torch

    from minhub import hardware, hub, speed
    from minhub.tokenizer import tokenizer_from_pretrained

    try:
        _check_generate_args(args)
        model = hub.from_pretrained(args.model, revision, dtype=getattr(torch, args.dtype), device=args.device)
        # the model's commit, not the branch name: model and tokenizer come from the same files
        tokenizer = tokenizer_from_pretrained(args.model, model.commit_hash or revision)
        if tokenizer.get_vocab_size() > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                             f"{model.config.vocab_size}: they do not belong together")
        speed.optimize(model, weights=speed.weights_for(model, int8=args.int8), compile_batches=args.compile)
    except (hub.LoadError, ValueError, FileNotFoundError, hardware.CPUFeatureError) as e:
        print(f"minhub: {e}", file=sys.stderr)
        return None
    return model, tokenizer


def generate_command(args: argparse.Namespace) -> int:
    """Load MODEL (any family minhub.from_pretrained loads) and its tokenizer from one commit, then stream the
    continuation of PROMPT to stdout."""
    import torch

    from minhub.generation import stream_text

    loaded = _load_for_generation(args, args.revision)
    if loaded is None:
        return 2
    model, tokenizer = loaded
    eos = None if args.ignore_eos else getattr(model.config, "eos_token_id", None)  # GPT4 runs have none
    device = next(model.parameters()).device
    generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)
    if args.suffix is not None:
        return _fill_in_the_middle(model, tokenizer, args, generator)
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


def _fill_in_the_middle(model, tokenizer, args: argparse.Namespace, generator) -> int:
    """Print PROMPT, the middle the model generates between it and --suffix (streamed), then the suffix."""
    from minhub.tokenizer import fim_ids

    try:
        ids = fim_ids(tokenizer, args.prompt, args.suffix)
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        _stream_reply(model, tokenizer, ids, args, generator, end=args.suffix + "\n")
    except ValueError as e:
        print(f"minhub: {e}", file=sys.stderr)
        return 2
    return 0


def _stream_reply(model, tokenizer, ids: list[int], args: argparse.Namespace, generator, end: str = "\n") -> str:
    """Stream the model's reply to the prompt `ids` to stdout as it is sampled, until one of the model's EOS ids or
    --max-new-tokens, then `end`; return the reply's text (what was printed)."""
    import torch
    from tokenizers.decoders import DecodeStream

    from minhub.generation import generate_stream

    context = model.config.context_length
    if len(ids) >= context:
        raise ValueError(f"the conversation has grown to {len(ids)} tokens, past the model's context of {context}: "
                         "start a new one")
    eos = getattr(model.config, "eos_token_id", None)
    stops = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    decoder, new, shown = DecodeStream(skip_special_tokens=True), [], ""
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    for token in generate_stream(model, idx, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k or None, top_p=args.top_p, eos_token_id=eos, generator=generator):
        if int(token[0]) in stops:
            break
        new.append(int(token[0]))
        piece = decoder.step(tokenizer, new[-1])
        if piece:  # None while a character's bytes are incomplete
            shown += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
    reply = tokenizer.decode(new)  # the stream holds back a character left incomplete at the end: print it now
    sys.stdout.write((reply[len(shown):] if reply.startswith(shown) else "") + end)
    sys.stdout.flush()
    return reply


def _chat_template(args: argparse.Namespace):
    """(the commit MODEL's files come from, its chat template); None (the error printed in one line) if there is no
    model or no template."""
    from minhub import hub
    from minhub.chat import chat_template_from_pretrained

    try:
        files = hub.CheckpointFiles(args.model, args.revision)
        files.require("config.json", "the model's hyper-parameters")  # pins the commit of every later file
        revision = files.commit_hash or args.revision
        template = chat_template_from_pretrained(args.model, revision)
    except (hub.LoadError, ValueError, FileNotFoundError) as e:
        print(f"minhub: {e}", file=sys.stderr)
        return None
    if template is None:
        print(f"minhub: {args.model} has no chat template (no chat_template.jinja, and none in its "
              "tokenizer_config.json): it is not a chat model; continue text with `minhub generate`", file=sys.stderr)
        return None
    return revision, template


def chat_command(args: argparse.Namespace) -> int:
    """Talk with MODEL in the terminal: each line of stdin is a user turn (until EOF or a line `/exit`); the whole
    conversation, rendered by the model's chat template, is continued and the reply streamed to stdout."""
    import torch

    from minhub.tokenizer import chat_ids

    found = _chat_template(args)
    loaded = None if found is None else _load_for_generation(args, found[0])
    if loaded is None:
        return 2
    (_, template), (model, tokenizer) = found, loaded
    device = next(model.parameters()).device
    generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    try:
        while True:
            if sys.stdin.isatty():
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\r\n")})
            ids = chat_ids(tokenizer, template, messages)  # ChatTemplateError (a ValueError) if it is refused
            messages.append({"role": "assistant", "content": _stream_reply(model, tokenizer, ids, args, generator)})
    except ValueError as e:
        print(f"minhub: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def score_command(args: argparse.Namespace) -> int:
    """`minhub perplexity` / `minhub score`: read FILE, score it with MODEL (strided windows, minhub.scoring) and
    print the perplexity (and, for score, every token's text and log-probability)."""
    import itertools
    import json
    from pathlib import Path

    import torch

    from minhub import hardware, hub
    from minhub.scoring import check_scoring_args, token_logprobs, windows
    from minhub.tokenizer import tokenizer_from_pretrained

    try:
        device = hardware.check_device(args.device)
        text = Path(args.file).read_text(encoding="utf-8")
        if not text:
            raise ValueError(f"{args.file} is empty: there is nothing to score")
        model = hub.from_pretrained(args.model, args.revision, device=device)
        context = model.config.context_length
        tokenizer = tokenizer_from_pretrained(args.model, model.commit_hash or args.revision)
        encoding = tokenizer.encode(text)
        max_length, stride = check_scoring_args(len(encoding.ids), context, args.max_length, args.stride,
                                                args.batch_size)
    except (hub.LoadError, ValueError, OSError, hardware.DeviceError) as e:
        print(f"minhub: {e}", file=sys.stderr)
        return 2
    per_token = args.handler_name == "score"
    try:
        scores = torch.cat(list(token_logprobs(model, encoding.ids, max_length=max_length, stride=stride,
                                               batch_size=args.batch_size, progress=sys.stderr.isatty())))
    except ValueError as e:  # token ids the model does not have: a tokenizer that does not belong to it
        print(f"minhub: {e}", file=sys.stderr)
        return 2
    nll = -scores.sum().item() / scores.numel()
    result = {"perplexity": math.exp(nll), "tokens": scores.numel(), "mean_nll": nll}
    if per_token:
        scored = [t for _, end, first in windows(len(encoding.ids), max_length, stride) for t in range(first, end)]
        values = dict(zip(scored, scores.tolist()))  # None for the tokens no window scores
        # each token's text is what it completes: a character split over several byte-level tokens goes to the
        # last of them (the others get ""), so the texts join to the file
        ends = [0, *itertools.accumulate((b for _, b in encoding.offsets), max)]
        result["token_scores"] = [{"text": text[ends[t]:ends[t + 1]], "id": i, "logprob": values.get(t)}
                                  for t, i in enumerate(encoding.ids)]
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    if per_token:
        for entry in result["token_scores"]:
            logprob = "" if entry["logprob"] is None else f"{entry['logprob']:.4f}"
            print(f"{logprob}\t{entry['text']!r}")
    print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """Serve MODEL behind an OpenAI-compatible API (minhub/serve.py) until SIGTERM or Ctrl-C: requests in flight
    then get --shutdown-timeout seconds to finish. 1 if the model thread failed (the server exits, not answer 500s)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("minhub: serving needs starlette and uvicorn: pip install 'minhub[serve]'", file=sys.stderr)
        return 2
    from minhub import hardware, hub
    from minhub.serve import build_app, uvicorn_server

    try:
        app = build_app(args.model, args.revision, max_batch=args.max_batch, dtype=args.dtype, device=args.device,
                        api_key=args.api_key, compile_batches=args.compile, max_body=args.max_body,
                        body_timeout=args.body_timeout, max_prompts=args.max_prompts, context=args.context)
        server = uvicorn_server(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout)
    except (hub.LoadError, ValueError, FileNotFoundError, hardware.CPUFeatureError) as e:
        print(f"minhub: {e}", file=sys.stderr)
        return 2
    print(f"serving {args.model} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr)
    server.run()
    failure = app.state.scheduler.failure
    if failure is not None:
        print(f"minhub: the model thread failed ({failure!r}; traceback above): the server stopped. Restart it; if "
              "it fails again, report the traceback", file=sys.stderr)
        return 1
    return 0 if server.started else 1  # uvicorn could not listen (the port taken?): it said why


def train_command(args: argparse.Namespace) -> int:
    """Train a model from scratch (see minhub/train.py)."""
    from minhub.train import TrainError, config_from_args, train

    try:
        train(config_from_args(args))
    except TrainError as e:
        print(f"minhub: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def plot_command(args: argparse.Namespace) -> int:
    """Draw RUN/log.jsonl's train and validation loss curves into RUN/loss.png."""
    import json
    from pathlib import Path

    log = Path(args.run) / "log.jsonl"
    if not log.is_file():
        print(f"minhub: {log} does not exist: is {args.run} a `minhub train` run directory?", file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("minhub: plotting needs matplotlib: pip install 'minhub[plot]'", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    latest = {row["step"]: row for row in rows}  # a resumed run may log a step again: keep the last
    steps = sorted(latest)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        ax.plot(steps, [latest[s][key] for s in steps], marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(Path(args.run).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(args.output) if args.output else Path(args.run) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)
    return 0


def _add_revision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None, help="branch, tag or commit sha on the hub")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")


def _add_dtype(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help=help_text)


def _add_compile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile batched decode steps in this process (minhub.speed, compile_batches), "
                             "after a compile of 20-40 s; one row on the CPU already runs a step compiled once per "
                             "machine (minhub.precompiled)")


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy decoding (default 1.0)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 disables")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="make sampling repeatable")


def _add_generate_arguments(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser("generate", help="continue a prompt with a GPT-2, Llama, Qwen2 or Mistral checkpoint "
                                               "or a GPT4-style run, streaming the text")
    gen.add_argument("model", help="hub repo id (gpt2, HuggingFaceTB/SmolLM2-135M, org/name) or a local directory "
                                   "(a checkpoint, or a GPT4-style run of minhub train)")
    gen.add_argument("prompt", help="text to continue ('' starts from <|endoftext|>)")
    _add_sampling_arguments(gen)
    _add_revision(gen)
    _add_dtype(gen, "bfloat16 on the CPU packs the weights for oneDNN where it has bf16 kernels (AVX-512 "
                    "BW/VL/DQ or AVX-NE-CONVERT), elsewhere takes minhub.matmul's bf16 path")
    _add_device(gen)
    gen.add_argument("--ignore-eos", action="store_true", help="keep going after <|endoftext|>")
    gen.add_argument("--suffix", default=None,
                     help="fill in the middle between PROMPT and this text (BigCode models: StarCoder, SantaCoder)")
    gen.add_argument("--int8", action="store_true",
                     help="int8 weights, on CPU (minhub.speed, weights='int8'): fastest, least exact")
    _add_compile(gen)
    gen.set_defaults(handler=generate_command)


def _add_chat_arguments(commands: argparse._SubParsersAction) -> None:
    ch = commands.add_parser("chat", help="talk with a chat model in the terminal (its chat template renders the "
                                          "conversation): one line per turn, /exit or end of input stops")
    ch.add_argument("model", help="hub repo id or local directory of a model with a chat template")
    ch.add_argument("--system", default=None, help="a system message that opens the conversation")
    _add_sampling_arguments(ch)
    _add_revision(ch)
    _add_dtype(ch)
    _add_device(ch)
    # replies are longer than `generate`'s default; --int8 and --compile are generate's only
    ch.set_defaults(handler=chat_command, max_new_tokens=256, int8=False, compile=False)


def _add_train_hyperparameters(tr: argparse.ArgumentParser) -> None:
    """The numeric TrainConfig fields as --options; None where the default is only decided once the run knows
    whether it starts from scratch or from --init-from."""
    from minhub.train import TrainConfig

    defaults = TrainConfig()
    for name, help_text in [
        ("n_layer", "layers (gpt4: depth)"), ("n_head", "attention heads"), ("n_embd", "model width (gpt4: dim)"),
        ("block_size", "context length (--init-from: at most the base's, default its own)"),
        ("dim_head", "gpt4: width of one head"),
        ("alibi_num_heads", "gpt4: heads with ALiBi (default half)"), ("batch_size", "sequences per micro-step"),
        ("grad_accum", "micro-steps per optimizer step"), ("max_steps", "optimizer steps"),
        ("warmup_steps", "linear warmup steps (0 with --init-from)"),
        ("eval_every", "steps between loss estimates"),
        ("eval_steps", "batches per loss estimate"), ("save_every", "steps between checkpoints (default eval_every)"),
        ("seed", "random seed"),
    ]:
        from_base = name in TrainConfig.BASE_FIELDS or name in ("block_size", "warmup_steps")  # None: decided later
        default = TrainConfig.SCRATCH_DEFAULTS.get(name, getattr(defaults, name))
        tr.add_argument("--" + name.replace("_", "-"), type=int, default=None if from_base else default,
                        help=help_text + (f"; default {default}" if from_base else ""))
    for name, help_text in [("dropout", "gpt2 dropout"), ("lr", "peak learning rate"), ("min_lr", "final lr"),
                            ("weight_decay", "AdamW weight decay (matrices only)"), ("beta1", "AdamW beta1"),
                            ("beta2", "AdamW beta2"), ("grad_clip", "max gradient norm, 0 disables"),
                            ("val_fraction", "share of the tokens held out for validation")]:
        fine_tune_default = name in ("lr", "min_lr")
        tr.add_argument("--" + name.replace("_", "-"), type=float,
                        default=None if fine_tune_default else getattr(defaults, name),
                        help=help_text + (f"; default {TrainConfig.SCRATCH_DEFAULTS[name]} ({TrainConfig.FINE_TUNE_LR} "
                                          "with --init-from)" if fine_tune_default else ""))


def _add_train_arguments(commands: argparse._SubParsersAction) -> None:
    from minhub.train import TrainConfig

    defaults = TrainConfig()
    tr = commands.add_parser("train", help="train a GPT-2 or GPT4-style model on a text file from scratch, or "
                             "fine-tune a pretrained model (--init-from)",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_argument("--data", required=True, help="UTF-8 text file")
    tr.add_argument("--out", required=True, help="run directory (checkpoints, tokenizer, logs)")
    tr.add_argument("--init-from", default=None,
                    help="fine-tune this model (hub id, commit, directory or run): its weights, shape and tokenizer")
    tr.add_argument("--revision", default=None, help="branch, tag or commit of --init-from")
    # None: not given (the defaults are TrainConfig's, or with --init-from the base model's)
    tr.add_argument("--model", choices=("gpt2", "gpt4"), default=None, help=f"default {defaults.model}")
    tr.add_argument("--tokenizer", default=None,
                    help=f"char, gpt2, or a tokenizer.json / directory / hub repo; default {defaults.tokenizer}")
    _add_train_hyperparameters(tr)
    tr.add_argument("--token-dtype", choices=("auto", "uint16", "uint32"), default=defaults.token_dtype)
    tr.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, mps")
    tr.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=defaults.dtype,
                    help="auto: bf16/fp16 autocast on CUDA, fp32 on CPU")
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.set_defaults(handler=train_command)


def _add_scoring_arguments(commands: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """`perplexity` and `score` take the same arguments; score_command tells them apart by handler_name."""
    sc = commands.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sc.add_argument("model", help="hub repo id (e.g. gpt2), commit, or local directory / minhub run")
    sc.add_argument("file", help="UTF-8 text file")
    sc.add_argument("--max-length", type=int, default=None, help="window length (default: the model's context)")
    sc.add_argument("--stride", type=int, default=None, help="distance between windows (default: max length / 2)")
    sc.add_argument("--batch-size", type=int, default=1, help="full-length windows per forward")
    _add_revision(sc)
    _add_device(sc)
    sc.add_argument("--json", action="store_true", help="print one JSON object")
    sc.set_defaults(handler=score_command, handler_name=name)


def _add_serve_arguments(commands: argparse._SubParsersAction) -> None:
    sv = commands.add_parser("serve", help="an OpenAI-compatible server: completions and chat completions (pip "
                                           "install 'minhub[serve]')",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sv.add_argument("model", help="hub repo id, commit, or local directory / minhub run")
    _add_revision(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=8, help="rows decoded together (continuous batching)")
    sv.add_argument("--context", type=int, default=None,
                    help="most tokens a row may reach, prompt and completion (default: the model's context, at most "
                         "8192: the KV cache holds that many slots for every row)")
    _add_dtype(sv)
    _add_device(sv)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    _add_compile(sv)
    sv.add_argument("--max-prompts", type=int, default=64,
                    help="most completions in one request (prompts x n); more: a 400")
    sv.add_argument("--max-body", type=int, default=None,
                    help="most bytes in a request body; more: a 413 (None: 1 MiB, or 64 bytes per token of the "
                         "model's context if that is more)")
    sv.add_argument("--body-timeout", type=float, default=30.0,
                    help="seconds a client has to send a request body; longer: a 408")
    sv.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="on SIGTERM, seconds requests in flight have to finish before they end with an error")
    sv.set_defaults(handler=serve_command)


def _add_plot_arguments(commands: argparse._SubParsersAction) -> None:
    pl = commands.add_parser("plot", help="plot a run's train/validation loss curves to a PNG (needs matplotlib)")
    pl.add_argument("run", help="run directory of `minhub train`")
    pl.add_argument("--output", default=None, help="PNG path (default RUN/loss.png)")
    pl.set_defaults(handler=plot_command)


def build_parser() -> argparse.ArgumentParser:
    """The `minhub` parser: one subcommand per *_command function, each with its handler set as a default."""
    parser = argparse.ArgumentParser(prog="minhub", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    # the order of these calls is the order of the subcommands in `minhub --help`
    _add_generate_arguments(commands)
    _add_chat_arguments(commands)
    _add_train_arguments(commands)
    _add_scoring_arguments(commands, "perplexity",
                           "perplexity of a text file (the strided loop of the transformers guide)")
    _add_scoring_arguments(commands, "score", "each token's log-probability in a text file, and the perplexity")
    _add_serve_arguments(commands)
    _add_plot_arguments(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `minhub` console script and `python -m minhub`."""
    args = build_parser().parse_args(argv)
    return args.handler(args)
