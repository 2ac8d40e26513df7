"""Build real checkpoints offline: random transformers GPT-2 models saved in the hub's layouts, placed in the
Hugging Face cache exactly as huggingface_hub would have downloaded them (blobs, snapshot symlinks, refs)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "gpt2-tokenizer"


def hf_gpt2(seed: int = 0, std: float = 0.2, **config):
    """A transformers GPT2LMHeadModel with random weights, LayerNorms and biases included.

    The weights are spread wider than GPT-2's init so that logits are far apart (greedy ties cannot flip) and a
    wrongly mapped LayerNorm or bias changes the output.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    defaults = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=101, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(GPT2Config(**{**defaults, **config}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(1.0)  # LayerNorm gains near 1, but not exactly
    return model.eval()


def save_checkpoint(model, directory: Path, layout: str = "save_pretrained", **kwargs) -> Path:
    """Write `model` to `directory` in one of the layouts found on the hub.

    save_pretrained: transformers' own (`transformer.` prefix, tied lm_head left out).
    openai: the OpenAI gpt2 repos' (no prefix, float causal-mask buffers `h.N.attn.bias` stored, no lm_head).
    openai+masked_bias: also stores `h.N.attn.masked_bias` (as DialoGPT-era checkpoints do) and keeps the prefix.
    """
    directory = Path(directory)
    model.save_pretrained(directory, **kwargs)
    if layout == "save_pretrained":
        return directory
    state = load_file(directory / "model.safetensors")
    n_pos = model.config.n_positions
    mask = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
    out = {}
    for name, t in state.items():
        if layout == "openai":
            name = name.removeprefix("transformer.")
        out[name] = t.contiguous()
    for i in range(model.config.n_layer):
        prefix = "" if layout == "openai" else "transformer."
        out[f"{prefix}h.{i}.attn.bias"] = mask.clone()
        if layout == "openai+masked_bias":
            out[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def openai_layout_checkpoint(directory: Path, seed: int = 0, **config) -> Path:
    """Write a random checkpoint by hand, in the exact layout of the OpenAI gpt2 repos' files: config.json as on the
    hub, model.safetensors with unprefixed names, Conv1D weights stored (in, out), float `h.N.attn.bias` causal-mask
    buffers, no lm_head. Much faster than building a transformers model at the 124M size."""
    import json

    c = {**dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12), **config}
    d, v, p = c["n_embd"], c["vocab_size"], c["n_positions"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, mean=0.0):
        return torch.randn(shape, generator=gen) * 0.02 + mean

    state = {"wte.weight": rand(v, d), "wpe.weight": rand(p, d), "ln_f.weight": rand(d, mean=1.0), "ln_f.bias": rand(d)}
    mask = torch.tril(torch.ones(p, p)).view(1, 1, p, p)
    for i in range(c["n_layer"]):
        state.update({
            f"h.{i}.ln_1.weight": rand(d, mean=1.0), f"h.{i}.ln_1.bias": rand(d),
            f"h.{i}.attn.bias": mask.clone(),
            f"h.{i}.attn.c_attn.weight": rand(d, 3 * d), f"h.{i}.attn.c_attn.bias": rand(3 * d),
            f"h.{i}.attn.c_proj.weight": rand(d, d), f"h.{i}.attn.c_proj.bias": rand(d),
            f"h.{i}.ln_2.weight": rand(d, mean=1.0), f"h.{i}.ln_2.bias": rand(d),
            f"h.{i}.mlp.c_fc.weight": rand(d, 4 * d), f"h.{i}.mlp.c_fc.bias": rand(4 * d),
            f"h.{i}.mlp.c_proj.weight": rand(4 * d, d), f"h.{i}.mlp.c_proj.bias": rand(d),
        })
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    hub_config = {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": p, "resid_pdrop": 0.1,
        "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, **c,
    }
    (directory / "config.json").write_text(json.dumps(hub_config, indent=2))
    return directory


def put_in_hub_cache(
    repo_id: str,
    source: Path | dict[str, Path | bytes],
    *,
    refs: tuple[str, ...] = ("main",),
    cache: Path | None = None,
) -> str:
    """Place files in the Hugging Face cache as one commit of `repo_id`; return the commit sha.

    source: a directory (all its files) or {filename: path or bytes}. refs: branches/tags pointing at the commit.
    """
    cache = Path(cache or os.environ["HF_HUB_CACHE"])
    if not isinstance(source, dict):
        source = {p.name: p for p in Path(source).iterdir() if p.is_file()}
    contents = {name: (data if isinstance(data, bytes) else Path(data).read_bytes()) for name, data in source.items()}
    commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(contents.values()))).hexdigest()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for name, data in contents.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return commit


def hub_checkpoint(repo_id: str, model, layout: str = "save_pretrained", *, tokenizer: bool = False, **kwargs) -> str:
    """Save `model` in `layout`, place it in the cache as `repo_id` (branch main); return the commit sha."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_checkpoint(model, Path(tmp), layout, **kwargs)
        if tokenizer:
            shutil.copy(TOKENIZER_DIR / "tokenizer.json", directory)
        return put_in_hub_cache(repo_id, directory)


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def from_x_transformers_state_dict(
    state_dict: dict[str, torch.Tensor], norm_unit_offset: bool = True
) -> dict[str, torch.Tensor]:
    """Map the state dict of an x-transformers `TransformerWrapper(..., attn_layers=Decoder(...))` built with the
    GPT4 options onto GPT4's names.

    x-transformers numbers attention and feed-forward layers alternately (layers.2i is block i's attention,
    layers.2i+1 its feed-forward); its rotary tables are dropped (recomputed). Its LayerNorms store `gamma` with a
    unit offset (gain = gamma + 1, `norm_add_unit_offset=True`, the default); pass norm_unit_offset=False for a
    Decoder built with norm_add_unit_offset=False.
    """
    offset = 1.0 if norm_unit_offset else 0.0
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.startswith("attn_layers.rotary_pos_emb.") or name.startswith("attn_layers.rel_pos."):
            continue
        parts = name.split(".")
        if name == "token_emb.emb.weight":
            new = "decoder.net.token_emb.weight"
        elif name == "pos_emb.emb.weight":
            new = "decoder.net.pos_emb.weight"
        elif name == "to_logits.weight":
            new = "decoder.net.to_logits.weight"
        elif name == "attn_layers.final_norm.gamma":
            new = "decoder.net.final_norm.weight"
        elif parts[:2] == ["attn_layers", "layers"]:
            index, rest = int(parts[2]), ".".join(parts[3:])
            block, is_attn = index // 2, index % 2 == 0
            prefix = f"decoder.net.layers.{block}."
            renames = {
                "0.0.gamma": "attn_norm.weight" if is_attn else "ff_norm.weight",
                "1.qk_norm_q_scale": "attn.q_scale", "1.qk_norm_k_scale": "attn.k_scale",
                "1.to_q.weight": "attn.to_q.weight", "1.to_k.weight": "attn.to_k.weight",
                "1.to_v.weight": "attn.to_v.weight", "1.to_out.weight": "attn.to_out.weight",
                "1.ff.0.0.weight": "ff.proj_in.weight", "1.ff.0.0.bias": "ff.proj_in.bias",
                "1.ff.2.weight": "ff.proj_out.weight", "1.ff.2.bias": "ff.proj_out.bias",
            }
            if rest not in renames:
                raise KeyError(f"{name}: not part of the GPT4 architecture (was the x-transformers model built with "
                               "other options?)")
            new = prefix + renames[rest]
        else:
            raise KeyError(f"{name}: not part of the GPT4 architecture")
        out[new] = tensor + offset if name.endswith(".gamma") else tensor
    return out


def x_transformers_gpt4(num_tokens: int = 97, max_seq_len: int = 48, **options):
    """(x-transformers' TransformerWrapper + Decoder built with a GPT4Config's options, minhub's GPT4 holding the same
    weights). The reference's norm gains and QK-norm scales (and biases, absolute positions) are moved away from
    their init, so that a missed mapping shows."""
    import x_transformers

    from minhub import GPT4
    from minhub.gpt4 import GPT4Config

    cfg = GPT4Config(num_tokens=num_tokens, max_seq_len=max_seq_len, **options)
    net = x_transformers.TransformerWrapper(
        num_tokens=cfg.num_tokens, max_seq_len=cfg.max_seq_len, use_abs_pos_emb=cfg.use_abs_pos_emb,
        attn_layers=x_transformers.Decoder(
            dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, attn_dim_head=cfg.dim_head,
            alibi_pos_bias=cfg.alibi_pos_bias, alibi_num_heads=cfg.alibi_num_heads, rotary_xpos=cfg.rotary_xpos,
            attn_flash=cfg.attn_flash, attn_one_kv_head=cfg.attn_one_kv_head, attn_qk_norm=cfg.attn_qk_norm,
            attn_qk_norm_dim_scale=cfg.attn_qk_norm_dim_scale,
        ),
    ).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("gamma", "_scale")):
                p.add_(torch.randn_like(p) * 0.3)
            if name.endswith(".bias") or name == "pos_emb.emb.weight":
                p.add_(torch.randn_like(p) * 0.1)
    ours = GPT4(cfg).eval()
    ours.load_state_dict(from_x_transformers_state_dict(net.state_dict()), strict=True)
    return net, ours
