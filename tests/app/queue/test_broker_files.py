"""The embedded broker's transport against real files, with a producer and a consumer in separate processes."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from queue import Empty

from kombu import Connection

from app.queue.broker_files import TRANSPORT

QUEUE = "cpu"


def _connection(root: Path, transport: str = TRANSPORT) -> Connection:
    """The layout `app.queue.broker.celery_config` gives the embedded broker: queue/ and processed/ in one folder."""
    for sub in ("queue", "processed"):
        (root / sub).mkdir(exist_ok=True)
    return Connection("filesystem://", transport=transport, transport_options={
        "data_folder_in": str(root / "queue"), "data_folder_out": str(root / "queue"),
        "processed_folder": str(root / "processed"), "store_processed": False})


def _produce(folder: Path, count: int, transport: str) -> None:
    # 1 MiB bodies: serializing one takes long enough that a consumer polling the folder meets every message
    # before it is whole, if the file is visible under its final name meanwhile (kombu's own transport: all of them)
    padding = "x" * (1 << 20)
    with _connection(folder, transport) as conn:
        for i in range(count):
            conn.default_channel._put(QUEUE, {"i": i, "padding": padding})


def _consume(folder: Path, count: int, transport: str, ready, produced, results) -> None:
    received, errors = [], []
    with _connection(folder, transport) as conn:
        channel = conn.default_channel
        ready.release()
        deadline = time.monotonic() + 60
        while len(received) + len(errors) < count and time.monotonic() < deadline:
            try:
                received.append(channel._get(QUEUE)["i"])
            except Empty:  # nothing (whole) in the folder yet; or ever again, once the producer is done
                if produced.is_set():
                    break
                continue
            except ValueError as exc:  # a message read before it was written
                errors.append(repr(exc))
    results.put((received, errors))


def _race(root: Path, count: int, consumers: int = 1, transport: str = TRANSPORT) -> tuple[list[int], list[str]]:
    """`count` messages put while `consumers` processes poll; a consumer stops when the folder is empty after the
    producer is done (or after `count` outcomes, or 60 s). What all of them got is returned."""
    ctx = multiprocessing.get_context("spawn")
    results, ready, produced = ctx.Queue(), ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=_consume, args=(root, count, transport, ready, produced, results))
             for _ in range(consumers)]
    for proc in procs:
        proc.start()
    for _ in procs:  # every consumer is polling before the first message is put
        assert ready.acquire(timeout=60)
    _produce(root, count, transport)
    produced.set()
    received, errors = [], []
    for _ in procs:
        got, failed = results.get(timeout=90)
        received += got
        errors += failed
    for proc in procs:
        proc.join(timeout=10)
    return received, errors


def test_a_polling_consumer_only_ever_sees_whole_messages(tmp_path):
    received, errors = _race(tmp_path, 60)
    assert errors == []
    assert sorted(received) == list(range(60))
    assert os.listdir(tmp_path / "queue") == [] and os.listdir(tmp_path / "processed") == []  # nothing left over


def test_an_undecodable_file_is_skipped_and_the_next_message_delivered(tmp_path, caplog):
    with _connection(tmp_path) as conn:
        # "0_" sorts before kombu's names (a millisecond timestamp), so these two are taken first
        (tmp_path / "queue" / f"0_empty.{QUEUE}.msg").write_bytes(b"")
        (tmp_path / "queue" / f"0_torn.{QUEUE}.msg").write_bytes(b'{"body": "tor')
        conn.default_channel._put(QUEUE, {"i": 7})
        with caplog.at_level("WARNING", logger="squeeze.broker"):
            assert conn.default_channel._get(QUEUE) == {"i": 7}
    assert len([r for r in caplog.records if "undecodable" in r.getMessage()]) == 2
    assert os.listdir(tmp_path / "queue") == [] and os.listdir(tmp_path / "processed") == []


def test_two_consumers_take_each_message_exactly_once(tmp_path):
    received, errors = _race(tmp_path, 40, consumers=2)
    assert errors == []
    assert sorted(received) == list(range(40))  # none lost, none twice
