"""The trajectory log: base weights + this file reproduce the trained weights bit-exactly (DESIGN I4).

Layout (little-endian):
    b"LZOTRAJ\\x01" | u32 n | header JSON (n bytes) | u32 crc32(header)
    then per step:  u32 n | record (n bytes) | u32 crc32(record)
    record = u64 step | u32 world_size | u32 k | f64 lr | u8 flags (1 = stop) | codes (world_size*k payload elements)
A record costs world_size*k*(bytes per code) + 33 bytes. Records are appended and flushed one by one, so a kill -9
loses at most the step in flight; a record cut short at the end of the file is a crash (dropped with a warning),
a complete record whose checksum fails is corruption (an error naming the last good step).
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .optimizer import StepRecord

MAGIC = b"LZOTRAJ\x01"
FORMAT_VERSION = 1
_RECORD = struct.Struct("<QIIdB")
_U32 = struct.Struct("<I")
_DTYPES = {"int8": np.int8, "float32": np.float32}


class CorruptLog(UserError):
    def __init__(self, path, message: str, last_good_step: int | None):
        self.last_good_step = last_good_step
        where = "no step" if last_good_step is None else f"step {last_good_step}"
        super().__init__(f"{path}: {message}; the last good record is {where}")


def record_size(slots: int, bytes_per_code: int) -> int:
    """Bytes one step adds to the log."""
    return 4 + _RECORD.size + slots * bytes_per_code + 4


def _frame(payload: bytes) -> bytes:
    return _U32.pack(len(payload)) + payload + _U32.pack(zlib.crc32(payload))


def encode_record(record: StepRecord, dtype: str) -> bytes:
    codes = np.asarray(record.codes, dtype=_DTYPES[dtype]).tobytes()
    return _frame(_RECORD.pack(record.step, record.world_size, record.k, record.lr, int(record.stop)) + codes)


@dataclass
class Trajectory:
    header: dict
    records: list[StepRecord]

    @property
    def last_step(self) -> int | None:
        return self.records[-1].step if self.records else None


def read(path: str | Path) -> Trajectory:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"trajectory log not found: {path}")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CorruptLog(path, "not a lightning_zo trajectory log (bad magic)", None)
    pos = len(MAGIC)
    header_bytes, pos, torn = _next_frame(data, pos)
    if header_bytes is None:
        raise CorruptLog(path, "the header is truncated" if torn else "the header checksum does not match", None)
    header = json.loads(header_bytes)
    if header.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported trajectory format {header.get('format_version')!r}")
    dtype = _DTYPES[header["payload_dtype"]]
    records: list[StepRecord] = []
    while pos < len(data):
        body, new_pos, torn = _next_frame(data, pos)
        last = records[-1].step if records else None
        if torn:
            warnings.warn(f"{path}: dropping a torn final record ({len(data) - pos} bytes, a crash mid-write); "
                          f"the log ends at step {last}", stacklevel=2)
            return Trajectory(header, records)
        if body is None:
            raise CorruptLog(path, f"record at byte {pos} fails its checksum", last)
        step, world_size, k, lr, flags = _RECORD.unpack_from(body)
        codes = np.frombuffer(body[_RECORD.size:], dtype=dtype)
        expected = 0 if last is None else last + 1
        if len(codes) != world_size * k or step != expected:
            raise CorruptLog(path, f"record at byte {pos} is inconsistent (step {step}, expected {expected})", last)
        records.append(StepRecord(step=step, world_size=world_size, k=k, lr=lr, codes=codes.tolist(),
                                  stop=bool(flags & 1)))
        pos = new_pos
    return Trajectory(header, records)


def _next_frame(data: bytes, pos: int) -> tuple[bytes | None, int, bool]:
    """(payload or None if its checksum fails, next position, torn: the frame runs past the end of the file)."""
    if pos + 4 > len(data):
        return None, pos, True
    (n,) = _U32.unpack_from(data, pos)
    end = pos + 4 + n + 4
    if end > len(data):
        return None, pos, True
    body = data[pos + 4: pos + 4 + n]
    (crc,) = _U32.unpack_from(data, pos + 4 + n)
    return (body if zlib.crc32(body) == crc else None), end, False


class Writer:
    """Append-only writer; `records` are flushed to the OS one by one (fsync optional)."""

    def __init__(self, path: str | Path, header: dict, records: list[StepRecord] = (), fsync: bool = False):
        self.path, self.fsync, self.dtype = Path(path), fsync, header["payload_dtype"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Rewrite the known-good prefix (drops a torn tail), then append.
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(MAGIC + _frame(json.dumps(header, sort_keys=True).encode()))
            for r in records:
                f.write(encode_record(r, self.dtype))
        tmp.replace(self.path)
        self._file = self.path.open("ab", buffering=0)

    def append(self, record: StepRecord) -> None:
        self._file.write(encode_record(record, self.dtype))
        if self.fsync:
            import os

            os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
