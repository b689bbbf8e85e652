"""JetStream's Orchestrator, driven by JetStream's own published stubs (PyPI google-jetstream, installed
with --no-deps by the test command). Those stubs declare the same proto package as ours, so they run in
a separate interpreter."""

import importlib.util
import json

import pytest

from jaxinfer.sampling_params import SamplingParams
from tests.serve.harness import run_client_script

CLIENT = r"""
import json, sys
import grpc
from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc

target, prompt, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with grpc.insecure_channel(target) as channel:
    stub = jetstream_pb2_grpc.OrchestratorStub(channel)
    live = stub.HealthCheck(jetstream_pb2.HealthCheckRequest()).is_live
    text = [r.stream_content.samples[0] for r in stub.Decode(jetstream_pb2.DecodeRequest(
        text_content=jetstream_pb2.DecodeRequest.TextContent(text=prompt), max_tokens=12))]
    tokens = [r.stream_content.samples[0] for r in stub.Decode(jetstream_pb2.DecodeRequest(
        token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=ids), max_tokens=12))]
    try:
        list(stub.Decode(jetstream_pb2.DecodeRequest(max_tokens=3)))
        error = None
    except grpc.RpcError as exc:
        error = exc.code().name
print(json.dumps({"live": live, "text": "".join(s.text for s in text),
                  "text_ids": [t for s in text for t in s.token_ids],
                  "token_ids": [t for s in tokens for t in s.token_ids],
                  "token_texts": [s.text for s in tokens], "error": error}))
"""


def test_jetstream_stubs_talk_to_the_orchestrator(served, offline):
    assert importlib.util.find_spec("jetstream") is not None, \
        "google-jetstream is missing: pip install --no-deps google-jetstream==0.2.2 (the README's test command does)"
    prompt = "the cat sat on the mat"
    ids = offline.tokenizer.encode("hello world")
    want_text = offline.generate([prompt], SamplingParams(max_tokens=12))[0]
    want_ids = offline.generate([ids], SamplingParams(max_tokens=12))[0]
    result = run_client_script(CLIENT, served.grpc, prompt, json.dumps(ids))
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["live"] is True
    assert got["text"] == want_text.text and got["text_ids"] == want_text.output_ids
    assert got["token_ids"] == want_ids.output_ids and not any(got["token_texts"])
    assert got["error"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize("name", ["DecodeRequest", "DecodeResponse", "HealthCheckRequest", "HealthCheckResponse"])
def test_wire_format_matches_published_proto(name):
    """Package, service and each message's descriptor (names, numbers, types, labels, oneofs, nested
    messages) equal JetStream's."""
    script = r"""
import json, sys
from google.protobuf import descriptor_pb2, json_format
if sys.argv[1] == "ours":
    from jaxinfer.serve.proto import jetstream_pb2 as module
else:
    from jetstream.core.proto import jetstream_pb2 as module
message = descriptor_pb2.DescriptorProto()
module.DESCRIPTOR.message_types_by_name[sys.argv[2]].CopyToProto(message)
service = descriptor_pb2.ServiceDescriptorProto()
module.DESCRIPTOR.services_by_name["Orchestrator"].CopyToProto(service)
for method in service.method:
    method.ClearField("options")
print(json.dumps({"package": module.DESCRIPTOR.package, "message": json_format.MessageToDict(message),
                  "service": json_format.MessageToDict(service)}, sort_keys=True))
"""
    ours = run_client_script(script, "ours", name)
    theirs = run_client_script(script, "theirs", name)
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    assert json.loads(ours.stdout) == json.loads(theirs.stdout)
