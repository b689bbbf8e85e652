"""OpenAI-compatible HTTP API, driven by the official openai client and raw httpx for bad input."""

import json
import math
import time

import httpx
import openai
import pytest

from jaxinfer.sampling_params import SamplingParams
from tests.serve.harness import MAX_MODEL_LEN, pages_in_use

PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.http + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected(offline, prompt, **params):
    return offline.generate([prompt], SamplingParams(**params))[0]


def test_models_and_health(served, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(served.http + "/health").json() == {"status": "ok"}


def test_completion_equals_offline_engine(client, offline):
    want = expected(offline, PROMPT, temperature=0.0, max_tokens=12, ignore_eos=True)
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(want.prompt_ids) and got.usage.completion_tokens == 12


def test_seeded_sampling_and_token_prompts_equal_offline(client, offline):
    ids = offline.tokenizer.encode(PROMPT)
    params = dict(temperature=0.9, top_p=0.8, seed=1234, max_tokens=10, ignore_eos=True)
    want = expected(offline, ids, **params)
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0.9, top_p=0.8, seed=1234,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text


def test_unseeded_sampled_requests_differ_and_seeded_ones_match(client):
    # a high temperature: the tiny random model is so peaked that at 1.0 every seed writes "tttt..."
    def sample(**seed):
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=20.0,
                                         extra_body={"ignore_eos": True}, **seed).choices[0].text
    assert sample() != sample()
    assert sample(seed=7) == sample(seed=7)


def test_batched_prompts_keep_their_order(client, offline):
    prompts = ["one two", "three four five", "six"]
    got = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    want = offline.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [w.text for w in want]
    assert got.usage.completion_tokens == 15


def test_chat_stream_order_and_usage(client, offline):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, stream=True,
                                            temperature=0, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and all(f is None for f in finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want = expected(offline, offline.tokenizer.encode_chat(messages), max_tokens=9, ignore_eos=True)
    assert text == want.text
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_ids)
    assert chunks[-1].usage.completion_tokens == 9
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.choices[0].message.content == text and full.choices[0].message.role == "assistant"


def test_chat_logprobs(client):
    got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         logprobs=True, top_logprobs=3, temperature=0,
                                         extra_body={"ignore_eos": True})
    content = got.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert math.isclose(entry.logprob, max(t.logprob for t in entry.top_logprobs), abs_tol=1e-5)  # greedy


def test_stop_string_ends_the_text(client, offline):
    free = expected(offline, PROMPT, max_tokens=20, ignore_eos=True).text
    stop = free[5:8]
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == free[:free.index(stop)]


def test_metrics_after_requests(served, client):
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(served.http + "/metrics").text
    for name in ("jaxinfer_requests_total{", "jaxinfer_time_to_first_token_seconds_bucket",
                 "jaxinfer_inter_token_latency_seconds_bucket", "jaxinfer_e2e_request_latency_seconds_bucket",
                 "jaxinfer_requests_waiting", "jaxinfer_kv_cache_usage_ratio", "jaxinfer_generation_tokens_per_second"):
        assert name in text
    assert 'jaxinfer_requests_total{api="completions",status="length"}' in text


BAD_BODIES = [
    (b"{not json", 400, "Invalid JSON"),
    (b'{"prompt": "\xff\xfe bad utf8", "max_tokens": 2}', 400, ""),
    (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "max_tokens": -3}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "temperature": 1e9}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "top_k": 10**12}).encode(), 400, "top_k"),
    (json.dumps({"prompt": "x", "seed": 2**70}).encode(), 400, "seed"),
    (json.dumps({"prompt": "x", "stop": [f"s{i}" for i in range(5000)]}).encode(), 400, "stop"),
    (json.dumps({"prompt": "x", "n": 2}).encode(), 400, "n=2"),
    (json.dumps({"prompt": "x", "logprobs": 50}).encode(), 400, "logprobs"),
    (json.dumps({"prompt": [5, 99999]}).encode(), 400, "vocabulary"),
    (json.dumps({"prompt": "word " * 400}).encode(), 400, "context"),
    (json.dumps({"prompt": ""}).encode(), 400, "empty"),
    (json.dumps({"prompt": []}).encode(), 400, "empty"),
    (json.dumps({"prompt": "x", "model": "gpt-9"}).encode(), 404, "gpt-9"),
    (json.dumps([1, 2, 3]).encode(), 400, ""),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD_BODIES)
def test_bad_completion_requests_get_openai_errors(served, body, status, needle):
    response = httpx.post(served.http + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] and error["code"]


def test_bad_chat_requests(served, client):
    url = served.http + "/v1/chat/completions"
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                 {"messages": [{"role": "user", "content": 5}]}, {"messages": "hi"},
                 {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
                 {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}):
        response = httpx.post(url, json=body)
        assert response.status_code == 400, (body, response.text)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=0)


def test_oversized_body_is_413(served):
    body = json.dumps({"prompt": "a" * (5 * 2**20)}).encode()
    response = httpx.post(served.http + "/v1/completions", content=body)
    assert response.status_code == 413 and "exceeds" in response.json()["error"]["message"]

    def chunks():  # no content-length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"a" * 65536
        yield b'"}'
    response = httpx.post(served.http + "/v1/completions", content=chunks())
    assert response.status_code == 413


def test_client_disconnect_mid_stream_frees_pages(served):
    body = {"prompt": PROMPT, "max_tokens": 200, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", served.http + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert pages_in_use(served) > 0
    deadline = time.monotonic() + 10
    while pages_in_use(served) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pages_in_use(served) == 0 and not served.frontend.num_in_flight
    assert httpx.get(served.http + "/health").status_code == 200


def test_context_limit_finishes_with_length(client):
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10_000, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens + got.usage.completion_tokens == MAX_MODEL_LEN
