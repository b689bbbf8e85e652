#!/usr/bin/env bash
# Regenerate the committed Python stubs from the .proto files (needs grpcio-tools, in the dev extra).
set -euo pipefail
cd "$(dirname "$0")/../../.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
    jaxinfer/serve/proto/inference.proto jaxinfer/serve/proto/jetstream.proto
