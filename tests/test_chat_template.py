"""Chat templates are code from the model file: rendered bounded (tightfit.chat_template), they give the text
transformers gives, or a ChatTemplateError - templates that would run for minutes or build gigabytes are stopped
at once; fuzzed templates and the committed regression inputs (tests/fuzz_regressions) end in one or the other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tightfit.errors import TightfitError

from .test_fuzz import FUZZ, GOOD_CHAT, outcome

CHAT = {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True}
REGRESSIONS = Path(__file__).with_name("fuzz_regressions")  # inputs that fuzzing or review found, and what each gives
EXPECTED = json.loads((REGRESSIONS / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_regression_inputs(name):
    """Each committed input gives its recorded outcome: chat-*.jinja are templates that would run for minutes or
    build gigabytes unbounded (stopped at once, before they allocate: an unbounded run would fail by time or
    memory) or that broke the renderer; config-*.json are config.json files the planner once mis-read."""
    from tightfit.chat_template import ChatTemplateError, render_source
    from tightfit.planner.spec import spec_from_config

    path, want = REGRESSIONS / name, EXPECTED[name]
    if name.startswith("chat-"):
        with pytest.raises(ChatTemplateError, match=want):
            render_source(path.read_text(), CHAT)
        return
    if want is None:
        assert spec_from_config(json.loads(path.read_text()), name).n_layers >= 1
        return
    with pytest.raises(TightfitError, match=want):
        spec_from_config(json.loads(path.read_text()), name)


def test_a_bound_in_dead_code_costs_nothing_and_refusals_are_typed():
    from tightfit.chat_template import ChatTemplateError, render_source

    assert render_source("{% if false %}{{ 'x'|center(1000000000) }}{% endif %}ok", CHAT) == "ok"
    with pytest.raises(ChatTemplateError, match="refused these messages: system first"):
        render_source("{{ raise_exception('system first') }}", CHAT)
    with pytest.raises(ChatTemplateError, match="refused these messages: maximum recursion"):
        render_source("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", CHAT)
    with pytest.raises(ChatTemplateError, match="refused these messages"):
        render_source("{{ messages[0].content.__class__.__mro__[1].__subclasses__() }}", CHAT)


TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'You are helpful.' }}
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}</tools><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}{% if message.role != 'system' %}<|im_start|>{{ message.role }}
{{ message.content }}{% if message.tool_calls %}{% for c in message.tool_calls %}
<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% endif %}<|im_end|>
{% endif %}{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}{{ eos_token if false }}"""


@pytest.mark.parametrize("template", ["llama", "tools"])
def test_bounded_chat_template_renders_what_transformers_renders(tiny_models, template):
    from transformers import AutoTokenizer

    from tightfit.chat_template import render

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    if template == "tools":
        tok.chat_template = TOOLS_TEMPLATE
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    calls = [{"id": "1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    chats = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"},
              {"role": "assistant", "content": "", "tool_calls": calls}, {"role": "user", "content": "thanks"}]]
    for messages in chats:
        for kw in ({}, {"tools": tools}):
            for prompt in (True, False):
                want = tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False, **kw)
                assert render(tok, messages, add_generation_prompt=prompt, **kw) == want


EXPRESSIONS = ["messages[0].content", "m.role|upper", "ns.a", "raise_exception('no')", "'x' * N", "'x'|center(N)",
               "(messages|tojson)|length", "'%sN' % N", "N ** N", "'a\nb'|indent(N)", "loop.index", "messages[N]",
               "messages|map(attribute='role')|join(',' * N)", "{}.__class__", "range(N)|list|length", "x * N",
               "'{:>N}'.format(1)", "('ab' ~ ns.a) * N", "tools|tojson", "add_generation_prompt", "m['content'][:N]"]
STATEMENTS = ["{% set ns = namespace(a='') %}", "{% set ns.a = ns.a ~ ns.a ~ 'ab' %}", "{% set x %}ab{% endset %}",
              "{% break %}", "{% continue %}", "text", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{",
              "%}", "{% endfor %}"]


def template_strategy():
    leaf = st.sampled_from(EXPRESSIONS).map(lambda e: "{{ " + e + " }}") | st.sampled_from(STATEMENTS)
    return st.recursive(st.lists(leaf, min_size=1, max_size=4).map("".join), lambda inner: st.one_of(
        st.tuples(st.sampled_from(["m in messages", "i in range(N)", "c in m.content", "t in tools or []"]), inner)
        .map(lambda t: "{% for " + t[0] + " %}" + t[1] + "{% endfor %}"),
        st.tuples(st.sampled_from(EXPRESSIONS), inner, inner)
        .map(lambda t: "{% if " + t[0] + " %}" + t[1] + "{% else %}" + t[2] + "{% endif %}"),
        st.lists(inner, min_size=2, max_size=3).map("".join)), max_leaves=12)


@FUZZ
@given(data=st.data())
def test_random_chat_templates_give_a_text_or_a_typed_error(data):
    """Templates built from real templates' pieces (loops over messages, namespaces, filters, macros) with
    sizes from 0 to 10^18 and broken syntax now and then: a text, or ChatTemplateError."""
    from tightfit.chat_template import render_source

    n = data.draw(st.sampled_from([0, 1, 3, 70, 1000, 100_000, 10**7, 10**9, 10**18]))
    source = data.draw(template_strategy()).replace("N", str(n))
    messages = data.draw(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                         "content": st.text(max_size=40)}), max_size=4))
    outcome(render_source, source, {"messages": messages, "add_generation_prompt": True, "tools": None})


def test_a_server_whose_chat_template_runs_long_answers_400_and_keeps_serving(tiny_models):
    from fastapi.testclient import TestClient

    from tightfit.runtime import load_runtime
    from tightfit.server.app import create_app

    lm = load_runtime(tiny_models["llama"])
    lm.tokenizer.chat_template = ("{% if messages[0].content == 'loop' %}"
                                  + (REGRESSIONS / "chat-silent-loops.jinja").read_text()
                                  + "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")
    with TestClient(create_app(lm.model, lm.tokenizer, "tiny", ctx=256, max_tokens_limit=8)) as c:
        r = c.post("/v1/chat/completions", json=GOOD_CHAT | {"messages": [{"role": "user", "content": "loop"}]})
        assert r.status_code == 400 and "steps without finishing" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages"
        assert c.post("/v1/chat/completions", json=GOOD_CHAT).status_code == 200
