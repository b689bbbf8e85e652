"""The embedded SmolLM2-135M served over both APIs, in process and as `python -m jaxinfer.serve`,
checked against the independent Hugging Face reference's greedy tokens."""

import grpc
import openai
import pytest

from jaxinfer.serve.proto import inference_pb2 as pb
from jaxinfer.serve.proto import inference_pb2_grpc as pb_grpc
from tests.serve.harness import ServeProcess, ServerThread

pytestmark = pytest.mark.real_model
QUESTION = "What is the capital of France, and why is it famous?"
SMALL = """
[cache]
num_pages = 256
[scheduler]
max_num_seqs = 4
max_model_len = 1024
max_prefill_seqs = 2
decode_buckets = [4]
prefill_buckets = [64, 256]
kv_buckets = [1024]
"""


def must_match(case) -> int:
    """Reference tokens up to the first near-tie (a gap under 0.05 logits may flip in f32)."""
    return next((i for i, gap in enumerate(case["greedy_top1_minus_top2_logit_gap"]) if gap < 0.05),
                len(case["greedy_new_ids"]))


@pytest.fixture(scope="module")
def real_server(real_model, real_engine):
    server = ServerThread("smollm2-135m", real_engine.config, loaded=real_model, served_model_name="smollm2-135m",
                          warm_up=False)
    yield server
    server.stop()


def test_chat_over_http_matches_reference(real_server, real_model, reference_data):
    case = reference_data["cases"]["chat_question"]
    n = must_match(case)
    client = openai.OpenAI(base_url=real_server.http + "/v1", api_key="unused", max_retries=0, timeout=300)
    stream = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == real_model.tokenizer.decode(case["greedy_new_ids"][:n])
    assert chunks[-1].usage.prompt_tokens == len(case["prompt_ids"]) and chunks[-1].usage.completion_tokens == n


def test_generate_over_grpc_matches_reference(real_server, reference_data):
    case = reference_data["cases"]["code_snippet"]
    n = must_match(case)
    with grpc.insecure_channel(real_server.grpc) as channel:
        responses = list(pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=case["prompt_ids"]),
            params=pb.SamplingParams(max_tokens=n, ignore_eos=True, temperature=0))))
    assert [t for r in responses for t in r.token_ids] == case["greedy_new_ids"][:n]


def test_served_as_a_process(tmp_path, real_model, reference_data):
    case = reference_data["cases"]["english_paragraph"]
    n = min(must_match(case), 16)
    proc = ServeProcess("smollm2-135m", tmp_path, "--no-warm-up", config_text=SMALL)
    try:
        client = openai.OpenAI(base_url=proc.http + "/v1", api_key="unused", max_retries=0, timeout=300)
        completion = client.completions.create(model="smollm2-135m", prompt=case["prompt"], max_tokens=n,
                                               temperature=0, extra_body={"ignore_eos": True})
        assert completion.choices[0].text == real_model.tokenizer.decode(case["greedy_new_ids"][:n])
        with grpc.insecure_channel(proc.grpc) as channel:
            responses = list(pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
                text=case["prompt"], params=pb.SamplingParams(max_tokens=n, ignore_eos=True, temperature=0))))
        assert [t for r in responses for t in r.token_ids] == case["greedy_new_ids"][:n]
        assert proc.finish() == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
