"""The embedded broker: kombu's `filesystem://` transport with its two crash paths closed.

kombu 5.7's `_put` creates `<ts>_<uuid>.<queue>.msg` and only then serializes and writes the message, and `_get`
takes any file with that name. A worker polling every 0.1 s can take a file in that window, read an empty body,
and `json.loads('')` raises out of Celery's consumer loop: "Unrecoverable error", the worker exits, and every job
sits queued until someone restarts it (kombu issue #1551; one CI run of the suite lost its worker this way).

- `_put` writes the message under a name `_get` does not match (a leading dot, a `.part` suffix) and renames it
  into place, so a consumer sees whole messages or nothing.
- `_get` takes a message by renaming it into the broker's processed folder (one consumer wins; kombu's move to
  the system temp dir is a copy when /tmp is another filesystem), and skips a file that does not decode
  (written by another kombu, torn by a crash or a full disk) with a warning instead of raising: the job row is
  the truth, and the reaper re-sends a queued job nobody claimed.
"""

from __future__ import annotations

import logging
import os
import uuid
from queue import Empty
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

log = logging.getLogger("squeeze.broker")

#: For Celery's `broker_transport` (a broker_url of `filesystem://` then picks this class).
TRANSPORT = f"{__name__}:AtomicFilesystemTransport"


class AtomicFilesystemChannel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # kombu's name, so its sorting (oldest first) and queue matching apply unchanged
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.part")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            try:
                os.remove(partial)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue):
        suffix = f"{queue}.msg"  # kombu's match: the part of the name after its first dot
        for name in sorted(os.listdir(self.data_folder_in)):  # oldest first
            if name.partition(".")[2] != suffix:
                continue
            # A rename within the broker folder: exactly one consumer takes a message (kombu moves it to the
            # system temp dir, a copy when /tmp is another filesystem, which two workers can both make).
            taken = os.path.join(self.processed_folder, name)
            try:
                os.replace(os.path.join(self.data_folder_in, name), taken)
            except FileNotFoundError:  # another consumer took it first
                continue
            try:
                with open(taken, "rb") as f:
                    payload = f.read()
            finally:
                if not self.store_processed:
                    os.remove(taken)
            try:
                return loads(bytes_to_str(payload))
            except ValueError as exc:
                log.warning("skipped an undecodable message file %s in queue %s (the reaper re-sends its job): %s",
                            name, queue, exc)
        raise Empty()


class AtomicFilesystemTransport(filesystem.Transport):
    Channel = AtomicFilesystemChannel
