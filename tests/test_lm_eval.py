"""EleutherAI's lm-evaluation-harness against `minhub serve` (issue 22): the tool people use to evaluate a served
model must get the right numbers from it. Needs `lm-eval[api]` (skipped without it).

lm-eval's `local-completions` model, in its default mode (prompts sent as token ids, the tokenizer found by
probing the server and then loaded from the model's files), runs three tasks made from local files against the real
server (uvicorn on a free loopback port): a multiple-choice task and a rolling-loglikelihood (perplexity) task,
which read the log-probabilities of the prompt's own tokens (echo, logprobs, max_tokens 1), and a generation task
with several stop strings (lm-eval appends its own end-of-text string). Reference: lm-eval's own `hf` backend, on
the same weights and tokenizer: every log-likelihood within 1e-4 (relative), every is_greedy and every generation
the same."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
from helpers import TOKENIZER_DIR, hf_gpt2, hub_checkpoint

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval[api]: its API models
pytest.importorskip("accelerate")  # lm-eval[hf]: its hf backend, the reference

from minhub.serve import BackgroundServer, build_app  # noqa: E402

MODEL = "tests/lm-eval-gpt2"
CONTEXT = 64
MULTIPLE_CHOICE = [
    {"question": "The capital of France is", "choices": [" Paris", " London", " a small dog"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five", " the moon", " 22"], "answer": 0},
    {"question": "Water boils at", "choices": [" 100 degrees", " noon", " the bank"], "answer": 0},
    {"question": "Once upon a time there was a", "choices": [" princess", " theorem", " caf\u00e9 na\u00efve"],
     "answer": 1},
    {"question": "The opposite of hot is", "choices": [" cold", " warm"], "answer": 0},
]
TEXTS = [  # each longer than one window of the 64-token context: scored in rolling windows
    {"text": "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
             "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
             "it was the season of Darkness, it was the spring of hope, it was the winter of despair."},
    {"text": "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
             "and nothing particular to interest me on shore, I thought I would sail about a little and see the "
             "watery part of the world. It is a way I have of driving off the spleen."},
    {"text": "Short text, one window."},
]
GENERATION = [{"prompt": p, "target": "x"} for p in
              ["The meaning of life is", "Q: What is the weather like?\nA:", "Hello, my name is", "In 1900,"]]
TASKS = {
    "minhub_mc": """
        output_type: multiple_choice
        target_delimiter: ""
        doc_to_text: "{{question}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{answer}}"
        metric_list:
          - metric: acc
        """,
    "minhub_rolling": """
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
          - metric: byte_perplexity
        """,
    "minhub_gen": """
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{target}}"
        generation_kwargs:
          until: ["\\n\\n", ".", "?", "!"]
          max_gen_toks: 8
          do_sample: false
          temperature: 0
        metric_list:
          - metric: exact_match
        """,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The weights in a local directory (for lm-eval's hf backend and tokenizer) and in the offline hub cache (for
    the server); the three tasks and their data in another directory."""
    tmp = tmp_path_factory.mktemp("lm-eval")
    model = hf_gpt2(seed=11, vocab_size=50257, n_embd=32, n_head=2, n_layer=2, n_positions=CONTEXT,
                    bos_token_id=50256, eos_token_id=50256, std=0.3)
    model.save_pretrained(tmp / "model")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / name, tmp / "model" / name)
    hub_checkpoint(MODEL, model, tokenizer=True)
    for doc in MULTIPLE_CHOICE:  # one more choice: the model's own greedy continuation (is_greedy true)
        doc["choices"] = doc["choices"][:4] + [greedy_text(model, doc["question"], 2)]
    tasks = tmp / "tasks"
    tasks.mkdir()
    for name, rows in (("minhub_mc", MULTIPLE_CHOICE), ("minhub_rolling", TEXTS), ("minhub_gen", GENERATION)):
        data = tmp / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
                f"  cache_dir: {json.dumps(str(tmp / 'datasets'))}\ntest_split: test\n")
        (tasks / f"{name}.yaml").write_text(head + textwrap.dedent(TASKS[name]), encoding="utf-8")
    return tmp


def greedy_text(model, text: str, new: int) -> str:
    import torch
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    ids = tokenizer.encode(text).ids
    with torch.no_grad():
        for _ in range(new):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tokenizer.decode(ids[-new:])


def evaluate(lm, tasks_dir) -> dict:
    """lm-eval's simple_evaluate of the three tasks with `lm`: {task: [each document's responses]}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir))
    results = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager, log_samples=True,
                                      bootstrap_iters=0)
    return {task: [sample["resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def test_lm_eval_local_completions_gets_the_numbers_of_its_hf_backend(setup):
    """Marked: lm-eval, ~30 s. Every log-likelihood of the served model within 1e-4 (relative) of lm-eval's hf
    backend on the same weights, every is_greedy and generation the same."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    app = build_app(MODEL, max_batch=4)
    with BackgroundServer(app) as running:
        served = LocalCompletionsAPI(base_url=f"http://127.0.0.1:{running.port}/v1/completions", model=MODEL,
                                     tokenizer=str(setup / "model"), max_length=CONTEXT, timeout=60, max_retries=1)
        assert served.tokenized_requests and served.tokenizer_backend == "huggingface"  # the default mode: ids
        ours = evaluate(served, setup / "tasks")
    # the API model keeps one position for the generated token and one more in its rolling windows: the hf backend
    # gets the windows of the same length (the multiple-choice and generation documents are shorter than either)
    reference = evaluate(HFLM(pretrained=str(setup / "model"), max_length=CONTEXT - 2, batch_size=1, device="cpu"),
                         setup / "tasks")
    assert ours.keys() == reference.keys() == set(TASKS)
    assert len(ours["minhub_mc"]) == len(MULTIPLE_CHOICE) and len(ours["minhub_rolling"]) == len(TEXTS)
    for task in ("minhub_mc", "minhub_rolling"):
        for doc, (got, expected) in enumerate(zip(ours[task], reference[task])):
            got_ll = [r[0][0] if task == "minhub_mc" else r[0] for r in got]
            expected_ll = [r[0][0] if task == "minhub_mc" else r[0] for r in expected]
            assert all(ll < 0 for ll in got_ll), (task, doc, got_ll)  # scored, not 0.0
            assert got_ll == pytest.approx(expected_ll, rel=1e-4, abs=0), (task, doc)
            if task == "minhub_mc":
                assert [r[0][1] for r in got] == [r[0][1] for r in expected], (task, doc)  # is_greedy
    assert any(r[0][1] for doc in reference["minhub_mc"] for r in doc)  # the greedy choices are seen as such
    assert ours["minhub_gen"] == reference["minhub_gen"]
    assert any(r[0] for r in ours["minhub_gen"])  # something was generated
