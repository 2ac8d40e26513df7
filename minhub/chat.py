"""Chat templates: the Jinja programs hub repos ship to turn a conversation into one prompt, rendered exactly as
transformers' `tokenizer.apply_chat_template(messages, tokenize=False)` renders them.

A template from the hub is untrusted code: it runs in Jinja's immutable sandbox, in the environment transformers builds
(the `{% generation %}` tag, its tojson, raise_exception, strftime_now, dict and namespace), and sees plain copies of
the caller's data, never the caller's objects. Every failure is a ChatTemplateError that says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from minhub.hub import CheckpointFiles


class ChatTemplateError(ValueError):
    """A chat template cannot be read or rendered, or the conversation does not fit it; the message says why."""


class _GenerationTag(jinja2.ext.Extension):
    # transformers marks assistant text with {% generation %} for its training masks; templates that use the tag must
    # parse, and the body renders unchanged, inside a call block as there, so that its variables stay local
    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    # the `dict` global: builds dicts without exposing the dict type itself, whose attributes a template could abuse
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
            "Please rename the attribute.")


class _TemplateNamespace(jinja2.utils.Namespace):
    # underscore names on a namespace would reach CPython internals, so they are refused as transformers refuses them
    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature trick: `namespace(self=1)` still works
        for name in dict(*args[1:], **kwargs):
            _check_name(name)
        jinja2.utils.Namespace.__init__(*args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused this conversation: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, > and & for HTML, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON types, as transformers does: the caller's objects may have methods that the
    sandbox does not know are dangerous, so anything else becomes an inert placeholder like "<ndarray>"."""
    numpy = sys.modules.get("numpy")  # a numpy scalar implies numpy is imported: never import it just to check
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base, to_base in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):  # subclasses (enums, numpy floats) carry extra methods: strip them
            return to_base(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if numpy is not None and isinstance(value, numpy.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _checked_messages(messages: Any) -> list[dict]:
    """Plain copies of the messages with None values dropped and reasoning aliased, as apply_chat_template passes
    them; anything but a non-empty list of dicts with string role and content is refused before rendering."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError(f"messages must be a non-empty list of dicts like {{'role': 'user', 'content': "
                                f"'Hello'}}, got {type(messages).__name__} {messages!r:.80}")
    checked = []
    for i, message in enumerate(messages):
        if not (isinstance(message, Mapping) and all(isinstance(message.get(k), str) for k in ("role", "content"))):
            raise ChatTemplateError(f"messages[{i}] is not a dict with a string 'role' and a string 'content' "
                                    f"({message!r:.80}): write each message as {{'role': 'user', 'content': 'Hi'}}")
        message = _plain({key: value for key, value in message.items() if value is not None})
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:  # templates read it under different names: fill them as transformers does
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        checked.append(message)
    return checked


_REMEDIES = {
    jinja2.exceptions.SecurityError: "it tried something the sandbox forbids, so it is broken or malicious; use a "
                                     "template you trust",
    jinja2.exceptions.UndefinedError: "it read something undefined; give the messages the fields it expects, or "
                                      "pass the variable it needs to render()",
}


class ChatTemplate:
    """One chat template with the special tokens it may refer to (bos_token, eos_token, pad_token, ...)."""

    def __init__(self, template: str, **special_tokens: str) -> None:
        if not isinstance(template, str):
            raise ChatTemplateError(f"a chat template is a string of Jinja, got {type(template).__name__}")
        self.source = template
        self.special_tokens = {name: str(value) for name, value in special_tokens.items() if value is not None}
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                           namespace=_TemplateNamespace)
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template has a syntax error on line {e.lineno}: {e.message}. Fix the "
                                    "template (tokenizer_config.json's chat_template or chat_template.jinja)") from e

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt for `messages` ([{'role': ..., 'content': ...}, ...]). add_generation_prompt: end with the
        header that starts the assistant's reply. extra: more template variables (tools=[JSON schemas],
        documents, date_string, enable_thinking, ...); they override special tokens of the same name."""
        chat = _checked_messages(messages)
        tools = extra.get("tools")
        if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, Mapping) for t in tools)):
            raise ChatTemplateError("tools must be a list of JSON schemas (dicts like {'type': 'function', "
                                    "'function': {'name': ..., 'parameters': ...}}), one per tool")
        variables = _plain({"tools": None, "documents": None, **self.special_tokens, **extra})
        try:
            return self._template.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except ChatTemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - the template is foreign code: whatever it raises is its failure
            remedy = _REMEDIES.get(type(e), "check that the messages fit the template (roles, fields, order)")
            raise ChatTemplateError(f"the chat template failed ({type(e).__name__}: {e}): {remedy}") from e


def _read_json(path: Any) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"{path} is not readable JSON ({e}): download it again with force_download=True") from e
    if not isinstance(value, dict):
        raise ChatTemplateError(f"{path} holds a {type(value).__name__}, not a JSON object: the file is malformed")
    return value


def _special_tokens(files: CheckpointFiles, config: dict) -> dict[str, str]:
    # transformers passes every `*_token` string of tokenizer_config.json (AddedToken dicts by their content) and
    # the named extra_special_tokens; `add_bos_token` and the like are booleans and drop out. Configs from before
    # added_tokens_decoder existed take their special tokens from special_tokens_map.json, which wins.
    legacy = files.get("special_tokens_map.json") if "added_tokens_decoder" not in config else None
    config = {**config, **(_read_json(legacy) if legacy is not None else {})}
    extra = config.get("extra_special_tokens")
    named = {key: value for key, value in config.items() if key.endswith("_token")}
    named.update(extra if isinstance(extra, dict) else {})
    named = {key: value.get("content") if isinstance(value, dict) else value for key, value in named.items()}
    return {key: value for key, value in named.items() if isinstance(value, str)}


def _default_template(value: Any, where: str) -> str | None:
    """The template string of tokenizer_config.json's chat_template: a string, or the one named "default" of a list
    of {"name", "template"} entries."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        templates = {t["name"]: t["template"] for t in value}
        if "default" not in templates:
            raise ChatTemplateError(f"{where} has several chat templates ({', '.join(sorted(templates))}) and none "
                                    "named 'default': build ChatTemplate(template, **special_tokens) from the one "
                                    "you want")
        return templates["default"]
    raise ChatTemplateError(f"{where}'s chat_template is neither a string nor a list of {{'name', 'template'}} "
                            f"entries ({type(value).__name__}): the file is malformed")


def chat_template_from_pretrained(identifier: str | os.PathLike, revision: str | None = None,
                                  **hub_options: Any) -> ChatTemplate | None:
    """The checkpoint's chat template with its special tokens, or None if it has none. chat_template.jinja wins over
    tokenizer_config.json's chat_template, as in transformers. hub_options: as CheckpointFiles (cache_dir,
    local_files_only, token, force_download)."""
    files = CheckpointFiles(identifier, revision, **hub_options)
    path = files.get("tokenizer_config.json")
    config = _read_json(path) if path is not None else {}
    jinja_path = files.get("chat_template.jinja")
    if jinja_path is not None:
        template = jinja_path.read_text(encoding="utf-8")
    else:
        template = _default_template(config.get("chat_template"), f"tokenizer_config.json of {files}")
    return None if template is None else ChatTemplate(template, **_special_tokens(files, config))
