"""Chat templates render exactly as transformers' apply_chat_template(..., tokenize=False) renders them.

Five real templates (tests/fixtures/chat/templates.json says where each was copied from) are saved by transformers
itself, in each layout it writes or reads (chat_template.jinja, the string in tokenizer_config.json, a named list),
and every render is compared with transformers' own render of the same saved tokenizer. Failures, from the
template's raise_exception to sandbox escapes, are ChatTemplateErrors where transformers refuses too.
"""

import datetime
import json

import jinja2
import pytest
from helpers import FIXTURES, put_in_hub_cache
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from minhub.chat import ChatTemplate, ChatTemplateError, chat_template_from_pretrained

TEMPLATES = json.loads((FIXTURES / "chat" / "templates.json").read_text(encoding="utf-8"))
TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
LLAMA_DATE = {"date_string": "26 Jul 2024"}  # the template otherwise prints today's date

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
USER = {"role": "user", "content": "What is the capital of France?"}
REPLY = {"role": "assistant", "content": "Paris."}
FOLLOW_UP = {"role": "user", "content": "  And of Japan? Write {{ it }} in 日本語 <b>bold</b> & \"quoted\"\n"}
CONVERSATIONS = {
    "user": [USER],
    "system+user": [SYSTEM, USER],
    "multi-turn": [SYSTEM, USER, REPLY, FOLLOW_UP],
    "multi-turn, no system": [USER, REPLY, FOLLOW_UP],
    "ends with the assistant": [USER, REPLY],
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Météo <now> & tomorrow",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def save_tokenizer(directory, template, save_jinja_files=True, **tokens):
    """A transformers tokenizer (word-level over its special tokens) saved with `template`, as transformers 5
    saves it; returns it reloaded from `directory`, so both sides read the same files."""
    specials = sorted(set(tokens.values()) | {"[UNK]"})
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(specials)}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(directory, save_jinja_files=save_jinja_files)
    return PreTrainedTokenizerFast.from_pretrained(directory)


def real(name, directory, **options):
    entry = TEMPLATES[name]
    tokens = {key: entry[key] for key in TOKEN_KEYS if key in entry}
    return save_tokenizer(directory, entry["chat_template"], **options, **tokens)


def reference(tokenizer, messages, add_generation_prompt=True, **extra):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **extra)


def assert_same(tokenizer, template, messages, add_generation_prompt=True, **extra):
    expected = reference(tokenizer, messages, add_generation_prompt, **extra)
    assert template.render(messages, add_generation_prompt=add_generation_prompt, **extra) == expected
    return expected


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_real_templates_render_as_transformers(name, tmp_path):
    tokenizer = real(name, tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()  # transformers 5's layout
    template = chat_template_from_pretrained(tmp_path)
    assert template.special_tokens["eos_token"] == TEMPLATES[name]["eos_token"]
    extra = LLAMA_DATE if name == "llama3.2" else {}
    # Mistral's template refuses system messages (see test_raise_exception_message)
    conversations = [m for m in CONVERSATIONS.values() if name != "mistral" or m[0]["role"] != "system"]
    rendered = set()
    for messages in conversations:
        for add_generation_prompt in (True, False):
            rendered.add(assert_same(tokenizer, template, messages, add_generation_prompt, **extra))
    assert len(rendered) >= len(conversations)  # no two conversations gave the same prompt


def test_default_system_prompts_and_special_tokens_appear(tmp_path):
    # guards against a comparison that passes because both sides render nothing
    real("smollm2", tmp_path / "smol")
    real("llama3.2", tmp_path / "llama")
    smol, llama = chat_template_from_pretrained(tmp_path / "smol"), chat_template_from_pretrained(tmp_path / "llama")
    assert "named SmolLM" in smol.render([USER]) and "named SmolLM" not in smol.render([SYSTEM, USER])
    assert llama.render([USER], **LLAMA_DATE).startswith("<|begin_of_text|><|start_header_id|>system")
    assert "Today Date: 26 Jul 2024" in llama.render([USER], **LLAMA_DATE)


def test_llama_date_from_strftime_now(tmp_path):
    tokenizer = real("llama3.2", tmp_path)
    template = chat_template_from_pretrained(tmp_path)
    for _ in range(2):  # a pair of renders that straddles midnight is retried once
        today = datetime.datetime.now().strftime("%d %b %Y")
        ours, theirs = template.render([SYSTEM, USER]), reference(tokenizer, [SYSTEM, USER])
        if ours == theirs and f"Today Date: {today}\n" in ours:
            break
    assert ours == theirs and f"Today Date: {today}\n" in ours


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.2"])
def test_tools_render_through_tojson(name, tmp_path):
    tokenizer = real(name, tmp_path)
    template = chat_template_from_pretrained(tmp_path)
    extra = LLAMA_DATE if name == "llama3.2" else {}
    rendered = assert_same(tokenizer, template, [SYSTEM, USER], tools=[WEATHER_TOOL], **extra)
    assert "Météo <now> & tomorrow" in rendered  # no ASCII or HTML escaping


def test_template_string_in_tokenizer_config(tmp_path):
    # older repos keep the template in tokenizer_config.json, with special tokens as AddedToken dicts
    save_tokenizer(tmp_path, TEMPLATES["tinyllama"]["chat_template"], save_jinja_files=False,
                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert not (tmp_path / "chat_template.jinja").exists()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATES["tinyllama"]["chat_template"]
    for key in ("bos_token", "eos_token"):
        config[key] = {"__type": "AddedToken", "content": config[key], "lstrip": False, "normalized": False,
                       "rstrip": False, "single_word": False, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    template = chat_template_from_pretrained(tmp_path)
    assert template.special_tokens["eos_token"] == "</s>"
    for messages in CONVERSATIONS.values():
        assert_same(tokenizer, template, messages)


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path):
    save_tokenizer(tmp_path, TEMPLATES["mistral"]["chat_template"], save_jinja_files=False, eos_token="</s>")
    (tmp_path / "chat_template.jinja").write_text(TEMPLATES["tinyllama"]["chat_template"], encoding="utf-8")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    template = chat_template_from_pretrained(tmp_path)
    assert template.source == tokenizer.chat_template == TEMPLATES["tinyllama"]["chat_template"]
    assert_same(tokenizer, template, CONVERSATIONS["multi-turn"])


def test_legacy_special_tokens_map(tmp_path):
    # configs without added_tokens_decoder (the oldest repos) take special tokens from special_tokens_map.json
    save_tokenizer(tmp_path, TEMPLATES["tinyllama"]["chat_template"], bos_token="<s>", eos_token="</s>")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<s>", "lstrip": False}}))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    template = chat_template_from_pretrained(tmp_path)
    assert template.special_tokens["eos_token"] == tokenizer.eos_token == "<s>"
    assert_same(tokenizer, template, CONVERSATIONS["multi-turn"])


@pytest.mark.parametrize("save_jinja_files", [False, True])
def test_named_templates_take_the_default(tmp_path, save_jinja_files):
    templates = {"default": TEMPLATES["smollm2"]["chat_template"], "tool_use": TEMPLATES["qwen2.5"]["chat_template"]}
    tokenizer = save_tokenizer(tmp_path, templates, save_jinja_files, eos_token="<|im_end|>")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert ("chat_template" in config) != save_jinja_files
    template = chat_template_from_pretrained(tmp_path)
    assert template.source == templates["default"]
    for messages in CONVERSATIONS.values():
        assert_same(tokenizer, template, messages)


def test_named_templates_without_default(tmp_path):
    save_tokenizer(tmp_path, {"rag": "{{ messages }}", "tool_use": "{{ tools }}"}, save_jinja_files=False)
    with pytest.raises(ChatTemplateError, match=r"several chat templates \(rag, tool_use\) and none named 'default'"):
        chat_template_from_pretrained(tmp_path)


def test_from_the_offline_hub_cache(tmp_path):
    real("qwen2.5", tmp_path)
    put_in_hub_cache("minhub-tests/chat-qwen", tmp_path)
    template = chat_template_from_pretrained("minhub-tests/chat-qwen")
    assert template.source == TEMPLATES["qwen2.5"]["chat_template"]
    assert "You are Qwen" in template.render([USER])


def test_repo_without_template_is_none(tmp_path):
    assert chat_template_from_pretrained(tmp_path) is None  # no tokenizer files at all
    save_tokenizer(tmp_path, None, eos_token="</s>")
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert chat_template_from_pretrained(tmp_path) is None
    put_in_hub_cache("minhub-tests/chat-none", tmp_path)
    assert chat_template_from_pretrained("minhub-tests/chat-none") is None


def test_raise_exception_message(tmp_path):
    tokenizer = real("mistral", tmp_path)
    template = chat_template_from_pretrained(tmp_path)
    message = "Conversation roles must alternate user/assistant/user/assistant/..."
    for messages in ([SYSTEM, USER], [USER, USER], [USER, REPLY, REPLY]):
        with pytest.raises(jinja2.TemplateError, match=message):
            reference(tokenizer, messages)
        with pytest.raises(ChatTemplateError, match=message):
            template.render(messages)


def test_syntax_error(tmp_path):
    broken = "{% for message in messages %}{{ message['content'] }}"  # no endfor
    with pytest.raises(ChatTemplateError, match="syntax error on line 1.*endfor"):
        ChatTemplate(broken)
    (tmp_path / "chat_template.jinja").write_text("line one\n{{ messages[0]['content'] +  }}")
    with pytest.raises(ChatTemplateError, match="syntax error on line 2"):
        chat_template_from_pretrained(tmp_path)


@pytest.mark.parametrize("messages", [
    "Hello", [], None, ["Hello"], [[USER]], [{"role": "user"}], [{"content": "Hi"}],
    [{"role": "user", "content": 3}], [{"role": None, "content": "Hi"}], [USER, ("user", "Hi")],
])
def test_messages_must_be_a_list_of_dicts(messages):
    template = ChatTemplate(TEMPLATES["smollm2"]["chat_template"])
    with pytest.raises(ChatTemplateError, match="messages"):
        template.render(messages)


def test_tools_must_be_schemas():
    with pytest.raises(ChatTemplateError, match="JSON schemas"):
        ChatTemplate(TEMPLATES["qwen2.5"]["chat_template"]).render([USER], tools=[print])


@pytest.mark.parametrize("escape", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",
    "{{ messages[0].update({'content': 'changed'}) }}",
    "{{ messages[0].pop('content') }}",
    "{% set ns = namespace(_hidden=1) %}",
    "{% set ns = namespace() %}{% set ns._hidden = 1 %}",
    "{{ dict.__call__.__globals__ }}",
])
def test_sandbox_escapes_are_refused(escape, tmp_path):
    tokenizer = save_tokenizer(tmp_path, escape, eos_token="</s>")
    with pytest.raises(jinja2.exceptions.SecurityError):
        reference(tokenizer, [USER])
    template = chat_template_from_pretrained(tmp_path)
    messages = [dict(USER)]
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        template.render(messages)
    assert messages == [USER]


@pytest.mark.parametrize("peek", ["{{ ''.__class__ }}", "{{ raise_exception.__globals__ }}",
                                  "{{ strftime_now.__code__ }}", "{{ messages[0].__class__ }}",
                                  "{{ namespace._Namespace__attrs }}"])
def test_unsafe_attributes_read_as_undefined(peek, tmp_path):
    # the sandbox answers a single unsafe attribute with an undefined that prints as nothing, as in transformers
    tokenizer = save_tokenizer(tmp_path, "[" + peek + "]", eos_token="</s>")
    assert assert_same(tokenizer, chat_template_from_pretrained(tmp_path), [USER]) == "[]"


def test_undefined_and_runtime_errors():
    with pytest.raises(ChatTemplateError, match="UndefinedError.*missing.*read something undefined"):
        ChatTemplate("{{ messages[0].missing.deeper }}").render([USER])
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        ChatTemplate("{{ 1 / 0 }}").render([USER])


INLINE = {
    "tojson options": "{{ x | tojson }}|{{ x | tojson(indent=2, sort_keys=True) }}|{{ x | tojson(separators=(',', ':'))"
                      " }}|{{ x | tojson(ensure_ascii=True) }}",
    "dict and namespace": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                          "{{ ns.n }} {{ dict(a=1, b=ns.n) | tojson }} {{ dict.fromkeys(['k'], 0) }}",
    "loop controls": "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'system' %}"
                     "{% continue %}{% endif %}[{{ m.content | trim }}]{% endfor %}",
    "generation tag": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content + eos_token }}"
                      "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
    "reasoning aliases": "{% for m in messages %}{{ m.role }}:{{ m.reasoning_content }}/{{ m.thinking }}/"
                         "{{ m.reasoning }};{% endfor %}",
    "trim and lstrip blocks": "  {% if add_generation_prompt %}\nA\n  {% endif %}\n{{ bos_token }}|{{ eos_token }}|"
                              "{{ tools }}|{{ documents }}|{{ message_payload }}",
    "none values dropped": "{% for m in messages %}{{ 'tool_calls' in m }}{{ m.keys() | list }}{% endfor %}",
}


class Payload:
    """A caller's object with a method a template must never reach."""

    def write(self, path):
        raise AssertionError("the template reached the caller's object")


@pytest.mark.parametrize("name", sorted(INLINE))
def test_environment_matches_transformers(name, tmp_path):
    tokenizer = save_tokenizer(tmp_path, INLINE[name], bos_token="<s>", eos_token="</s>")
    template = chat_template_from_pretrained(tmp_path)
    messages = [SYSTEM, USER, dict(REPLY, thinking="Easy.", tool_calls=None), FOLLOW_UP]
    extra = {"x": {"b": [1, 2.5, None, True], "a": "é <&>"}, "message_payload": Payload()}
    for add_generation_prompt in (True, False):
        assert_same(tokenizer, template, messages, add_generation_prompt, **extra)
    assert_same(tokenizer, template, messages, eos_token="<override>", **extra)  # extras override special tokens


def test_render_leaves_the_callers_messages_alone():
    messages = [dict(USER), dict(REPLY, tool_calls=None)]
    snapshot = [dict(m) for m in messages]
    ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}").render(messages)
    assert messages == snapshot


def test_local_directory_without_tokenizer_config_but_with_jinja(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(TEMPLATES["smollm2"]["chat_template"], encoding="utf-8")
    template = chat_template_from_pretrained(tmp_path)
    assert template.special_tokens == {}
    assert template.render([USER]).endswith("<|im_start|>assistant\n")
