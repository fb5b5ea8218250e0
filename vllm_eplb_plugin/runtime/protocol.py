"""Wire protocol between the EPLB scheduler and the ranks.

Transport: ``multiprocessing.connection`` with an auth key. Its HMAC challenge runs before
any message, so a peer with a wrong key can neither send nor read anything. Messages are
JSON objects (never pickle: even an authenticated peer cannot make the other side run
code), each with a string ``"type"``:

- rank -> scheduler ``hello``: ``rank``, ``world_size``, ``num_layers``, ``num_experts``,
  ``table`` ``[L][K0]`` (the experts in this rank's slots, per layer);
- scheduler -> every rank ``init``: ``mode`` (A2A / AG / EX), ``table`` ``[L][R][K]``, the
  placement every rank starts from (with the redundant slots filled);
- rank -> scheduler ``load``: ``round``, ``layer``, ``load`` ``[E]`` (tokens this rank
  routed to each logical expert in that round);
- scheduler -> every rank ``plan``: ``round``, ``layer``, ``table`` ``[R][K]``; or ``keep``:
  ``round``, ``layer``, ``reason`` (the layer stays as it is);
- scheduler -> rank ``error``: ``message``, before it drops a connection or a report.
"""

from __future__ import annotations

import json
import os
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from typing import Any

AUTH_ENV = "EPLB_AUTH_KEY"


class AuthKeyMissing(ValueError):
    """Neither ``--auth_key`` nor ``EPLB_AUTH_KEY`` gives a key."""


class ProtocolError(ValueError):
    """A message that is not a JSON object with a string ``type``."""


def resolve_auth_key(value: str | bytes | None) -> bytes:
    """The key given, else ``$EPLB_AUTH_KEY``; there is no built-in default."""
    key = value if value else os.environ.get(AUTH_ENV, "")
    if not key:
        raise AuthKeyMissing(f"no EPLB auth key: pass --auth_key or set {AUTH_ENV}")
    return key if isinstance(key, bytes) else key.encode()


def send(conn: Connection, msg: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(msg).encode())


def recv(conn: Connection) -> dict[str, Any]:
    raw = conn.recv_bytes()
    try:
        msg = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"EPLB message is not JSON: {raw[:80]!r}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(f"EPLB message must be a JSON object with a string 'type'; got {str(msg)[:80]}")
    return msg


def connect(host: str, port: int, auth_key: bytes) -> Connection:
    """A connection to the scheduler at ``host:port``."""
    try:
        return Client((host, port), authkey=auth_key)
    except AuthenticationError as exc:
        raise AuthenticationError(
            f"EPLB scheduler at {host}:{port} refused the auth key; use the scheduler's key "
            f"(--auth_key or {AUTH_ENV})"
        ) from exc
