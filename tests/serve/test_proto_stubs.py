"""The committed gRPC stubs are what jaxinfer/serve/proto/generate.sh makes from the .proto files."""

import shutil
import subprocess
import sys

from tests.conftest import REPO

PROTO = REPO / "jaxinfer" / "serve" / "proto"


def test_committed_stubs_match_the_protos(tmp_path):
    work = tmp_path / "jaxinfer" / "serve" / "proto"
    work.mkdir(parents=True)
    for proto in PROTO.glob("*.proto"):
        shutil.copy(proto, work)
    protos = [f"jaxinfer/serve/proto/{p.name}" for p in sorted(PROTO.glob("*.proto"))]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", *protos], cwd=tmp_path, check=True)
    generated = sorted(work.glob("*_pb2*.py*"))
    assert len(generated) == 6
    for path in generated:
        assert path.read_text() == (PROTO / path.name).read_text(), f"{path.name} is stale: run generate.sh"
