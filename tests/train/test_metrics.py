"""Metrics sinks: TensorBoard event files (decoded by hand and by tensorboardX's protobufs), the JSONL log
and its truncation on resume, Weights & Biases through a stand-in module, throughput."""

from __future__ import annotations

import json
import math
import struct
import sys
import types

import pytest

from jaxalign.train import LogConfig
from jaxalign.train import metrics as metrics_module
from jaxalign.train.metrics import METRICS_FILE, MetricsLogger, Throughput
from jaxalign.train.tensorboard import EventFileWriter, crc32c, masked_crc32c


def bitwise_crc32c(data: bytes) -> int:
    """CRC-32C bit by bit (no table), an independent check of the writer's table-driven one."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def records(path) -> list[bytes]:
    """The payloads of a TFRecord file, checking both masked CRCs of every record."""
    data, payloads, offset = open(path, "rb").read(), [], 0
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[offset + 8:offset + 12])
        payload = data[offset + 12:offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
        assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload)
        payloads.append(payload)
        offset += 16 + length
    return payloads


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283 == bitwise_crc32c(b"123456789")
    assert crc32c(b"jaxalign event") == bitwise_crc32c(b"jaxalign event")


def test_event_file_holds_the_scalars_by_hand(tmp_path):
    writer = EventFileWriter(tmp_path)
    writer.add_scalars(7, {"loss": 0.25})
    writer.close()
    first, second = records(writer.path)
    assert b"brain.Event:2" in first
    # Event: wall_time (field 1, double), step (field 2) = 7, summary (field 5) { value { tag, simple_value } }.
    assert second[0] == 0x09 and second[9:11] == bytes([0x10, 7])
    value = bytes([0x0A, 4]) + b"loss" + bytes([0x15]) + struct.pack("<f", 0.25)
    assert second[11:] == bytes([0x2A, len(value) + 2, 0x0A, len(value)]) + value


def test_event_file_parses_with_tensorboards_protobufs(tmp_path):
    from tensorboardX.proto import event_pb2  # an independent decoder of the event files (test extra)
    writer = EventFileWriter(tmp_path)
    writer.add_scalars(3, {"loss": 1.5, "learning_rate": 2e-5})
    writer.add_scalars(300, {"loss": -0.75})
    writer.close()
    events = [event_pb2.Event.FromString(payload) for payload in records(writer.path)]
    assert events[0].file_version == "brain.Event:2"
    scalars = [(event.step, value.tag, value.simple_value) for event in events[1:] for value in event.summary.value]
    assert scalars == [(3, "loss", 1.5), (3, "learning_rate", pytest.approx(2e-5)), (300, "loss", -0.75)]
    assert all(event.wall_time > 1e9 for event in events)


def test_jsonl_log_writes_plain_values_and_drops_steps_after_a_resume(tmp_path):
    config = LogConfig(directory=str(tmp_path), tensorboard=False, progress_bar=False)
    logger = MetricsLogger(config, total_steps=5, start_step=0)
    for step in range(1, 6):
        logger.log(step, {"loss": float(step), "finite": True})
    logger.log(6, {"loss": math.nan, "finite": False})
    logger.close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert json.loads(lines[-1]) == {"step": 6, "loss": None, "finite": False}
    # Resuming from the checkpoint of step 3: steps 4-6 will be recomputed, so their records go.
    logger = MetricsLogger(config, total_steps=5, start_step=3)
    logger.log(4, {"loss": 40.0})
    logger.close()
    assert [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()] == [
        {"step": 1, "loss": 1.0, "finite": True}, {"step": 2, "loss": 2.0, "finite": True},
        {"step": 3, "loss": 3.0, "finite": True}, {"step": 4, "loss": 40.0}]


def test_a_cut_short_last_jsonl_line_is_dropped_on_resume(tmp_path):
    config = LogConfig(directory=str(tmp_path), tensorboard=False, progress_bar=False)
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-write
    with pytest.warns(UserWarning, match="unreadable last line 3"):
        logger = MetricsLogger(config, total_steps=5, start_step=2)
    logger.log(3, {"loss": 1.0})
    logger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    # A damaged line before the last is not a crash artefact: it is reported, naming the line.
    path.write_text('{"step": 1, "loss": 2.0}\ngarbage\n{"step": 2, "loss": 1.5}\n')
    with pytest.raises(ValueError, match="line 2: not a metrics record"):
        MetricsLogger(config, total_steps=5, start_step=2)


def test_wandb_run_is_created_logged_and_continued(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    config = LogConfig(directory=str(tmp_path), tensorboard=False, progress_bar=False, wandb_project="tiny",
                       wandb_run_name="first")
    for start in (0, 1):
        logger = MetricsLogger(config, total_steps=2, start_step=start, run_config={"seed": 3})
        logger.log(start + 1, {"loss": 0.5})
        logger.close()
    first, second = calls[0][1], calls[3][1]
    assert first["project"] == "tiny" and first["name"] == "first" and first["config"] == {"seed": 3}
    assert first["resume"] == "allow" and first["id"] and second["id"] == first["id"]
    assert calls[1] == ("log", 1, {"loss": 0.5}) and calls[2] == ("finish",) and calls[4][1] == 2


def test_wandb_asked_for_but_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="wandb is not installed"):
        MetricsLogger(LogConfig(wandb_project="tiny", progress_bar=False), total_steps=1, start_step=0)


def test_throughput_averages_over_the_steps_since_the_last_report(monkeypatch):
    clock = iter([100.0, 101.0, 104.0, 105.0])
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))
    throughput = Throughput()
    throughput.step_done(tokens=100)
    throughput.step_done(tokens=500)
    assert throughput.report() == {"step_time": 2.0, "tokens_per_second": 150.0}
    throughput.step_done(tokens=None)
    assert throughput.report() == {"step_time": 1.0}
