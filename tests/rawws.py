"""A deliberately minimal websocket client on a raw socket, for clients that misbehave.

The websockets library refuses to misbehave (it reads in the background, masks,
answers pings); these helpers do only what a test asks for.
"""

from __future__ import annotations

import base64
import os
import socket
import struct


def raw_connect(
    port: int, host: str = "127.0.0.1", rcvbuf: int | None = None, origin: str | None = None
) -> socket.socket:
    """Open a TCP connection and complete the websocket handshake; return the socket."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    headers = [
        "GET / HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin:
        headers.append(f"Origin: {origin}")
    sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)  # byte by byte: read nothing past the handshake
        if not chunk:
            raise ConnectionError("closed during handshake")
        response += chunk
    status = response.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        raise ConnectionError(status.decode(errors="replace"))
    return sock


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """Return one masked client frame."""
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def send_text(sock: socket.socket, text: str) -> None:
    sock.sendall(frame(text.encode()))
