"""The trajectory log: base weights + this file reproduce the trained weights bit-exactly (DESIGN I4).

Layout (little-endian):
    b"LZOTRAJ\\x01" | u32 n | header JSON (n bytes) | u32 crc32(header)
    then per step:  u32 n | record (n bytes) | u32 crc32(record)
    record = u64 step | u32 world_size | u32 k | f64 lr | u8 flags (1 = stop) | codes (world_size*k payload elements)
A record costs world_size*k*(bytes per code) + 33 bytes. Records are appended and flushed one by one, so a kill -9
loses at most the step in flight, and tears at most that one record, of a size the log already implies: the
header's `record_slots` (format 2, when the writer was told its world_size*k) or else the last complete record's.
So only bytes after the last complete record that are a prefix of such a record (shorter than it, length field
and step consistent) are a torn tail, dropped with a warning; anything else (a frame whose length field runs past
the end of the file with more than one record left, a complete record whose checksum fails) is corruption: an
error naming the last good step. Format 1 headers (no `record_slots`) read as before.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .optimizer import StepRecord

MAGIC = b"LZOTRAJ\x01"
FORMAT_VERSION = 2
HISTORY_VERSION = 3  # a log whose update rule depends on past steps: releases before rules (which would replay it
                     # as sgd, silently wrong) refuse it
POPULATION_VERSION = 4  # a log whose steps are normalised as a population (issue 44): releases before it refuse it
MASK_VERSION = 5  # a log whose steps perturb sparse masks (core/masks.py): releases before it refuse it
READABLE_VERSIONS = (1, 2, 3, 4, 5)


def format_version(header: dict) -> int:
    """The version a log with this header is written as: 2 unless its update needs a later release to replay."""
    if header.get("mask") is not None:
        return MASK_VERSION
    if header.get("population", "none") != "none":
        return POPULATION_VERSION
    return FORMAT_VERSION if (header.get("rule") or {"name": "sgd"})["name"] == "sgd" else HISTORY_VERSION
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
    header_end: int = 0  # byte offset where the first record starts
    ends: list[int] = field(default_factory=list)  # byte offset where each record ends
    torn_bytes: int = 0  # bytes of a torn final record after the last complete one (dropped)

    @property
    def last_step(self) -> int | None:
        return self.records[-1].step if self.records else None


def read(path: str | Path) -> Trajectory:
    """Validate and parse the whole log; a torn final record is dropped with a warning, damage is CorruptLog."""
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
    if header.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"{path}: unsupported trajectory format {header.get('format_version')!r}")
    dtype = _DTYPES[header["payload_dtype"]]
    log = Trajectory(header, [], header_end=pos)
    while pos < len(data):
        body, new_pos, torn = _next_frame(data, pos)
        last = log.last_step
        expected = 0 if last is None else last + 1
        if torn:
            last_slots = log.records[-1].world_size * log.records[-1].k if log.records else None
            why = _not_torn(data[pos:], header.get("record_slots"), last_slots, np.dtype(dtype).itemsize, expected)
            if why:
                raise CorruptLog(path, f"the {len(data) - pos} bytes after step {last} at byte {pos} are not a torn "
                                       f"final record ({why})", last)
            warnings.warn(f"{path}: dropping a torn final record ({len(data) - pos} bytes, a crash mid-write); "
                          f"the log ends at step {last}", stacklevel=2)
            log.torn_bytes = len(data) - pos
            return log
        if body is None:
            raise CorruptLog(path, f"record at byte {pos} fails its checksum", last)
        if len(body) < _RECORD.size:
            raise CorruptLog(path, f"record at byte {pos} is {len(body)} bytes, shorter than a record", last)
        step, world_size, k, lr, flags = _RECORD.unpack_from(body)
        if (len(body) - _RECORD.size) % np.dtype(dtype).itemsize:
            raise CorruptLog(path, f"record at byte {pos} does not hold whole codes", last)
        codes = np.frombuffer(body[_RECORD.size:], dtype=dtype)
        if len(codes) != world_size * k or step != expected:
            raise CorruptLog(path, f"record at byte {pos} is inconsistent (step {step}, expected {expected})", last)
        log.records.append(StepRecord(step=step, world_size=world_size, k=k, lr=lr, codes=codes.tolist(),
                                      stop=bool(flags & 1)))
        log.ends.append(new_pos)
        pos = new_pos
    return log


def _not_torn(tail: bytes, slots: int | None, last_slots: int | None, code_bytes: int, step: int) -> str:
    """Why `tail` (the bytes after the last complete record, whose frame runs past the end of the file) cannot be a
    record for `step` cut short by a crash; "" if it can. `slots`: the record size the header implies (strict).
    Without it (format 1), the record's own step, world size and k must fit its length field, or, when fewer than
    20 bytes of it are left, its length field must be that of the last complete record (`last_slots`)."""
    size = None if slots is None else record_size(slots, code_bytes)
    if size is not None and len(tail) >= size:
        return f"a record of this log is {size} bytes"
    if len(tail) < 4:
        return ""
    (n,) = _U32.unpack_from(tail)
    if size is not None and n != size - 8:
        return f"its length field says {n} bytes, a record of this log holds {size - 8}"
    if n <= _RECORD.size or (n - _RECORD.size) % code_bytes:
        return f"its length field says {n} bytes, not a record of whole codes"
    if len(tail) >= 12 and struct.unpack_from("<Q", tail, 4)[0] != step:
        return f"it is not step {step}"
    if len(tail) >= 20:
        world_size, k = struct.unpack_from("<II", tail, 12)
        if world_size * k * code_bytes != n - _RECORD.size:
            return (f"its length field says {n} bytes, but its world size {world_size} and k {k} make a record "
                    f"of {world_size * k * code_bytes + _RECORD.size}")
    elif size is None and last_slots is not None and n != _RECORD.size + last_slots * code_bytes:
        return f"its length field says {n} bytes, the last record holds {_RECORD.size + last_slots * code_bytes}"
    return ""


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
    """Append-only writer; `records` are flushed to the OS one by one (fsync optional).

    `records`: the log's records so far (what `read` returned; none for a new log). An existing log is validated
    as a whole first (`read`: a damaged one raises and nothing is written) and must hold exactly these records;
    then a torn tail is cut off and the writer appends. Only a changed header rewrites the file (atomically: the
    validated records' bytes verbatim behind the new header). `slots` (world_size * k of this run) goes into the
    header as `record_slots`: the size of a record, so that a later read tells a torn record from damage.
    """

    def __init__(self, path: str | Path, header: dict, records: list[StepRecord] = (), fsync: bool = False,
                 slots: int | None = None):
        self.path, self.fsync, self.dtype = Path(path), fsync, header["payload_dtype"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = {**header, **({"record_slots": int(slots)} if slots else {})}
        head = MAGIC + _frame(json.dumps(header, sort_keys=True).encode())
        records = list(records)
        if self.path.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the caller's own read already warned about a torn tail
                existing = read(self.path)
            if [r.step for r in existing.records] != [r.step for r in records]:
                raise ValueError(f"{self.path} holds steps {existing.records[0].step if existing.records else None}"
                                 f"..{existing.last_step}, not the {len(records)} records given: not rewriting it")
            data = self.path.read_bytes()
            end = existing.ends[-1] if existing.ends else existing.header_end
            if data[:existing.header_end] == head:
                if len(data) > end:
                    with self.path.open("r+b") as f:
                        f.truncate(end)
            else:
                self._replace(head + data[existing.header_end:end])
        else:
            self._replace(head + b"".join(encode_record(r, self.dtype) for r in records))
        self._file = self.path.open("ab", buffering=0)

    def _replace(self, content: bytes) -> None:
        import os

        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            f.write(content)
            if self.fsync:
                os.fsync(f.fileno())
        tmp.replace(self.path)

    def append(self, record: StepRecord) -> None:
        self._file.write(encode_record(record, self.dtype))
        if self.fsync:
            import os

            os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
