"""A real uvicorn server on loopback, driven by the official openai client and by raw HTTP."""

import socket
import threading
import time

import httpx
import openai
import pytest

from tightfit.runtime import load_runtime
from tightfit.server.app import create_app

KEY = "sk-test"


@pytest.fixture(scope="module")
def server(tiny_models):
    import uvicorn

    lm = load_runtime(tiny_models["llama"])
    app = create_app(lm.model, lm.tokenizer, "tiny", api_key=KEY, ctx=256, max_tokens_limit=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)


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
    assert e.value.body["message"] == "max_tokens is 1000, above this server's limit of 64."
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 400}])
    assert "this server's context holds 256: shorten it." in e.value.body["message"]
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
