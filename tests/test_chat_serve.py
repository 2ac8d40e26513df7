"""Chat: POST /v1/chat/completions of `minhub serve` (the real server on a loopback port, called with the official
`openai` client and raw HTTP) and `minhub chat` in the terminal, on Llama-family checkpoints in the offline hub cache
(built by tests/test_llama_hub.py: a byte-level BPE tokenizer, a chat template, several EOS ids).

The reference is transformers on the same files: its apply_chat_template(..., tokenize=True) gives the prompt ids,
its greedy `generate` with generation_config.json's EOS ids gives every reply and where it ends."""

from __future__ import annotations

import concurrent.futures
import functools
import http.client
import io
import json
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import put_in_hub_cache
from test_llama_hub import greedy_reference, hub_repo, stop_ids, write_checkpoint

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import minhub  # noqa: E402
from minhub.chat import ChatTemplate, chat_template_from_pretrained  # noqa: E402
from minhub.serve import BackgroundServer, build_app  # noqa: E402
from minhub.tokenizer import chat_ids  # noqa: E402

MODEL = "tests/chat-llama"
REFERENCE = {}  # "model": the transformers model the server serves, "tokenizer": its transformers tokenizer
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CONVERSATIONS = {  # what transformers' greedy reply does within 30 tokens, checked where it matters
    "stop": [{"role": "user", "content": "Hello"}],
    "stop, other eos": [{"role": "user", "content": "Once upon a time"}],
    "length": [{"role": "user", "content": "Tell me a story."}],
    "multi-turn": [SYSTEM, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."},
                   {"role": "user", "content": "What is the capital of France?"}],
}
MISTRAL_TEMPLATE = json.loads((Path(__file__).parent / "fixtures" / "chat" / "templates.json").read_text(
    encoding="utf-8"))["mistral"]["chat_template"]  # refuses system messages and roles that do not alternate


@pytest.fixture(scope="module")
def repo():
    """MODEL in the hub cache; the transformers model and tokenizer in REFERENCE."""
    REFERENCE["model"], REFERENCE["tokenizer"] = hub_repo(MODEL, "llama", seed=1)
    return MODEL


@pytest.fixture(scope="module")
def server(repo):
    """The app serving MODEL on 127.0.0.1:<free port>, max batch 4, API key 'secret'."""
    app = build_app(MODEL, max_batch=4, api_key="secret")
    with BackgroundServer(app) as running:
        yield running.port


def client(port: int):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0, timeout=60)


def raw(port: int, body) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", "/v1/chat/completions", body=data,
                       headers={"Authorization": "Bearer secret", "Content-Type": "application/json"})
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read() or b"{}")
    connection.close()
    return status, payload


def template_ids(messages: list[dict], tokenizer=None, **options) -> list[int]:
    """transformers' ids of the conversation with the generation prompt (the server's prompt)."""
    tokenizer = tokenizer or REFERENCE["tokenizer"]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                              **options))


@functools.lru_cache(maxsize=None)
def reference(conversation: str, max_tokens: int = 30) -> tuple[list[int], str, int]:
    """transformers' greedy reply to CONVERSATIONS[conversation]: (its ids, EOS left out; "stop" or "length";
    the prompt's length)."""
    ids = template_ids(CONVERSATIONS[conversation])
    tokenizer = REFERENCE["tokenizer"]
    new, finish = greedy_reference(REFERENCE["model"], ids, max_tokens, stop_ids("llama", tokenizer))
    return new, finish, len(ids)


def reference_text(conversation: str, max_tokens: int = 30) -> str:
    return REFERENCE["tokenizer"].decode(reference(conversation, max_tokens)[0], skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_prompt_ids_equal_transformers_apply_chat_template(family, tmp_path):
    """The rendered conversation, encoded without the tokenizer's special tokens as transformers does: Llama 3's
    template writes its BOS once (the tokenizer's post-processor would add a second), Qwen2's has none."""
    _, tokenizer = write_checkpoint(tmp_path, family)
    ours, template = minhub.tokenizer_from_pretrained(tmp_path), chat_template_from_pretrained(tmp_path)
    for messages in CONVERSATIONS.values():
        ids = chat_ids(ours, template, messages)
        assert ids == template_ids(messages, tokenizer)
        if family == "llama":
            assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        else:
            assert tokenizer.bos_token_id is None


def test_chat_completions_equal_transformers_greedy_replies(server):
    """The openai client's chat.completions.create: transformers' greedy reply (its tokens decoded), the finish
    reason ("stop" at either EOS id of generation_config.json, "length" at max_tokens) and the usage."""
    c = client(server)
    assert {reference(name)[1] for name in CONVERSATIONS} == {"stop", "length"}  # what the conversations are for
    tokenizer = REFERENCE["tokenizer"]
    stops = stop_ids("llama", tokenizer)
    ended_at = {}  # conversation: the EOS id that ended it
    for name, messages in CONVERSATIONS.items():
        new, finish, prompt_tokens = reference(name)
        result = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
        assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
        choice = result.choices[0]
        assert (choice.message.role, choice.message.content) == ("assistant", reference_text(name)), name
        assert choice.finish_reason == finish, name
        assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == \
            (prompt_tokens, len(new), prompt_tokens + len(new)), name
        if finish == "stop":
            ids = template_ids(messages)
            with torch.no_grad():  # which EOS id ended it
                ended_at[name] = int(REFERENCE["model"](torch.tensor([ids + new])).logits[0, -1].argmax())
    assert {ended_at["stop"], ended_at["stop, other eos"]} == set(stops)
    result = c.chat.completions.create(model=MODEL, messages=CONVERSATIONS["length"], max_completion_tokens=7,
                                       temperature=0)
    assert (result.choices[0].message.content, result.choices[0].finish_reason) == \
        (reference_text("length", 7), "length")


def test_streaming_with_the_client(server):
    """chat.completion.chunk objects: the role first (empty content), then the content as it comes, then a chunk
    with the finish reason only, then (stream_options) one with the usage and no choices."""
    c = client(server)
    for name in ("stop", "length", "multi-turn"):
        new, finish, prompt_tokens = reference(name)
        chunks = list(c.chat.completions.create(model=MODEL, messages=CONVERSATIONS[name], max_tokens=30,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
        *chunks, usage = chunks
        assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks + [usage])
        first, last = chunks[0].choices[0], chunks[-1].choices[0]
        assert (first.delta.role, first.delta.content, first.finish_reason) == ("assistant", "", None)
        assert (last.delta.content, last.finish_reason) == (None, finish)
        middle = [ch.choices[0] for ch in chunks[1:-1]]
        assert all(ch.finish_reason is None and ch.delta.content for ch in middle)
        assert "".join(ch.delta.content for ch in middle) == reference_text(name)
        assert usage.choices == [] and (usage.usage.prompt_tokens, usage.usage.completion_tokens) == \
            (prompt_tokens, len(new))


def seeded_reference(messages: list[dict], seed: int, max_tokens: int) -> tuple[str, int]:
    """What the server samples for one choice: minhub.sample_next_token (temperature 1, the whole vocabulary) on
    transformers' logits, token by token, with a generator seeded `seed`, until an EOS id or max_tokens: (the
    text, its number of tokens)."""
    tokenizer, model = REFERENCE["tokenizer"], REFERENCE["model"]
    ids, new, stops = template_ids(messages), [], stop_ids("llama", tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        while len(new) < max_tokens:
            logits = model(torch.tensor([ids + new])).logits[0, -1]
            token = int(minhub.sample_next_token(logits[None], 1.0, None, None, generator)[0])
            if token in stops:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_n_choices_with_a_seed(server):
    """n=2, seed 5: choice i is what sampling from transformers' logits with seed 5 + i draws; the same request
    gives the same choices; the usage counts both."""
    c = client(server)
    messages = CONVERSATIONS["length"]

    def ask():
        result = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, n=2, seed=5, temperature=1)
        assert sorted(ch.index for ch in result.choices) == [0, 1]
        return result, [ch.message.content for ch in sorted(result.choices, key=lambda ch: ch.index)]

    result, texts = ask()
    (text0, count0), (text1, count1) = seeded_reference(messages, 5, 12), seeded_reference(messages, 6, 12)
    assert texts == [text0, text1] and text0 != text1
    assert ask()[1] == texts
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(template_ids(messages)),
                                                                            count0 + count1)


def test_chat_and_completions_share_the_batch(server):
    """Chat and completions requests decoded side by side through 4 rows: each gets what it gets alone."""
    c = client(server)
    names = ["stop", "length", "multi-turn"] * 3
    expected_completion = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20,
                                               temperature=0).choices[0].text

    def chat(name: str) -> str:
        return c.chat.completions.create(model=MODEL, messages=CONVERSATIONS[name], max_tokens=30,
                                         temperature=0).choices[0].message.content

    def complete(_) -> str:
        return c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20,
                                    temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        chats = list(pool.map(chat, names))
        completions = list(pool.map(complete, range(4)))
    assert chats == [reference_text(name) for name in names]
    assert completions == [expected_completion] * 4


@pytest.mark.parametrize("body, status, fragment, param", [
    ({"model": MODEL}, 400, "'messages' must be a non-empty list", "messages"),
    ({"model": MODEL, "messages": []}, 400, "'messages' must be a non-empty list", "messages"),
    ({"model": MODEL, "messages": ["hi"]}, 400, "'messages[0]' must be an object", "messages[0]"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "'messages[0].role' must be one of",
     "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "'messages[0].content' must be a string",
     "messages[0].content"),
    ({"model": MODEL, "messages": [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 400,
     "'messages[1].content' must be a string", "messages[1].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, 400,
     "'messages[0].tool_calls' is not supported", "messages[0].tool_calls"),
    (b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800"}]}' % MODEL.encode(), 400,
     "'messages[0].content' is not valid Unicode", "messages[0].content"),
    ({"model": MODEL, "messages": CONVERSATIONS["stop"], "max_tokens": 0}, 400, "'max_tokens' must be at least 1",
     "max_tokens"),
    ({"model": MODEL, "messages": CONVERSATIONS["stop"], "max_completion_tokens": 0}, 400,
     "'max_completion_tokens' must be at least 1", "max_completion_tokens"),
    ({"model": MODEL, "messages": CONVERSATIONS["stop"], "max_completion_tokens": 1000}, 400,
     "fit the context of 256 tokens", "max_completion_tokens"),
    ({"model": MODEL, "messages": CONVERSATIONS["stop"], "max_tokens": 5, "max_completion_tokens": 6}, 400,
     "differ", "max_tokens"),
    ({"model": MODEL, "messages": CONVERSATIONS["stop"], "temperature": -1}, 400, "temperature", "temperature"),
    ({"model": MODEL, "messages": CONVERSATIONS["stop"], "prompt": "hi"}, 400, "unrecognized request argument(s): "
     "prompt", "prompt"),
    ({"model": MODEL, "messages": CONVERSATIONS["stop"], "logprobs": True}, 400, "unrecognized", "logprobs"),
    ({"model": MODEL, "messages": CONVERSATIONS["stop"], "user": 7}, 400, "'user' must be str", "user"),
    ({"model": "gpt-4o", "messages": CONVERSATIONS["stop"]}, 404, "does not exist here", "model"),
])
def test_bad_requests_get_openai_error_bodies(server, body, status, fragment, param):
    """Each gets its OpenAI error body naming the field, before any work; the next request is served."""
    code, payload = raw(server, body)
    assert code == status and fragment in payload["error"]["message"], payload
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["param"] == param
    result = client(server).chat.completions.create(model=MODEL, messages=CONVERSATIONS["length"], max_tokens=5,
                                                    temperature=0)
    assert result.choices[0].message.content == reference_text("length", 5)


def test_a_template_that_refuses_the_conversation_is_a_400_with_its_message(server):
    """Mistral's template (raise_exception for roles that do not alternate, and for other roles) served over
    the same model: its messages come back as 400s; a conversation it accepts gets transformers' greedy reply on
    transformers' ids for that template."""
    from starlette.testclient import TestClient

    from minhub.serve import create_app

    tokenizer = REFERENCE["tokenizer"]
    model = minhub.from_pretrained(MODEL)
    template = ChatTemplate(MISTRAL_TEMPLATE, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    app = create_app(model, minhub.tokenizer_from_pretrained(MODEL), "mistral-style", max_batch=2,
                     eos_token_id=model.config.eos_token_id, chat_template=template)
    user = {"role": "user", "content": "Hello"}
    with TestClient(app) as http:
        for messages, message in [([user, user], "Conversation roles must alternate user/assistant/user/assistant"),
                                  ([user, SYSTEM], "Only user and assistant roles are supported!")]:
            response = http.post("/v1/chat/completions", json={"model": "mistral-style", "messages": messages})
            assert response.status_code == 400
            error = response.json()["error"]
            assert message in error["message"] and error["param"] == "messages"
        response = http.post("/v1/chat/completions", json={"model": "mistral-style", "messages": [user],
                                                           "max_tokens": 20, "temperature": 0})
    ids = template_ids([user], chat_template=MISTRAL_TEMPLATE)
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.encode("[", add_special_tokens=False)[0]]
    new, finish = greedy_reference(REFERENCE["model"], ids, 20, stop_ids("llama", tokenizer))
    choice = response.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == \
        (tokenizer.decode(new, skip_special_tokens=True), finish)
    assert response.json()["usage"]["prompt_tokens"] == len(ids)


@pytest.fixture(scope="module")
def no_template_repo():
    """A Llama checkpoint without a chat template (a base model), in the cache as tests/chat-base."""
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), "llama", seed=1)
        (Path(tmp) / "chat_template.jinja").unlink()
        assert "chat_template" not in json.loads((Path(tmp) / "tokenizer_config.json").read_text())
        put_in_hub_cache("tests/chat-base", Path(tmp))
    return "tests/chat-base"


def test_a_model_without_a_chat_template_answers_chat_with_a_400(no_template_repo):
    """build_app finds no template: /v1/chat/completions says so (OpenAI's error body); completions still work."""
    from starlette.testclient import TestClient

    with TestClient(build_app(no_template_repo, max_batch=2)) as http:
        response = http.post("/v1/chat/completions", json={"model": no_template_repo,
                                                           "messages": CONVERSATIONS["stop"]})
        assert response.status_code == 400
        error = response.json()["error"]
        assert "has no chat template" in error["message"] and "/v1/completions" in error["message"]
        assert error["type"] == "invalid_request_error"
        response = http.post("/v1/completions", json={"model": no_template_repo, "prompt": "Hello", "max_tokens": 3})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1


# --------------------------------------------------------------------------------------------------------------------
# minhub chat


def expected_conversation(repo: str, turns: list[str], system: str | None, max_new_tokens: int) -> list[str]:
    """Each reply as minhub.generate makes it greedily on the templated ids of the conversation so far (the earlier
    replies in it), stopped at the model's EOS ids; the ids checked against transformers' apply_chat_template."""
    model, tokenizer = minhub.from_pretrained(repo), minhub.tokenizer_from_pretrained(repo)
    template, stops = chat_template_from_pretrained(repo), model.config.eos_token_id
    messages, replies = [{"role": "system", "content": system}] if system else [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        ids = chat_ids(tokenizer, template, messages)
        assert ids == template_ids(messages, REFERENCE["tokenizer"])
        new = minhub.generate(model, torch.tensor([ids]), max_new_tokens, temperature=0,
                              eos_token_id=stops)[0, len(ids):].tolist()
        replies.append(tokenizer.decode([t for t in new if t not in stops]))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


@pytest.mark.parametrize("system", [None, "You are a terse assistant."])
def test_cli_chat_streams_each_greedy_reply(repo, system, monkeypatch, capsys):
    """Two user turns on stdin: each reply is printed on its line, the second continuing the conversation that
    holds the first reply."""
    from minhub.cli import main

    turns = ["Hello", "Tell me a story."]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(turn + "\n" for turn in turns)))
    options = ["--system", system] if system else []
    assert main(["chat", MODEL, "--temperature", "0", "--max-new-tokens", "30", *options]) == 0
    replies = expected_conversation(MODEL, turns, system, 30)
    assert capsys.readouterr().out == "".join(reply + "\n" for reply in replies)
    assert len(set(replies)) == 2 and all(replies)


def test_cli_chat_stops_at_exit(repo, monkeypatch, capsys):
    from minhub.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\n/exit\nTell me a story.\n"))
    assert main(["chat", MODEL, "--temperature", "0", "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out == expected_conversation(MODEL, ["Hello"], None, 30)[0] + "\n"


def test_cli_chat_without_a_chat_template_is_one_line(no_template_repo, monkeypatch, capsys):
    from minhub.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", no_template_repo]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "has no chat template" in captured.err and "minhub generate" in captured.err
