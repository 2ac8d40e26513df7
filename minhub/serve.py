"""`minhub serve MODEL`: an OpenAI-compatible server with continuous batching (needs `minhub[serve]`).

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{model}, GET /health. The
official `openai` client works with it unchanged: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")`, then
`.completions.create(model=..., prompt=...)` or `.chat.completions.create(model=..., messages=[...])`. A chat's
prompt is the model's chat template rendered with the generation prompt, tokenized as transformers'
apply_chat_template(tokenize=True) tokenizes it; both endpoints share the scheduler, so their rows batch together.

Continuous batching, on the model contract (docs/contract.md) alone, so every model file is served the same way:
one thread owns the model and runs one decode step at a time for every active row (up to max_batch), against one
shared KV cache whose columns all rows advance together. A request that arrives while others decode is admitted
between steps into cache row 0 (the row there, if any, is copied to a free row first): its prompt runs in one
forward at the columns just before the batch's, right-aligned, with every other column of its row masked out. Models
count positions over the unmasked columns only, so every row computes what it would alone. A step decodes only the
first rows up to the last one in use (the contract's cache takes fewer rows than it holds). A finished or
disconnected row leaves at once and its row is free for the next request. When the columns run out, the cache is
shifted left past the columns no active row uses. Waiting rows are admitted round-robin across requests, so a
request of many prompts cannot starve a small one.

No request can harm the others (docs/serving.md, "Limits"): bodies are bounded in size and in time, prompts per
request are capped, tokenizing runs off the event loop, a request whose sampling fails ends alone. If the model
thread itself fails, /health answers 503 and the server exits (`minhub serve` with status 1). On SIGTERM the server
stops accepting, lets requests in flight finish for up to --shutdown-timeout seconds, ends the rest with a 503 error
and exits.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import math
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from minhub import speed
from minhub.generation import check_int, check_sampling_args, sample_next_token

if TYPE_CHECKING:
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger("minhub")

class RequestError(ValueError):
    """A request the server refuses or cannot finish: an HTTP 4xx (or 5xx) with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None, *,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message.encode("utf-8", "backslashreplace").decode())  # a lone surrogate, shown escaped
        self.param, self.status, self.code, self.kind, self.headers = param, status, code, kind, headers

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str = "server_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (docs/serving.md, "Limits")."""

    max_body: int  # bytes of a request body: 413 past it
    body_timeout: float  # seconds to receive a body: 408 past it
    max_prompts: int  # completions in one request, prompts x n: 400 past it
    max_prompt_chars: int  # characters of a prompt string past which it cannot fit the context: 400, not tokenized


def default_max_body(context: int) -> int:
    """The default --max-body: 1 MiB, or 64 bytes per token of the context if that is more (a prompt that fills the
    context takes a few bytes per token, as text or as ids)."""
    return max(2**20, 64 * context)


def longest_token(tokenizer) -> int:
    """Characters of the tokenizer's longest token: a text longer than context x this cannot fit the context (each
    token covers at most that many characters of the text; byte-level tokens are written one character a byte)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True) if hasattr(tokenizer, "get_vocab") else {}
    return max(map(len, vocab), default=0) or 64


# --------------------------------------------------------------------------------------------------------------------
# Requests


@dataclass
class Completion:
    """One row: a prompt to continue, how, and where its tokens go."""

    prompt_ids: list[int]
    max_tokens: int  # 0: score the prompt only (echo)
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    logprobs: int | None
    stop_ids: set[int]
    # deliver(event), from the model thread: ("prompt", logprobs, tops) first when score_prompt, then ("token", id,
    # logprob, top) per token, ("eos", id, logprob, top) for an EOS when score_prompt, and ("end", finish_reason) or
    # ("end", "error", HTTP status, message) last
    deliver: Any
    score_prompt: bool = False  # echo with logprobs: the log-probabilities of the prompt's own tokens too
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    start: int = 0  # first cache column of this row


def _field(body: dict, name: str, kinds: tuple, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise RequestError(f"'{name}' must be {names}, got {json.dumps(value)[:80]}", param=name)
    return value


INLINE_PARSE_BYTES = 8192  # bodies (and prompt texts) up to this size are parsed (tokenized) on the event loop
MAX_STOPS = 16  # evaluation harnesses add their own end-of-text string to a task's list
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "user",
                   "stream_options", "frequency_penalty", "presence_penalty"}
KNOWN_FIELDS = SAMPLING_FIELDS | {"prompt", "logprobs", "echo", "suffix"}  # of /v1/completions
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens"}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_FIELDS = ("role", "content", "name")


def _check_body(body: Any, known: set[str], served_name: str) -> None:
    """A JSON object naming only `known` fields and the served model, or RequestError."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        names = [name.encode("utf-8", "backslashreplace").decode() for name in unknown]  # lone surrogates escaped
        raise RequestError(f"unrecognized request argument(s): {', '.join(names)}", param=names[0])
    model = body.get("model")
    if model != served_name:
        shown = model.encode("utf-8", "backslashreplace").decode() if isinstance(model, str) else model
        raise RequestError(f"the model {shown!r} does not exist here: this server serves {served_name!r}",
                           param="model", status=404, code="model_not_found")


def _check_text(text: str, what: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \ud800 escapes give lone surrogates, which are no text
        raise RequestError(f"{what} is not valid Unicode text ({e.reason} at {e.start})", param=param) from e


def parse_sampling(body: dict, max_n: int, max_tokens_name: str = "max_tokens",
                   max_tokens_default: int | None = 16, min_tokens: int = 1) -> dict:
    """The fields /v1/completions and /v1/chat/completions share, checked: how many tokens (under `max_tokens_name`;
    None where absent and the default is None; at least `min_tokens`), how they are sampled, n, the seed, stop
    strings, streaming."""
    for name in ("frequency_penalty", "presence_penalty"):
        if _field(body, name, (int, float), 0) != 0:
            raise RequestError(f"'{name}' is not supported (only 0)", param=name)
    max_tokens = _field(body, max_tokens_name, (int,), max_tokens_default)
    temperature = _field(body, "temperature", (int, float), 1.0)
    top_p = _field(body, "top_p", (int, float), 1.0)
    top_k = _field(body, "top_k", (int,), 0)
    seed = _field(body, "seed", (int,), None)
    n = _field(body, "n", (int,), 1)
    _field(body, "user", (str,), None)
    if seed is not None and not -2**63 <= seed <= 2**63 - max(n, 1):  # choice i samples with seed + i
        raise RequestError(f"'seed' must be in [-2**63, 2**63 - n], got {seed}", param="seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise RequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", param="stop")
    for s in stops:
        _check_text(s, "a stop string", "stop")
    if max_tokens is not None and max_tokens < min_tokens:
        raise RequestError(f"'{max_tokens_name}' must be at least 1, got {max_tokens}" +
                           (" (0 only with echo: true, to score the prompt alone)" if min_tokens == 0 else ""),
                           param=max_tokens_name)
    if not 1 <= n <= max_n:
        raise RequestError(f"'n' must be in [1, {max_n}] (the server's --max-batch), got {n}", param="n")
    try:
        check_sampling_args(temperature, top_k or None, top_p)
    except ValueError as e:
        raise RequestError(str(e), param="temperature" if "temperature" in str(e) else "top_p"
                           if "top_p" in str(e) else "top_k") from e
    if top_k < 0:
        raise RequestError(f"'top_k' must be >= 0 (0: no limit), got {top_k}", param="top_k")
    return {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": None if top_p >= 1 else float(top_p),
            "top_k": top_k or None, "seed": seed, "n": n, "stop": stops,
            "stream": bool(_field(body, "stream", (bool,), False)),
            "include_usage": bool(_field(_field(body, "stream_options", (dict,), {}), "include_usage", (bool,), False))}


def _check_prompt_ids(ids: list[int], max_tokens: int, max_tokens_name: str, context: int, vocab_size: int,
                      param: str) -> None:
    if not ids:
        raise RequestError("a prompt is empty: give at least one token of text", param=param)
    if len(ids) + max_tokens > context:
        raise RequestError(f"the prompt has {len(ids)} tokens and {max_tokens_name} is {max_tokens}: together they "
                           f"must fit the context of {context} tokens", param=max_tokens_name,
                           code="context_length_exceeded")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise RequestError(f"the prompt has token ids outside the model's vocabulary [0, {vocab_size})", param=param)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_field(prompt: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """The `prompt` of /v1/completions as strings ("text", ["a", "b"]) or as token ids ([1, 2], [[1, 2], [3]])."""
    if isinstance(prompt, str):
        return [prompt], None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return prompt, None
        if all(_is_id(i) for i in prompt):
            return None, [prompt]
        if all(isinstance(p, list) and p and all(_is_id(i) for i in p) for p in prompt):
            return None, prompt
    raise RequestError("'prompt' must be a string, a non-empty list of strings, a non-empty list of token ids, or "
                       "a list of such lists", param="prompt")


def parse_completion_request(body: Any, served_name: str, tokenizer, context: int, vocab_size: int,
                             max_n: int, *, max_prompts: int | None = None,
                             max_prompt_chars: int | None = None) -> dict:
    """Check a /v1/completions body; return the normalised request, or raise RequestError naming the field.

    At most `max_prompts` completions (prompts x n); a prompt string of more than `max_prompt_chars` characters is
    refused as too long for the context without tokenizing it. Token-id prompts are checked against the vocabulary
    and echo their decoded text. Long texts are tokenized with the GIL released (encode_batch): call this off the
    event loop for bodies over INLINE_PARSE_BYTES."""
    _check_body(body, KNOWN_FIELDS, served_name)
    texts, encoded = _prompt_field(body.get("prompt"))
    req = parse_sampling(body, max_n, min_tokens=0)
    echo = bool(_field(body, "echo", (bool,), False))
    if req["max_tokens"] == 0 and not echo:
        raise RequestError("'max_tokens' must be at least 1, got 0 (0 only with echo: true, to score the prompt alone)",
                           param="max_tokens")
    logprobs = _field(body, "logprobs", (int,), None)
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise RequestError(f"'logprobs' must be in [0, 5], got {logprobs}", param="logprobs")
    rows = len(texts or encoded) * req["n"]
    if max_prompts is not None and rows > max_prompts:
        raise RequestError(f"the request asks for {rows} completions ({len(texts or encoded)} prompts x n={req['n']})"
                           f": this server takes at most {max_prompts} per request (--max-prompts); split it into "
                           "several requests", param="prompt")
    suffix = _field(body, "suffix", (str,), None)
    if suffix is not None:
        encoded = _fill_in_the_middle(tokenizer, texts, suffix, echo)
    elif texts is not None:
        for p in texts:
            _check_text(p, "a prompt", "prompt")
            if max_prompt_chars is not None and len(p) > max_prompt_chars:
                raise RequestError(f"a prompt has {len(p)} characters: more than fit the context of {context} tokens "
                                   f"(at most {max_prompt_chars} characters)", param="prompt",
                                   code="context_length_exceeded")
        if sum(map(len, texts)) > INLINE_PARSE_BYTES and hasattr(tokenizer, "encode_batch"):
            encoded = [e.ids for e in tokenizer.encode_batch(texts)]  # releases the GIL
        else:
            encoded = [tokenizer.encode(p).ids for p in texts]
    for ids in encoded:
        _check_prompt_ids(ids, req["max_tokens"], "max_tokens", context, vocab_size, "prompt")
    if texts is None:
        texts = [tokenizer.decode(ids) for ids in encoded]
    return {**req, "prompts": texts, "encoded": encoded, "logprobs": logprobs, "echo": echo}


def _fill_in_the_middle(tokenizer, texts: list[str] | None, suffix: str, echo: bool) -> list[list[int]]:
    """The fill-in-the-middle prompt ids of each text prompt with `suffix` (minhub.tokenizer.fim_ids), or a 400."""
    from minhub.tokenizer import fim_ids

    if texts is None or echo:
        raise RequestError("'suffix' takes text prompts, without echo", param="suffix")
    _check_text(suffix, "the suffix", "suffix")
    for text in texts:
        _check_text(text, "a prompt", "prompt")
    try:
        return [fim_ids(tokenizer, text, suffix) for text in texts]
    except ValueError as e:  # a tokenizer without FIM tokens
        raise RequestError(str(e), param="suffix") from e


def _chat_messages(body: dict) -> list[dict]:
    """The request's messages, each {role, content[, name]} with string values, or RequestError naming the field."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages like {\"role\": \"user\", \"content\": "
                           "\"Hello\"}", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"'{where}' must be an object like {{\"role\": \"user\", \"content\": \"Hello\"}}, "
                               f"got {json.dumps(message)[:80]}", param=where)
        unknown = sorted(set(message) - set(MESSAGE_FIELDS))
        if unknown:
            name = unknown[0].encode("utf-8", "backslashreplace").decode()
            raise RequestError(f"'{where}.{name}' is not supported: a message has {', '.join(MESSAGE_FIELDS)}",
                               param=f"{where}.{name}")
        if message.get("role") not in CHAT_ROLES:
            raise RequestError(f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got "
                               f"{json.dumps(message.get('role'))[:80]}", param=f"{where}.role")
        for key in ("content", "name"):  # content parts (lists) are not supported; name is optional
            value = message.get(key)
            if key == "name" and value is None:
                continue
            if not isinstance(value, str):
                raise RequestError(f"'{where}.{key}' must be a string, got {json.dumps(value)[:80]}",
                                   param=f"{where}.{key}")
            _check_text(value, f"'{where}.{key}'", f"{where}.{key}")
    return messages


def parse_chat_request(body: Any, served_name: str, tokenizer, chat_template, context: int, vocab_size: int,
                       max_n: int) -> dict:
    """Check a /v1/chat/completions body and render its messages with `chat_template` (a minhub.chat.ChatTemplate,
    or None: a 400) into the prompt's ids as transformers' apply_chat_template(tokenize=True) makes them; return the
    normalised request (parse_completion_request's fields: one prompt, no echo, no logprobs), or RequestError."""
    from minhub.chat import ChatTemplateError
    from minhub.tokenizer import chat_ids

    _check_body(body, CHAT_FIELDS, served_name)
    if chat_template is None:
        raise RequestError(f"{served_name} has no chat template (no chat_template.jinja, and none in its "
                           "tokenizer_config.json), so it cannot render messages: use /v1/completions with a prompt",
                           param="messages", code="no_chat_template")
    messages = _chat_messages(body)
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_name == "max_completion_tokens" and body.get("max_tokens") not in (None, body["max_completion_tokens"]):
        raise RequestError("'max_tokens' and 'max_completion_tokens' differ: give one of them (max_tokens is the "
                           "older name)", param="max_tokens")
    req = parse_sampling(body, max_n, max_name, None)
    try:
        ids = chat_ids(tokenizer, chat_template, messages)
    except ChatTemplateError as e:
        raise RequestError(str(e), param="messages") from e
    if req["max_tokens"] is None:  # as OpenAI: up to the end of the context
        req["max_tokens"] = max(context - len(ids), 1)
    _check_prompt_ids(ids, req["max_tokens"], max_name, context, vocab_size, "messages")
    return {**req, "prompts": [""], "encoded": [ids], "logprobs": None, "echo": False}


# --------------------------------------------------------------------------------------------------------------------
# The model thread: continuous batching


SERVED_CONTEXT = 8192  # the default cap: the KV cache holds max_batch rows of this many slots, allocated at start


def serving_context(model_context: int, asked: int | None) -> int:
    """The tokens a served row may reach: `asked` (--context), at most the model's context; by default the model's
    context up to SERVED_CONTEXT. A 128k-token model (Llama 3.2) would otherwise allocate a cache of 128k slots a row
    at start: gigabytes per row."""
    if asked is not None and asked > model_context:
        raise ValueError(f"--context {asked} is more than the model's context of {model_context} tokens")
    chosen = asked or min(model_context, SERVED_CONTEXT)
    if chosen < model_context and asked is None:
        log.warning("minhub: serving a context of %d tokens of the model's %d (--context to change it: the KV cache "
                    "holds that many slots for every row)", chosen, model_context)
    return chosen


class Scheduler:
    """Owns the model; runs decode steps for every active row, admitting waiting rows between steps, round-robin
    across requests."""

    def __init__(self, model: nn.Module, max_batch: int, eos_token_id: int | list[int] | None,
                 context: int | None = None) -> None:
        self.model, self.eos = model, eos_token_id
        self.context = serving_context(model.config.context_length, context)
        self.vocab_size = model.config.vocab_size
        self.max_batch = max_batch
        self.lock = threading.Lock()  # guards the waiting requests, failure and closing
        self.waiting: collections.deque[collections.deque[Completion]] = collections.deque()  # one deque a request
        self.work = threading.Event()  # set when a request arrives (or it is time to stop)
        self.rows: list[Completion | None] = [None] * self.max_batch
        self.column = 0  # the next cache column every active row writes
        self.stopped = threading.Event()
        self.failure: Exception | None = None
        self.closing = False  # no new requests: shutting down
        self.deadline: float | None = None  # time.monotonic() past which rows still running end with an error
        self.on_failure: list[Callable[[], None]] = []  # called from the model thread when it fails
        self.thread = threading.Thread(target=self._run, name="minhub-scheduler", daemon=True)

    def start(self) -> None:
        with torch.inference_mode():
            self.model.setup_cache(self.max_batch, self.context)
        self.caches = self.model.kv_caches()
        self.step_forward = speed.decode_step(self.model, self.max_batch, masked=True)
        self.device = next(self.model.parameters()).device
        self.mask = torch.zeros(self.max_batch, self.context, dtype=torch.long, device=self.device)
        self.thread.start()

    def close(self, grace: float) -> None:
        """Take no new requests; rows still running (or waiting) in `grace` seconds end with a 503 error."""
        with self.lock:
            self.closing = True
            deadline = time.monotonic() + grace
            self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
        self.work.set()

    def stop(self) -> None:
        """End the model thread (rows still there end with a 503 error)."""
        with self.lock:
            self.closing = True
        self.stopped.set()
        self.work.set()
        if self.thread.ident is not None:
            self.thread.join(timeout=10)

    def check_open(self) -> None:
        """RequestError (503) once the model thread has failed or the server is closing."""
        if self.failure is not None:
            raise RequestError(f"the model thread failed ({self.failure!r}): the server is exiting; restart it",
                               status=503, kind="server_error")
        if self.closing:
            raise RequestError("the server is shutting down: send the request to another instance, or again once it "
                               "has restarted", status=503, kind="server_error")

    def submit(self, rows: list[Completion]) -> None:
        """Queue one request's rows, or RequestError (503) as check_open."""
        with self.lock:
            self.check_open()
            self.waiting.append(collections.deque(rows))
        self.work.set()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self.stopped.is_set():
                    if self.deadline is not None and time.monotonic() >= self.deadline:
                        self._end_all("the server shut down before this request finished (--shutdown-timeout)")
                    self.work.clear()
                    self._admit()
                    if any(row is not None for row in self.rows):
                        self._step()
                    else:
                        self.work.wait(0.05)  # idle: wait for work without spinning
        except Exception as e:  # a bug, or the device failing: end every request, and the server, instead of 500s
            with self.lock:
                self.failure = e
            traceback.print_exc()
            self._end_all(f"the model thread failed ({e!r}): the server is exiting; restart it")
            for listener in list(self.on_failure):
                listener()
        finally:
            self._end_all("the server stopped before this request finished")

    def _end_all(self, message: str) -> None:
        """End every row, active or waiting, with a 503 error (touching no tensor: the device may be what failed)."""
        with self.lock:
            waiting = [row for group in self.waiting for row in group]
            self.waiting.clear()
        active = [row for row in self.rows if row is not None]
        self.rows = [None] * self.max_batch
        for row in active + waiting:
            row.deliver(("end", "error", 503, message))

    def _free_slots(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row is None]

    def _next_waiting(self) -> Completion | None:
        """The first waiting row of the request whose turn it is (cancelled rows dropped), or None."""
        with self.lock:
            while self.waiting:
                group = self.waiting[0]
                while group and group[0].cancelled:
                    group.popleft()
                if group:
                    return group[0]
                self.waiting.popleft()
        return None

    def _take_waiting(self) -> None:
        """Remove the row _next_waiting gave; its request goes to the back of the line (round-robin)."""
        with self.lock:
            group = self.waiting.popleft()
            group.popleft()
            if group:
                self.waiting.append(group)

    def _admit(self) -> None:
        while True:
            row = self._next_waiting()
            if row is None:
                return
            if row.max_tokens == 0 and not row.score_prompt:  # echo alone: nothing to compute
                self._take_waiting()
                row.deliver(("end", "length"))
                continue
            if not self._free_slots() or not self._make_room(len(row.prompt_ids), row.max_tokens):
                return  # it waits until older rows finish
            self._take_waiting()
            self._prefill(row)

    def _make_room(self, prompt_len: int, max_tokens: int) -> bool:
        """Make columns [column - prompt_len, column + max_tokens - 1) available, shifting the cache if needed."""
        active = [row for row in self.rows if row is not None]
        if not active:
            self.column = prompt_len
            self.mask.zero_()
            return True
        if self.column >= prompt_len and self.column + max_tokens - 1 <= self.context:
            return True
        first = min(row.start for row in active)
        ends = [row.start + len(row.prompt_ids) + row.max_tokens - 1 for row in active]
        # after moving everything left by `first`, then right by what the prompt needs
        shift = max(prompt_len - (self.column - first), 0) - first
        if max(ends) + shift > self.context or self.column + shift + max_tokens - 1 > self.context:
            return False
        self._shift(shift)
        return True

    def _shift(self, shift: int) -> None:
        """Move every row's columns by `shift` (negative: left); the columns that come free are masked."""
        if shift == 0:
            return
        for cache in self.caches:
            for t in (cache.k, cache.v):
                t.copy_(torch.roll(t, shift, dims=2))
        self.mask.copy_(torch.roll(self.mask, shift, dims=1))
        if shift > 0:
            self.mask[:, :shift] = 0
        else:
            self.mask[:, shift:] = 0
        self.column += shift
        for row in self.rows:
            if row is not None:
                row.start += shift

    def _prefill(self, row: Completion) -> None:
        """Run the prompt into cache row 0, right-aligned to the batch's column, and sample the first token (none
        when max_tokens is 0); with score_prompt, the prompt's own tokens are scored on the way."""
        try:
            if row.seed is not None:
                row.generator = torch.Generator(device=self.device).manual_seed(row.seed)
        except Exception as e:  # the request's own values: it fails alone
            row.deliver(("end", "error", 500, f"this request cannot be sampled ({e!r})"))
            return
        if self.rows[0] is not None:
            self._move_row(0, self._free_slots()[0])
        P = len(row.prompt_ids)
        begin = self.column - P
        self.mask[0] = 0
        self.mask[0, begin:self.column] = 1
        row.start = begin
        self.rows[0] = row
        prompt = torch.tensor([row.prompt_ids], device=self.device)
        if row.score_prompt:
            last = self._score_prompt(row, prompt, begin)
        else:
            last = self.model(prompt, begin, self.mask[:1, :self.column], only_last=True)[0, -1]
        if row.max_tokens == 0:
            self._retire(0, ("end", "length"))
        else:
            self._emit(0, last)

    def _score_prompt(self, row: Completion, prompt: torch.Tensor, begin: int) -> torch.Tensor:
        """Run the prompt into the cache PREFILL_CHUNK positions at a time (logits of a bounded size), hand over
        the log-probability of each of its tokens given the ones before it (None for the first) and the row's
        `logprobs` most likely tokens there; return the logits of the last position."""
        P, ids = prompt.size(1), row.prompt_ids
        values: list[float | None] = [None]
        tops: list[list | None] = [None]
        for a in range(0, P, PREFILL_CHUNK):
            b = min(a + PREFILL_CHUNK, P)
            logits = self.model(prompt[:, a:b], begin + a, self.mask[:1, :begin + b])[0]
            chunk_values, chunk_tops = token_scores(logits, ids[a + 1:b + 1], row.logprobs)
            values += chunk_values
            tops += chunk_tops
        row.deliver(("prompt", values, tops))
        return logits[-1]

    def _move_row(self, source: int, target: int) -> None:
        """Move a row's keys, values, mask and request to another (free) cache row."""
        for cache in self.caches:
            cache.k[target] = cache.k[source]
            cache.v[target] = cache.v[source]
        self.mask[target] = self.mask[source]
        self.mask[source] = 0
        self.rows[target], self.rows[source] = self.rows[source], None

    def _step(self) -> None:
        """One token for every active row, fed at the shared column."""
        if self.column >= self.context:  # cannot happen: rows are admitted only with room to finish
            raise RuntimeError("the batch ran out of cache columns")
        b = 1 + max(slot for slot, row in enumerate(self.rows) if row is not None)  # rows this step decodes
        tokens = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        for slot, row in enumerate(self.rows[:b]):
            if row is not None:
                tokens[slot, 0] = row.generated[-1]
        c = self.column
        self.mask[:b, c] = 1  # every row sees its new token (an empty row sees only that: no all-masked query)
        logits = self.step_forward(tokens, c, self.mask[:b, :c + 1])[:, -1]
        self.column += 1
        for slot, row in enumerate(self.rows[:b]):
            if row is None:
                self.mask[slot, c] = 0
            else:
                self._emit(slot, logits[slot])

    def _emit(self, slot: int, logits: torch.Tensor) -> None:
        """Sample the row's next token from its logits (V,), hand it over, and retire the row when it is done."""
        row = self.rows[slot]
        if row.cancelled:
            self._retire(slot, None)
            return
        try:
            token = int(sample_next_token(logits[None], row.temperature, row.top_k, row.top_p, row.generator)[0])
            logprob, top = None, None
            if row.logprobs is not None:
                logprobs = logits.float().log_softmax(-1)
                logprob = float(logprobs[token])
                if row.logprobs:
                    values, ids = logprobs.topk(row.logprobs)
                    top = list(zip(ids.tolist(), values.tolist()))
        except Exception as e:  # the request's own sampling values: it fails alone, the batch goes on
            traceback.print_exc()
            self._retire(slot, ("end", "error", 500, f"sampling failed for this request ({e!r})"))
            return
        row.generated.append(token)
        if token in row.stop_ids:
            if row.score_prompt:  # scoring clients read every token the model chose, the last one included
                row.deliver(("eos", token, logprob, top))
            self._retire(slot, ("end", "stop"))
            return
        row.deliver(("token", token, logprob, top))  # text and stop strings are the HTTP side's work, not this thread's
        if len(row.generated) >= row.max_tokens:
            self._retire(slot, ("end", "length"))

    def _retire(self, slot: int, event: tuple | None) -> None:
        row = self.rows[slot]
        self.rows[slot] = None
        self.mask[slot] = 0
        if event is not None:
            row.deliver(event)


PREFILL_CHUNK = 256  # prompt positions per forward when a prompt is scored: (256, vocab) logits at a time


def token_scores(logits: torch.Tensor, targets: list[int], k: int | None) -> tuple[list, list]:
    """The log-probability of each target under the row of `logits` (rows, V) of the same index (rows past the
    targets are left out), and the `k` most likely tokens there ([(id, logprob)], None when k is 0 or None)."""
    logprobs = logits[:len(targets)].float().log_softmax(-1)
    values = logprobs.gather(-1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
    if not k:
        return values, [None] * len(targets)
    best, best_ids = logprobs.topk(k)
    return values, [list(zip(i, v)) for i, v in zip(best_ids.tolist(), best.tolist())]


# --------------------------------------------------------------------------------------------------------------------
# HTTP


class Choice:
    """The text of one choice as it grows: stop strings, echo and logprobs in OpenAI's legacy format."""

    def __init__(self, tokenizer, prompt: str, stops: list[str], echo: bool, logprobs: int | None) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0  # characters of the completion already handed out
        self.text = ""
        self.prefix = prompt if echo else ""
        self.logprobs = None if logprobs is None else {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                       "text_offset": []}
        self.finish_reason: str | None = None

    def _top(self, top) -> dict[str, float] | None:
        return None if top is None else {self.tokenizer.decode([i]): v for i, v in top}

    def add_prompt(self, ids: list[int], logprobs: list, tops: list) -> None:
        """The prompt's own tokens at the head of the logprobs (echo): their texts, log-probabilities (None for the
        first, as OpenAI) and offsets in the echoed text."""
        lp = self.logprobs
        lp["tokens"] += [self.tokenizer.decode([i]) for i in ids]
        lp["token_logprobs"] += logprobs
        lp["top_logprobs"] += [self._top(top) for top in tops]
        lp["text_offset"] += text_offsets(self.tokenizer, ids)

    def add_eos(self, token: int, logprob: float | None, top) -> None:
        """The EOS that ended the choice, in the logprobs only (echo with logprobs): not part of the text."""
        if self.logprobs is not None:
            self.logprobs["tokens"].append(self.tokenizer.decode([token], skip_special_tokens=False))
            self.logprobs["token_logprobs"].append(logprob)
            self.logprobs["top_logprobs"].append(self._top(top))
            self.logprobs["text_offset"].append(len(self.prefix) + len(self.text))

    def add(self, token: int, logprob: float | None, top) -> bool:
        """Take one token; False when a stop string ended the choice."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if self.logprobs is not None:
            self.logprobs["tokens"].append(self.tokenizer.decode([token]))
            self.logprobs["token_logprobs"].append(logprob)
            self.logprobs["top_logprobs"].append(self._top(top))
            self.logprobs["text_offset"].append(len(self.prefix) + len(self.text))
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                self.text = text[:at]
                self.finish_reason = "stop"
                return False
        self.text = text
        return True

    def new_text(self) -> str:
        """Text not handed out yet, holding back what may be the start of a stop string or a split character."""
        safe = len(self.text)
        if self.finish_reason is None:
            if self.text.endswith("\ufffd"):
                safe = len(self.text.rstrip("\ufffd"))
            for stop in self.stops:
                for k in range(len(stop) - 1, 0, -1):
                    if self.text[:safe].endswith(stop[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        piece = self.text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return piece


def text_offsets(tokenizer, ids: list[int], window: int = 8) -> list[int]:
    """Where each token's text starts in tokenizer.decode(ids): what the token adds to the text is measured by
    decoding it after the `window` tokens before it (linear time; never backwards, where tokens split a character)."""
    offsets, at = [0] * len(ids), 0
    for t in range(1, len(ids)):
        w = max(0, t - 1 - window)
        before = len(tokenizer.decode(ids[w:t - 1])) if t - 1 > w else 0
        at += max(len(tokenizer.decode(ids[w:t])) - before, 0)
        offsets[t] = at
    return offsets


class InFlight:
    """One completions request while it decodes: its choices (n per prompt), the rows it hands the scheduler, and
    the events the model thread sends back for them, turned into OpenAI's payloads (whole, or streamed)."""

    ID_PREFIX, OBJECT, CHUNK_OBJECT = "cmpl-", "text_completion", "text_completion"

    def __init__(self, req: dict[str, Any], tokenizer, served_name: str, eos_token_id: int | list[int] | None) -> None:
        loop = asyncio.get_running_loop()
        self.req, self.served_name = req, served_name
        self.id = f"{self.ID_PREFIX}{uuid.uuid4().hex}"
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        self.rows: list[Completion] = []
        self.error: tuple[int, str] | None = None  # (HTTP status, message) of the first choice that ended in error
        stop_ids = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) \
            else set(eos_token_id)
        score = req["echo"] and req["logprobs"] is not None
        for prompt, ids in zip(req["prompts"], req["encoded"]):
            for i in range(req["n"]):
                self.choices.append(Choice(tokenizer, prompt, req["stop"], req["echo"], req["logprobs"]))
                seed = None if req["seed"] is None else req["seed"] + i
                self.rows.append(Completion(ids, req["max_tokens"], req["temperature"], req["top_k"], req["top_p"],
                                            seed, req["logprobs"], stop_ids, self._deliverer(loop, len(self.rows)),
                                            score_prompt=score))

    def _deliverer(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[tuple], None]:
        def deliver(event: tuple) -> None:  # called by the model thread
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed: nobody waits for the row any more
                pass
        return deliver

    def envelope(self, kind: str, choices: list[dict], with_usage: bool) -> dict[str, Any]:
        """A response object of `kind` (OBJECT or CHUNK_OBJECT) holding `choices`, with the usage if asked."""
        out = {"id": self.id, "object": kind, "created": int(time.time()), "model": self.served_name,
               "choices": choices}
        if with_usage:
            prompt_tokens = sum(len(ids) for ids in self.req["encoded"])
            completion_tokens = sum(len(c.ids) for c in self.choices)
            out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
        return out

    def result(self) -> dict[str, Any]:
        """The whole response, once every choice has ended."""
        return self.envelope(self.OBJECT, [{"index": i, "text": c.prefix + c.text, "logprobs": c.logprobs,
                                            "finish_reason": c.finish_reason}
                                           for i, c in enumerate(self.choices)], True)

    def _chunk(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        return self.envelope(self.CHUNK_OBJECT, [{"index": index, "text": text, "logprobs": None,
                                                  "finish_reason": finish}], False)

    def opening_chunks(self) -> list[dict[str, Any]]:
        """The stream's chunks before any token: each choice's echoed prompt."""
        return [self._chunk(i, c.prefix, None) for i, c in enumerate(self.choices) if c.prefix]

    def chunks(self, index: int, piece: str, finish: str | None) -> list[dict[str, Any]]:
        """The stream's chunks for choice `index`'s new text `piece`, and its finish reason once it has ended."""
        return [self._chunk(index, piece, finish)] if piece or finish else []

    async def finished_events(self):
        """(choice index, "token" or "end") as the model thread hands them over, until every choice has ended.
        A stop string ends a choice here; its row is then cancelled and leaves the batch at the next step."""
        from starlette.concurrency import run_in_threadpool

        done = 0
        while done < len(self.rows):
            index, event = await self.events.get()
            choice = self.choices[index]
            if choice.finish_reason is not None:  # tokens the row made before it saw its cancellation
                continue
            if event[0] == "prompt":  # decoding a long prompt's tokens is work: off the event loop
                await run_in_threadpool(choice.add_prompt, self.rows[index].prompt_ids, *event[1:])
                continue
            if event[0] == "eos":
                choice.add_eos(*event[1:])
                continue
            if event[0] == "token" and choice.add(*event[1:]):
                yield index, "token"
                continue
            if event[0] == "token":
                self.rows[index].cancelled = True
            else:
                choice.finish_reason = event[1]
                if len(event) > 2 and self.error is None:
                    self.error = event[2], event[3]
            done += 1
            yield index, "end"

    def cancel(self) -> None:
        """Free every row of the request at the scheduler's next step."""
        for row in self.rows:
            row.cancelled = True

    async def whole(self, request):
        """The whole completion once every choice has ended; 499 (and the rows freed) if the client went away; the
        error of a choice that failed (503: the server failed or shut down; 500: this request failed alone)."""
        from starlette.responses import JSONResponse

        try:
            async for _ in self.finished_events():
                if await request.is_disconnected():
                    self.cancel()
                    return JSONResponse({}, status_code=499)
        except asyncio.CancelledError:
            self.cancel()
            raise
        if self.error is not None:
            self.cancel()
            return JSONResponse(error_body(self.error[1]), status_code=self.error[0])
        return JSONResponse(self.result())

    async def stream(self):
        """Server-sent events: the opening chunks, each choice's text as it comes, the finish reasons, [DONE]; an
        error event before [DONE] if a choice failed (the `openai` client raises it)."""
        try:
            for chunk in self.opening_chunks():
                yield f"data: {json.dumps(chunk)}\n\n"
            async for index, kind in self.finished_events():
                c = self.choices[index]
                for chunk in self.chunks(index, c.new_text(), c.finish_reason if kind == "end" else None):
                    yield f"data: {json.dumps(chunk)}\n\n"
            if self.error is not None:
                yield f"data: {json.dumps(error_body(self.error[1]))}\n\n"
            elif self.req["include_usage"]:  # OpenAI's stream_options: one last chunk with no choices and the usage
                yield f"data: {json.dumps(self.envelope(self.CHUNK_OBJECT, [], True))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # a client that went away frees its rows at the next step


class ChatInFlight(InFlight):
    """One chat completions request: InFlight's rows and events in the chat formats, the whole reply as an
    assistant message, or chunks of deltas: the role first, then the content as it comes, then the finish reason."""

    ID_PREFIX, OBJECT, CHUNK_OBJECT = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def result(self) -> dict[str, Any]:
        return self.envelope(self.OBJECT, [{"index": i, "message": {"role": "assistant", "content": c.text},
                                            "logprobs": None, "finish_reason": c.finish_reason}
                                           for i, c in enumerate(self.choices)], True)

    def _delta(self, index: int, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        return self.envelope(self.CHUNK_OBJECT, [{"index": index, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}], False)

    def opening_chunks(self) -> list[dict[str, Any]]:
        return [self._delta(i, {"role": "assistant", "content": ""}, None) for i in range(len(self.choices))]

    def chunks(self, index: int, piece: str, finish: str | None) -> list[dict[str, Any]]:
        return ([self._delta(index, {"content": piece}, None)] if piece else []) + \
            ([self._delta(index, {}, finish)] if finish else [])


class _Api:
    """The endpoints of create_app, on one scheduler."""

    def __init__(self, scheduler: Scheduler, tokenizer, served_name: str, api_key: str | None,
                 eos_token_id: int | list[int] | None, chat_template, limits: Limits) -> None:
        self.scheduler, self.tokenizer, self.served_name = scheduler, tokenizer, served_name
        self.api_key, self.eos, self.chat_template, self.limits = api_key, eos_token_id, chat_template, limits
        self.created = int(time.time())

    @staticmethod
    def error(e: RequestError) -> Response:
        from starlette.responses import JSONResponse

        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def authorised(self, request: Request) -> bool:
        """No key set, or `Authorization: Bearer KEY` (the scheme in any case, as HTTP has it)."""
        if self.api_key is None:
            return True
        scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode("latin-1", "replace"),
                                                                  self.api_key.encode("utf-8"))

    def unauthorised(self) -> Response:
        return self.error(RequestError("a valid API key is needed: send 'Authorization: Bearer KEY'", status=401,
                                       code="invalid_api_key"))

    async def health(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        failure = self.scheduler.failure
        if failure is not None:
            return JSONResponse({"status": "error", **error_body(f"the model thread failed ({failure!r}): the "
                                                                  "server is exiting; restart it")}, status_code=503)
        if self.scheduler.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def _model(self) -> dict[str, Any]:
        return {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "minhub"}

    async def models(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        if not self.authorised(request):
            return self.unauthorised()
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{model} (the openai client's models.retrieve)."""
        from starlette.responses import JSONResponse

        if not self.authorised(request):
            return self.unauthorised()
        name = request.path_params["model"]
        if name != self.served_name:
            return self.error(RequestError(f"the model {name!r} does not exist here: this server serves "
                                           f"{self.served_name!r}", param="model", status=404,
                                           code="model_not_found"))
        return JSONResponse(self._model())

    async def read_body(self, request: Request) -> bytes:
        """The body, or RequestError: 413 past limits.max_body (from Content-Length before reading, and while
        reading a chunked body), 408 if it has not all come within limits.body_timeout seconds."""
        limit, close = self.limits.max_body, {"Connection": "close"}  # what is left of the body is never read
        too_large = RequestError(f"the request body is larger than this server takes ({limit} bytes, --max-body)",
                                 status=413, code="request_too_large", headers=close)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            raise too_large
        chunks: list[bytes] = []

        async def receive() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive(), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within {self.limits.body_timeout:g} s "
                               "(--body-timeout)", status=408, code="request_timeout", headers=close) from None
        return b"".join(chunks)

    async def run(self, request: Request, parse: Callable[[Any], dict], kind: type[InFlight]) -> Response:
        """Answer a (chat) completions request: `parse` checks its body (in a worker thread: it tokenizes), `kind`
        decodes it on the scheduler."""
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import ClientDisconnect
        from starlette.responses import Response, StreamingResponse

        if not self.authorised(request):
            return self.unauthorised()
        try:
            data = await self.read_body(request)
            try:
                body = json.loads(data)
            except (ValueError, RecursionError) as e:  # also numbers past Python's 4300 digits, deep nesting
                raise RequestError(f"the request body is not valid JSON: {str(e)[:200]}") from e
            self.scheduler.check_open()
            # a small body parses in a few ms: a thread hop would only spread a burst of requests over more steps
            req = parse(body) if len(data) <= INLINE_PARSE_BYTES else await run_in_threadpool(parse, body)
            flight = kind(req, self.tokenizer, self.served_name, self.eos)
            self.scheduler.submit(flight.rows)
        except RequestError as e:
            return self.error(e)
        except ClientDisconnect:
            return Response(status_code=499)
        if req["stream"]:
            return StreamingResponse(flight.stream(), media_type="text/event-stream")
        return await flight.whole(request)

    async def completions(self, request: Request) -> Response:
        s = self.scheduler
        return await self.run(request, lambda body: parse_completion_request(
            body, self.served_name, self.tokenizer, s.context, s.vocab_size, s.max_batch,
            max_prompts=self.limits.max_prompts, max_prompt_chars=self.limits.max_prompt_chars), InFlight)

    async def chat_completions(self, request: Request) -> Response:
        s = self.scheduler
        return await self.run(request, lambda body: parse_chat_request(
            body, self.served_name, self.tokenizer, self.chat_template, s.context, s.vocab_size, s.max_batch),
            ChatInFlight)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's HTTPExceptions (404: no such path, 405: wrong method) in OpenAI's error format."""
        if exc.status_code == 404:
            message = (f"there is no {request.url.path} here: this server has POST /v1/completions, POST "
                       "/v1/chat/completions, GET /v1/models, GET /v1/models/{model} and GET /health")
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path}: use {allowed or 'another method'}"
        else:
            message = str(exc.detail)
        return self.error(RequestError(message, status=exc.status_code, headers=exc.headers,
                                       code="not_found" if exc.status_code == 404 else None))

    async def server_error(self, request: Request, exc: Exception) -> Response:
        """A bug: a 500 in OpenAI's error format (the traceback goes to the log)."""
        from starlette.responses import JSONResponse

        return JSONResponse(error_body(f"internal error ({type(exc).__name__}): please report it"), status_code=500)


def create_app(model: nn.Module, tokenizer, served_name: str, *, max_batch: int = 8, api_key: str | None = None,
               eos_token_id: int | list[int] | None = None, chat_template=None, max_body: int | None = None,
               body_timeout: float = 30.0, max_prompts: int = 64, context: int | None = None):
    """The Starlette application serving `model` (already loaded) under the name `served_name`; chat_template (a
    minhub.chat.ChatTemplate, or None: the model has none) renders the messages of /v1/chat/completions.

    Limits: max_body bytes of a request body (None: default_max_body of the context), body_timeout seconds to
    receive it, max_prompts completions (prompts x n) in one request, context tokens a row may reach (prompt and
    completion; see serving_context)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    check_int("--max-batch", max_batch, 1)
    check_int("--max-prompts", max_prompts, 1)
    if max_body is not None:
        check_int("--max-body", max_body, 1)
    _check_seconds("--body-timeout", body_timeout)
    scheduler = Scheduler(model, max_batch, eos_token_id, context)
    limits = Limits(max_body or default_max_body(scheduler.context), float(body_timeout), max_prompts,
                    scheduler.context * longest_token(tokenizer))
    api = _Api(scheduler, tokenizer, served_name, api_key, eos_token_id, chat_template, limits)
    app = Starlette(routes=[Route("/health", api.health), Route("/v1/models", api.models),
                            Route("/v1/models/{model:path}", api.model),
                            Route("/v1/completions", api.completions, methods=["POST"]),
                            Route("/v1/chat/completions", api.chat_completions, methods=["POST"])],
                    exception_handlers={HTTPException: api.http_error, Exception: api.server_error},
                    lifespan=_lifespan(scheduler))
    app.state.scheduler, app.state.limits = scheduler, limits
    return app


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _lifespan(scheduler: Scheduler):
    """The app's lifespan: the model thread runs while the app does."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    return lifespan


def build_app(model_id: str, revision: str | None = None, *, max_batch: int = 8, dtype: str = "float32",
              device: str = "cpu", api_key: str | None = None, compile_batches: bool = False,
              max_body: int | None = None, body_timeout: float = 30.0, max_prompts: int = 64,
              context: int | None = None):
    """Load the model, tokenizer and chat template as `minhub generate` does, take the speed path
    (minhub.speed.optimize; compile_batches: torch.compile the batched decode step, 20-40 s at the first request) and
    return the application (for tests and ASGI); the limits as create_app's."""
    from minhub import hardware, hub
    from minhub.chat import chat_template_from_pretrained
    from minhub.tokenizer import tokenizer_from_pretrained

    check_int("--max-batch", max_batch, 1)
    check_int("--max-prompts", max_prompts, 1)
    if context is not None:
        check_int("--context", context, 1)
    _check_seconds("--body-timeout", body_timeout)
    hardware.check_device(device)
    torch_dtype = getattr(torch, dtype)
    model = hub.from_pretrained(model_id, revision, dtype=torch_dtype, device=device)
    eos = getattr(model.config, "eos_token_id", None)  # GPT4 runs have none
    tokenizer = tokenizer_from_pretrained(model_id, model.commit_hash or revision)
    chat_template = chat_template_from_pretrained(model_id, model.commit_hash or revision)  # None if it has none
    # the loader applied the matmul plan; bf16 packing where it is fastest, batched steps compiled when asked
    speed.optimize(model, weights=speed.weights_for(model), compile_batches=compile_batches)
    return create_app(model, tokenizer, str(model_id), max_batch=max_batch, api_key=api_key, eos_token_id=eos,
                      chat_template=chat_template, max_body=max_body, body_timeout=body_timeout,
                      max_prompts=max_prompts, context=context)


def uvicorn_server(app, host: str = "127.0.0.1", port: int = 8000, *, shutdown_timeout: float = 30.0,
                   log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn.Server for an app of create_app that always ends: on SIGTERM / SIGINT (or `should_exit`) it stops
    accepting, lets requests in flight finish for up to `shutdown_timeout` seconds, ends the rest with a 503 error
    and returns (uvicorn then re-raises the signal); it also returns by itself when the model thread fails (then
    app.state.scheduler.failure is set)."""
    import uvicorn

    _check_seconds("--shutdown-timeout", shutdown_timeout)
    scheduler: Scheduler = app.state.scheduler

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            scheduler.close(shutdown_timeout)
            await super().shutdown(sockets)

    # uvicorn's own bound, a backstop: it cancels what is left (say, a client still sending its body)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=math.ceil(shutdown_timeout) + 5)
    server = Server(config)
    scheduler.on_failure.append(lambda: setattr(server, "should_exit", True))
    return server


class BackgroundServer:
    """`app` (of create_app or build_app) served by uvicorn on host:<a free port> in a background thread, for tests,
    benchmarks and notebooks: `with BackgroundServer(app) as server: ... server.port ...`; leaving the block stops
    it (requests still in flight get `shutdown_timeout` seconds). It also stops when the model thread fails."""

    def __init__(self, app, host: str = "127.0.0.1", start_timeout: float = 30.0,
                 shutdown_timeout: float = 10.0) -> None:
        import socket

        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
            self.port = probe.getsockname()[1]
        self.host, self.start_timeout, self.shutdown_timeout = host, start_timeout, shutdown_timeout
        self.app = app
        self.server = uvicorn_server(app, host, self.port, shutdown_timeout=shutdown_timeout)
        self.thread = threading.Thread(target=self.server.run, name="minhub-server", daemon=True)

    @property
    def failure(self) -> Exception | None:
        """What ended the model thread, or None."""
        return self.app.state.scheduler.failure

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.shutdown_timeout + 20)
