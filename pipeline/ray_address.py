"""A quick look at a Ray address before ``ray.init`` is given it, for every stage that joins a cluster.

``ray.init`` retries an address with nothing behind it for minutes, printing a warning every few
seconds, and one where something other than Ray answers (a web server, Redis, a Ray dashboard port
typed for the GCS one) just as long. ``probe`` fails in seconds with one line instead: it connects,
and checks that the port speaks gRPC, as Ray's GCS and its client server (``ray://``) do.
"""

from __future__ import annotations

import os
import socket

from pipeline.errors import UserError

PROBE_TIMEOUT_S = 5.0

# An HTTP/2 client's opening (RFC 9113 §3.4): the fixed preface, then an empty SETTINGS frame.
# A gRPC server answers with a SETTINGS frame of its own (frame type 0x4) before anything else.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 0x4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 0x4
_HINT = "the head's GCS port, 6379 by default, or ray://host:10001"


def probe(address: str, given_as: str) -> None:
    """Raise a one-line ``UserError`` unless ``address`` (``host:port`` or ``ray://host:port``) answers gRPC.

    ``given_as`` says where the address came from (``--ray-address``, ``RAY_ADDRESS``), for the message.
    Addresses without a port ("auto", "local") are left to Ray; so is the protocol check when Ray
    runs with TLS (``RAY_USE_TLS``), whose handshake this does not speak.
    """
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    host = host.strip("[]")  # [::1]:6379
    where = f"cannot reach a Ray cluster at {address}"
    check = f"check {given_as} ({_HINT})"
    if not 0 < int(port) < 65536:
        raise UserError(f"{where}: port {port} is outside 1..65535")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return
            sock.sendall(_H2_PREFACE)
            answer = _read(sock, 9)
    except socket.timeout:
        raise UserError(f"{where}: no answer within {PROBE_TIMEOUT_S:g} s; {check}") from None
    except OSError as exc:
        raise UserError(f"{where}: {exc.strerror or exc}; {check}") from None
    if len(answer) < 9 or answer[3] != _H2_SETTINGS:
        seen = answer.split(b"\r\n", 1)[0].decode("ascii", "replace").strip() or "nothing"
        raise UserError(f"{where}: something else answers on port {port} (it sent {seen[:40]!r}, "
                        f"not gRPC); {check}")


def _read(sock: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes, fewer when the peer closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
