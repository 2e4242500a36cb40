"""A parent written against the broker's proto with Python grpcio (the
C-core stack most non-Rust parents use), over the broker's Unix socket or
over mutual TLS.

Usage: grpc_client.py STUBS_DIR SOCKET
       grpc_client.py STUBS_DIR --tls HOST:PORT PKI_DIR PARENT

Creates a bubble, calls it, deletes it; checks that a malformed message is
INVALID_ARGUMENT and an oversized one RESOURCE_EXHAUSTED naming
max_payload. Exits non-zero on the first failed check.
"""

import sys

import grpc

sys.path.insert(0, sys.argv[1])
from bubble.v1 import broker_pb2 as pb  # noqa: E402
from bubble.v1 import broker_pb2_grpc as rpc  # noqa: E402


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def main():
    if sys.argv[2] == "--tls":
        target, pki, parent = sys.argv[3], sys.argv[4], sys.argv[5]
        # Default options: the server certificate is checked against the
        # target's host name.
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(f"{pki}/ca.pem"),
            private_key=read(f"{pki}/parents/{parent}.key"),
            certificate_chain=read(f"{pki}/parents/{parent}.pem"),
        )
        channel = grpc.secure_channel(target, creds)
        owner = f"cert:{parent}"
    else:
        # Default options: grpc-core sends the socket path, percent-encoded,
        # as :authority, which the broker accepts.
        channel = grpc.insecure_channel("unix:" + sys.argv[2])
        owner = None
    stub = rpc.BrokerStub(channel)

    b = stub.CreateBubble(pb.CreateBubbleRequest(memory_mib=16, vcpus=1), timeout=30)
    check(b.state == pb.BUBBLE_STATE_READY, f"created {b.bubble_id} READY")
    if owner is not None:
        check(b.owner == owner, f"owned by {b.owner}")
    r = stub.Call(pb.CallRequest(bubble_id=b.bubble_id, op="echo", input=b"from python"), timeout=30)
    check(r.output == b"from python", "echo answered")

    # Bytes that are not a CallRequest (a field header with no value).
    raw = channel.unary_unary(
        "/bubble.v1.Broker/Call",
        request_serializer=lambda x: x,
        response_deserializer=lambda x: x,
    )
    try:
        raw(b"\x0a\xff\xff\xff\xff\x0f", timeout=30)
        check(False, "malformed message refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"malformed: {e.code()} {e.details()}")

    big = pb.CallRequest(bubble_id=b.bubble_id, op="echo", input=b"x" * (3 << 20))
    try:
        stub.Call(big, timeout=30)
        check(False, "oversized message refused")
    except grpc.RpcError as e:
        check(
            e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_payload" in e.details(),
            f"oversized: {e.code()} {e.details()}",
        )

    d = stub.DeleteBubble(pb.BubbleRef(bubble_id=b.bubble_id), timeout=30)
    check(d.state == pb.BUBBLE_STATE_DELETED, "deleted")


if __name__ == "__main__":
    main()
