"""A real uvicorn server on loopback, driven by the official openai client and by raw HTTP."""

import contextlib
import socket
import threading
import time

import json

import httpx
import jsonschema
import openai
import pytest

from tightfit.runtime import load_runtime
from tightfit.server.app import create_app

KEY = "sk-test"
SERVERS = {}  # url -> the Server behind it (its batcher's counters)


@contextlib.contextmanager
def serving(app):
    """APP served by uvicorn on a free local port, in a thread: yields its URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if srv.started:
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(10)


@pytest.fixture(scope="module")
def server(tiny_models):
    lm = load_runtime(tiny_models["llama"])
    app = create_app(lm.model, lm.tokenizer, "tiny", api_key=KEY, ctx=1024, max_tokens_limit=256)
    with serving(app) as url:
        SERVERS[url] = app.state.server
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def test_models_and_completions(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="The economy", max_tokens=8, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0 and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == 8 and all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    chunks = list(client.completions.create(model="tiny", prompt="The economy", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text  # greedy: the same text
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices == []


def test_chat_streaming_and_seed(client):
    msgs = [{"role": "user", "content": "Hello there"}]
    a = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=10, temperature=1.0,
                                       seed=5, logprobs=True, top_logprobs=3)
    b = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=10, temperature=1.0, seed=5)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.role == "assistant" and a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert len(a.choices[0].logprobs.content[0].top_logprobs) == 3
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=1.0, seed=5,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == a.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens


def test_stop_strings(client):
    full = client.completions.create(model="tiny", prompt="The", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[4:6]
    r = client.completions.create(model="tiny", prompt="The", max_tokens=12, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["message"] == ("The model 'gpt-4' does not exist; this server serves 'tiny' (GET /v1/models).")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=1000)
    assert e.value.body["message"] == "max_tokens is 1000, above this server's limit of 256."
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 1500}])
    assert "this server's context holds 1024: shorten it." in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=5)
    assert e.value.body["message"].startswith("Invalid request: temperature:")
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("The request body is not valid JSON")
    r = httpx.post(server + "/v1/completions", json={"model": "tiny"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "Invalid request: prompt: Field required."
    assert httpx.get(server + "/v1/models").status_code == 401  # no key at all
    assert client.completions.create(model="tiny", prompt="still", max_tokens=2).usage.completion_tokens >= 1


def test_client_disconnect_stops_generation_and_frees_the_server(server, client):
    with httpx.Client() as h, h.stream("POST", server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "The", "max_tokens": 64, "stream": True,
                            "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # leave after the first token
    r = client.completions.create(model="tiny", prompt="next", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert httpx.get(server + "/health").json()["waiting"] == 0


def test_concurrent_requests_are_queued_and_all_answered(client):
    results = []

    def one(i):
        r = client.completions.create(model="tiny", prompt=f"Request {i}", max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
        results.append(r.usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [6] * 6


# ---- structured outputs, tool calls, logit_bias and penalties, /metrics (the grammar decides what the tiny
# random model may say, whatever it would say) ----
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "color": {"enum": ["red", "green", "blue"]}},
     "required": ["ok", "n", "color"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer", "maximum": 9,
                                                                                       "minimum": 0},
                                                                                 "y": {"type": "number", "maximum": 1,
                                                                                       "minimum": 0}},
                                                "required": ["x", "y"], "additionalProperties": False},
                                      "tag": {"type": "string", "maxLength": 5}},
     "required": ["point", "tag"], "additionalProperties": False},
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "the time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                   "additionalProperties": False}}}
MSGS = [{"role": "user", "content": "Answer in JSON"}]


def fmt(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_json_schema_answers_validate_also_streamed(client, i):
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=64, temperature=temperature,
                                           seed=i, response_format=fmt(SCHEMAS[i]))
        c = r.choices[0]
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMAS[i])
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=64, temperature=0,
                                                 response_format=fmt(SCHEMAS[i]), stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    jsonschema.validate(json.loads(streamed), SCHEMAS[i])
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_is_an_object(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=64, temperature=0,
                                       response_format={"type": "json_object"})
    c = r.choices[0]
    assert c.message.content.startswith("{")
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)


def test_tool_call_round_trip_and_named_choice(client):
    named = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                           tools=[WEATHER, CLOCK], max_tokens=64, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    c = named.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_time" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), CLOCK["function"]["parameters"])
    # "required" with parallel_tool_calls false: exactly one call (a random model otherwise lists calls until
    # max_tokens)
    req = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                         tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=200, temperature=0,
                                         parallel_tool_calls=False)
    assert req.choices[0].finish_reason == "tool_calls" and len(req.choices[0].message.tool_calls) == 1
    for call in req.choices[0].message.tool_calls:
        spec = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])
    # the call goes back with its result; the model answers (a tool-free choice: plain content)
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump() for call in c.message.tool_calls]},
               {"role": "tool", "tool_call_id": c.message.tool_calls[0].id, "content": "12:00"}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER, CLOCK],
                                            tool_choice="none", max_tokens=8, temperature=0)
    assert answer.choices[0].message.tool_calls is None and isinstance(answer.choices[0].message.content, str)
    # streamed: the call's id and name in its first delta, then its arguments text as it is generated, then
    # finish_reason tool_calls; the pieces join into the arguments the same request gets unstreamed
    kw = dict(model="tiny", messages=history[:1], tools=[WEATHER], max_tokens=200, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert len(deltas) > 3 and chunks[-1].choices[0].finish_reason == "tool_calls"  # streamed, not one piece
    arguments = json.loads("".join(d.function.arguments for d in deltas))
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    assert json.loads(whole.function.arguments) == arguments


def test_auto_tool_choice_parses_calls_the_model_writes():
    from tightfit.server.schema import Tool
    from tightfit.server.structured import parse_tool_calls

    tools = [Tool(**WEATHER)]
    assert parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
                            tools) == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert parse_tool_calls('[{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}]', tools)
    assert parse_tool_calls('```json\n{"name": "get_weather", "parameters": {}}\n```', tools)[0]["arguments"] == {}
    assert parse_tool_calls('{"name": "launch_rocket", "arguments": {}}', tools) is None  # not a known tool
    assert parse_tool_calls("It is sunny in Oslo.", tools) is None


def test_logit_bias_and_penalties(client):
    base = dict(model="tiny", prompt="The economy", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**base, logprobs=0).choices[0]
    forced = client.completions.create(**base, logit_bias={"65": 100}, logprobs=0).choices[0]
    assert set(forced.logprobs.tokens) == {client_token(65)}  # every token is the one biased to +100
    banned_id = first_token_id(plain)
    banned = client.completions.create(**base, logit_bias={str(banned_id): -100}).choices[0]
    assert banned.text != plain.text
    penalized = client.completions.create(**base, frequency_penalty=2.0, presence_penalty=2.0).choices[0]
    assert distinct(penalized.text) >= distinct(plain.text)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**base, logit_bias={"999999": 1})
    assert e.value.body["param"] == "logit_bias" and "token ids in [0, " in e.value.body["message"]


def client_token(i):
    return TOKENIZER().decode([i])


_TOK = {}


def TOKENIZER():
    return _TOK["tok"]


@pytest.fixture(autouse=True)
def _tokenizer(tiny_models):
    from transformers import AutoTokenizer

    _TOK.setdefault("tok", AutoTokenizer.from_pretrained(tiny_models["llama"]))


def first_token_id(choice):
    return TOKENIZER()(choice.logprobs.tokens[0], add_special_tokens=False)["input_ids"][0]


def distinct(text):
    return len(set(TOKENIZER()(text, add_special_tokens=False)["input_ids"]))


def test_bad_structured_requests_name_the_field_and_the_server_keeps_serving(client):
    cases = [
        (dict(response_format=fmt({"type": "nonsense"})), "response_format.json_schema.schema", "not a usable JSON schema"),
        (dict(response_format={"type": "xml"}), "response_format.type", "Invalid request: response_format.type"),
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools[0].function.parameters",
         "parameters is missing"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice",
         "not in tools"),
        (dict(response_format={"type": "json_schema"}), "response_format.json_schema.schema", "is required"),
    ]
    for kwargs, param, message in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, **kwargs)
        assert e.value.body["param"] == param and message in e.value.body["message"], e.value.body
    assert client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).usage.completion_tokens >= 1


def test_metrics(server, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(server + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["tightfit_generation_tokens_total"] >= 4 and values["tightfit_prompt_tokens_total"] > 0
    assert values["tightfit_time_to_first_token_seconds_count"] >= 1
    assert values["tightfit_inter_token_latency_seconds_count"] >= 3
    assert values['tightfit_requests_total{path="/v1/completions",status="200"}'] >= 1
    assert values["tightfit_queue_depth"] == 0


def test_concurrent_clients_are_batched_and_get_the_tokens_they_get_alone(server, client):
    # the server has 4 slots: 8 clients share decode steps, the rest wait for a free slot
    prompts = [f"Request number {i} about the economy" for i in range(8)]
    ask = lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].text
    alone = [ask(p) for p in prompts]
    app_stats = httpx.get(server + "/health").json()
    before = dict(server_batcher(server).stats)
    together = [None] * 8

    def one(i):
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone
    after = server_batcher(server).stats
    steps, rows = after["steps"] - before["steps"], after["rows"] - before["rows"]
    assert rows / steps > 1.5, (steps, rows)  # decode steps served several sequences at once
    assert app_stats["parallel"] == 4 and app_stats["active"] == 0


def test_a_shared_prompt_prefix_is_not_recomputed(server, client):
    system = "You are a careful assistant who answers in one short sentence. " * 3
    msgs = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]
    first = client.chat.completions.create(model="tiny", messages=msgs("What is GDP?"), max_tokens=6, temperature=0)
    b = server_batcher(server)
    before, prefilled = b.stats["reused_tokens"], b.stats["prefill_tokens"]
    again = client.chat.completions.create(model="tiny", messages=msgs("What is GDP?"), max_tokens=6, temperature=0)
    other = client.chat.completions.create(model="tiny", messages=msgs("And inflation?"), max_tokens=6, temperature=0)
    reused = b.stats["reused_tokens"] - before
    assert reused >= 2 * (first.usage.prompt_tokens // 2)  # both found the system prompt in a slot's cache
    assert b.stats["prefill_tokens"] - prefilled < 0.5 * (again.usage.prompt_tokens + other.usage.prompt_tokens)
    assert again.choices[0].message.content == first.choices[0].message.content  # same tokens from the cache


def server_batcher(url):
    return SERVERS[url].batcher


def test_tool_call_stream_splits_any_chunking_into_name_then_arguments():
    """The scanner behind streamed tool calls: escaped quotes and braces inside strings, nested values, a call
    whose arguments come before its name, and any chunk boundaries give the same calls."""
    from tightfit.server.structured import ToolCallStream

    text = ('[{"name": "get_weather", "arguments": {"city": "Pa\\"ris {x}\\\\", "days": [1, 2], "o": {"a": 1}}}, '
            '{"arguments": {"q": "}]"}, "name": "search"}]')
    want = json.loads(text)
    for step in (1, 2, 5, len(text)):
        stream, calls = ToolCallStream(), {}
        for i in range(0, len(text), step):
            for d in stream.feed(text[i:i + step]):
                c = calls.setdefault(d["index"], {"name": None, "arguments": ""})
                if "id" in d:
                    assert c["name"] is None and d["id"].startswith("call_")
                    c["name"] = d["function"]["name"]
                c["arguments"] += d["function"]["arguments"]
        got = [(c["name"], json.loads(c["arguments"])) for c in calls.values()]
        assert got == [(w["name"], w["arguments"]) for w in want]


def test_a_model_file_changed_under_the_server_does_not_change_its_answers(tiny_models, tmp_path):
    """The runtime copies what it runs (GGUF codes by plain reads, a --max-memory budget's streamed weights into an
    unlinked scratch file): truncating or rewriting the model file while serving changes no answer."""
    from tightfit.cli import main

    gguf = tmp_path / "m.gguf"
    assert main(["convert", str(tiny_models["llama"]), "--to", "gguf-f16", "-o", str(gguf)]) == 0
    full = load_runtime(gguf).model.weight_bytes()
    for budget in (None, int(0.6 * (full["layers"] + full["head"] + full["embedding"]))):
        lm = load_runtime(gguf, max_memory=budget)
        assert budget is None or lm.model.streamer.streamed  # some layers are read from the scratch file per token
        app = create_app(lm.model, lm.tokenizer, "tiny", api_key=KEY, ctx=256, max_tokens_limit=32)
        with serving(app) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)

            def ask():
                return c.completions.create(model="tiny", prompt="The state of", max_tokens=12, temperature=0)

            before = ask().choices[0].text
            blob = gguf.read_bytes()
            gguf.write_bytes(blob[: len(blob) // 3])  # cut short under the running server
            assert ask().choices[0].text == before
            gguf.write_bytes(bytes(len(blob)))  # then zeros
            assert ask().choices[0].text == before
            gguf.write_bytes(blob)


def test_the_stress_bench_at_ci_size(tiny_models, tmp_path):
    """bench/stress.py on the tiny model: 16 clients mixing well-formed requests and streams with disconnects,
    slow readers, a 100 MB chunked body, 100k-deep JSON and over-limit requests; every outcome as it should be,
    the server healthy after, and its memory not grown by anything like a body's size."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "stress.json"
    r = subprocess.run([sys.executable, str(root / "bench" / "stress.py"), "--model", str(tiny_models["llama"]),
                        "--clients", "16", "--requests", "1", "--rounds", "1", "--parallel", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    res = json.loads(out.read_text())
    assert r.returncode == 0, (res["outcomes"], r.stderr[-2000:])
    kinds = {k.split(" -> ")[0] for k in res["outcomes"]}
    assert kinds == {"plain", "stream", "disconnect", "slow_reader", "nested", "limits", "oversized"}
    assert res["healthy_after"] and res["request_after_ok"]
    assert res["rss_growth_mb"] < 90, res  # the 100 MB body is not kept (one round: some warm-up growth)
