"""The embedded broker's transport against real files, with a producer and a consumer in separate processes."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from queue import Empty

from kombu import Connection

from app.broker_files import TRANSPORT

QUEUE = "cpu"


def _connection(folder: Path, transport: str = TRANSPORT) -> Connection:
    return Connection("filesystem://", transport=transport, transport_options={
        "data_folder_in": str(folder), "data_folder_out": str(folder), "store_processed": False})


def _produce(folder: Path, count: int, transport: str) -> None:
    # 1 MiB bodies: serializing one takes long enough that a consumer polling the folder meets every message
    # before it is whole, if the file is visible under its final name meanwhile (kombu's own transport: all of them)
    padding = "x" * (1 << 20)
    with _connection(folder, transport) as conn:
        for i in range(count):
            conn.default_channel._put(QUEUE, {"i": i, "padding": padding})


def _consume(folder: Path, count: int, transport: str, results) -> None:
    received, errors = [], []
    with _connection(folder, transport) as conn:
        channel = conn.default_channel
        deadline = time.monotonic() + 60
        while len(received) + len(errors) < count and time.monotonic() < deadline:
            try:
                received.append(channel._get(QUEUE)["i"])
            except Empty:  # nothing (whole) in the folder yet
                continue
            except ValueError as exc:  # a message read before it was written
                errors.append(repr(exc))
    results.put((received, errors))


def _race(folder: Path, count: int, transport: str = TRANSPORT) -> tuple[list[int], list[str]]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    consumer = ctx.Process(target=_consume, args=(folder, count, transport, results))
    consumer.start()
    _produce(folder, count, transport)
    outcome = results.get(timeout=90)
    consumer.join(timeout=10)
    return outcome


def test_a_polling_consumer_only_ever_sees_whole_messages(tmp_path):
    received, errors = _race(tmp_path, 60)
    assert errors == []
    assert sorted(received) == list(range(60))
    assert os.listdir(tmp_path) == []  # no partial file left behind


def test_an_undecodable_file_is_skipped_and_the_next_message_delivered(tmp_path, caplog):
    # "0_" sorts before kombu's names (a millisecond timestamp), so these two are taken first
    (tmp_path / f"0_empty.{QUEUE}.msg").write_bytes(b"")
    (tmp_path / f"0_torn.{QUEUE}.msg").write_bytes(b'{"body": "tor')
    with _connection(tmp_path) as conn:
        conn.default_channel._put(QUEUE, {"i": 7})
        with caplog.at_level("WARNING", logger="squeeze.broker"):
            assert conn.default_channel._get(QUEUE) == {"i": 7}
    assert len([r for r in caplog.records if "undecodable" in r.getMessage()]) == 2
    assert os.listdir(tmp_path) == []
