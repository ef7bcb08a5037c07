"""A minimal TensorBoard event-file writer for scalars, so logging needs neither TensorFlow nor tensorboardX.

An event file is a sequence of TFRecords, each holding one serialised ``tensorflow.Event`` protobuf::

    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with ``masked_crc32c(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8`` (mod 2³²) and CRC-32C (Castagnoli).
The first event carries ``file_version = "brain.Event:2"``; each scalar is an event with ``wall_time``,
``step`` and ``summary.value = [{tag, simple_value}]``. Only the protobuf fields written here are encoded:

    Event:          wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5
    Summary:        value = 1 (repeated Summary.Value)
    Summary.Value:  tag = 1 (string), simple_value = 2 (float)
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping

_CRC32C_POLYNOMIAL = 0x82F63B78  # Castagnoli, bit-reversed


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLYNOMIAL if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings and nested messages."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(*, wall_time: float, step: int = 0, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
    """A serialised ``Event`` protobuf (see the module docstring for the fields)."""
    event = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        event += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        event += _field_bytes(5, values)
    return event


def encode_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class EventFileWriter:
    """Appends scalar events to a new ``events.out.tfevents.*`` file in ``directory`` (TensorBoard's --logdir)."""

    def __init__(self, directory: str | os.PathLike):
        os.makedirs(directory, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(directory, name)
        self._file = open(self.path, "ab")
        self._write(encode_event(wall_time=time.time(), file_version="brain.Event:2"))

    def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._write(encode_event(wall_time=time.time(), step=step, scalars=scalars))

    def _write(self, event: bytes) -> None:
        self._file.write(encode_record(event))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
