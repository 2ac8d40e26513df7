"""Resolving and reading checkpoints: hub repos (one pinned commit) or local directories, every file format the hub
uses for GPT-2 (model.safetensors, sharded safetensors, pytorch_model.bin read with weights_only=True), one family of
typed errors whose messages say what to do, and the package's loaders for both models.

The model files (gpt2.py, gpt4.py) each carry a short loader of their own so that they work copied alone; the
loaders here add what a library owes its users: the device is checked before any file is read, a moving branch
cannot mix two commits, offline misses say whether the repo, the revision or a file is absent (and list what is
cached), unreadable or unsafe files are named, and every missing, unexpected or wrongly shaped weight is listed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from minhub import hardware, matmul, speed
from minhub.gpt2 import CONV1D_WEIGHTS, GPT2, GPT2Config, gpt2_from_state_dict, hub_name_to_minhub
from minhub.gpt4 import GPT4, GPT4Config
from minhub.gpt_bigcode import GPTBigCode, GPTBigCodeConfig, gpt_bigcode_from_state_dict
from minhub.gpt_neox import IGNORED_BUFFERS as NEOX_IGNORED_BUFFERS
from minhub.gpt_neox import GPTNeoX, GPTNeoXConfig, gpt_neox_from_state_dict
from minhub.llama import Llama, LlamaConfig, llama_from_state_dict


class LoadError(Exception):
    """Base class of the errors raised while loading a checkpoint; each message says what to do."""


class ConfigError(LoadError, ValueError):
    """config.json asks for something this model does not implement."""


class ModelNotFoundError(LoadError, FileNotFoundError):
    """The repository or directory does not exist, or is not in the cache while offline."""


class RevisionNotFoundError(LoadError, FileNotFoundError):
    """The branch, tag or commit does not exist, or is not in the cache while offline."""


class MissingFileError(LoadError, FileNotFoundError):
    """The repository exists but lacks a file the model needs."""


class CheckpointError(LoadError, ValueError):
    """The weights are unreadable (corrupt, truncated, unsafe) or do not fit the model (names or shapes)."""




class CheckpointFiles:
    """The files of one checkpoint: a local directory, or one commit of a hub repo.

    The first file fetched from the hub pins the commit its revision pointed to; every later file comes from that
    commit, so a branch that moves during loading cannot mix files from two commits.
    """

    def __init__(
        self,
        identifier: str | os.PathLike,
        revision: str | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
    ) -> None:
        self.identifier = str(identifier)
        self.revision = revision
        self.commit_hash: str | None = None
        self.cache_dir = cache_dir
        self.local_files_only = local_files_only
        self.token = token
        self.force_download = force_download
        path = Path(self.identifier).expanduser()
        self.local_dir = path if path.is_dir() else None
        if self.local_dir is None and (path.is_absolute() or self.identifier.startswith((".", "~"))
                                       or self.identifier.count("/") > 1 or os.sep in self.identifier.replace("/", "")):
            raise ModelNotFoundError(f"{self.identifier!r} looks like a path but is not a directory: check the path, "
                                     "or give a hub repo id such as 'gpt2' or 'openai-community/gpt2-medium'")
        if self.local_dir is not None and revision is not None:
            raise ValueError(f"revision={revision!r} was given for the local directory {self.identifier!r}: "
                             "a directory has no revisions; drop the argument")

    def __str__(self) -> str:
        if self.local_dir is not None:
            return f"directory {self.local_dir}"
        return f"{self.identifier}@{self.commit_hash or self.revision or 'main'}"

    def get(self, filename: str) -> Path | None:
        """Path of `filename` (downloaded if needed), or None if the checkpoint has no such file."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            return path if path.is_file() else None
        return self._download(filename)

    def require(self, filename: str, what: str) -> Path:
        """Like get(), but a missing file raises MissingFileError saying what the file is for."""
        path = self.get(filename)
        if path is None:
            raise MissingFileError(f"{self} has no {filename} ({what}){self.offline_hint()}")
        return path

    def offline_hint(self) -> str:
        """A sentence to append to a missing-file error when only cached files can be seen, else ''."""
        if self.local_dir is None and self._offline():
            return ("; offline, only files downloaded before are found: run once with network access "
                    "(unset HF_HUB_OFFLINE) to fetch it")
        return ""

    def _offline(self) -> bool:
        from huggingface_hub import constants

        return self.local_files_only or constants.HF_HUB_OFFLINE

    def _download(self, filename: str) -> Path | None:
        from huggingface_hub import errors, hf_hub_download

        try:
            path = Path(hf_hub_download(
                self.identifier, filename, revision=self.commit_hash or self.revision, cache_dir=self.cache_dir,
                local_files_only=self.local_files_only, token=self.token, force_download=self.force_download,
            ))
        except errors.HFValidationError as e:
            raise ModelNotFoundError(f"{self.identifier!r} is neither a directory nor a valid hub repo id ({e})") from e
        except errors.GatedRepoError as e:
            raise ModelNotFoundError(f"{self.identifier} is a gated repository: accept its terms on its hub page, "
                                     "then pass token=... (or log in with `hf auth login`)") from e
        except errors.RepositoryNotFoundError as e:
            raise ModelNotFoundError(f"no repository {self.identifier!r} on the hub: check the spelling (e.g. 'gpt2', "
                                     "'openai-community/gpt2-medium'); for a private repo pass token=...") from e
        except errors.RevisionNotFoundError as e:
            raise RevisionNotFoundError(f"{self.identifier} has no revision {self.revision!r}: use a branch, a tag "
                                        "or a full 40-character commit sha") from e
        except errors.LocalEntryNotFoundError as e:
            self._explain_not_cached(e)
            return None  # the repo and revision are cached, this file is not
        except errors.EntryNotFoundError:
            return None  # the repo exists online but has no such file
        if self.commit_hash is None:
            # .../models--org--name/snapshots/<commit>/<filename>: pin that commit for every later file
            snapshot = path.parent
            if snapshot.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", snapshot.name):
                self.commit_hash = snapshot.name
        return path

    def _explain_not_cached(self, err: Exception) -> None:
        """Offline and not cached: say whether the repo, the revision or only the file is missing, then raise."""
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        cache = Path(self.cache_dir or constants.HF_HUB_CACHE)
        repo_dir = cache / repo_folder_name(repo_id=self.identifier, repo_type="model")
        how = ("HF_HUB_OFFLINE=1 or local_files_only=True is set" if self._offline()
               else "the hub could not be reached")
        if not repo_dir.is_dir():
            raise ModelNotFoundError(
                f"{self.identifier!r} is not in the Hugging Face cache ({cache}) and {how}: run once with network "
                "access to download it, check the repo id, or pass a local directory") from err
        revision = self.commit_hash or self.revision or "main"
        if not ((repo_dir / "refs" / revision).is_file() or (repo_dir / "snapshots" / revision).is_dir()):
            refs = sorted(p.name for p in (repo_dir / "refs").glob("*")) if (repo_dir / "refs").is_dir() else []
            commits = sorted(p.name for p in (repo_dir / "snapshots").glob("*"))
            raise RevisionNotFoundError(
                f"revision {revision!r} of {self.identifier} is not in the cache and {how}. Cached branches/tags: "
                f"{refs or 'none'}; cached commits: {commits or 'none'}. Offline, give one of these (a commit as its "
                "full 40-character sha), or run once with network access") from err



def _read_safetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    state_dict: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:  # memory-mapped: tensors are read straight from the file
                for name in f.keys():
                    state_dict[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}): it is corrupt or truncated. Download it again "
                "with force_download=True (or delete it from the cache)"
            ) from e
    return state_dict


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        # weights_only=True: the unpickler builds tensors and plain containers only, never arbitrary objects or code
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects other than tensors, and unpickling them could run "
            "code. Use a checkpoint with model.safetensors, or convert this one only if you trust its author"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e}): delete it and download it "
                              "again") from e
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state_dict


def load_state_dict(files: CheckpointFiles) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under their stored names: model.safetensors, else the sharded safetensors index,
    else pytorch_model.bin or its sharded index (unpickled with weights_only=True)."""
    path = files.get("model.safetensors")
    if path is not None:
        return _read_safetensors([path])
    index = files.get("model.safetensors.index.json")
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map): {e}") from e
        return _read_safetensors([files.require(shard, "a weight shard named in the index") for shard in shards])
    path = files.get("pytorch_model.bin")
    if path is not None:
        return _read_pickle(path)
    index = files.get("pytorch_model.bin.index.json")
    if index is not None:  # older large repos (Pythia 6.9B and 12B on early revisions)
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid index (no weight_map): {e}") from e
        return {name: t for shard in shards
                for name, t in _read_pickle(files.require(shard, "a weight shard named in the index")).items()}
    raise MissingFileError(f"{files} has no weights: looked for model.safetensors, model.safetensors.index.json, "
                           f"pytorch_model.bin and pytorch_model.bin.index.json{files.offline_hint()}")


def _names_list(names: list[str] | set[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")



def check_weights_fit(
    weights: dict[str, torch.Tensor],
    expected: dict[str, torch.Size],
    model_name: str,
    stored_name: Callable[[str], str] = lambda name: name,
    stored_shape: Callable[[str, torch.Size], tuple[int, ...]] = lambda name, shape: tuple(shape),
) -> None:
    """Raise CheckpointError naming every missing, unexpected and wrongly shaped weight of `weights` against the
    `expected` shapes (both under our names); stored_name and stored_shape give what the file says, for the message."""
    missing = [stored_name(n) for n in expected.keys() - weights.keys()]
    unexpected = [stored_name(n) for n in weights.keys() - expected.keys()]
    misshaped = [f"{stored_name(n)} {stored_shape(n, weights[n].shape)} (expected {stored_shape(n, expected[n])})"
                 for n in sorted(expected.keys() & weights.keys()) if weights[n].shape != expected[n]]
    problems = [f"{what}: {_names_list(names)}" for what, names in
                (("missing weights", missing), ("unexpected weights", unexpected),
                 ("wrongly shaped weights", misshaped)) if names]
    if problems:
        raise CheckpointError(f"the checkpoint does not fit the {model_name} described by its config.json (check "
                              "that config.json and the weights belong together): " + "; ".join(problems))


def read_config(files: CheckpointFiles) -> dict[str, Any]:
    """config.json as a dict; ConfigError if it is not valid JSON."""
    path = files.require("config.json", "the model's hyper-parameters")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): delete it and download it again") from e


def hub_to_minhub_state_dict(state_dict: dict[str, torch.Tensor], model: GPT2) -> dict[str, torch.Tensor]:
    """Map a hub GPT-2 state dict onto `model`'s names with gpt2.py's own mapping (both hub layouts), or raise
    CheckpointError naming every misfit by its stored name and shape."""
    mapped: dict[str, torch.Tensor] = {}
    stored_as: dict[str, str] = {}  # our name -> the name in the file, for error messages
    for stored, tensor in state_dict.items():
        converted = hub_name_to_minhub(stored, tensor)
        if converted is not None:
            mapped[converted[0]], stored_as[converted[0]] = converted[1], stored
    expected = {name: p.shape for name, p in model.state_dict(keep_vars=True).items()}
    tied = model.config.tie_word_embeddings
    if tied:  # the file need not store lm_head; if it does, it must be wte
        del expected["lm_head.weight"]
        head, wte = mapped.pop("lm_head.weight", None), mapped.get("transformer.wte.weight")
        if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
            raise CheckpointError("lm_head.weight differs from transformer.wte.weight, but the config says "
                                  "tie_word_embeddings=true: set it to false in config.json if the head is untied")

    def stored_shape(name: str, shape: torch.Size) -> tuple[int, ...]:  # Conv1D weights are stored (in, out)
        return tuple(shape)[::-1] if name.endswith(CONV1D_WEIGHTS) and len(shape) == 2 else tuple(shape)

    check_weights_fit(mapped, expected, "GPT-2", lambda name: stored_as.get(name, name), stored_shape)
    if tied:
        mapped["lm_head.weight"] = mapped["transformer.wte.weight"]
    return mapped


def _files(identifier, revision, device, **hub_options) -> CheckpointFiles:
    hardware.check_device(device)  # before any file is read
    matmul.setting()
    return CheckpointFiles(identifier, revision, **hub_options)


def gpt2_from_pretrained(
    identifier: str | os.PathLike = "gpt2",
    revision: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> GPT2:
    """Load a GPT-2 checkpoint from the Hugging Face hub or a local directory, ready for inference (eval mode).

    identifier: a hub repo id ('gpt2', 'gpt2-medium', 'distilgpt2', 'org/fine-tune') or a directory holding
        config.json and model.safetensors (or a sharded index, or pytorch_model.bin).
    revision: branch, tag or commit sha (hub only; default 'main'). Offline, a commit must be the full sha.
    dtype: parameter dtype (default float32, whatever the checkpoint stores). device: where to put the model
        (checked first: hardware.DeviceError if this machine has no such device).
    cache_dir, local_files_only, token, force_download: passed to huggingface_hub (HF_HUB_OFFLINE=1 also works
        offline; force_download=True fetches the files again, e.g. after a corrupt download).

    The returned model's `commit_hash` is the commit it was loaded from: pass it as the tokenizer's revision to
    get files from the very same commit.
    """
    files = _files(identifier, revision, device, cache_dir=cache_dir, local_files_only=local_files_only,
                   token=token, force_download=force_download)
    config_dict = read_config(files)
    if config_dict.get("model_type", "gpt2") != "gpt2":
        hint = "; load it with gpt4_from_pretrained" if config_dict["model_type"] == "minhub-gpt4" else ""
        raise ConfigError(f"this is a {config_dict['model_type']!r} checkpoint, not GPT-2 (model_type must be 'gpt2')"
                          + hint)
    if config_dict.get("add_cross_attention"):
        raise ConfigError("add_cross_attention=True (an encoder-decoder GPT-2) is not implemented")
    try:
        config = GPT2Config.from_dict(config_dict)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    with torch.device("meta"):
        expected = GPT2(config)
    state_dict = load_state_dict(files)
    hub_to_minhub_state_dict(state_dict, expected)  # names every misfit; the model file then does the mapping
    model = gpt2_from_state_dict(config, state_dict).to(device=device, dtype=dtype or torch.float32)
    speed.optimize(model)
    model.name_or_path, model.commit_hash = files.identifier, files.commit_hash
    return model.eval()


def gpt4_from_pretrained(
    identifier: str | os.PathLike,
    revision: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> GPT4:
    """Load what GPT4.save_pretrained (or `minhub train --model gpt4`) wrote, from a directory or a hub repo, with
    the errors of gpt2_from_pretrained (whose arguments these are)."""
    files = _files(identifier, revision, device, cache_dir=cache_dir, local_files_only=local_files_only,
                   token=token, force_download=force_download)
    config_dict = read_config(files)
    if config_dict.get("model_type") != "minhub-gpt4":
        raise ConfigError(f"{files} describes a {config_dict.get('model_type')!r} model, not minhub-gpt4: is it a "
                          "directory written by GPT4.save_pretrained or minhub train --model gpt4?")
    try:
        config = GPT4Config.from_dict(config_dict)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    with torch.device("meta"):
        expected = {n: p.shape for n, p in GPT4(config).state_dict(keep_vars=True).items()}
    weights = load_state_dict(files)
    check_weights_fit(weights, expected, "GPT4 decoder")
    model = GPT4.from_state_dict(config, weights).to(device=device, dtype=dtype or torch.float32)
    speed.optimize(model)
    model.name_or_path, model.commit_hash = files.identifier, files.commit_hash
    return model.eval()


def llama_from_pretrained(identifier: str | os.PathLike, revision: str | None = None, **options: Any) -> Llama:
    """Load a Llama, Qwen2 or Mistral checkpoint (SmolLM2, Llama 3.x, TinyLlama, Qwen2.5, ...) with the errors and
    arguments of gpt2_from_pretrained: single or sharded files, stored in any float dtype."""
    return _family_from_pretrained(identifier, revision, LlamaConfig, Llama, llama_from_state_dict,
                                   ("rotary_emb.inv_freq",), **options)


def gpt_neox_from_pretrained(identifier: str | os.PathLike, revision: str | None = None, **options: Any) -> GPTNeoX:
    """Load a GPT-NeoX checkpoint (Pythia, with its training steps as revisions "step1000" ..., StableLM-alpha,
    RedPajama-INCITE) with the errors and arguments of gpt2_from_pretrained."""
    return _family_from_pretrained(identifier, revision, GPTNeoXConfig, GPTNeoX, gpt_neox_from_state_dict,
                                   NEOX_IGNORED_BUFFERS, **options)


def gpt_bigcode_from_pretrained(identifier: str | os.PathLike, revision: str | None = None,
                                **options: Any) -> GPTBigCode:
    """Load a GPT-BigCode checkpoint (SantaCoder, StarCoder, tiny_starcoder) with the errors and arguments of
    gpt2_from_pretrained."""
    return _family_from_pretrained(identifier, revision, GPTBigCodeConfig, GPTBigCode, gpt_bigcode_from_state_dict,
                                   (".attn.bias", ".attn.masked_bias", "transformer.bias"), **options)


def _family_from_pretrained(identifier: str | os.PathLike, revision: str | None, config_class: type,
                            model_class: type, from_state_dict: Callable, ignored: tuple[str, ...], *,
                            dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                            **hub_options: Any) -> torch.nn.Module:
    """A model file's model from a checkpoint: its config (ConfigError), every weight checked against the shapes the
    config implies (CheckpointError naming the misfits; a tied head may be stored or not, and buffers ending in
    `ignored` are dropped), then the file's own loading, the stop ids and the speed path."""
    files = _files(identifier, revision, device, **hub_options)
    try:
        config = config_class.from_dict(read_config(files))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{files}: {e}") from e
    config.eos_token_id = stop_ids(files, config.eos_token_id)
    with torch.device("meta"):
        skeleton = model_class(config)
    expected = {n: p.shape for n, p in skeleton.state_dict(keep_vars=True).items()}
    weights = {n: t for n, t in load_state_dict(files).items() if not n.endswith(ignored)}
    first_name = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(p), name) != name:  # a tied weight's second name: the file may leave it out
            del expected[name]
            weights.pop(name, None)
    check_weights_fit(weights, expected, f"{getattr(config, 'model_type', model_class.__name__)} model")
    model = from_state_dict(config, weights).to(device=device, dtype=dtype or torch.float32)
    speed.optimize(model)
    model.name_or_path, model.commit_hash = files.identifier, files.commit_hash
    return model.eval()


def stop_ids(files: CheckpointFiles, config_eos: int | list[int] | None) -> int | list[int] | None:
    """The ids that end a generation: generation_config.json's eos_token_id where the repo has one (Llama 3 instruct
    models list several there), else config.json's."""
    path = files.get("generation_config.json")
    if path is None:
        return config_eos
    try:
        eos = json.loads(path.read_text()).get("eos_token_id", config_eos)
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a valid generation config ({e}): delete it and download it again") from e
    return config_eos if eos is None else eos


# the transformers class of the families whose configs are written as their fields (transformers 5's names)
ARCHITECTURES = {GPTNeoXConfig: ("gpt_neox", "GPTNeoXForCausalLM"),
                 GPTBigCodeConfig: ("gpt_bigcode", "GPTBigCodeForCausalLM")}
LOADERS: dict[str, Callable[..., torch.nn.Module]] = {
    "gpt2": gpt2_from_pretrained, "minhub-gpt4": gpt4_from_pretrained, "llama": llama_from_pretrained,
    "qwen2": llama_from_pretrained, "mistral": llama_from_pretrained, "gpt_neox": gpt_neox_from_pretrained,
    "gpt_bigcode": gpt_bigcode_from_pretrained}


def model_type(identifier: str | os.PathLike, revision: str | None = None) -> str:
    """config.json's model_type ('gpt2' where it has none, as the oldest GPT-2 repos), from a directory or a repo."""
    return read_config(CheckpointFiles(identifier, revision)).get("model_type", "gpt2")


def from_pretrained(identifier: str | os.PathLike, revision: str | None = None, *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, **hub_options: Any) -> torch.nn.Module:
    """The model that the checkpoint's config.json describes (its model_type: gpt2, minhub-gpt4, llama, qwen2,
    mistral), loaded by that family's loader with typed errors and the speed path; ConfigError for any other type.

    identifier: a hub repo id or a local directory; revision: branch, tag or commit; dtype: default float32;
    device: default the CPU; hub_options: cache_dir, local_files_only, token, force_download (huggingface_hub's).
    """
    hardware.check_device(device)
    kind = read_config(CheckpointFiles(identifier, revision, **hub_options)).get("model_type", "gpt2")
    if kind not in LOADERS:
        raise ConfigError(f"{identifier} is a {kind!r} model, which minhub does not implement: it loads "
                          f"{', '.join(sorted(LOADERS))}")
    return LOADERS[kind](identifier, revision, dtype=dtype, device=device, **hub_options)


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write config.json and model.safetensors, which from_pretrained and, for the hub's families, transformers read.

    A model that saves itself (GPT4) does; GPT-2 is stored in the hub's layout (save_pretrained's: `transformer.`
    prefix, Conv1D weights stored (in, out)); every other family under its own names, which mirror the hub's. A tied
    weight is stored once, under its first name (the tied lm_head is left out, as transformers' save_pretrained does
    and expects); config.json is the config's to_dict(), or its fields with the architecture transformers knows the
    family by (TypeError for a model neither gives)."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
        return
    config = model.config
    if hasattr(config, "to_dict"):
        config_json = config.to_dict()
    elif type(config) in ARCHITECTURES:
        model_type, architecture = ARCHITECTURES[type(config)]
        config_json = {"model_type": model_type, "architectures": [architecture], **dataclasses.asdict(config)}
    else:
        raise TypeError(f"{type(model).__name__} cannot be saved: its config has no to_dict() for config.json")
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, stored = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():  # keep_vars: a tied weight is one object
        if id(tensor) in stored:
            continue
        stored.add(id(tensor))
        transposed = isinstance(model, GPT2) and name.endswith(CONV1D_WEIGHTS)
        state[name] = (tensor.t() if transposed else tensor).detach().contiguous().cpu()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
