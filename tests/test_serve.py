"""`minhub serve`: the real server (uvicorn) on a free loopback port, called with the official `openai` client and
with raw HTTP.

The reference is independent of minhub: the server serves the weights of a transformers GPT2LMHeadModel, and that
model itself (greedy = the argmax of its logits, log-probabilities = the log_softmax of its logits, EOS = its
config's eos_token_id) says what every completion, finish reason and log-probability must be, alone and under
continuous batching. The GPT4 run is checked against x-transformers (the reference of tests/test_gpt4.py)."""

import concurrent.futures
import contextlib
import copy
import functools
import http.client
import json
import time

import pytest
import torch
from helpers import TOKENIZER_DIR, hf_gpt2, hub_checkpoint, put_in_hub_cache

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
tokenizers = pytest.importorskip("tokenizers")

from minhub.serve import BackgroundServer, build_app  # noqa: E402

MODEL = "tests/serve-gpt2"
EOS = 50256
TOL = 1e-4  # the server's log-probabilities against transformers' log_softmax
REFERENCE = {}  # "model": the transformers GPT2LMHeadModel whose weights the server serves
SCHEDULER = {}  # the running app's model thread, for the tests that look at its rows
TOKENIZER = tokenizers.Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))  # the file the server is given
PROMPTS = ["The meaning of life is", "Once upon a time", "Hello", "In the beginning God created the heaven",
           "A", "Three rings for the elven kings under the sky, seven for", "The end"]
NO_EOS = PROMPTS[0]  # transformers' greedy path has no EOS in its first 30 tokens
EOS_AFTER_9 = PROMPTS[3]  # transformers' greedy path is 9 tokens, then EOS (both checked where they matter)


@pytest.fixture(scope="module")
def server():
    """The app on 127.0.0.1:<free port>, max batch 4, API key 'secret'; stopped after the module.

    It serves a random transformers GPT-2 (kept in REFERENCE) whose EOS row of the tied embedding is scaled by 8, so
    that greedy decoding reaches EOS after a few tokens on some prompts and not on others."""
    model = hf_gpt2(seed=3, vocab_size=50257, n_embd=32, n_head=2, n_layer=2, n_positions=64, bos_token_id=EOS,
                    eos_token_id=EOS, std=0.5)
    with torch.no_grad():
        model.transformer.wte.weight[EOS] *= 8  # lm_head is tied to it: EOS's logit is scaled by 8
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    REFERENCE["model"] = model
    hub_checkpoint(MODEL, model, tokenizer=True)
    app = build_app(MODEL, max_batch=4, api_key="secret")
    SCHEDULER["it"] = app.state.scheduler
    with BackgroundServer(app) as running:
        yield running.port


@contextlib.contextmanager
def one_thread():
    """The reference models are tiny: on a busy 2-core machine one thread runs them ten times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_logprobs(ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits for `ids` (T, vocab): row t scores the token after ids[:t + 1]."""
    with torch.no_grad(), one_thread():
        return REFERENCE["model"](torch.tensor([ids])).logits[0].log_softmax(-1)


@functools.lru_cache(maxsize=None)
def reference(prompt: str, max_tokens: int) -> tuple[list[int], torch.Tensor, str]:
    """transformers' greedy continuation of `prompt`, ended as the server must end it: (the new ids, EOS left out;
    the log_softmax rows they were chosen from, one per id plus one for EOS if it came; the finish reason)."""
    ids = TOKENIZER.encode(prompt).ids
    new, rows = [], []
    for _ in range(max_tokens):
        rows.append(reference_logprobs(ids + new)[-1])
        token = int(rows[-1].argmax())
        if token == EOS:
            return new, torch.stack(rows), "stop"
        new.append(token)
    return new, torch.stack(rows), "length"


def reference_text(prompt: str, max_tokens: int) -> str:
    return TOKENIZER.decode(reference(prompt, max_tokens)[0])


def client(port: int, **kwargs):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0, timeout=60,
                         **kwargs)


def raw(port: int, method: str, path: str, body=None, headers=None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Authorization": "Bearer secret",
                                                        "Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read() or b"{}")
    connection.close()
    return status, payload


def test_greedy_completions_and_finish_reasons_equal_transformers(server):
    """Reference: transformers' greedy tokens and where they end: "length" at max_tokens, "stop" at EOS (left out
    of the text and of the usage), including max_tokens one short of EOS and exactly at it."""
    c = client(server)
    ids, _, finish = reference(NO_EOS, 20)
    assert finish == "length" and len(ids) == 20  # what the fixture is built for
    result = c.completions.create(model=MODEL, prompt=NO_EOS, max_tokens=20, temperature=0)
    prompt_tokens = len(TOKENIZER.encode(NO_EOS).ids)
    assert (result.choices[0].text, result.choices[0].finish_reason) == (TOKENIZER.decode(ids), "length")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == \
        (prompt_tokens, 20, prompt_tokens + 20)
    ids, _, finish = reference(EOS_AFTER_9, 30)
    assert finish == "stop" and len(ids) == 9  # what the fixture is built for
    for max_tokens, expected in [(30, "stop"), (10, "stop"), (9, "length"), (5, "length")]:
        result = c.completions.create(model=MODEL, prompt=EOS_AFTER_9, max_tokens=max_tokens, temperature=0)
        assert result.choices[0].finish_reason == expected == reference(EOS_AFTER_9, max_tokens)[2], max_tokens
        assert result.choices[0].text == TOKENIZER.decode(ids[:max_tokens]), max_tokens
        assert result.usage.completion_tokens == min(9, max_tokens), max_tokens


def test_streaming_gives_the_same_text_and_finish_reason(server):
    """Reference: transformers' greedy text and finish reason, on the last chunk only."""
    c = client(server)
    for prompt in (PROMPTS[1], EOS_AFTER_9, PROMPTS[5]):
        ids, _, finish = reference(prompt, 25)
        chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=25, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == TOKENIZER.decode(ids)
        assert [ch.choices[0].finish_reason for ch in chunks] == [None] * (len(chunks) - 1) + [finish]
    assert [reference(p, 25)[2] for p in (PROMPTS[1], EOS_AFTER_9, PROMPTS[5])] == ["length", "stop", "stop"]
    stream = c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=25, temperature=0, stream=True,
                                  stream_options={"include_usage": True})
    *chunks, last = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks) == reference_text(PROMPTS[1], 25)
    prompt_tokens = len(TOKENIZER.encode(PROMPTS[1]).ids)
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_tokens, 25)
    assert last.usage.total_tokens == prompt_tokens + 25


def test_logprobs_are_the_log_softmax_of_transformers_logits(server):
    """Reference: log_softmax of transformers' logits at each greedy step, for the chosen token (token_logprobs)
    and the 5 most likely (top_logprobs, keyed by decoded text as the server writes them), within 1e-4; three
    prompts of different lengths decoded side by side, one of them ended by EOS."""
    prompts = [NO_EOS, PROMPTS[2], PROMPTS[5]]
    result = client(server).completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0, logprobs=5)
    choices = sorted(result.choices, key=lambda ch: ch.index)
    assert [reference(p, 8)[2] for p in prompts] == ["length", "length", "stop"]
    for prompt, choice in zip(prompts, choices):
        ids, rows, finish = reference(prompt, 8)
        assert (choice.text, choice.finish_reason) == (TOKENIZER.decode(ids), finish)
        lp = choice.logprobs
        assert lp.tokens == [TOKENIZER.decode([i]) for i in ids]
        assert lp.token_logprobs == pytest.approx([float(rows[t, i]) for t, i in enumerate(ids)], abs=TOL, rel=0)
        assert lp.text_offset == [len(TOKENIZER.decode(ids[:t])) for t in range(len(ids))]
        assert len(lp.top_logprobs) == len(ids)
        for t, top in enumerate(lp.top_logprobs):
            values, top_ids = rows[t].topk(5)
            expected = {TOKENIZER.decode([i]): v for i, v in zip(top_ids.tolist(), values.tolist())}
            assert top.keys() == expected.keys()
            assert top == pytest.approx(expected, abs=TOL, rel=0)


def check_sampled(prompt: str, choice, top_k: int, max_tokens: int) -> list[int]:
    """A sampled choice against transformers: every token is one of its `top_k` most likely there, with the
    log-probability its log_softmax gives (within 1e-4); "stop" only where EOS is among them; the ids."""
    ids, lp = TOKENIZER.encode(prompt).ids, choice.logprobs
    new = []
    for token, logprob in zip(lp.tokens, lp.token_logprobs):
        row = reference_logprobs(ids + new)[-1]
        candidates = [i for i in row.topk(top_k).indices.tolist() if TOKENIZER.decode([i]) == token]
        assert candidates, f"{token!r} is not among transformers' {top_k} most likely tokens"
        best = min(candidates, key=lambda i: abs(float(row[i]) - logprob))
        assert logprob == pytest.approx(float(row[best]), abs=TOL, rel=0)
        new.append(best)
    assert choice.text == TOKENIZER.decode(new)
    if choice.finish_reason == "length":
        assert len(new) == max_tokens
    else:
        assert choice.finish_reason == "stop" and len(new) < max_tokens
        assert EOS in reference_logprobs(ids + new)[-1].topk(top_k).indices.tolist()
    return new


def test_n_sampled_choices_differ_and_a_seed_repeats_them(server):
    """n=3 with a seed: three different choices, the same three again for the same request. Each token (seeded or
    not) is checked against transformers: among its top_k, with its log_softmax as logprob."""
    c = client(server)

    def ask(**kwargs):
        result = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, n=3, temperature=1.0, logprobs=0,
                                      extra_body={"top_k": 5}, **kwargs)
        assert sorted(ch.index for ch in result.choices) == [0, 1, 2]
        return sorted(result.choices, key=lambda ch: ch.index)

    seeded = ask(seed=7)
    ids = [check_sampled(PROMPTS[2], ch, 5, 8) for ch in seeded]
    assert len({tuple(i) for i in ids}) == 3, "the n choices of one seeded request are the same"
    assert all(top is None for ch in seeded for top in ch.logprobs.top_logprobs)  # logprobs=0: no alternatives
    again = ask(seed=7)
    assert [(ch.text, ch.logprobs.token_logprobs, ch.finish_reason) for ch in again] == \
        [(ch.text, ch.logprobs.token_logprobs, ch.finish_reason) for ch in seeded]
    for ch in ask():  # no seed: docs/serving.md promises nothing about repetition, only top_k and the format
        check_sampled(PROMPTS[2], ch, 5, 8)


def test_a_list_of_prompts_echo_and_a_stop_string(server):
    """Reference: transformers' greedy texts (echoed after their prompts); a stop string cuts the text before it,
    with finish_reason "stop"."""
    c = client(server)
    result = c.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=10, temperature=0, echo=True)
    assert [(ch.text, ch.finish_reason) for ch in sorted(result.choices, key=lambda ch: ch.index)] == \
        [(p + reference_text(p, 10), reference(p, 10)[2]) for p in PROMPTS[:3]]
    ids, _, finish = reference(NO_EOS, 30)
    full = TOKENIZER.decode(ids)
    assert finish == "length"
    offsets = [len(TOKENIZER.decode(ids[:k])) for k in range(len(ids))]
    k = next(k for k in range(3, len(ids)) if full.index(full[offsets[k]:offsets[k] + 4]) == offsets[k])
    before, stop = full[:offsets[k]], full[offsets[k]:offsets[k] + 4]  # the first place it is found: a token start
    assert before == TOKENIZER.decode(ids[:k]) and len(stop) == 4
    result = c.completions.create(model=MODEL, prompt=NO_EOS, max_tokens=30, temperature=0, stop=stop)
    assert (result.choices[0].text, result.choices[0].finish_reason) == (before, "stop")
    chunks = list(c.completions.create(model=MODEL, prompt=NO_EOS, max_tokens=30, temperature=0, stop=[stop, "zzz"],
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == before and chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_clients_get_what_each_gets_alone(server):
    """16 clients x 10 requests, streaming and not, through 4 batch rows: each gets transformers' greedy text and
    finish reason (some prompts end at EOS, some at max_tokens); nothing lost or mixed up."""
    expected = {p: (reference_text(p, 12), reference(p, 12)[2], len(reference(p, 12)[0])) for p in PROMPTS}
    assert {finish for _, finish, _ in expected.values()} == {"length", "stop"}

    def one_client(k: int) -> list[tuple]:
        c = client(server)
        got = []
        for r in range(10):
            prompt = PROMPTS[(k + r) % len(PROMPTS)]
            if (k + r) % 2:
                chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
                got.append((prompt, "".join(ch.choices[0].text for ch in chunks[:-1]),
                            chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens))
            else:
                result = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
                got.append((prompt, result.choices[0].text, result.choices[0].finish_reason,
                            result.usage.completion_tokens))
        return got

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = [item for got in pool.map(one_client, range(16)) for item in got]
    assert len(results) == 160
    for prompt, *answer in results:
        assert tuple(answer) == expected[prompt], prompt


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' must be at least 1"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 100}, 400, "fit the context of 64 tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 2}, 400, "top_p"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "'max_tokens' must be int"),
    ({"model": MODEL, "prompt": 42}, 400, "'prompt' must be a string"),
    ({"model": MODEL, "prompt": "hi", "frobnicate": 1}, 400, "unrecognized request argument(s): frobnicate"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "does not exist here"),
    (b"[" * 100000, 400, "not valid JSON"),  # nesting past Python's recursion limit
    (b'{"model": "%s", "prompt": "hi", "max_tokens": %s}' % (MODEL.encode(), b"9" * 5000), 400, "not valid JSON"),
    (b'{"model": "%s", "prompt": "a\\ud800b"}' % MODEL.encode(), 400, "a prompt is not valid Unicode"),
    (b'{"model": "%s", "prompt": "hi", "\\ud800": 1}' % MODEL.encode(), 400, "unrecognized request argument(s)"),
    ({"model": MODEL, "prompt": "hi", "temperature": 10**400}, 400, "temperature must be a finite number"),
    ({"model": MODEL, "prompt": "hi", "seed": 2**64}, 400, "'seed' must be in [-2**63, 2**63 - n]"),
    ({"model": MODEL, "prompt": "hi", "seed": 2**63 - 1, "n": 2}, 400, "'seed' must be in"),
    ({"model": MODEL, "prompt": "hi", "seed": -2**63 - 1}, 400, "'seed' must be in"),
])
def test_bad_requests_get_openai_error_bodies(server, body, status, fragment):
    """Each gets its OpenAI error body before any work, and the next request is served as transformers decodes."""
    code, payload = raw(server, "POST", "/v1/completions", body)
    assert code == status and fragment in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"
    result = client(server).completions.create(model=MODEL, prompt=NO_EOS, max_tokens=5, temperature=0)
    assert result.choices[0].text == reference_text(NO_EOS, 5)


@pytest.mark.parametrize("setting", [{"temperature": 1e-300}, {"temperature": 1e-45}, {"top_p": 1e-300},
                                     {"top_p": 1e-46}])
def test_vanishing_temperature_or_top_p_samples_the_greedy_token(server, setting):
    """As temperature -> 0 (or top_p -> 0) sampling becomes greedy decoding: the reference is transformers' greedy
    text; the server keeps serving afterwards (such a request once left every later completion failing)."""
    for _ in range(2):
        result = client(server).completions.create(model=MODEL, prompt=NO_EOS, max_tokens=8, seed=1, **setting)
        assert result.choices[0].text == reference_text(NO_EOS, 8)


def test_api_key_models_and_health(server):
    code, payload = raw(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert code == 401 and "API key" in payload["error"]["message"]
    code, payload = raw(server, "GET", "/v1/models")
    assert code == 200 and payload["data"][0]["id"] == MODEL
    assert raw(server, "GET", "/health", headers={"Authorization": ""}) == (200, {"status": "ok"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="nope", max_retries=0).completions.create(
            model=MODEL, prompt="hi", max_tokens=2)


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, monkeypatch):
    """The row leaves the batch before max_tokens; the next request still gets transformers' greedy text."""
    scheduler = SCHEDULER["it"]
    step = scheduler._step

    def slow_step():  # 60 tokens take over a second: long enough to see the row leave early
        time.sleep(0.02)
        step()

    monkeypatch.setattr(scheduler, "_step", slow_step)
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"model": MODEL, "prompt": "Hello", "max_tokens": 60, "temperature": 0, "stream": True}),
        headers={"Authorization": "Bearer secret", "Content-Type": "application/json"})
    response = connection.getresponse()
    response.fp.readline()  # the first chunk has come: the row is decoding
    row = next(row for row in scheduler.rows if row is not None and row.max_tokens == 60)
    connection.sock.close()
    connection.close()
    hang_guard = time.monotonic() + 60  # a bound, not a speed requirement: the assertion below is the check
    while any(r is row for r in scheduler.rows):
        assert time.monotonic() < hang_guard, "the row of a client that went away is still decoding"
        time.sleep(0.01)
    assert row.cancelled and len(row.generated) < 60
    result = client(server).completions.create(model=MODEL, prompt="A", max_tokens=3, temperature=0)
    assert result.choices[0].text == reference_text("A", 3)


def test_a_seeded_request_samples_the_same_alone_and_beside_others(server):
    """As docs/serving.md promises: a seeded request's sample does not depend on the other rows of the batch."""
    def ask(prompt: str, seed: int) -> str:
        return client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=0.9,
                                                 seed=seed, extra_body={"top_k": 40}).choices[0].text

    alone = ask(PROMPTS[5], 11)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        crowd = [pool.submit(ask, PROMPTS[i % len(PROMPTS)], 100 + i) for i in range(5)]
        beside = pool.submit(ask, PROMPTS[5], 11)
        [f.result() for f in crowd]
    assert beside.result() == alone


def test_a_gpt4_run_is_served_in_batches_with_x_transformers_tokens(tmp_path):
    """The GPT4 decoder follows the contract (a padding mask, positions per row), so its rows share the batch.
    Reference: x-transformers' greedy generation (no cache) with the weights the server serves, each prompt alone."""
    x_transformers = pytest.importorskip("x_transformers")
    from helpers import x_transformers_gpt4
    from starlette.testclient import TestClient

    torch.manual_seed(0)
    net, ours = x_transformers_gpt4(num_tokens=50257, max_seq_len=40, dim=32, depth=2, dim_head=16, heads=4,
                                    alibi_num_heads=2)
    ours.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "tokenizer.json").write_bytes((TOKENIZER_DIR / "tokenizer.json").read_bytes())
    put_in_hub_cache("tests/serve-gpt4", tmp_path / "run")
    app = build_app("tests/serve-gpt4", max_batch=4)
    wrapper = x_transformers.AutoregressiveWrapper(net)
    with TestClient(app) as http, concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = pool.map(lambda prompt: http.post("/v1/completions", json={
            "model": "tests/serve-gpt4", "prompt": prompt, "max_tokens": 10, "temperature": 0}), PROMPTS[:3])
        for prompt, response in zip(PROMPTS[:3], responses):
            with one_thread():
                theirs = wrapper.generate(torch.tensor([TOKENIZER.encode(prompt).ids]), 10, temperature=0.0,
                                          cache_kv=False)
            assert response.status_code == 200
            assert response.json()["choices"][0]["text"] == TOKENIZER.decode(theirs[0].tolist())
            assert response.json()["choices"][0]["finish_reason"] == "length"


def test_cli_serve_refuses_a_bad_model_or_batch_in_one_line(capsys):
    from minhub.cli import main

    assert main(["serve", "nobody/missing"]) == 2
    assert "nobody/missing" in capsys.readouterr().err
    hub_checkpoint("tests/serve-cli", hf_gpt2(vocab_size=50257, n_embd=16, n_head=2, bos_token_id=50256,
                                              eos_token_id=50256), tokenizer=True)
    capsys.readouterr()  # transformers' save progress bar
    assert main(["serve", "tests/serve-cli", "--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch must be a positive integer" in err and len(err.strip().splitlines()) == 1


def test_the_server_takes_the_speed_path_of_minhub_generate():
    """fp32 weights keep the matmul plan's kernels (no packed copy: the plan measures oneDNN on the plain weight)."""
    from minhub import matmul

    hub_checkpoint("tests/serve-probe", hf_gpt2(vocab_size=50257, n_embd=16, n_head=2, bos_token_id=50256,
                                                eos_token_id=50256), tokenizer=True)
    model = build_app("tests/serve-probe", max_batch=2).state.scheduler.model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is matmul.CPULinear for m in linears)


@pytest.mark.parametrize("plan_name", ["blas", "minhub", "minhub one row + onednn"])
def test_a_bf16_server_decodes_transformers_bf16_tokens_under_every_plan(server, plan_name, monkeypatch):
    """bf16 weights stay unpacked, so the matmul plan's kernels decode the server's batch: each plan forced
    (tests/plans.py), three prompts decoded side by side (few rows) and one alone (one row). Reference: transformers
    with the model in bf16, token by token along its greedy path: the same token, with a log-probability within 2x
    the distance between its own bf16 and fp32 log-probabilities; a different token only at a near-tie (its top two
    within twice that), where the comparison of that choice ends."""
    from plans import force

    force(monkeypatch, plan_name)
    app = build_app(MODEL, max_batch=4, dtype="bfloat16")
    rounded = copy.deepcopy(REFERENCE["model"]).to(torch.bfloat16)
    with BackgroundServer(app) as running:
        c = client(running.port)
        batched = c.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=8, temperature=0, logprobs=1)
        alone = c.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=8, temperature=0, logprobs=1)
    for prompt, choice in zip(PROMPTS[:4], sorted(batched.choices, key=lambda ch: ch.index) + alone.choices):
        ids, new = TOKENIZER.encode(prompt).ids, []
        with torch.no_grad(), one_thread():
            for ours, ours_logprob in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs):
                full = torch.tensor([ids + new])
                theirs = rounded(full).logits[0, -1].float().log_softmax(-1)
                bound = 2 * (theirs - REFERENCE["model"](full).logits[0, -1].log_softmax(-1)).abs().max().item()
                top2 = theirs.topk(2)
                if ours != TOKENIZER.decode([int(top2.indices[0])]):
                    assert top2.values[0] - top2.values[1] <= 2 * bound, (prompt, new)
                    break
                assert ours_logprob == pytest.approx(float(top2.values[0]), abs=bound)
                new.append(int(top2.indices[0]))
            else:  # the whole choice followed transformers' path: it ends where transformers' does
                if len(new) < 8:
                    assert int(rounded(torch.tensor([ids + new])).logits[0, -1].argmax()) == EOS, prompt
                assert choice.finish_reason == ("length" if len(new) == 8 else "stop"), prompt


def expected_prompt_scores(ids: list[int], k: int) -> tuple[list, list, torch.Tensor]:
    """OpenAI's echo contract on transformers' logits: each prompt token's log_softmax given the ones before it, None
    for the first; the k most likely tokens there (keyed by decoded text), None for the first; and the rows."""
    rows = reference_logprobs(ids)
    logprobs = [None] + [float(rows[t - 1, ids[t]]) for t in range(1, len(ids))]
    tops = [None] + [{TOKENIZER.decode([i]): v for i, v in zip(rows[t - 1].topk(k).indices.tolist(),
                                                               rows[t - 1].topk(k).values.tolist())}
                     for t in range(1, len(ids))]
    return logprobs, tops, rows


def check_echoed_prompt(choice: dict, ids: list[int], k: int) -> None:
    """The first len(ids) entries of the choice's logprobs score the prompt as transformers does (within 1e-4)."""
    lp, P = choice["logprobs"], len(ids)
    logprobs, tops, _ = expected_prompt_scores(ids, k)
    assert lp["tokens"][:P] == [TOKENIZER.decode([i]) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:P] == pytest.approx(logprobs[1:], abs=TOL, rel=0)
    for top, expected in zip(lp["top_logprobs"][1:P], tops[1:]):
        assert top.keys() == expected.keys() and top == pytest.approx(expected, abs=TOL, rel=0)
    assert lp["text_offset"][:P] == [len(TOKENIZER.decode(ids[:t])) for t in range(P)]


def test_echo_with_logprobs_scores_the_prompt_as_transformers(server):
    """The scoring contract of OpenAI's completions (what lm-eval's local-completions reads): with echo and logprobs,
    every prompt token's log-probability (None for the first) and top_logprobs, then the generated tokens'. Prompts
    as text, as token ids and as lists of them; max_tokens 1 (a generated token last) and 0 (the prompt alone).
    Reference: log_softmax of transformers' logits."""
    texts = [NO_EOS, PROMPTS[5], "caf\u00e9 \u00e9t\u00e9 \u2014 na\u00efve"]  # characters split over byte tokens
    encoded = [TOKENIZER.encode(text).ids for text in texts]
    for prompt in (texts, encoded, encoded[1]):
        for max_tokens in (1, 0):
            status, payload = raw(server, "POST", "/v1/completions", {
                "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "logprobs": 2, "echo": True,
                "temperature": 0})
            assert status == 200, payload
            ids_list = encoded if isinstance(prompt[0], (str, list)) else [prompt]
            choices = sorted(payload["choices"], key=lambda c: c["index"])
            assert len(choices) == len(ids_list)
            for choice, ids in zip(choices, ids_list):
                check_echoed_prompt(choice, ids, 2)
                lp, new = choice["logprobs"], reference(TOKENIZER.decode(ids), 1)[0][:max_tokens]
                assert len(lp["tokens"]) == len(ids) + max_tokens
                assert choice["text"] == TOKENIZER.decode(ids) + TOKENIZER.decode(new)
                assert choice["finish_reason"] == "length"
                if max_tokens:
                    assert lp["token_logprobs"][-1] == pytest.approx(
                        float(reference_logprobs(ids)[-1].max()), abs=TOL, rel=0)
                    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # greedy, exactly
                    assert lp["text_offset"][-1] == len(TOKENIZER.decode(ids))
            if max_tokens == 0:
                assert payload["usage"]["completion_tokens"] == 0


def test_echo_with_logprobs_keeps_the_eos_that_ended_a_choice(server):
    """A scoring client drops the last token of the logprobs (the generated one): when EOS ends the choice, it is
    there too (not in the text), with transformers' log-probability."""
    ids = TOKENIZER.encode(EOS_AFTER_9).ids
    new, rows, finish = reference(EOS_AFTER_9, 30)
    assert finish == "stop" and len(new) == 9
    status, payload = raw(server, "POST", "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 30,
                                                               "logprobs": 1, "echo": True, "temperature": 0})
    choice = payload["choices"][0]
    assert status == 200 and choice["finish_reason"] == "stop"
    assert choice["text"] == EOS_AFTER_9 + TOKENIZER.decode(new)
    check_echoed_prompt(choice, ids, 1)
    lp = choice["logprobs"]
    assert lp["tokens"][len(ids):] == [TOKENIZER.decode([i]) for i in new] + ["<|endoftext|>"]
    assert lp["token_logprobs"][len(ids):] == pytest.approx(
        [float(rows[t, i]) for t, i in enumerate(new + [EOS])], abs=TOL, rel=0)


def test_echo_alone_streams_and_the_openai_client_scores_token_ids(server):
    c = client(server)
    ids = TOKENIZER.encode(PROMPTS[1]).ids
    result = c.completions.create(model=MODEL, prompt=[ids, ids[:2]], echo=True, max_tokens=0, logprobs=0)
    assert [ch.text for ch in sorted(result.choices, key=lambda ch: ch.index)] == \
        [PROMPTS[1], TOKENIZER.decode(ids[:2])]
    assert result.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        expected_prompt_scores(ids, 1)[0][1:], abs=TOL, rel=0)
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[1], echo=True, max_tokens=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == PROMPTS[1]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_retrieve(server):
    c = client(server)
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")


def test_a_prompt_scored_in_chunks_scores_the_same(server, monkeypatch):
    """A scored prompt runs into the cache a bounded number of positions at a time (here 4): the same scores, and
    the same greedy tokens after it, beside a row that decodes meanwhile."""
    from minhub import serve

    monkeypatch.setattr(serve, "PREFILL_CHUNK", 4)
    ids = TOKENIZER.encode(PROMPTS[5]).ids
    assert len(ids) > 3 * 4
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        beside = pool.submit(client(server).completions.create, model=MODEL, prompt=NO_EOS, max_tokens=20,
                             temperature=0)
        status, payload = raw(server, "POST", "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 3,
                                                                   "logprobs": 3, "echo": True, "temperature": 0})
        assert beside.result(timeout=60).choices[0].text == reference_text(NO_EOS, 20)
    assert status == 200
    check_echoed_prompt(payload["choices"][0], ids, 3)
    assert payload["choices"][0]["text"] == PROMPTS[5] + reference_text(PROMPTS[5], 3)


def test_the_served_context_is_capped_and_a_request_past_it_is_a_400(server, caplog):
    """A 128k-context model would hold 128k cache slots a row from the start: the server serves at most
    SERVED_CONTEXT tokens unless --context says otherwise, and refuses a request past what it serves."""
    from minhub.serve import SERVED_CONTEXT, serving_context

    assert serving_context(131072, None) == SERVED_CONTEXT and "of the model's 131072" in caplog.text
    assert serving_context(1024, None) == 1024 and serving_context(1024, 100) == 100
    with pytest.raises(ValueError, match="--context 2000 is more than the model's context of 1024"):
        serving_context(1024, 2000)
    with pytest.raises(ValueError, match="--context must be a positive integer"):
        build_app(MODEL, context=0)
    app = build_app(MODEL, max_batch=2, context=16)  # the model's own is 64
    with BackgroundServer(app) as running:
        ids = TOKENIZER.encode(PROMPTS[0]).ids
        status, body = raw(running.port, "POST", "/v1/completions",
                           {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 17 - len(ids), "temperature": 0})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
        assert "the context of 16 tokens" in body["error"]["message"]
        status, body = raw(running.port, "POST", "/v1/completions",
                           {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 16 - len(ids), "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == reference_text(PROMPTS[0], 16 - len(ids))
    assert app.state.scheduler.caches[0].k.shape[2] == 16
