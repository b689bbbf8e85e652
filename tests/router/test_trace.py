"""Trace loading and reshaping."""

import json

import pytest

from jaxinfer.datasets import TRACES, shared_file, trace_file
from jaxinfer.router.trace import (
    TraceRequest,
    cap_lengths,
    load_azure,
    load_mooncake,
    load_trace,
    long_context_mix,
    scale_rate,
    stretch,
    summarize,
    take,
)


def test_load_azure_conv():
    if shared_file("traces", TRACES["azure_conv"]) is None:
        pytest.skip("Azure trace not found in the shared data folder")
    trace = load_azure()
    assert len(trace) == 19366
    assert trace[0] == TraceRequest(0.0, 374, 44)
    assert trace[1].arrival == pytest.approx(4.3145790, abs=1e-6)  # 18:15:50.9951690 - 18:15:46.6805900
    assert all(a.arrival <= b.arrival for a, b in zip(trace, trace[1:], strict=False))
    assert all(r.output_len >= 1 for r in trace)
    assert load_azure(limit=10) == trace[:10]


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_azure(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("time,a,b\r\n")
    with pytest.raises(ValueError, match="expected header TIMESTAMP,ContextTokens,GeneratedTokens"):
        load_azure(bad)
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46.68,12\r\n")
    with pytest.raises(ValueError, match=":2: malformed row"):
        load_azure(bad)
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\r\nyesterday,12,3\r\n")
    with pytest.raises(ValueError, match="malformed row"):
        load_azure(bad)
    good = tmp_path / "good.csv"
    good.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:47.5,10,0\r\n"
                    "2023-11-16 18:15:46.0000001,20,5\r\n")
    assert load_azure(good) == [TraceRequest(0.0, 20, 5), TraceRequest(pytest.approx(1.4999999), 10, 1)]


def test_load_mooncake(tmp_path):
    lines = [{"timestamp": 2500, "input_length": 10, "output_length": 0, "hash_ids": [0, 1]},
             {"timestamp": 1000, "input_length": 20, "output_length": 5, "hash_ids": []},
             {"timestamp": 1250.5, "input_length": 30, "output_length": 7, "hash_ids": [2]}]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(d) for d in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    assert load_mooncake(good) == [TraceRequest(0.0, 20, 5), TraceRequest(pytest.approx(0.2505), 30, 7),
                                   TraceRequest(1.5, 10, 1)]
    assert load_mooncake(good, limit=2) == [TraceRequest(0.0, 20, 5), TraceRequest(1.5, 10, 1)]


@pytest.mark.parametrize("line, message", [
    ('{"timestamp": 0, "input_length": 5', r":2: malformed JSON \("),
    ('[0, 5, 1]', ":2: expected a JSON object, got list"),
    ('{"timestamp": 0, "input_length": 5}', ":2: missing key output_length"),
    ('{"timestamp": "0", "input_length": 5, "output_length": 1}', ":2: timestamp must be a number"),
    ('{"timestamp": 0, "input_length": 5.5, "output_length": 1}', ":2: input_length must be an integer, got 5.5"),
    ('{"timestamp": 0, "input_length": 5, "output_length": true}', ":2: output_length must be an integer"),
    ('{"timestamp": 0, "input_length": 5, "output_length": -1}', ":2: need timestamp >= 0, input_length >= 1"),
    ('{"timestamp": 0, "input_length": 0, "output_length": 1}', ":2: need timestamp >= 0, input_length >= 1"),
    ('{"timestamp": -3, "input_length": 5, "output_length": 1}', ":2: need timestamp >= 0, input_length >= 1"),
])
def test_load_mooncake_errors(tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0]}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_mooncake(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_load_mooncake_missing_or_empty(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_mooncake(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        load_mooncake(empty)


def test_load_trace_names():
    with pytest.raises(ValueError, match="unknown trace 'burstgpt'.*azure_conv, azure_code, mooncake_conversation"):
        load_trace("burstgpt")


# SOURCES.md's table: requests, input mean, output mean (Mooncake conversation's output mean is taken before
# 0 outputs become 1, hence its wider tolerance).
@pytest.mark.parametrize("name, count, prompt_mean, output_mean, tolerance", [
    ("azure_conv", 19366, 1154.7, 211.1, 0.05),
    ("azure_code", 8819, 2047.8, 27.9, 0.05),
    ("mooncake_conversation", 12031, 12035.1, 342.6, 0.5),
    ("mooncake_synthetic", 3993, 15325.5, 149.1, 0.05),
])
def test_shared_traces(name, count, prompt_mean, output_mean, tolerance):
    try:
        trace_file(name)
    except FileNotFoundError:
        pytest.skip(f"trace {name} not found in the shared data folder")
    trace = load_trace(name)
    stats = summarize(trace)
    assert stats["requests"] == count
    assert stats["prompt_mean"] == pytest.approx(prompt_mean, abs=0.05)
    assert stats["output_mean"] == pytest.approx(output_mean, abs=tolerance)
    assert trace[0].arrival == 0.0 and all(a.arrival <= b.arrival for a, b in zip(trace, trace[1:], strict=False))
    assert all(r.prompt_len >= 1 and r.output_len >= 1 for r in trace)
    assert load_trace(name, limit=5) == trace[:5]


def test_reshaping():
    trace = [TraceRequest(0.0, 100, 10), TraceRequest(2.0, 5000, 300), TraceRequest(4.0, 50, 5)]
    assert [r.arrival for r in scale_rate(trace, 4.0)] == [0.0, 0.5, 1.0]
    assert take(trace, start=1.0, duration=10.0) == [TraceRequest(0.0, 5000, 300), TraceRequest(2.0, 50, 5)]
    assert take(trace, count=1) == trace[:1]
    assert cap_lengths(trace, 4096)[1] == TraceRequest(2.0, 4095, 1)
    assert stretch(trace, 3.0, 4096)[0] == TraceRequest(0.0, 300, 30)
    assert summarize(trace)["requests"] == 3 and summarize(trace)["context_max"] == 5300
    with pytest.raises(ValueError, match="rate factor must be positive"):
        scale_rate(trace, 0)


def test_long_context_mix_is_seeded_and_in_range():
    a = long_context_mix(2000, rate=5.0, seed=1)
    assert a == long_context_mix(2000, rate=5.0, seed=1) and a != long_context_mix(2000, rate=5.0, seed=2)
    assert all(1024 <= r.prompt_len and r.prompt_len + r.output_len <= 131072 for r in a)
    long = sum(r.prompt_len >= 8192 for r in a) / len(a)
    assert 0.1 < long < 0.2 and max(r.prompt_len for r in a) > 32768
    assert summarize(a)["rate_rps"] == pytest.approx(5.0, rel=0.1)
    with pytest.raises(ValueError, match="need num_requests >= 1"):
        long_context_mix(0, rate=1.0)
