"""`minhub serve MODEL`: an OpenAI-compatible server with continuous batching (needs `minhub[serve]`).

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health. The official `openai` client
works with it unchanged: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")`, then
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
shifted left past the columns no active row uses.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from minhub import speed
from minhub.generation import check_int, check_sampling_args, sample_next_token


class RequestError(ValueError):
    """A request the server refuses: becomes an HTTP 4xx with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


# --------------------------------------------------------------------------------------------------------------------
# Requests


@dataclass
class Completion:
    """One row: a prompt to continue, how, and where its tokens go."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    logprobs: int | None
    stop_ids: set[int]
    deliver: Any  # deliver(event), from the model thread: ("token", id, logprob, top) or ("end", reason)
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
        raise RequestError(f"'{name}' must be {names}, got {json.dumps(value)}", param=name)
    return value


SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "user",
                   "stream_options", "frequency_penalty", "presence_penalty"}
KNOWN_FIELDS = SAMPLING_FIELDS | {"prompt", "logprobs", "echo"}  # of /v1/completions
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
        raise RequestError(f"the model {model!r} does not exist here: this server serves {served_name!r}",
                           param="model", status=404, code="model_not_found")


def _check_text(text: str, what: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \ud800 escapes give lone surrogates, which are no text
        raise RequestError(f"{what} is not valid Unicode text ({e.reason} at {e.start})", param=param) from e


def parse_sampling(body: dict, max_n: int, max_tokens_name: str = "max_tokens",
                   max_tokens_default: int | None = 16) -> dict:
    """The fields /v1/completions and /v1/chat/completions share, checked: how many tokens (under `max_tokens_name`;
    None where absent and the default is None), how they are sampled, n, the seed, stop strings, streaming."""
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
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError("'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"'{max_tokens_name}' must be at least 1, got {max_tokens}", param=max_tokens_name)
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
    if max(ids) >= vocab_size:
        raise RequestError("the prompt encodes to ids outside the model's vocabulary", param=param)


def parse_completion_request(body: Any, served_name: str, tokenizer, context: int, vocab_size: int,
                             max_n: int) -> dict:
    """Check a /v1/completions body; return the normalised request, or raise RequestError naming the field."""
    _check_body(body, KNOWN_FIELDS, served_name)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("'prompt' must be a string or a non-empty list of strings", param="prompt")
    for p in prompts:
        _check_text(p, "a prompt", "prompt")
    req = parse_sampling(body, max_n)
    logprobs = _field(body, "logprobs", (int,), None)
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise RequestError(f"'logprobs' must be in [0, 5], got {logprobs}", param="logprobs")
    encoded = [tokenizer.encode(p).ids for p in prompts]
    for ids in encoded:
        _check_prompt_ids(ids, req["max_tokens"], "max_tokens", context, vocab_size, "prompt")
    return {**req, "prompts": prompts, "encoded": encoded, "logprobs": logprobs,
            "echo": bool(_field(body, "echo", (bool,), False))}


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


class Scheduler:
    """Owns the model; runs decode steps for every active row, admitting waiting rows between steps."""

    def __init__(self, model: nn.Module, max_batch: int, eos_token_id: int | list[int] | None) -> None:
        self.model, self.eos = model, eos_token_id
        self.context, self.vocab_size = model.config.context_length, model.config.vocab_size
        self.max_batch = max_batch
        self.waiting: queue.Queue[Completion] = queue.Queue()
        self.rows: list[Completion | None] = [None] * self.max_batch
        self.column = 0  # the next cache column every active row writes
        self.stopped = threading.Event()
        self.failure: Exception | None = None
        self.thread = threading.Thread(target=self._run, name="minhub-scheduler", daemon=True)

    def start(self) -> None:
        with torch.inference_mode():
            self.model.setup_cache(self.max_batch, self.context)
        self.caches = self.model.kv_caches()
        self.step_forward = speed.decode_step(self.model, self.max_batch, masked=True)
        self.device = next(self.model.parameters()).device
        self.mask = torch.zeros(self.max_batch, self.context, dtype=torch.long, device=self.device)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def submit(self, row: Completion) -> None:
        self.waiting.put(row)

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self.stopped.is_set():
                    self._admit()
                    if not any(self.rows):
                        try:  # idle: wait for work without spinning
                            self.waiting.put(self.waiting.get(timeout=0.05))
                        except queue.Empty:
                            pass
                        continue
                    self._step()
        except Exception as e:  # a bug, or the device failing: end every request instead of leaving it waiting
            self.failure = e
            traceback.print_exc()
            for slot, row in enumerate(self.rows):
                if row is not None:
                    self._retire(slot, ("end", "error"))
            while not self.waiting.empty():
                self.waiting.get().deliver(("end", "error"))

    def _free_slots(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row is None]

    def _admit(self) -> None:
        while self._free_slots() and not self.waiting.empty():
            row = self.waiting.queue[0]
            if row.cancelled:
                self.waiting.get()
                continue
            if not self._make_room(len(row.prompt_ids), row.max_tokens):
                return  # it waits until older rows finish
            self.waiting.get()
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
        """Run the prompt into cache row 0, right-aligned to the batch's column, and sample the first token."""
        if self.rows[0] is not None:
            self._move_row(0, self._free_slots()[0])
        P = len(row.prompt_ids)
        begin = self.column - P
        self.mask[0] = 0
        self.mask[0, begin:self.column] = 1
        prompt = torch.tensor([row.prompt_ids], device=self.device)
        logits = self.model(prompt, begin, self.mask[:1, :self.column], only_last=True)[:, -1]
        row.start = begin
        if row.seed is not None:
            row.generator = torch.Generator(device=self.device).manual_seed(row.seed)
        self.rows[0] = row
        self._emit(0, logits[0])

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
        token = int(sample_next_token(logits[None], row.temperature, row.top_k, row.top_p, row.generator)[0])
        logprob, top = None, None
        if row.logprobs is not None:
            logprobs = logits.float().log_softmax(-1)
            logprob = float(logprobs[token])
            if row.logprobs:
                values, ids = logprobs.topk(row.logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
        row.generated.append(token)
        if token in row.stop_ids:
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

    def add(self, token: int, logprob: float | None, top) -> bool:
        """Take one token; False when a stop string ended the choice."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if self.logprobs is not None:
            self.logprobs["tokens"].append(self.tokenizer.decode([token]))
            self.logprobs["token_logprobs"].append(logprob)
            self.logprobs["top_logprobs"].append(
                None if top is None else {self.tokenizer.decode([i]): v for i, v in top})
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
        stop_ids = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) \
            else set(eos_token_id)
        for prompt, ids in zip(req["prompts"], req["encoded"]):
            for i in range(req["n"]):
                self.choices.append(Choice(tokenizer, prompt, req["stop"], req["echo"], req["logprobs"]))
                seed = None if req["seed"] is None else req["seed"] + i
                self.rows.append(Completion(ids, req["max_tokens"], req["temperature"], req["top_k"], req["top_p"],
                                            seed, req["logprobs"], stop_ids, self._deliverer(loop, len(self.rows))))

    def _deliverer(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[tuple], None]:
        def deliver(event: tuple) -> None:  # called by the model thread
            loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
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
        done = 0
        while done < len(self.rows):
            index, event = await self.events.get()
            choice = self.choices[index]
            if choice.finish_reason is not None:  # tokens the row made before it saw its cancellation
                continue
            if event[0] == "token" and choice.add(*event[1:]):
                yield index, "token"
                continue
            if event[0] == "token":
                self.rows[index].cancelled = True
            else:
                choice.finish_reason = event[1]
            done += 1
            yield index, "end"

    def cancel(self) -> None:
        """Free every row of the request at the scheduler's next step."""
        for row in self.rows:
            row.cancelled = True

    async def whole(self, request):
        """The whole completion once every choice has ended; 499 (and the rows freed) if the client went away."""
        from starlette.responses import JSONResponse

        try:
            async for _ in self.finished_events():
                if await request.is_disconnected():
                    self.cancel()
                    return JSONResponse({}, status_code=499)
        except asyncio.CancelledError:
            self.cancel()
            raise
        return JSONResponse(self.result())

    async def stream(self):
        """Server-sent events: the opening chunks, each choice's text as it comes, the finish reasons, [DONE]."""
        try:
            for chunk in self.opening_chunks():
                yield f"data: {json.dumps(chunk)}\n\n"
            async for index, kind in self.finished_events():
                c = self.choices[index]
                for chunk in self.chunks(index, c.new_text(), c.finish_reason if kind == "end" else None):
                    yield f"data: {json.dumps(chunk)}\n\n"
            if self.req["include_usage"]:  # OpenAI's stream_options: one last chunk with no choices and the usage
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


def create_app(model: nn.Module, tokenizer, served_name: str, *, max_batch: int = 8, api_key: str | None = None,
               eos_token_id: int | list[int] | None = None, chat_template=None):
    """The Starlette application serving `model` (already loaded) under the name `served_name`; chat_template (a
    minhub.chat.ChatTemplate, or None: the model has none) renders the messages of /v1/chat/completions."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    scheduler = Scheduler(model, max_batch, eos_token_id)
    created = int(time.time())

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def authorised(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    def unauthorised() -> JSONResponse:
        return error(RequestError("a valid API key is needed: send 'Authorization: Bearer KEY'", status=401,
                                  code="invalid_api_key"))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> JSONResponse:
        if not authorised(request):
            return unauthorised()
        return JSONResponse({"object": "list", "data": [{"id": served_name, "object": "model", "created": created,
                                                         "owned_by": "minhub"}]})

    async def run(request: Request, parse: Callable[[Any], dict], kind: type[InFlight]):
        """Answer a (chat) completions request: `parse` checks its body, `kind` decodes it on the scheduler."""
        if not authorised(request):
            return unauthorised()
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as e:  # also numbers past Python's 4300 digits, nesting past its stack
            return error(RequestError(f"the request body is not valid JSON: {str(e)[:200]}"))
        if scheduler.failure is not None:
            return JSONResponse({"error": {"message": f"the model thread failed ({scheduler.failure!r}): restart the "
                                           "server", "type": "server_error", "param": None, "code": None}},
                                status_code=500)
        try:
            req = parse(body)
        except RequestError as e:
            return error(e)
        flight = kind(req, tokenizer, served_name, eos_token_id)
        for row in flight.rows:
            scheduler.submit(row)
        if req["stream"]:
            return StreamingResponse(flight.stream(), media_type="text/event-stream")
        return await flight.whole(request)

    async def completions(request: Request):
        return await run(request, lambda body: parse_completion_request(
            body, served_name, tokenizer, scheduler.context, scheduler.vocab_size, scheduler.max_batch), InFlight)

    async def chat_completions(request: Request):
        return await run(request, lambda body: parse_chat_request(
            body, served_name, tokenizer, chat_template, scheduler.context, scheduler.vocab_size,
            scheduler.max_batch), ChatInFlight)

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                            Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"])],
                    lifespan=_lifespan(scheduler))
    app.state.scheduler = scheduler
    return app


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
              device: str = "cpu", api_key: str | None = None, compile_batches: bool = False):
    """Load the model, tokenizer and chat template as `minhub generate` does, take the speed path
    (minhub.speed.optimize; compile_batches: torch.compile the batched decode step, 20-40 s at the first request) and
    return the application (for tests and ASGI)."""
    from minhub import hardware, hub
    from minhub.chat import chat_template_from_pretrained
    from minhub.tokenizer import tokenizer_from_pretrained

    check_int("--max-batch", max_batch, 1)
    hardware.check_device(device)
    torch_dtype = getattr(torch, dtype)
    model = hub.from_pretrained(model_id, revision, dtype=torch_dtype, device=device)
    eos = getattr(model.config, "eos_token_id", None)  # GPT4 runs have none
    tokenizer = tokenizer_from_pretrained(model_id, model.commit_hash or revision)
    chat_template = chat_template_from_pretrained(model_id, model.commit_hash or revision)  # None if it has none
    # the loader applied the matmul plan; bf16 packing where it is fastest, batched steps compiled when asked
    speed.optimize(model, weights=speed.weights_for(model), compile_batches=compile_batches)
    return create_app(model, tokenizer, str(model_id), max_batch=max_batch, api_key=api_key, eos_token_id=eos,
                      chat_template=chat_template)


class BackgroundServer:
    """`app` served by uvicorn on host:<a free port> in a background thread, for tests, benchmarks and notebooks:
    `with BackgroundServer(app) as server: ... server.port ...`; leaving the block stops it."""

    def __init__(self, app, host: str = "127.0.0.1", start_timeout: float = 30.0) -> None:
        import socket

        import uvicorn

        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
            self.port = probe.getsockname()[1]
        self.host, self.start_timeout = host, start_timeout
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="minhub-server", daemon=True)

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
        self.thread.join(timeout=30)
