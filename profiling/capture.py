"""Capture an XProf trace from a running ``python -m jaxinfer.serve`` through its Admin.CaptureProfile RPC.

    python profiling/capture.py [--target 127.0.0.1:9000] [--duration-ms 2000] [--log-dir /tmp/xprof]

The trace lands in ``LOG_DIR/plugins/profile/<run>/`` on the server's machine (``*.xplane.pb``); view it
with ``xprof --logdir LOG_DIR`` (``pip install xprof``) or TensorBoard's profile plugin. Run load against
the server meanwhile (e.g. ``profiling/bench_serving.py``) to see engine steps in the trace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from jaxinfer.serve.proto import inference_pb2 as pb
from jaxinfer.serve.proto import inference_pb2_grpc as pb_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:9000", help="the server's gRPC address")
    parser.add_argument("--duration-ms", type=int, default=2000)
    parser.add_argument("--log-dir", default="/tmp/xprof", help="directory on the server's machine")
    args = parser.parse_args()
    log_dir = str(Path(args.log_dir).resolve())
    with grpc.insecure_channel(args.target) as channel:
        admin = pb_grpc.AdminStub(channel)
        try:
            result = admin.CaptureProfile(pb.CaptureProfileRequest(duration_ms=args.duration_ms, log_dir=log_dir),
                                          timeout=args.duration_ms / 1000 + 60)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    print(f"captured {result.seconds:.2f} s into {result.log_dir}; view: xprof --logdir {result.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
