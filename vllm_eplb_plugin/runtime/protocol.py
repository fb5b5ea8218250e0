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

A message is at most :data:`MAX_MESSAGE_BYTES`; the receiver checks every field it reads
with :func:`int_field`, :func:`table_field` and :func:`load_field` (integers are real
integers, never booleans, floats or strings; numbers are finite and in range), so a
message from an authenticated but broken peer is refused by name, never raises further.
"""

from __future__ import annotations

import json
import os
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from typing import Any

import numpy as np

AUTH_ENV = "EPLB_AUTH_KEY"

MAX_MESSAGE_BYTES = 4 * 2**20
"""Largest message either side reads. The largest legitimate one is ``init``, the table
``[L][R][K]`` as JSON, about 5 bytes per slot: DeepSeek-V3 (61 layers x (256 experts + 32
redundant), 32 ranks) is 83 KB; 61 layers x (1024 + 1024) slots on 256 ranks is 646 KB.
A ``load`` of 1024 experts is 26 KB. 4 MiB leaves 6x room over the second; a longer
message is refused before it is read, so a forged length header allocates nothing."""

MAX_LOAD = float(2**53)
"""Largest token count a ``load`` entry may hold (the largest float that counts exactly)."""


class AuthKeyMissing(ValueError):
    """Neither ``--auth_key`` nor ``EPLB_AUTH_KEY`` gives a key."""


class ProtocolError(ValueError):
    """A message that is not a JSON object with a string ``type``, or a field that is wrong."""


class MessageTooLarge(ProtocolError):
    """A length header over the limit; the body is left unread, so the stream is out of
    step and the receiver closes the connection (the message says so)."""


def resolve_auth_key(value: str | bytes | None) -> bytes:
    """The key given, else ``$EPLB_AUTH_KEY``; there is no built-in default."""
    key = value if value else os.environ.get(AUTH_ENV, "")
    if not key:
        raise AuthKeyMissing(f"no EPLB auth key: pass --auth_key or set {AUTH_ENV}")
    return key if isinstance(key, bytes) else key.encode()


def send(conn: Connection, msg: dict[str, Any]) -> None:
    conn.send_bytes(encode(msg))


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode()


def recv(conn: Connection, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """The next message. Over ``max_bytes``: :class:`MessageTooLarge`, and the connection
    can no longer be read (close it); not a JSON object: :class:`ProtocolError`, and the
    next message may be fine."""
    try:
        raw = conn.recv_bytes(max_bytes)
    except OSError as exc:
        if str(exc) != "bad message length":  # multiprocessing's words for "over maxlength"
            raise
        raise MessageTooLarge(f"EPLB message over the {max_bytes}-byte limit; connection closed") from exc
    return decode(raw)


def decode(raw: bytes) -> dict[str, Any]:
    """``raw`` as a message: a JSON object with a string ``type``, else :class:`ProtocolError`."""
    try:
        msg = json.loads(raw)
    except RecursionError as exc:  # json's C parser nests as deep as the stack allows
        raise ProtocolError("EPLB message is nested too deeply to be a message") from exc
    except ValueError as exc:  # also a number of more than 4300 digits
        raise ProtocolError(f"EPLB message is not JSON: {raw[:80]!r}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(f"EPLB message must be a JSON object with a string 'type'; got {raw[:80]!r}")
    return msg


def show(value: Any) -> str:
    """``value`` for an error message: short, and never recursing into what a peer nested."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'list' if isinstance(value, list) else 'object'} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"


def int_field(msg: dict[str, Any], name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``msg[name]``, an integer (in ``[lo, hi)`` if given); booleans, floats and strings are refused."""
    value = msg.get(name)
    if type(value) is not int:
        raise ProtocolError(f"{name}={show(value)} is not an integer")
    if lo is not None and hi is not None and not lo <= value < hi:
        raise ProtocolError(f"{name}={show(value)} is not in [{lo}, {hi})")
    return value


def table_field(msg: dict[str, Any], name: str, rows: int, max_cols: int, num_values: int) -> np.ndarray:
    """``msg[name]``: ``rows`` lists of the same length in ``[1, max_cols]``, of integers in
    ``[0, num_values)``, as an int64 array ``[rows, cols]``."""
    table = msg.get(name)
    if (not isinstance(table, list) or len(table) != rows or not all(isinstance(row, list) for row in table)
            or not 1 <= len(table[0]) <= max_cols or any(len(row) != len(table[0]) for row in table)):
        raise ProtocolError(f"{name} must be {rows} lists of the same length, 1 to {max_cols} expert ids each")
    for i, row in enumerate(table):
        for j, value in enumerate(row):
            if type(value) is not int or not 0 <= value < num_values:
                raise ProtocolError(f"{name}[{i}][{j}]={show(value)} is not an expert id in [0, {num_values})")
    return np.array(table, dtype=np.int64)


def load_field(msg: dict[str, Any], name: str, length: int) -> np.ndarray:
    """``msg[name]``: ``length`` finite numbers in ``[0, MAX_LOAD]``, as a float64 array."""
    load = msg.get(name)
    if not isinstance(load, list) or len(load) != length:
        raise ProtocolError(f"{name} must be a list of {length} numbers; got {show(load)}")
    for i, value in enumerate(load):
        # A bool is an int to Python, and an int of 400 digits overflows float(): test the
        # type, then compare before converting (nan and inf fail the comparison).
        if type(value) not in (int, float) or not 0 <= value <= MAX_LOAD:
            raise ProtocolError(f"{name}[{i}]={show(value)} is not a finite number in [0, 2**53]")
    return np.array(load, dtype=np.float64)


def connect(host: str, port: int, auth_key: bytes) -> Connection:
    """A connection to the scheduler at ``host:port``."""
    try:
        return Client((host, port), authkey=auth_key)
    except AuthenticationError as exc:
        raise AuthenticationError(
            f"EPLB scheduler at {host}:{port} refused the auth key; use the scheduler's key "
            f"(--auth_key or {AUTH_ENV})"
        ) from exc
