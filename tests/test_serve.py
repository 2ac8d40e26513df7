"""`minhub serve`: the real server (uvicorn) on a free loopback port, called with the official `openai` client and
with raw HTTP. Greedy completions equal minhub.generate, alone and under continuous batching."""

import concurrent.futures
import http.client
import json
import time

import pytest
import torch
from helpers import hf_gpt2, hub_checkpoint

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from minhub import generate, gpt2_from_pretrained, tokenizer_from_pretrained  # noqa: E402
from minhub.serve import BackgroundServer, build_app  # noqa: E402

MODEL = "tests/serve-gpt2"
SCHEDULER = {}  # the running app's model thread, for the tests that look at its rows
PROMPTS = ["The meaning of life is", "Once upon a time", "Hello", "In the beginning God created the heaven",
           "A", "Three rings for the elven kings under the sky, seven for"]


@pytest.fixture(scope="module")
def server():
    """The app on 127.0.0.1:<free port>, max batch 4, API key 'secret'; stopped after the module."""
    hub_checkpoint(MODEL, hf_gpt2(seed=3, vocab_size=50257, n_embd=32, n_head=2, n_layer=2, n_positions=64,
                                  bos_token_id=50256, eos_token_id=50256, std=0.5), tokenizer=True)
    app = build_app(MODEL, max_batch=4, api_key="secret")
    SCHEDULER["it"] = app.state.scheduler
    with BackgroundServer(app) as running:
        yield running.port


def client(port: int, **kwargs):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0, timeout=60,
                         **kwargs)


def expected_greedy(prompt: str, max_tokens: int) -> str:
    model, tokenizer = gpt2_from_pretrained(MODEL), tokenizer_from_pretrained(MODEL)
    idx = torch.tensor([tokenizer.encode(prompt).ids])
    out = generate(model, idx, max_tokens, temperature=0, eos_token_id=50256)[0, idx.size(1):].tolist()
    out = out[:out.index(50256)] if 50256 in out else out
    return tokenizer.decode(out)


def raw(port: int, method: str, path: str, body=None, headers=None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Authorization": "Bearer secret",
                                                        "Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read() or b"{}")
    connection.close()
    return status, payload


def test_greedy_completions_equal_generate(server):
    result = client(server).completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    assert result.choices[0].text == expected_greedy(PROMPTS[0], 20)
    tokens = len(tokenizer_from_pretrained(MODEL).encode(PROMPTS[0]).ids)
    assert result.usage.prompt_tokens == tokens
    assert result.usage.total_tokens == tokens + result.usage.completion_tokens
    assert result.choices[0].finish_reason in ("length", "stop")


def test_streaming_gives_the_same_text(server):
    stream = client(server).completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=25, temperature=0,
                                               stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected_greedy(PROMPTS[1], 25)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    stream = client(server).completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=25, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
    *chunks, last = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected_greedy(PROMPTS[1], 25)
    prompt_tokens = len(tokenizer_from_pretrained(MODEL).encode(PROMPTS[1]).ids)
    assert last.choices == [] and last.usage.prompt_tokens == prompt_tokens
    assert last.usage.total_tokens == prompt_tokens + last.usage.completion_tokens


def test_a_list_of_prompts_echo_stop_n_and_logprobs(server):
    c = client(server)
    result = c.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=10, temperature=0, echo=True)
    assert [ch.text for ch in sorted(result.choices, key=lambda ch: ch.index)] == \
        [p + expected_greedy(p, 10) for p in PROMPTS[:3]]
    full = expected_greedy(PROMPTS[3], 30)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    if stop.strip():
        result = c.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=30, temperature=0, stop=stop)
        assert result.choices[0].text == full[:full.index(stop)] and result.choices[0].finish_reason == "stop"
    sampled = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, n=3, seed=7, temperature=1.0)
    again = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, n=3, seed=7, temperature=1.0)
    assert [ch.text for ch in sampled.choices] == [ch.text for ch in again.choices] and len(sampled.choices) == 3
    scored = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2)
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 5 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) == 2 and max(top.values()) >= lp - 1e-6
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))


def test_concurrent_clients_get_what_each_gets_alone(server):
    """16 clients x 10 requests, streaming and not, through 4 batch rows: nothing lost or mixed up."""
    expected = {p: expected_greedy(p, 12) for p in PROMPTS}

    def one_client(k: int) -> list[bool]:
        c = client(server)
        ok = []
        for r in range(10):
            prompt = PROMPTS[(k + r) % len(PROMPTS)]
            if (k + r) % 2:
                text = "".join(ch.choices[0].text for ch in c.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
            else:
                result = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
                text = result.choices[0].text
                ok.append(result.usage.completion_tokens == 12 or result.choices[0].finish_reason == "stop")
            ok.append(text == expected[prompt])
        return ok

    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one_client, range(16)))
    assert all(all(r) for r in results) and sum(len(r) for r in results) == 240
    assert time.time() - start < 240


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
])
def test_bad_requests_get_openai_error_bodies(server, body, status, fragment):
    code, payload = raw(server, "POST", "/v1/completions", body)
    assert code == status and fragment in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"


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
    deadline = time.time() + 10
    while any(r is row for r in scheduler.rows):
        assert time.time() < deadline, "the row of a client that went away is still decoding"
        time.sleep(0.01)
    assert row.cancelled and len(row.generated) < 60
    result = client(server).completions.create(model=MODEL, prompt="A", max_tokens=3, temperature=0)
    assert result.choices[0].text == expected_greedy("A", 3)


def test_a_seeded_request_samples_the_same_alone_and_beside_others(server):
    def ask(prompt: str, seed: int) -> str:
        return client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=0.9,
                                                 seed=seed, extra_body={"top_k": 40}).choices[0].text

    alone = ask(PROMPTS[5], 11)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        crowd = [pool.submit(ask, PROMPTS[i % len(PROMPTS)], 100 + i) for i in range(5)]
        beside = pool.submit(ask, PROMPTS[5], 11)
        [f.result() for f in crowd]
    assert beside.result() == alone


def test_a_gpt4_run_is_served_one_row_at_a_time(tmp_path):
    from helpers import TOKENIZER_DIR, put_in_hub_cache

    from minhub import GPT4
    from minhub.serve import create_app

    torch.manual_seed(0)
    model = GPT4(num_tokens=50257, max_seq_len=40, dim=32, depth=2, dim_head=16, heads=4, alibi_num_heads=2)
    model.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "tokenizer.json").write_bytes((TOKENIZER_DIR / "tokenizer.json").read_bytes())
    put_in_hub_cache("tests/serve-gpt4", tmp_path / "run")
    app = build_app("tests/serve-gpt4", max_batch=4)
    assert app.state.scheduler.max_batch == 1
    from starlette.testclient import TestClient

    tokenizer = tokenizer_from_pretrained("tests/serve-gpt4")
    loaded = GPT4.from_pretrained(tmp_path / "run")
    with TestClient(app) as http:
        for prompt in PROMPTS[:3]:
            response = http.post("/v1/completions", json={"model": "tests/serve-gpt4", "prompt": prompt,
                                                           "max_tokens": 10, "temperature": 0})
            idx = torch.tensor([tokenizer.encode(prompt).ids])
            expected = tokenizer.decode(generate(loaded, idx, 10, temperature=0)[0, idx.size(1):].tolist())
            assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected
    assert create_app  # the same application factory serves both models


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


@pytest.mark.parametrize("onednn", [True, False])
def test_packing_follows_the_cpu_probe(onednn, monkeypatch):
    """With oneDNN the server packs its fp32 weights once; a PyTorch without it serves the plain model."""
    import dataclasses

    from minhub import hardware
    from minhub.fast import PackedLinear

    if onednn and not hardware.cpu_info().onednn:
        pytest.skip(f"needs a PyTorch built with oneDNN; {hardware.cpu_info().describe()}")
    fake = dataclasses.replace(hardware.cpu_info(), onednn=onednn)
    monkeypatch.setattr(hardware, "cpu_info", lambda: fake)
    hub_checkpoint("tests/serve-probe", hf_gpt2(vocab_size=50257, n_embd=16, n_head=2, bos_token_id=50256,
                                                eos_token_id=50256), tokenizer=True)
    model = build_app("tests/serve-probe", max_batch=2).state.scheduler.model
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert bool(packed) == onednn
    if not onednn:
        assert all(isinstance(m, torch.nn.Linear) for m in (model.lm_head, model.transformer.h[0].mlp.c_fc))
