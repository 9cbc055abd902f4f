"""Text datasets for language models: plain UTF-8 text (.txt) and JSON Lines with a "text" field (.jsonl).

Streamed a chunk (or a line) at a time, never read whole: a 10 GB corpus screens in constant memory. Nothing here
tokenizes: the job tokenizes the text with the model's own tokenizer, in the sandbox. The checks are the ones a
tokenizer would trip on later, reported now with the byte offset or line number to fix: not UTF-8, NUL bytes
(binary data), a JSON line that is not an object with a string "text", no text at all.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import IO, Any

from app.files.screening.common import ACCEPTED_DATASETS, CHUNK, ScreeningError, Sniffed, unsupported

BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
SAMPLE_BYTES = 8192  # the head judged text or binary
MAX_CONTROL_SHARE = 0.05  # more control bytes than this in the head: binary data, not text in some other encoding
MAX_LINE_BYTES = 16 * 1024 * 1024  # one JSON Lines record
TOKENIZED_NOTE = "the text is tokenized in the job by the model's own tokenizer"
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\v\x1b")


def looks_like_text(head: bytes) -> bool:
    """Whether the first bytes are text in some encoding (UTF-8 or not): no NUL byte and few control bytes. Binary
    data that is none of the accepted formats is refused as such (415), not as badly encoded text (422)."""
    sample = head[:SAMPLE_BYTES]
    if b"\0" in sample:
        return False
    controls = sum(1 for b in sample if (b < 0x20 or b == 0x7F) and b not in _TEXT_CONTROLS)
    return controls <= MAX_CONTROL_SHARE * len(sample)


def looks_like_jsonl(head: bytes) -> bool:
    """JSON Lines are told from plain text by their first non-space byte, "{" (after an optional BOM)."""
    return head.removeprefix(BOM).lstrip().startswith(b"{")


def _not_utf8(offset: int, line: int | None = None) -> ScreeningError:
    where = f"line {line} (byte offset {offset})" if line else f"byte offset {offset}"
    return ScreeningError(422, "invalid_text", f"the text is not valid UTF-8 at {where}; save it as UTF-8 (in Python: "
                          "open(path, 'w', encoding='utf-8'), or iconv -t UTF-8) and upload it again",
                          {"offset": offset, **({"line": line} if line else {})})


def _nul_byte(offset: int) -> ScreeningError:
    return ScreeningError(422, "invalid_text", f"a NUL byte at byte offset {offset}: the file holds binary data, not "
                          "text; upload plain UTF-8 text, JSON Lines with a \"text\" field, or .parquet with a "
                          "\"text\" column", {"offset": offset})


def empty_text(what: str, why: str = "only whitespace") -> ScreeningError:
    return ScreeningError(422, "empty_dataset", f"{what} holds no text ({why}); upload a corpus with the documents "
                          "to calibrate or evaluate on", {})


def _scan_plain(f: IO[bytes]) -> dict[str, Any]:
    """Decodes the stream as UTF-8 chunk by chunk: characters, lines, and whether any is not whitespace."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pos = characters = lines = 0
    has_text = bom = False
    last = ""
    while True:
        chunk = f.read(CHUNK)
        if pos == 0 and chunk.startswith(BOM):
            bom, chunk, pos = True, chunk[len(BOM):], len(BOM)
        if (nul := chunk.find(b"\0")) >= 0:
            raise _nul_byte(pos + nul)
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise _not_utf8(pos - pending + exc.start) from None
        pos += len(chunk)
        characters += len(text)
        lines += text.count("\n")
        has_text = has_text or not text.isspace() and bool(text)
        last = text[-1:] or last
        if not chunk:
            break
    if not has_text:
        raise empty_text("the text file")
    lines += last != "\n"
    return {"encoding": "utf-8-sig" if bom else "utf-8", "characters": characters, "lines": lines}


def _bad_line(line: int, why: str) -> ScreeningError:
    return ScreeningError(422, "invalid_jsonl", f"JSON Lines, line {line}: {why}; every non-empty line must be one "
                          "JSON object with a string \"text\" field, such as {\"text\": \"Once upon a time\"}: fix "
                          "that line (or upload the corpus as plain .txt)", {"line": line})


def _record_text(raw: bytes, line: int, offset: int) -> str | None:
    """The "text" of one JSON line (None for a blank line); a line that is not such an object is refused."""
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(offset + exc.start, line) from None
    if not decoded.strip():
        return None
    try:
        record = json.loads(decoded)
    except (ValueError, RecursionError) as exc:
        raise _bad_line(line, f"not JSON ({str(exc)[:200]})") from None
    if not isinstance(record, dict):
        raise _bad_line(line, f"a JSON {type(record).__name__}, not an object")
    text = record.get("text")
    if not isinstance(text, str):
        raise _bad_line(line, "no \"text\" field" if text is None else "\"text\" is not a string")
    return text


def _scan_jsonl(f: IO[bytes]) -> dict[str, Any]:
    """Reads the stream line by line (each at most MAX_LINE_BYTES): records, lines and the characters of the texts."""
    offset = line = records = characters = 0
    has_text = False
    while raw := f.readline(MAX_LINE_BYTES + 1):
        line += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise _bad_line(line, f"longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB: split the document into "
                                  "several records")
        body = raw[len(BOM):] if offset == 0 and raw.startswith(BOM) else raw
        text = _record_text(body, line, offset + len(raw) - len(body))
        offset += len(raw)
        if text is None:
            continue
        records += 1
        characters += len(text)
        has_text = has_text or bool(text.strip())
    if not has_text:
        raise empty_text("the JSON Lines file")
    return {"records": records, "lines": line, "characters": characters}


def screen_text(path: Path, head: bytes, size: int) -> Sniffed:
    """A text dataset, the fallback after every binary format: JSON Lines when it starts with "{", else plain
    UTF-8 text. Binary data is refused as an unrecognised format (415), text in another encoding as invalid (422)."""
    if head.startswith(UTF16_BOMS):
        raise ScreeningError(422, "invalid_text", "the text is UTF-16 (it starts with a UTF-16 byte order mark); save "
                             "it as UTF-8 and upload it again", {"offset": 0, "encoding": "utf-16"})
    if not looks_like_text(head):
        raise unsupported(ACCEPTED_DATASETS)
    jsonl = looks_like_jsonl(head)
    with open(path, "rb") as f:
        details = _scan_jsonl(f) if jsonl else _scan_plain(f)
    return Sniffed("jsonl" if jsonl else "txt", {"bytes": size, **details, "note": TOKENIZED_NOTE})
