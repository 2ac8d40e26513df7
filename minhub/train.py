"""Train a GPT-2 or GPT4-style model on a text file, from scratch (`minhub train --data input.txt --out runs/x`), or
fine-tune any model `minhub.from_pretrained` loads (`--init-from gpt2`, `--init-from HuggingFaceTB/SmolLM2-135M`:
its weights, shape and tokenizer).

The run directory ends up holding what `minhub.from_pretrained` (and, for the hub's families, transformers) loads
(config.json, model.safetensors, tokenizer.json, and a base's other tokenizer files), plus `train_state.pt` (model,
optimizer, step, each process's random states) for `--resume`, `log.jsonl` (train/val loss every eval) and the
tokenized data (`train.bin`, `val.bin`, `data.json`).

Reading order, the order the data flows: TrainConfig -> tokenizers -> data (tokenize once into memory-mapped files,
sample random blocks) -> model and optimizer -> learning rate -> checkpoints -> processes and devices -> the run,
in the order `train` (at the end) calls its parts: resolve_config, prepare_run_data, build_run, then run_loop, whose
every step is optimizer_step, with evaluate, checkpoints and stop requests between steps.
Under `torchrun --nproc_per_node N` each process trains a DistributedDataParallel replica on its own batches.
"""

from __future__ import annotations

import array
import hashlib
import json
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from minhub import files

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class TrainError(ValueError):
    """A training input that cannot work: the message says what to change."""


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI flags are these fields with dashes."""

    data: str = "input.txt"
    out: str = "runs/minhub"
    model: str = "gpt2"  # gpt2 | gpt4
    tokenizer: str = "char"  # char | gpt2 | a tokenizer.json path, directory or hub repo
    # model shape (gpt2: n_layer/n_head/n_embd; gpt4: depth/heads/dim, dim_head, its attention options)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int | None = None  # None: 256, or with init_from the base's context
    dropout: float = 0.0  # gpt2; with init_from, every dropout field the base's config has (DROPOUT_FIELDS)
    dim_head: int = 64  # gpt4 only
    alibi_num_heads: int | None = None  # gpt4: default half the heads
    # optimisation
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 5000
    lr: float | None = None  # None: 1e-3, or with init_from FINE_TUNE_LR
    min_lr: float | None = None  # None: 1e-4, or with init_from lr (constant)
    warmup_steps: int | None = None  # None: 100, or with init_from 0 (a constant lr, as nanoGPT fine-tunes)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # bookkeeping
    eval_every: int = 250
    eval_steps: int = 20
    save_every: int | None = None  # default: every eval
    val_fraction: float = 0.1
    token_dtype: str = "auto"  # auto | uint16 | uint32
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 or fp16 autocast on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16
    compile: bool = False
    resume: bool = False
    # fine-tuning: start from this model (anything minhub.from_pretrained loads) with its shape and tokenizer
    init_from: str | None = None
    revision: str | None = None  # of init_from

    # the fields that define the model: a run directory cannot be continued with different ones
    MODEL_FIELDS = ("model", "tokenizer", "n_layer", "n_head", "n_embd", "block_size", "dropout", "dim_head",
                    "alibi_num_heads", "init_from", "revision")
    # what --init-from takes from the base model (given together with it, they are an error)
    BASE_FIELDS = ("model", "tokenizer", "n_layer", "n_head", "n_embd", "dim_head", "alibi_num_heads")
    FINE_TUNE_LR = 3e-5  # nanoGPT's finetune_shakespeare: a small, constant learning rate
    SCRATCH_DEFAULTS = {"block_size": 256, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100}  # None from scratch


def config_from_args(args: Any) -> TrainConfig:
    """TrainConfig from argparse's namespace (flags are the fields with dashes; None: not given). With --init-from,
    the base model's fields (TrainConfig.BASE_FIELDS) must not be given."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if given.get("init_from") is not None:
        clashing = [name for name in TrainConfig.BASE_FIELDS if name in given]
        if clashing:
            flags = ", ".join("--" + name.replace("_", "-") for name in clashing)
            raise TrainError(f"{flags} come from the base model with --init-from: drop them (--block-size, "
                             "--dropout and the optimisation settings may be set)")
    elif given.get("revision") is not None:
        raise TrainError("--revision is the revision of --init-from: give --init-from too")
    return TrainConfig(**given)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers


def char_tokenizer(chars: list[str]) -> Tokenizer:
    """A character-level `tokenizers.Tokenizer`: one id per character, in sorted order. It saves as an ordinary
    tokenizer.json, so generation decodes it like any other; characters it has never seen map to the first one."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=chars[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tokenizer.decoder = decoders.Fuse()  # join the characters back without spaces
    return tokenizer


def load_tokenizer(spec: str, data: Path, chunk_chars: int) -> Tokenizer:
    """'char': built from the characters of `data`; 'gpt2': GPT-2's BPE; else a tokenizer.json, directory or repo."""
    from tokenizers import Tokenizer

    from minhub.tokenizer import tokenizer_from_pretrained

    if spec == "char":
        chars: set[str] = set()
        for chunk in read_chunks(data, chunk_chars):
            chars.update(chunk)
        return char_tokenizer(sorted(chars))
    if spec.endswith(".json") and Path(spec).is_file():
        return Tokenizer.from_file(spec)
    return tokenizer_from_pretrained(spec)


# --------------------------------------------------------------------------------------------------------------------
# Data: the text is tokenized once into memory-mapped token files; batches are random blocks of them


def read_chunks(path: Path, chunk_chars: int) -> Iterator[str]:
    """The text of `path` in pieces of about chunk_chars characters, cut after a newline where there is one, so a
    file larger than memory streams through and BPE rarely sees a word cut in two."""
    with open(path, encoding="utf-8") as f:
        carry = ""
        while True:
            piece = f.read(chunk_chars)
            if not piece:
                if carry:
                    yield carry
                return
            piece = carry + piece
            cut = piece.rfind("\n") + 1
            if cut == 0:
                cut = len(piece)
            carry = piece[cut:]
            yield piece[:cut]


TOKEN_DTYPES = {"uint16": (torch.uint16, "H", 2**16), "uint32": (torch.uint32, "I", 2**32)}  # torch, array code, ids


def token_dtype(vocab_size: int, requested: str) -> str:
    """uint16 for vocabularies of at most 65,536 tokens, else uint32; a requested uint16 must fit."""
    if requested not in ("auto", *TOKEN_DTYPES):
        raise TrainError(f"token_dtype must be auto, uint16 or uint32, not {requested!r}")
    if requested == "auto":
        requested = "uint16" if vocab_size <= 2**16 else "uint32"
    if vocab_size > TOKEN_DTYPES[requested][2]:
        raise TrainError(f"the vocabulary has {vocab_size:,} tokens, too many for a {requested} token file (at most "
                         f"{TOKEN_DTYPES[requested][2]:,}): use --token-dtype uint32 (or auto)")
    return requested


def open_tokens(path: Path, dtype: str) -> torch.Tensor:
    """A token file as a 1-D tensor, memory-mapped: pages are read when a batch touches them."""
    torch_dtype = TOKEN_DTYPES[dtype][0]
    return torch.from_file(str(path), shared=False, size=path.stat().st_size // torch_dtype.itemsize,
                           dtype=torch_dtype)


def check_data(config: TrainConfig) -> Path:
    """config.data as a Path, once it is known to be a non-empty file (and val_fraction to be usable)."""
    data = Path(config.data)
    if not data.is_file():
        raise TrainError(f"data file {data} does not exist: give a UTF-8 text file with --data")
    if data.stat().st_size == 0:
        raise TrainError(f"data file {data} is empty")
    if not 0 < config.val_fraction < 1:
        raise TrainError(f"val_fraction must be in (0, 1), got {config.val_fraction}")
    return data


def prepare_data(
    config: TrainConfig, data: Path, out: Path, tokenizer: Tokenizer, chunk_chars: int = 1 << 22
) -> dict[str, Any]:
    """Tokenize config.data into out/train.bin and out/val.bin (the last val_fraction of the tokens), once: a
    matching out/data.json means it is already done. `data` is config.data, checked by check_data. Returns
    data.json's contents."""
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size, config.token_dtype)
    stat = data.stat()
    meta = {"source": str(data.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(), "dtype": dtype,
            "vocab_size": vocab_size, "val_fraction": config.val_fraction}
    meta_path = out / "data.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} == meta:
            return old
    # stream: encode piece by piece into one token file, then cut it into the two splits
    all_path = out / "tokens.bin.tmp"
    with open(all_path, "wb") as f:
        for chunk in read_chunks(data, chunk_chars):  # one stream of text: no BOS (or other special) at chunk starts
            array.array(TOKEN_DTYPES[dtype][1], tokenizer.encode(chunk, add_special_tokens=False).ids).tofile(f)
    tokens = open_tokens(all_path, dtype)
    n = len(tokens)
    n_val = int(n * config.val_fraction)
    n_train = n - n_val
    if min(n_train, n_val) <= config.block_size:
        del tokens
        all_path.unlink()
        raise TrainError(f"{data} has {n:,} tokens: {n_train:,} for training and {n_val:,} for validation, but "
                         f"each split needs more than block_size={config.block_size}: use a smaller --block-size, "
                         "a larger file, or another --val-fraction")
    itemsize = TOKEN_DTYPES[dtype][0].itemsize
    with open(all_path, "rb") as src:  # the first n_train tokens, then the rest
        for name, count in (("train.bin", n_train), ("val.bin", n_val)):
            files.save_atomically(out, [name], partial(_copy_bytes, src, name, count * itemsize))
    del tokens
    all_path.unlink()
    meta.update(train_tokens=n_train, val_tokens=n_val)
    files.write_atomically(meta_path, (json.dumps(meta, indent=2) + "\n").encode())  # last: it says all is done
    return meta


def _copy_bytes(src: BinaryIO, name: str, count: int, directory: Path) -> None:
    """Copy the next `count` bytes of the open file `src` into directory/name, 16 MiB at a time."""
    with open(directory / name, "wb") as dst:
        while count:
            piece = src.read(min(count, 1 << 24))
            dst.write(piece)
            count -= len(piece)


class Batches:
    """Random blocks of block_size + 1 tokens from a memory-mapped token file, drawn with a seeded generator."""

    def __init__(self, path: Path, dtype: str, block_size: int, batch_size: int, seed: int, device) -> None:
        self.tokens = open_tokens(path, dtype)
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.block_size - 1, (self.batch_size,), generator=self.generator)
        block = torch.stack([self.tokens[s:s + self.block_size + 1].long() for s in starts.tolist()])
        block = block.to(self.device)
        return block[:, :-1], block[:, 1:]  # inputs, next-token targets


# --------------------------------------------------------------------------------------------------------------------
# Model, optimizer, learning rate


# the base's files that a fine-tune copies, byte for byte from the base's commit, into the run where the base has
# them: its tokenizer (for minhub and transformers alike), chat template and stop ids stay the base's
TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json",
                   "chat_template.jinja", "generation_config.json", "tokenizer.json")  # tokenizer.json last: all done
# with --init-from: the config fields set to --dropout, where the base's config has them (GPT-2's and GPT-BigCode's
# three rates, the attention dropout of Llama and GPT-NeoX)
DROPOUT_FIELDS = ("embd_pdrop", "attn_pdrop", "resid_pdrop", "attention_dropout")
# families with a learned position table: their context field and the table, cropped to block_size (nanoGPT's
# crop_block_size), so the run's model has that context. Elsewhere (rotary, ALiBi) block_size only limits the training
# window, and the run keeps the base's context.
LEARNED_POSITIONS = {"n_positions": "transformer.wpe.weight"}


def load_base(config: TrainConfig) -> tuple[nn.Module, dict[str, bytes]]:
    """The model that --init-from names (any family minhub.from_pretrained loads and save_pretrained writes), and
    its tokenizer files from the same commit (TOKENIZER_FILES, tokenizer.json built where the base has only GPT-2's
    vocab.json + merges.txt); a TrainError that says why when it cannot be used. Nothing is written."""
    from minhub import hub
    from minhub.tokenizer import tokenizer_from_pretrained

    try:
        base = hub.from_pretrained(config.init_from, config.revision)
        commit = base.commit_hash or config.revision
        tokenizer = tokenizer_from_pretrained(config.init_from, commit)
        checkpoint = hub.CheckpointFiles(config.init_from, commit)
        base_files = {name: path.read_bytes() for name in TOKENIZER_FILES if (path := checkpoint.get(name))}
    except (hub.LoadError, ValueError, OSError) as e:
        raise TrainError(f"--init-from {config.init_from}: {e}") from e
    if config.model not in ("gpt2", kind := _family(base)):  # "gpt2" is the default: not given
        raise TrainError(f"--init-from {config.init_from} is a {kind!r} model: drop --model {config.model}")
    if not (hasattr(base, "save_pretrained") or hasattr(base.config, "to_dict")
            or type(base.config) in hub.ARCHITECTURES):
        raise TrainError(f"--init-from {config.init_from}: minhub cannot save {kind!r} models yet (its config has no "
                         "to_dict), so the run could not be written")
    if tokenizer.get_vocab_size() > base.config.vocab_size:
        raise TrainError(f"--init-from {config.init_from}: its tokenizer has {tokenizer.get_vocab_size():,} tokens, "
                         f"more than the model's {base.config.vocab_size:,}")
    base_files.setdefault("tokenizer.json", tokenizer.to_str(pretty=True).encode())
    return base, base_files


def with_defaults(config: TrainConfig, base: nn.Module | None) -> TrainConfig:
    """Fill the fields left None: from scratch SCRATCH_DEFAULTS; from a base model its family as model, its context
    (config.context_length) as block_size and FINE_TUNE_LR, constant (no warmup). A block_size past the base's
    context is a TrainError."""
    from dataclasses import replace

    if base is None:
        return replace(config, **{k: v for k, v in TrainConfig.SCRATCH_DEFAULTS.items() if getattr(config, k) is None})
    context = base.config.context_length
    block_size = context if config.block_size is None else config.block_size
    if not 2 <= block_size <= context:
        raise TrainError(f"block_size must be in [2, {context}] (the context of {config.init_from}), got {block_size}")
    lr = TrainConfig.FINE_TUNE_LR if config.lr is None else config.lr
    return replace(config, model=_family(base), block_size=block_size, lr=lr,
                   min_lr=lr if config.min_lr is None else config.min_lr,
                   warmup_steps=0 if config.warmup_steps is None else config.warmup_steps)


def _family(base: nn.Module) -> str:
    """The model_type (gpt2, llama, qwen2, ..., minhub-gpt4) of the config.json a loaded model was read from."""
    from minhub import hub

    return hub.model_type(base.name_or_path, base.commit_hash)


def fine_tune_model(base: nn.Module, config: TrainConfig) -> nn.Module:
    """A new model of the base's class with the base's shape and weights, except the run's dropout (DROPOUT_FIELDS)
    and, for a family with a learned position table (LEARNED_POSITIONS), the context cropped to block_size: the
    first block_size positions, as nanoGPT's crop_block_size. The base itself is left as it is."""
    from dataclasses import fields as config_fields
    from dataclasses import replace

    names = {f.name for f in config_fields(base.config)}
    state = dict(base.state_dict())
    changes: dict[str, Any] = {name: config.dropout for name in DROPOUT_FIELDS if name in names}
    for field, table in LEARNED_POSITIONS.items():
        if field in names and table in state:
            changes[field] = config.block_size
            state[table] = state[table][:config.block_size]
    model = type(base)(replace(base.config, **changes))
    model.load_state_dict(state)
    return model


def build_model(config: TrainConfig, vocab_size: int) -> nn.Module:
    """A new, randomly initialised model of config's kind and shape."""
    if config.model == "gpt2":
        from minhub.gpt2 import GPT2, GPT2Config

        return GPT2(GPT2Config(
            vocab_size=vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
            n_head=config.n_head, embd_pdrop=config.dropout, attn_pdrop=config.dropout, resid_pdrop=config.dropout,
            bos_token_id=None, eos_token_id=None,
        ))
    if config.model == "gpt4":
        from minhub.gpt4 import GPT4

        return GPT4(num_tokens=vocab_size, max_seq_len=config.block_size, dim=config.n_embd, depth=config.n_layer,
                    heads=config.n_head, dim_head=config.dim_head,
                    alibi_num_heads=config.alibi_num_heads or max(1, config.n_head // 2))
    raise TrainError(f"model must be gpt2 or gpt4, not {config.model!r}")


def build_optimizer(model: nn.Module, config: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices of linear layers and embeddings only, never on biases, norm gains or
    QK-norm scales."""
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())  # tied weights once
    decay = [p for p in params if id(p) in matrices]
    no_decay = [p for p in params if id(p) not in matrices]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused or None)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints: every file is written whole or not at all (minhub.files), so a crash never leaves a half-written file
# in place of a good one


def random_states(batches: Batches, world: int, device: torch.device) -> list[dict[str, Any]] | None:
    """Every process's random states, in rank order, on rank 0 (None on the others): its torch CPU state (dropout),
    its batch generator's and, where CUDA is available, its CUDA states. A collective under torchrun: every process
    must call it at the same point. Each process draws its own batches and dropout masks, so resuming exactly needs
    each one's own states, not rank 0's."""
    own = {"rng": torch.get_rng_state(), "batch_rng": batches.generator.get_state()}
    if torch.cuda.is_available():
        own["cuda_rng"] = torch.cuda.get_rng_state_all()
    if world == 1:
        return [own]
    import torch.distributed as dist

    rank = dist.get_rank()
    gathered = [None] * world if rank == 0 else None
    # NCCL sends the pickled objects from torch.cuda.current_device(): make that this process's own GPU
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        dist.gather_object(own, gathered, dst=0)
    return gathered


def saved_random_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """train_state.pt's random states, one entry per process of the run that saved it. A train_state.pt written
    before they were kept per process holds one process's states at its top level: it resumes as a one-process run."""
    if "random_states" in state:
        return state["random_states"]
    return [{k: state[k] for k in ("rng", "batch_rng", "cuda_rng") if k in state}]


def save_checkpoint(out: Path, model: nn.Module, optimizer, scaler, step: int, states: list[dict[str, Any]],
                    config: TrainConfig, best_val: float) -> None:
    """The loadable model (config.json + model.safetensors) first, then train_state.pt, which alone is enough to
    resume: if a crash falls between the two, --resume continues from the previous, complete state. `states`:
    every process's random states (random_states), saved as train_state.pt's "random_states" in rank order."""
    from minhub.hub import save_pretrained

    files.save_atomically(out, ["model.safetensors", "config.json"], partial(save_pretrained, model))
    state = {
        "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "best_val": best_val,
        "scaler": scaler.state_dict(), "random_states": states, "config": asdict(config),
    }
    files.save_atomically(out, ["train_state.pt"], lambda staging: torch.save(state, staging / "train_state.pt"))


def check_run_directory(out: Path, config: TrainConfig) -> dict | None:
    """Refuse to overwrite a run (of this model or another); with resume, return its saved train state."""
    state_path = out / "train_state.pt"
    if config.resume:
        if not state_path.is_file():
            raise TrainError(f"--resume: {out} has no train_state.pt to resume from")
        return torch.load(state_path, map_location="cpu", weights_only=True)
    run_config = out / "run.json"
    if run_config.is_file():
        old = json.loads(run_config.read_text())
        different = {k: (old.get(k), getattr(config, k)) for k in TrainConfig.MODEL_FIELDS
                     if old.get(k) != getattr(config, k)}
        if different:
            described = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in different.items())
            raise TrainError(f"{out} holds a run of a different model ({described}): choose another --out "
                             "(nothing was overwritten)")
    if state_path.exists() or (out / "model.safetensors").exists():
        raise TrainError(f"{out} already holds a trained model: pass --resume to continue it, or choose another "
                         "--out (nothing was overwritten)")
    return None


# --------------------------------------------------------------------------------------------------------------------
# Processes and devices


def _setup_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size); initialises the process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    """The device to train on; a device this machine does not have, or --compile without a C++ compiler on the
    CPU, is a TrainError before anything is written."""
    from minhub import hardware

    try:
        if config.device != "auto":
            device = hardware.check_device(config.device)
        else:
            device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if config.compile and device.type == "cpu":
            hardware.require_compiler("--compile")
    except (hardware.DeviceError, hardware.CPUFeatureError) as e:
        raise TrainError(str(e)) from e
    return device


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); fp32 elsewhere."""
    if config.dtype == "float32" or device.type != "cuda":
        return None
    if config.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, config.dtype)


# --------------------------------------------------------------------------------------------------------------------
# The run, in the order `train` does it: the config, the data, the state (model, optimizer, batches), then the loop
# of optimizer steps with its evaluations, checkpoints and stop requests


def resolve_config(
    config: TrainConfig, out: Path, world: int = 1
) -> tuple[TrainConfig, dict | None, nn.Module | None, dict[str, bytes] | None]:
    """The run's complete, checked config, and its directory `out`, created: nothing else is written yet.

    A new run fills the fields left None (from the base model with --init-from, which is loaded first: a bad base
    leaves no trace) and may not overwrite another run. A resumed run is its saved config, except how long and where
    to go on, and must run on as many processes (`world`) as saved it. Returns (config, the saved train state, the
    base model, its tokenizer files), each None where not used."""
    base = base_files = resumed = None
    if config.resume:  # the run's own settings, except how long and where to go on
        resumed = check_run_directory(out, config)
        saved_world = len(saved_random_states(resumed))
        if saved_world != world:  # each process continues its own batches and dropout: no other count is exact
            raise TrainError(f"--resume: {out} was saved by a run of {saved_world} process(es), and continues exactly "
                             f"only on as many (torchrun --nproc_per_node {saved_world}), not on {world}")
        keep = ("max_steps", "eval_every", "eval_steps", "save_every", "device", "resume", "compile")
        config = TrainConfig(**{**resumed["config"], **{k: getattr(config, k) for k in keep}})
    else:
        if config.init_from is not None:
            base, base_files = load_base(config)  # before anything is written: a bad base leaves no trace
        config = with_defaults(config, base)
        check_run_directory(out, config)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("batch_size", "grad_accum", "max_steps", "block_size", "eval_every", "eval_steps"):
        if getattr(config, name) <= 0:
            raise TrainError(f"{name} must be positive, got {getattr(config, name)}")
    return config, resumed, base, base_files


def prepare_run_data(config: TrainConfig, out: Path, main_process: bool, world: int,
                     base_files: dict[str, bytes] | None, resumed: dict | None) -> dict[str, Any]:
    """The run's tokenizer.json (the base's tokenizer files with --init-from; kept when resuming), token files and
    run.json: rank 0 writes them while the other processes wait. Returns data.json's contents."""
    tokenizer_path = out / "tokenizer.json"
    if main_process:
        data = check_data(config)
        if resumed is None or not tokenizer_path.is_file():
            if base_files:  # byte for byte; tokenizer.json last, so that its presence means all are there
                files.save_atomically(out, list(base_files), partial(_write_files, base_files))
            else:
                tokenizer = load_tokenizer(config.tokenizer, data, 1 << 22)
                files.save_atomically(out, ["tokenizer.json"], lambda d: tokenizer.save(str(d / "tokenizer.json")))
        from tokenizers import Tokenizer

        prepare_data(config, data, out, Tokenizer.from_file(str(tokenizer_path)))
        model_fields = {k: getattr(config, k) for k in TrainConfig.MODEL_FIELDS}  # what a later run must match
        files.write_atomically(out / "run.json", (json.dumps(model_fields, indent=2) + "\n").encode())
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return json.loads((out / "data.json").read_text())


def _write_files(contents: dict[str, bytes], directory: Path) -> None:
    for name, data in contents.items():
        (directory / name).write_bytes(data)


@dataclass
class Run:
    """What the loop works with, and how far it has come: build_run makes it, run_loop advances it."""

    config: TrainConfig
    out: Path  # the run directory, as given (a resumed config keeps the `out` it was first trained in)
    main_process: bool  # rank 0, the one process that prints and writes files
    world: int  # how many processes train together
    device: torch.device
    model: nn.Module  # what a step calls: raw_model, compiled with --compile, wrapped in DDP under torchrun
    raw_model: nn.Module  # the module that owns the parameters: what is evaluated, clipped and saved
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling for fp16 autocast; a no-op otherwise
    autocast: Callable[[], Any]  # a new autocast context (or nullcontext) per forward pass
    batches: Batches  # this process's training batches
    eval_batches: dict[str, Batches]  # "train" and "val": the same batches at every evaluation
    step: int = 0  # optimizer steps done
    best_val: float = float("inf")
    saved_step: int | None = None  # the step train_state.pt holds, when known: a stop request saves only if it differs

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step, over every micro-batch and process."""
        return self.config.batch_size * self.config.block_size * self.config.grad_accum * self.world

    def save(self) -> None:
        """A checkpoint of this step: every process calls it (its random states are gathered), rank 0 writes the
        loadable model, then train_state.pt."""
        states = random_states(self.batches, self.world, self.device)
        if self.main_process:
            save_checkpoint(self.out, self.raw_model, self.optimizer, self.scaler, self.step, states, self.config,
                            self.best_val)
        self.saved_step = self.step


def initial_model(config: TrainConfig, out: Path, vocab_size: int, base: nn.Module | None) -> nn.Module:
    """The model before its first step here: fresh (build_model), the base's weights (--init-from), or, resuming a
    fine-tune, the family and shape of the run's own saved model (its weights then come from train_state.pt)."""
    if config.init_from is None:
        return build_model(config, vocab_size)
    if base is None:
        from minhub import hub

        base = hub.from_pretrained(out)
    return fine_tune_model(base, config)


def build_run(config: TrainConfig, out: Path, meta: dict[str, Any], base: nn.Module | None, resumed: dict | None,
              rank: int, local_rank: int, world: int, device: torch.device) -> Run:
    """Batches, model, optimizer and loss scaler: new, or exactly as train_state.pt left them (weights, optimizer
    moments, step, and every random state the next steps draw from). Rank 0 prints what is trained on what."""
    from tqdm import tqdm

    batches = Batches(out / "train.bin", meta["dtype"], config.block_size, config.batch_size,
                      config.seed + 1000 * rank, device)  # each process its own batches
    eval_batches = {"train": Batches(out / "train.bin", meta["dtype"], config.block_size, config.batch_size,
                                     config.seed + 1, device),
                    "val": Batches(out / "val.bin", meta["dtype"], config.block_size, config.batch_size,
                                   config.seed + 2, device)}
    model = initial_model(config, out, meta["vocab_size"], base).to(device)
    optimizer = build_optimizer(model, config, fused=device.type == "cuda")
    step, best_val = 0, float("inf")
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, best_val = resumed["step"], resumed["best_val"]
        own = saved_random_states(resumed)[rank]  # this process's, not rank 0's (resolve_config checked the count)
        torch.set_rng_state(own["rng"])  # dropout continues where it was
        batches.generator.set_state(own["batch_rng"])  # and so do the batches
        if "cuda_rng" in own and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own["cuda_rng"])
    raw_model = model
    if config.compile:
        model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    amp = _autocast_dtype(config, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    if resumed is not None and resumed.get("scaler"):
        scaler.load_state_dict(resumed["scaler"])
    if rank == 0:
        n_params = sum(p.numel() for p in raw_model.parameters())
        tqdm.write(f"{config.model}: {n_params / 1e6:.2f}M parameters, vocabulary {meta['vocab_size']}, "
                   f"{meta['train_tokens']:,} training tokens, {world} process(es) on {device}"
                   + (f", autocast {amp}" if amp else ""))
    return Run(config, out, rank == 0, world, device, model, raw_model, optimizer, scaler, autocast, batches,
               eval_batches, step, best_val, saved_step=step if resumed is not None else None)


def optimizer_step(run: Run, lr: float) -> float:
    """One optimizer step at learning rate `lr`: grad_accum micro-batches whose gradients add up (DDP all-reduces
    only the last one's), clipping, then AdamW. Returns the step's loss, the mean over its micro-batches."""
    config, world, model, optimizer, scaler = run.config, run.world, run.model, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for micro in range(config.grad_accum):
        x, y = run.batches.next()
        sync = world == 1 or micro == config.grad_accum - 1  # DDP: all-reduce gradients once per step
        with (nullcontext() if sync else model.no_sync()), run.autocast():
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()) / config.grad_accum
            scaler.scale(loss).backward()
        loss_sum += loss.item()
    if config.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(run.raw_model.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


@torch.no_grad()
def estimate_loss(model: nn.Module, batches: dict[str, Batches], steps: int, autocast, seed: int) -> dict[str, float]:
    """Mean loss over `steps` batches of each split; the same batches every time, so evaluations compare."""
    model.eval()
    out = {}
    for i, (split, source) in enumerate(batches.items()):
        source.generator.manual_seed(seed + i)
        losses = torch.zeros(steps)
        for i in range(steps):
            x, y = source.next()
            with autocast():
                losses[i] = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        out[split] = losses.mean().item()
    model.train()
    return out


def evaluate(run: Run, lr: float) -> dict[str, Any]:
    """Both splits' loss at this step; rank 0 prints it and appends it to log.jsonl. Returns the
    {"step", "train_loss", "val_loss"} that train returns when this is the last evaluation."""
    from tqdm import tqdm

    losses = estimate_loss(run.raw_model, run.eval_batches, run.config.eval_steps, run.autocast, run.config.seed)
    run.best_val = min(run.best_val, losses["val"])
    last = {"step": run.step, "train_loss": losses["train"], "val_loss": losses["val"]}
    if run.main_process:
        tqdm.write(f"step {run.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        with open(run.out / "log.jsonl", "a") as f:
            f.write(json.dumps({**last, "lr": lr, "tokens": run.step * run.tokens_per_step, "time": time.time()})
                    + "\n")
    return last


class StopRequest:
    """The signal handler for SIGTERM and SIGINT (Ctrl-C) during training.

    The first signal only asks the loop to stop: it finishes the step it is in (eval and save included) and saves
    that step, so the checkpoint never mixes two steps' state. A second signal stops at once, wherever the loop is;
    every file is written atomically, so the last complete checkpoint survives that too.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __call__(self, signum: int, frame) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.signal_name = signal.Signals(signum).name

    def install(self) -> dict:
        """Handle SIGTERM and SIGINT from now on (main thread only); return the handlers to put back."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self) for signum in (signal.SIGTERM, signal.SIGINT)}


def _stop_everywhere(stop: StopRequest, world: int, device: torch.device) -> bool:
    """Whether any process was asked to stop: all DDP processes must leave the loop at the same step."""
    if world == 1:
        return stop.signal_name is not None
    import torch.distributed as dist

    flag = torch.tensor([stop.signal_name is not None], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def run_loop(run: Run, callback: Callable[[int, dict], None] | None) -> dict[str, Any]:
    """Optimizer steps from run.step to max_steps, evaluating every eval_every steps and saving every save_every
    (and both at the end); a stop request saves the step it ends and raises KeyboardInterrupt (see StopRequest).
    Returns the last evaluation."""
    from tqdm import tqdm

    config = run.config
    save_every = config.save_every or config.eval_every
    bar = tqdm(total=config.max_steps, initial=run.step, disable=not run.main_process, dynamic_ncols=True)
    last = {"step": run.step, "train_loss": None, "val_loss": None}
    run.model.train()
    t0 = time.perf_counter()
    stop = StopRequest()
    previous_handlers = stop.install()  # `kill`, schedulers and torchrun send SIGTERM first; Ctrl-C sends SIGINT
    try:
        while run.step < config.max_steps:
            if _stop_everywhere(stop, run.world, run.device):  # a step boundary: nothing of the next step has happened
                if run.saved_step != run.step:  # the same on every process: all of them enter the save
                    run.save()
                if run.main_process:
                    tqdm.write(f"stopped by {stop.signal_name or 'a signal to another process'} after step "
                               f"{run.step}, saved in {run.out} (continue with --resume)")
                raise KeyboardInterrupt(stop.signal_name)
            lr = learning_rate(run.step, config)
            loss = optimizer_step(run, lr)
            run.step += 1
            elapsed = time.perf_counter() - t0
            t0 = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{run.tokens_per_step / elapsed:,.0f}")
            if callback is not None:
                callback(run.step, {"loss": loss, "lr": lr})
            if run.step % config.eval_every == 0 or run.step == config.max_steps:
                last = evaluate(run, lr)
            if run.step % save_every == 0 or run.step == config.max_steps:  # every process: save gathers from all
                run.save()
    finally:
        bar.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if run.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return last


def train(config: TrainConfig, callback: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train as `config` says; return the last {"step", "train_loss", "val_loss"}.

    callback(step, metrics) is called after every optimizer step (metrics: loss, lr). SIGTERM or Ctrl-C (SIGINT)
    ends the step under way, saves it, and raises KeyboardInterrupt: --resume then continues bit for bit as if the
    run had never stopped. A second signal stops at once, keeping the last complete checkpoint; a SIGKILL loses at
    most the steps since the last periodic save (--save-every).
    """
    rank, local_rank, world = _setup_distributed()
    device = _device(config, local_rank)  # an unusable device is an error before anything is written
    out = Path(config.out)
    config, resumed, base, base_files = resolve_config(config, out, world)
    torch.manual_seed(config.seed + rank)  # the initial weights and dropout (DDP broadcasts rank 0's weights)
    meta = prepare_run_data(config, out, rank == 0, world, base_files, resumed)
    run = build_run(config, out, meta, base, resumed, rank, local_rank, world, device)
    del base, base_files  # the model has the base's weights now: keep no second copy while training
    return run_loop(run, callback)
