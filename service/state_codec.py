"""Session state on the wire: raw tensor bytes behind a small fixed header. No pickle.

    offset  size  field
    0       4     magic b"LSTM"
    4       1     codec version (2)
    5       1     dtype code (1 = float32, little-endian)
    6       2     reserved (0)
    8       4     rows (always 1: one sequence)
    12      4     columns (floats per row: h and c of every layer)
    16      8     model fingerprint (the first 16 hex digits, as 8 bytes)
    24      8     tokens consumed (u64)
    32      8     version counter (u64): compare-and-set token for concurrent writers
    40      8     created_at (f64, unix seconds)
    48      8     updated_at (f64, unix seconds)
    56      ...   rows * columns * 4 bytes of float32 state, layout [h_1 .. h_L, c_1 .. c_L]

Version 1 laid the state out [h_1, c_1, h_2, c_2, ...]; keys carry the codec version
(RedisSessionStore's namespace), so a version-1 blob is never read as version 2.

The version sits at a fixed offset so the Redis compare-and-set script can compare it as bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"LSTM"
CODEC_VERSION = 2
DTYPE_FLOAT32 = 1
HEADER = struct.Struct("<4sBBHII8sQQdd")
HEADER_SIZE = HEADER.size  # 56
VERSION_OFFSET = 32
VERSION_FORMAT = struct.Struct("<Q")


def store_namespace(fingerprint: str) -> str:
    """Where a model's sessions live in a shared store: its fingerprint and this codec's version."""
    return f"{fingerprint}:v{CODEC_VERSION}"


class StateDecodeError(ValueError):
    """A stored blob is not a state this service can use; the message says why."""


@dataclass
class SessionState:
    """One session: its LSTM state as flat float32 rows (1, S) (model.engine's format) and bookkeeping."""

    rows: np.ndarray  # (1, S) float32
    tokens: int
    version: int
    created_at: float
    updated_at: float


def encode_state(session: SessionState, fingerprint: str) -> bytes:
    flat = np.asarray(session.rows, dtype="<f4")
    if flat.ndim != 2 or flat.shape[0] != 1:
        raise ValueError(f"expected (1, S) state rows, got {flat.shape}")
    header = HEADER.pack(
        MAGIC,
        CODEC_VERSION,
        DTYPE_FLOAT32,
        0,
        1,
        flat.shape[1],
        bytes.fromhex(fingerprint[:16]),
        session.tokens,
        session.version,
        session.created_at,
        session.updated_at,
    )
    return header + flat.tobytes()


def version_bytes(version: int) -> bytes:
    return VERSION_FORMAT.pack(version)


def decode_state(blob: bytes, fingerprint: str, expected_columns: int) -> SessionState:
    """Parse a blob, checking everything the header claims against this model."""
    if len(blob) < HEADER_SIZE:
        raise StateDecodeError(f"state blob of {len(blob)} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, codec, dtype, _, rows, cols, fp, tokens, version, created, updated = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise StateDecodeError("state blob does not start with the LSTM magic bytes")
    if codec != CODEC_VERSION:
        raise StateDecodeError(f"state codec version {codec} is not supported (this service reads {CODEC_VERSION})")
    if dtype != DTYPE_FLOAT32:
        raise StateDecodeError(f"state dtype code {dtype} is not float32")
    if fp.hex() != fingerprint[:16]:
        raise StateDecodeError(f"state belongs to model {fp.hex()}, not {fingerprint[:16]}")
    if not (np.isfinite(created) and np.isfinite(updated)):
        raise StateDecodeError("state timestamps are not finite numbers")
    if rows != 1 or cols != expected_columns:
        raise StateDecodeError(f"state shape ({rows}, {cols}) does not fit this model (1, {expected_columns})")
    payload = blob[HEADER_SIZE:]
    if len(payload) != rows * cols * 4:
        raise StateDecodeError(f"state payload is {len(payload)} bytes, header promises {rows * cols * 4}")
    array = np.frombuffer(payload, dtype="<f4").reshape(rows, cols).copy()
    if not np.isfinite(array).all():
        raise StateDecodeError("state holds NaN or infinite values")
    return SessionState(array, tokens, version, created, updated)
