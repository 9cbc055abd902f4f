"""Static screening of uploaded models and datasets (DESIGN.md §6, §7).

Nothing here deserializes an upload: zips are read through their directory and streamed, pickles
are walked opcode by opcode with `pickletools.genops` (never executed), ONNX is walked at the
protobuf wire level, and .npy / safetensors headers are parsed as data. Standard library only: the
API process must not import torch or onnx.
"""

from __future__ import annotations

import ast
import json
import math
import mmap
import pickletools
import re
import resource
import stat
import struct
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

ACCEPTED_MODELS = (
    "a .pt2 from torch.export.save, a single-file .onnx (torch.onnx.export(..., external_data=False)), "
    "a model package (a zip with model.py defining build_model() and weights.safetensors), "
    "or a Hugging Face folder (a zip of config.json + model.safetensors, from save_pretrained)"
)
ACCEPTED_DATASETS = "a .npz of numeric arrays (numpy.savez, no object arrays) or a .safetensors file"
PICKLE_ADVICE = (
    "pickled torch.save files are refused: they execute code when loaded. Export with torch.export.save "
    "(.pt2), torch.onnx.export (.onnx), or upload a model package (zip with model.py + weights.safetensors)"
)

# Zip bombs by ratio. Deflate packs weights about 1.1:1 and text a few times, while zeros reach ~1000:1. Past
# RATIO_FREE_BYTES unpacked, both each entry and the archive as a whole may inflate at most MAX_RATIO times: a small
# upload can then never make the sandbox, which extracts the archive again on every job, write more than MAX_RATIO
# times its size (64 entries of 8 MiB - 1 of zeros, 1016:1 each, passed when only entries of 8 MiB were checked).
# Under RATIO_FREE_BYTES the ratio is free, so that tiny, very compressible files (config.json, model.py) pass.
RATIO_FREE_BYTES = 1024 * 1024
MAX_RATIO = 200
BOMB_ADVICE = ("if the file is genuine, zip it without compression (zipfile.ZIP_STORED, `zip -0`, or numpy.savez "
               "rather than numpy.savez_compressed)")
MAX_DETAIL_ITEMS = 50  # lists in `details` are capped: they go into a DB row
MAX_JSON_BYTES = 64 * 1024 * 1024  # pt2 payload configs parsed here
MAX_PKL_BYTES = 256 * 1024 * 1024
MAX_SOURCE_BYTES = 16 * 1024 * 1024  # model.py
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
MAX_NPY_HEADER = 10_000  # numpy's own default limit (max_header_size)
MAX_PROTO_DEPTH = 64
CHUNK = 1024 * 1024

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"


class ScreeningError(Exception):
    """An upload refused by screening; maps onto the API's error body."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    def __repr__(self) -> str:
        return f"ScreeningError({self.status}, {self.code!r}, {self.message!r})"


@dataclass
class Sniffed:
    kind: Literal["pt2", "onnx", "package", "hf", "npz", "safetensors"]
    details: dict[str, Any] = field(default_factory=dict)


def _truncated(what: str, **details: Any) -> ScreeningError:
    return ScreeningError(422, "truncated", f"{what}: the file is truncated or corrupt; upload it again", details)


def _unsupported(accepted: str, why: str = "unrecognised file format", **details: Any) -> ScreeningError:
    return ScreeningError(415, "unsupported_format", f"{why}; upload {accepted}", {"accepted": accepted, **details})


# --------------------------------------------------------------------------------------------------
# Pickles: walked, never loaded.

# What benign torch.export archives hold in their pickled entries (sample inputs, tensor-subclass
# weights and constants are all torch.save zips; see tests/app/test_screening.py), plus the close
# siblings of the same writer: every legacy typed storage class torch.save may name, the dtypes
# `_rebuild_tensor_v3` names for the newer dtypes, and Parameters. Deliberately narrower than
# torch's weights_only allowlist: no tensor-subclass rebuilds, no sparse/nested/quantized tensors,
# no builtins at all. Exact (module, name) pairs only; a dotted name never matches.
_STORAGES = (
    "DoubleStorage FloatStorage HalfStorage LongStorage IntStorage ShortStorage CharStorage ByteStorage "
    "BoolStorage BFloat16Storage ComplexDoubleStorage ComplexFloatStorage"
).split()
_DTYPES = (
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 uint16 uint32 uint64 bool complex64 "
    "complex128 complex32 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2"
).split()
PICKLE_ALLOWLIST: frozenset[tuple[str, str]] = frozenset(
    [("collections", "OrderedDict"),
     ("torch._utils", "_rebuild_tensor_v2"),
     ("torch._utils", "_rebuild_tensor_v3"),  # newer dtypes: an UntypedStorage plus a dtype global
     ("torch.storage", "UntypedStorage"),
     ("torch._utils", "_rebuild_parameter"),
     ("torch._utils", "_rebuild_parameter_with_state"),
     ("torch", "device"),
     ("torch", "Size")]
    + [("torch", s) for s in _STORAGES]
    + [("torch", d) for d in _DTYPES]
)

_MARK = object()  # stands for a MARK on the simulated stack
_UNKNOWN = object()  # any value the walk does not need to know


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def _unsafe(entry: str, why: str, **details: Any) -> ScreeningError:
    return ScreeningError(
        415, "unsafe_pickle",
        f"{entry}: {why}. Pickled entries may only rebuild plain tensors; re-export the model with "
        "torch.export.save from plain tensors, or upload ONNX or a model package",
        {"entry": entry, **details})


def scan_pickle(stream: IO[bytes], entry: str) -> set[tuple[str, str]]:
    """Walks one pickle's opcodes and returns the globals it names; raises unless all are allowed.

    Symbolically tracks the stack and memo (strings only) so that STACK_GLOBAL operands are resolved
    the way the unpickler would; an operand that is not a known string is refused, as is anything
    the walk cannot parse.
    """
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    found: set[tuple[str, str]] = set()

    def check(module: str, name: str) -> _Global:
        if (module, name) not in PICKLE_ALLOWLIST:
            raise _unsafe(entry, f"pickle references {module}.{name}, which is not allowed",
                          **{"global": f"{module}.{name}"})
        found.add((module, name))
        return _Global(module, name)

    def pop() -> Any:
        if not stack:
            raise ValueError("stack underflow")
        return stack.pop()

    def pop_mark() -> None:
        while True:
            if pop() is _MARK:
                return

    try:
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in _STRING_OPS:
                stack.append(arg)
            elif name == "MARK":
                stack.append(_MARK)
            elif name in _PUT_OPS:
                if not stack:
                    raise ValueError("memo of empty stack")
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                if not stack:
                    raise ValueError("memo of empty stack")
                memo[len(memo)] = stack[-1]
            elif name in _GET_OPS:
                if arg not in memo:
                    raise ValueError(f"memo key {arg} missing")
                stack.append(memo[arg])
            elif name == "DUP":
                if not stack:
                    raise ValueError("stack underflow")
                stack.append(stack[-1])
            elif name in ("GLOBAL", "INST"):
                module, _, gname = str(arg).partition(" ")
                g = check(module, gname)
                if name == "INST":
                    pop_mark()
                    stack.append(_UNKNOWN)
                else:
                    stack.append(g)
            elif name == "STACK_GLOBAL":
                gname, module = pop(), pop()
                if not (isinstance(module, str) and isinstance(gname, str)):
                    raise _unsafe(entry, "pickle builds a global from values that are not literal strings")
                stack.append(check(module, gname))
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise _unsafe(entry, "pickle uses the copyreg extension registry")
            elif name == "STOP":
                pop()
                break
            else:
                before = op.stack_before
                if pickletools.markobject in before:
                    pop_mark()
                    for _ in range(before.index(pickletools.markobject)):
                        pop()
                else:
                    for _ in before:
                        pop()
                stack.extend(_UNKNOWN for _ in op.stack_after)
        else:
            raise ValueError("no STOP opcode")
    except ScreeningError:
        raise
    except Exception as exc:  # genops raises ValueError and friends on malformed input
        raise _unsafe(entry, f"pickle could not be parsed statically ({exc})") from None
    return found


def _looks_like_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


# --------------------------------------------------------------------------------------------------
# Zip archives.

_DRIVE = re.compile(r"^[A-Za-z]:")


def _ratio_bomb(label: str, what: str, unpacked: int, packed: int, **details: Any) -> ScreeningError:
    ratio = unpacked // max(packed, 1)
    return ScreeningError(413, "zip_bomb",
                          f"{label}: {what} inflates {ratio} times ({packed} bytes to {unpacked}), more than the limit "
                          f"of {MAX_RATIO}, like a zip bomb; {BOMB_ADVICE}",
                          {**details, "file_size": unpacked, "compress_size": packed, "max_ratio": MAX_RATIO})


def _check_entry(info: zipfile.ZipInfo, label: str) -> None:
    """One entry's name, type and ratio; refused when extracting it could escape or flood the folder."""
    name = info.filename
    parts = name.split("/")
    if ("\\" in name or "\x00" in name or name.startswith("/") or _DRIVE.match(name)
            or any(p == ".." for p in parts)):
        raise ScreeningError(415, "path_traversal", f"{label}: entry name {name!r} points outside the archive",
                             {"entry": name})
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ScreeningError(415, "path_traversal", f"{label}: entry {name!r} is a symbolic link; links are refused",
                             {"entry": name})
    if info.flag_bits & 0x1:
        raise ScreeningError(415, "unsupported_format", f"{label}: entry {name!r} is encrypted", {"entry": name})
    if info.file_size > RATIO_FREE_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise _ratio_bomb(label, f"entry {name!r}", info.file_size, info.compress_size, entry=name)


def _check_zip(zf: zipfile.ZipFile, *, max_unpacked_bytes: int, max_entries: int, label: str,
               crc: bool = True) -> dict[str, Any]:
    infos = zf.infolist()
    if len(infos) > max_entries:
        raise ScreeningError(413, "zip_bomb", f"{label} holds {len(infos)} entries, more than the limit of {max_entries}",
                             {"entries": len(infos), "max_entries": max_entries})
    total = packed = 0
    seen: set[str] = set()
    for info in infos:
        _check_entry(info, label)
        if info.filename in seen:
            raise ScreeningError(415, "path_traversal", f"{label}: entry {info.filename!r} appears twice",
                                 {"entry": info.filename})
        seen.add(info.filename)
        total += info.file_size
        packed += info.compress_size
    if total > max_unpacked_bytes:
        raise ScreeningError(413, "zip_bomb", f"{label} unpacks to {total} bytes, more than the limit of {max_unpacked_bytes}",
                             {"unpacked_bytes": total, "max_unpacked_bytes": max_unpacked_bytes})
    if total > RATIO_FREE_BYTES and total > MAX_RATIO * max(packed, 1):
        raise _ratio_bomb(label, f"the archive ({len(infos)} entries)", total, packed, entries=len(infos))
    if crc:
        # Streams every entry; zipfile checks the CRC at the end and never inflates past file_size.
        for info in infos:
            try:
                with zf.open(info) as f:
                    while f.read(CHUNK):
                        pass
            except (zipfile.BadZipFile, EOFError, zlib.error, OSError, NotImplementedError, ValueError) as exc:
                raise _truncated(label, entry=info.filename, reason=str(exc)) from None
    return {"entries": len(infos), "unpacked_bytes": total}


def _open_zip(src: Path | IO[bytes], label: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(src)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise _truncated(label, reason=str(exc)) from None


def _read_entry(zf: zipfile.ZipFile, name: str, limit: int, label: str) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise ScreeningError(413, "entry_too_large", f"{label}: entry {name!r} is larger than {limit} bytes", {"entry": name})
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        raise _truncated(label, entry=name, reason=str(exc)) from None


def _head(zf: zipfile.ZipFile, name: str, n: int = 8) -> bytes:
    with zf.open(name) as f:
        return f.read(n)


def _root_of(names: list[str]) -> str | None:
    roots = {n.split("/", 1)[0] for n in names if "/" in n}
    if len(roots) == 1 and all("/" in n for n in names):
        return roots.pop()
    return None


@contextmanager
def _entry_copy(zf: zipfile.ZipFile, entry: str, *, cap: int, tmp_dir: Path) -> Iterator[IO[bytes]]:
    """The entry copied to an unnamed temp file (gone once closed, or when the process dies), to read a zip nested
    in it: through zf.open every backwards seek inflates the entry again from its first byte (a .pt2 whose nested
    zip put 100 pickles in reverse order after 200 MB of padding took 91 s of CPU). `cap` is the unpacked budget
    (max_unpacked_bytes, which the outer archive's declared total, this entry included, already fits)."""
    info = zf.getinfo(entry)
    if info.file_size > cap:
        raise ScreeningError(413, "zip_bomb", f"{entry} unpacks to {info.file_size} bytes, more than the limit of {cap}",
                             {"entry": entry, "unpacked_bytes": info.file_size, "max_unpacked_bytes": cap})
    with tempfile.TemporaryFile(dir=tmp_dir, prefix="screen-") as tmp:
        copied = 0
        try:
            with zf.open(info) as src:
                while chunk := src.read(CHUNK):
                    copied += len(chunk)
                    if copied > min(cap, info.file_size):  # zipfile stops at file_size; this holds if it did not
                        raise ScreeningError(413, "zip_bomb", f"{entry} inflates past its declared size",
                                             {"entry": entry, "file_size": info.file_size})
                    tmp.write(chunk)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, ValueError) as exc:
            raise _truncated(entry, reason=str(exc)) from None
        tmp.seek(0)
        yield tmp


def _scan_torch_zip(outer: zipfile.ZipFile, entry: str, *, max_unpacked_bytes: int, max_entries: int,
                    tmp_dir: Path, found: set[tuple[str, str]]) -> None:
    """A torch.save zip nested in an entry: torch.load unpickles its data.pkl, so walk every .pkl."""
    with _entry_copy(outer, entry, cap=max_unpacked_bytes, tmp_dir=tmp_dir) as raw:
        inner = _open_zip(raw, entry)
        with inner:
            _check_zip(inner, max_unpacked_bytes=max_unpacked_bytes, max_entries=max_entries, label=entry, crc=False)
            names = inner.namelist()
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                raise ScreeningError(415, "torchscript", f"{entry}: holds a TorchScript archive, which runs code when loaded",
                                     {"entry": entry})
            pkls = [n for n in names if n.endswith(".pkl")]
            if not any(n.endswith("data.pkl") for n in pkls):
                raise _unsafe(entry, "nested archive has no data.pkl")
            for n in pkls:
                if inner.getinfo(n).file_size > MAX_PKL_BYTES:
                    raise _unsafe(f"{entry}:{n}", "pickle too large to screen")
                with inner.open(n) as f:
                    found |= scan_pickle(f, f"{entry}:{n}")


def _scan_torch_load_entry(zf: zipfile.ZipFile, entry: str, found: set[tuple[str, str]], **limits: Any) -> None:
    """An entry that torch.load reads: only the zip form of torch.save is accepted."""
    if entry not in zf.NameToInfo:
        return  # the loader fails on a missing entry; nothing to unpickle
    head = _head(zf, entry, 4)
    if head == b"":
        return  # empty sample inputs load as {} without unpickling
    if head != ZIP_MAGIC:
        raise _unsafe(entry, "pickled entry is not in torch.save's zip format (legacy pickles are refused)")
    _scan_torch_zip(zf, entry, found=found, **limits)


def _screen_pt2(zf: zipfile.ZipFile, root: str, base: dict[str, Any], limits: dict[str, Any]) -> Sniffed:
    names = [n[len(root) + 1:] for n in zf.namelist()]
    rel = set(names)
    full = lambda n: f"{root}/{n}"  # noqa: E731
    version = _read_entry(zf, full("archive_version"), 64, "pt2").decode("latin-1").strip() \
        if "archive_version" in rel else None
    if version != "0":
        raise ScreeningError(422, "unsupported_pt2_version",
                             f"pt2 archive_version {version!r} is not supported; re-export with torch.export.save "
                             "from torch 2.13", {"archive_version": version})
    native = [n for n in names if n.startswith(("data/aotinductor/", "data/executorch/", "data/mtia"))]
    if native:
        raise ScreeningError(415, "native_code",
                             "pt2 holds compiled (AOTInductor/ExecuTorch) artifacts, which load native code; "
                             "upload the plain torch.export.save output", {"entry": full(native[0])})
    models = sorted(n[len("models/"):-len(".json")] for n in names if n.startswith("models/") and n.endswith(".json"))
    if not models:
        raise ScreeningError(422, "invalid_pt2", "pt2 archive has no models/*.json", {})

    found: set[tuple[str, str]] = set()
    screened: set[str] = set()
    pickled: list[str] = []

    def torch_load(rel_name: str) -> None:
        if rel_name in screened:
            return
        screened.add(rel_name)
        pickled.append(full(rel_name))
        _scan_torch_load_entry(zf, full(rel_name), found, **limits)

    for model in models:
        torch_load(f"data/sample_inputs/{model}.pt")
        for kind in ("weights", "constants"):
            legacy = f"data/{kind}/{model}.pt"
            if legacy in rel:
                torch_load(legacy)
                continue
            cfg_name = f"data/{kind}/{model}_{kind}_config.json"
            if cfg_name not in rel:
                continue
            try:
                cfg = json.loads(_read_entry(zf, full(cfg_name), MAX_JSON_BYTES, "pt2"))
                payloads = cfg["config"].values()
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ScreeningError(422, "invalid_pt2", f"{full(cfg_name)} is not a valid payload config ({exc})",
                                     {"entry": full(cfg_name)}) from None
            for meta in payloads:
                path_name = meta.get("path_name") if isinstance(meta, dict) else None
                if not isinstance(path_name, str) or not path_name or "/" in path_name or "\\" in path_name \
                        or path_name.startswith("."):
                    raise ScreeningError(415, "path_traversal", f"{full(cfg_name)} names an invalid payload path",
                                         {"entry": full(cfg_name), "path_name": str(path_name)[:200]})
                entry = f"data/{kind}/{path_name}"
                if path_name.startswith("custom_obj_"):
                    raise _unsafe(full(entry), "TorchScript custom-class constants are refused")
                if path_name.startswith("opaque_obj_"):
                    if entry in rel and entry not in screened:
                        screened.add(entry)
                        pickled.append(full(entry))
                        with zf.open(full(entry)) as f:
                            found |= scan_pickle(f, full(entry))
                elif meta.get("use_pickle"):
                    torch_load(entry)

    # Anything else that looks like a pickle or a nested archive is screened too, in case some
    # other loader path reads it; raw tensor payloads are never unpickled and are left alone.
    raw_payloads = {n for n in rel if n.startswith(("data/weights/", "data/constants/")) and not n.endswith(".json")}
    for n in names:
        if n in screened or n in raw_payloads or n.endswith("/"):
            continue
        head = _head(zf, full(n), 4)
        if head == ZIP_MAGIC:
            torch_load(n)
        elif _looks_like_pickle(head):
            screened.add(n)
            pickled.append(full(n))
            with zf.open(full(n)) as f:
                found |= scan_pickle(f, full(n))

    details = {**base, "archive_version": version, "models": models[:MAX_DETAIL_ITEMS],
               "pickled_entries": sorted(pickled)[:MAX_DETAIL_ITEMS],
               "pickle_globals": sorted(f"{m}.{g}" for m, g in found)}
    return Sniffed("pt2", details)


def _dtype_bits(dtype: str) -> int | None:
    return _SAFETENSORS_BITS.get(dtype)


_SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                     "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
                     "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def check_safetensors(stream: IO[bytes], size: int, label: str) -> dict[str, Any]:
    """Validates a safetensors header (length, JSON, dtypes, offsets covering the buffer) as the library does."""
    prefix = stream.read(8)
    if len(prefix) < 8:
        raise _truncated(label)
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_SAFETENSORS_HEADER or n == 0:
        raise ScreeningError(422, "invalid_safetensors", f"{label}: header length {n} is not valid", {"entry": label})
    if 8 + n > size:
        raise _truncated(label, header_bytes=n, size=size)
    raw = stream.read(n)
    if len(raw) < n:
        raise _truncated(label)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ScreeningError(422, "invalid_safetensors", f"{label}: header is not JSON ({exc})", {"entry": label}) from None
    if not isinstance(header, dict):
        raise ScreeningError(422, "invalid_safetensors", f"{label}: header is not a JSON object", {"entry": label})
    buffer_len = size - 8 - n
    tensors: list[tuple[int, int, str]] = []
    info: dict[str, Any] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
                raise ScreeningError(422, "invalid_safetensors", f"{label}: __metadata__ must map strings to strings",
                                     {"entry": label})
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                  and all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end)))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ScreeningError(422, "invalid_safetensors", f"{label}: bad entry for tensor {key!r}",
                                 {"entry": label, "tensor": key})
        bits = _dtype_bits(dtype)
        if bits is None:
            raise ScreeningError(422, "invalid_safetensors", f"{label}: tensor {key!r} has unknown dtype {dtype!r}",
                                 {"entry": label, "tensor": key})
        nbits = math.prod(shape) * bits
        if nbits % 8 or end < begin or end - begin != nbits // 8:
            raise ScreeningError(422, "invalid_safetensors", f"{label}: tensor {key!r} offsets do not match its shape",
                                 {"entry": label, "tensor": key})
        tensors.append((begin, end, key))
        if len(info) < MAX_DETAIL_ITEMS:
            info[key] = {"dtype": dtype, "shape": shape}
    pos = 0
    for begin, end, key in sorted(tensors):
        if begin != pos:
            raise ScreeningError(422, "invalid_safetensors", f"{label}: tensor {key!r} overlaps or leaves a gap",
                                 {"entry": label, "tensor": key})
        pos = end
    if pos != buffer_len:
        if pos > buffer_len:
            raise _truncated(label, expected_bytes=8 + n + pos, size=size)
        raise ScreeningError(422, "invalid_safetensors", f"{label}: data past the last tensor", {"entry": label})
    return {"tensor_count": len(tensors), "tensors": info}


_BUILD_MODEL = re.compile(rb"^[ \t]*def[ \t]+build_model[ \t]*\(", re.MULTILINE)


def _screen_package(zf: zipfile.ZipFile, base: dict[str, Any]) -> Sniffed:
    names = set(zf.namelist())
    missing = [n for n in ("model.py", "weights.safetensors") if n not in names]
    if missing:
        nested = sorted(n for n in names if n.rsplit("/", 1)[-1] in missing and "/" in n)
        hint = f" (found {', '.join(nested[:3])}: put them at the top level of the zip)" if nested else ""
        raise ScreeningError(422, "invalid_package",
                             f"model package is missing {' and '.join(missing)}{hint}; a package is a zip with "
                             "model.py (defining build_model()), weights.safetensors and optionally "
                             "example_inputs.safetensors", {"missing": missing})
    source = _read_entry(zf, "model.py", MAX_SOURCE_BYTES, "model package")
    if not _BUILD_MODEL.search(source):
        raise ScreeningError(422, "invalid_package", "model.py does not define build_model(); the worker calls "
                             "build_model() to create the module, then loads weights.safetensors into it",
                             {"missing": ["build_model"]})
    details = dict(base)
    for n in ("weights.safetensors", "example_inputs.safetensors"):
        if n in names:
            info = zf.getinfo(n)
            with zf.open(info) as f:
                st = check_safetensors(f, info.file_size, n)
            details[n.split(".")[0]] = st
    details["files"] = sorted(names)[:MAX_DETAIL_ITEMS]
    return Sniffed("package", details)


HF_PICKLED = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def _hf_prefix(names: list[str]) -> str | None:
    """"" or "folder/" when the zip is a Hugging Face folder (config.json at the top or in the single top folder,
    and no model package's weights.safetensors), else None."""
    if "weights.safetensors" in {n.rsplit("/", 1)[-1] for n in names}:
        return None
    if "config.json" in names:
        return ""
    root = _root_of(names)
    if root is not None and f"{root}/config.json" in names:
        return f"{root}/"
    return None


def _screen_hf(zf: zipfile.ZipFile, base: dict[str, Any], prefix: str) -> Sniffed:
    """A Hugging Face folder: config.json (no auto_map: no remote code) + safetensors weights; no Python files,
    no pickled weights."""
    names = [n for n in zf.namelist() if not n.endswith("/")]
    py = sorted(n for n in names if n.endswith((".py", ".pyc", ".so")))
    if py:
        raise ScreeningError(415, "unsupported_format", f"Hugging Face folder holds code ({', '.join(py[:3])}); "
                             "custom modelling code is never run: only architectures built into transformers are "
                             "accepted", {"entries": py[:MAX_DETAIL_ITEMS]})
    pickled = sorted(n for n in names if n.rsplit("/", 1)[-1].startswith(HF_PICKLED)
                     or n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")))
    if pickled:
        raise ScreeningError(415, "pickled_model", f"Hugging Face folder holds pickled or non-torch weights "
                             f"({', '.join(pickled[:3])}): save it with model.save_pretrained(folder, "
                             "safe_serialization=True) so the weights are model.safetensors",
                             {"entries": pickled[:MAX_DETAIL_ITEMS], "format": "pytorch_model.bin"})
    raw = _read_entry(zf, f"{prefix}config.json", MAX_CONFIG_BYTES, "Hugging Face folder")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ScreeningError(422, "invalid_hf", f"config.json is not JSON ({exc})", {}) from None
    if not isinstance(config, dict):
        raise ScreeningError(422, "invalid_hf", "config.json is not a JSON object", {})
    if "auto_map" in config:
        raise ScreeningError(415, "unsupported_format", "config.json has auto_map (trust_remote_code models): custom "
                             "modelling code is never run; only architectures built into transformers are "
                             "accepted", {"auto_map": True})
    if not isinstance(config.get("model_type"), str):
        raise ScreeningError(422, "invalid_hf", "config.json has no model_type", {})
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ScreeningError(422, "invalid_hf", "config.json: architectures must be a list of class names", {})
    weights = sorted(n for n in names if n.startswith(prefix) and n.endswith(".safetensors")
                     and "/" not in n[len(prefix):])
    if not weights:
        raise ScreeningError(422, "invalid_hf", "Hugging Face folder has no *.safetensors weights next to "
                             "config.json (save with safe_serialization=True)", {})
    index_name = f"{prefix}model.safetensors.index.json"
    if f"{prefix}model.safetensors" not in names:
        if index_name not in names:
            raise ScreeningError(422, "invalid_hf", "Hugging Face folder has neither model.safetensors nor "
                                 "model.safetensors.index.json", {})
        try:
            index = json.loads(_read_entry(zf, index_name, MAX_CONFIG_BYTES, "Hugging Face folder").decode("utf-8"))
            shards = set(index["weight_map"].values())
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise ScreeningError(422, "invalid_hf", "model.safetensors.index.json has no valid weight_map", {}) \
                from None
        missing = sorted(str(s) for s in shards if f"{prefix}{s}" not in weights)
        if missing:
            raise ScreeningError(422, "invalid_hf", f"shards named in the index are missing: {missing[:5]}",
                                 {"missing": missing[:MAX_DETAIL_ITEMS]})
    details = dict(base)
    st: dict[str, Any] = {}
    for n in weights:
        info = zf.getinfo(n)
        with zf.open(info) as f:
            st[n[len(prefix):]] = check_safetensors(f, info.file_size, n)
    details.update(model_type=config["model_type"], architectures=(archs or [])[:MAX_DETAIL_ITEMS],
                   weights={k: v["tensor_count"] for k, v in list(st.items())[:MAX_DETAIL_ITEMS]},
                   tensor_count=sum(v["tensor_count"] for v in st.values()),
                   files=sorted(names)[:MAX_DETAIL_ITEMS])
    return Sniffed("hf", details)


def _classify_zip(path: Path, *, max_unpacked_bytes: int, max_entries: int) -> Sniffed:
    label = path.name or "upload"
    zf = _open_zip(path, "zip")
    with zf:
        base = _check_zip(zf, max_unpacked_bytes=max_unpacked_bytes, max_entries=max_entries, label="zip")
        names = zf.namelist()
        if not names:
            raise _unsupported(ACCEPTED_MODELS, "empty zip")
        root = _root_of(names)
        if root is not None and f"{root}/archive_format" in zf.NameToInfo:
            if _read_entry(zf, f"{root}/archive_format", 16, label).strip() == b"pt2":
                # Nested zips are copied next to the upload (its disk, not a tmpfs /tmp) while screened.
                return _screen_pt2(zf, root, base, {"max_unpacked_bytes": max_unpacked_bytes,
                                                    "max_entries": max_entries, "tmp_dir": path.parent})
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            raise ScreeningError(415, "torchscript",
                                 "TorchScript archives are refused: they run code when loaded and torch.jit is "
                                 "deprecated. Export with torch.export.save (.pt2), torch.onnx.export (.onnx), or "
                                 "upload a model package (zip with model.py + weights.safetensors)", {})
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise ScreeningError(415, "pickled_model", PICKLE_ADVICE, {"format": "torch.save (zip)"})
        hf_prefix = _hf_prefix(names)
        if hf_prefix is not None:
            return _screen_hf(zf, base, hf_prefix)
        if any(n.rsplit("/", 1)[-1] in ("model.py", "weights.safetensors") for n in names):
            return _screen_package(zf, base)
        raise _unsupported(ACCEPTED_MODELS, "zip is neither a torch.export .pt2 nor a model package")


# --------------------------------------------------------------------------------------------------
# ONNX, at the protobuf wire level.

class _Wire(Exception):
    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind  # "truncated" or "invalid"


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Wire("truncated", "varint runs past the end")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Wire("invalid", "varint too long")


def _fields(buf: Any, pos: int, end: int):
    """Yields (field, wire_type, value_or_span, pos_after) for each field in buf[pos:end]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        fnum, wt = key >> 3, key & 7
        if fnum == 0:
            raise _Wire("invalid", "field number 0")
        if wt == 0:
            val, pos = _varint(buf, pos, end)
            yield fnum, wt, val
        elif wt == 1:
            if pos + 8 > end:
                raise _Wire("truncated", "fixed64 runs past the end")
            pos += 8
            yield fnum, wt, None
        elif wt == 5:
            if pos + 4 > end:
                raise _Wire("truncated", "fixed32 runs past the end")
            pos += 4
            yield fnum, wt, None
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Wire("truncated", f"field {fnum} length {n} runs past the end")
            yield fnum, wt, (pos, pos + n)
            pos += n
        else:
            raise _Wire("invalid", f"field {fnum} has wire type {wt}")


# ModelProto: field -> wire type.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
# Where TensorProtos can hide inside a model: message -> {field: submessage}.
_NESTED = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def _walk_onnx(buf: Any, start: int, end: int, msg: str, depth: int, stats: dict[str, int]) -> None:
    if depth > MAX_PROTO_DEPTH:
        raise _Wire("invalid", "messages nested too deep")
    nested = _NESTED.get(msg, {})
    for fnum, wt, val in _fields(buf, start, end):
        if msg == "tensor":
            if (fnum == 13 and wt == 2) or (fnum == 14 and wt == 0 and val == 1):
                raise ScreeningError(
                    415, "external_data",
                    "ONNX model references external data files; upload a single self-contained file "
                    "(torch.onnx.export(..., external_data=False), or onnx.save_model(m, path, "
                    "save_as_external_data=False))", {})
            continue
        sub = nested.get(fnum)
        if sub is None:
            continue
        if wt != 2:
            raise _Wire("invalid", f"{msg} field {fnum} has wire type {wt}")
        if sub == "tensor":
            stats["tensors"] += 1
        elif sub == "node":
            stats["nodes"] += 1
        _walk_onnx(buf, val[0], val[1], sub, depth + 1, stats)


def _sniff_onnx(buf: Any, size: int) -> Sniffed | None:
    """Returns None when the bytes do not look like ONNX at all; raises when they look like broken ONNX."""
    try:
        first = next(_fields(buf, 0, size), None)
    except _Wire:
        return None
    # Every ONNX writer puts ir_version (field 1, varint) first.
    if first is None or first[0] != 1 or first[1] != 0 or not 1 <= first[2] <= 100:
        return None
    details: dict[str, Any] = {"ir_version": first[2]}
    graph: tuple[int, int] | None = None
    opsets: dict[str, int] = {}
    stats = {"nodes": 0, "tensors": 0}
    try:
        for fnum, wt, val in _fields(buf, 0, size):
            if _MODEL_FIELDS.get(fnum) != wt:
                raise _Wire("invalid", f"ModelProto has no field {fnum} with wire type {wt}")
            if fnum == 7:
                graph = val
            elif fnum == 8:
                domain, version = "", 0
                for f2, w2, v2 in _fields(buf, val[0], val[1]):
                    if f2 == 1 and w2 == 2:
                        domain = bytes(buf[v2[0]:v2[1]]).decode("utf-8", "replace")
                    elif f2 == 2 and w2 == 0:
                        version = v2
                opsets[domain or "ai.onnx"] = version
            elif fnum == 2:
                details["producer_name"] = bytes(buf[val[0]:min(val[1], val[0] + 200)]).decode("utf-8", "replace")
            if fnum in _NESTED["model"]:
                _walk_onnx(buf, val[0], val[1], _NESTED["model"][fnum], 1, stats)
    except _Wire as exc:
        if exc.kind == "truncated":
            raise _truncated("ONNX model", reason=str(exc)) from None
        raise ScreeningError(422, "invalid_onnx", f"not a valid ONNX model ({exc})", {}) from None
    if graph is None:
        raise ScreeningError(422, "invalid_onnx", "ONNX model has no graph (truncated upload?)", {})
    details.update(opset_import=opsets, nodes=stats["nodes"], tensors=stats["tensors"])
    return Sniffed("onnx", details)


# --------------------------------------------------------------------------------------------------
# Public entry points.

def _read_head(path: Path, n: int = 16) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        head = f.read(n)
        size = f.seek(0, 2)
    return head, size


def _looks_like_safetensors(path: Path, head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= min(MAX_SAFETENSORS_HEADER, size - 8) and head[8:9] == b"{"


def sniff_model(path: Path, *, max_unpacked_bytes: int, max_entries: int) -> Sniffed:
    """Recognises and statically screens an uploaded model; raises ScreeningError when refused."""
    path = Path(path)
    head, size = _read_head(path)
    if size == 0:
        raise _unsupported(ACCEPTED_MODELS, "empty file")
    if head.startswith((ZIP_MAGIC, EMPTY_ZIP_MAGIC)):
        return _classify_zip(path, max_unpacked_bytes=max_unpacked_bytes, max_entries=max_entries)
    if _looks_like_pickle(head):
        raise ScreeningError(415, "pickled_model", PICKLE_ADVICE, {"format": "torch.save (legacy pickle)"})
    if _looks_like_safetensors(path, head, size):
        raise _unsupported(ACCEPTED_MODELS, "a bare .safetensors holds weights but no architecture; "
                           "put it in a model package with a model.py")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        found = _sniff_onnx(buf, size)
    if found is not None:
        return found
    raise _unsupported(ACCEPTED_MODELS)


_NPY_MAGIC = b"\x93NUMPY"
_NPY_DESCR = re.compile(r"^[<>|=]?(b1|\?|[iu][1248]|f[248]|c(8|16)|[SUV]\d+|[mM]8(\[\w+\])?)$")


def _descr_has_object(descr: Any) -> bool:
    if isinstance(descr, str):
        return "O" in descr
    if isinstance(descr, (list, tuple)):
        return any(_descr_has_object(x) for x in descr)
    return True  # anything else is not a numpy descr: treat as unsafe


def _npy_header(f: IO[bytes], entry: str) -> tuple[dict[str, Any], int]:
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != _NPY_MAGIC:
        raise ScreeningError(422, "invalid_npz", f"{entry}: not a .npy array", {"entry": entry})
    major = magic[6]
    if major == 1:
        raw = f.read(2)
        hlen = struct.unpack("<H", raw)[0] if len(raw) == 2 else -1
        pre = 10
    elif major in (2, 3):
        raw = f.read(4)
        hlen = struct.unpack("<I", raw)[0] if len(raw) == 4 else -1
        pre = 12
    else:
        raise ScreeningError(422, "invalid_npz", f"{entry}: unknown .npy version {major}", {"entry": entry})
    if hlen < 0:
        raise _truncated(entry)
    if hlen > MAX_NPY_HEADER:
        raise ScreeningError(422, "invalid_npz", f"{entry}: .npy header too large", {"entry": entry})
    text = f.read(hlen)
    if len(text) < hlen:
        raise _truncated(entry)
    try:
        header = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin-1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError):
        raise ScreeningError(422, "invalid_npz", f"{entry}: .npy header is not a literal dict", {"entry": entry}) from None
    if not (isinstance(header, dict) and {"descr", "fortran_order", "shape"} <= header.keys()
            and isinstance(header["shape"], tuple)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in header["shape"])):
        raise ScreeningError(422, "invalid_npz", f"{entry}: .npy header lacks descr/fortran_order/shape", {"entry": entry})
    return header, pre + hlen


def _itemsize(descr: str) -> int:
    code = descr.lstrip("<>|=")
    if code in ("?", "b1"):
        return 1
    digits = re.search(r"\d+", code)
    size = int(digits.group()) if digits else 1
    return size * 4 if code[0] == "U" else size


def _screen_npz(path: Path, *, max_unpacked_bytes: int, max_entries: int) -> Sniffed:
    zf = _open_zip(path, "npz")
    with zf:
        base = _check_zip(zf, max_unpacked_bytes=max_unpacked_bytes, max_entries=max_entries, label="npz")
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if not infos:
            raise _unsupported(ACCEPTED_DATASETS, "empty zip")
        arrays: dict[str, Any] = {}
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise _unsupported(ACCEPTED_DATASETS, f"entry {info.filename!r} is not a .npy array",
                                   entry=info.filename)
            with zf.open(info) as f:
                header, offset = _npy_header(f, info.filename)
            descr = header["descr"]
            if _descr_has_object(descr):
                raise ScreeningError(415, "unsafe_pickle",
                                     f"{info.filename}: object arrays are pickles and are refused; save numeric "
                                     "arrays (numpy.savez with numeric dtypes)", {"entry": info.filename,
                                                                                  "dtype": str(descr)})
            if not (isinstance(descr, str) and _NPY_DESCR.match(descr)):
                raise _unsupported(ACCEPTED_DATASETS, f"{info.filename}: dtype {descr!r} is not a plain numeric dtype",
                                   entry=info.filename)
            expected = offset + math.prod(header["shape"]) * _itemsize(descr)
            if info.file_size != expected:
                raise _truncated(info.filename, expected_bytes=expected, size=info.file_size)
            key = info.filename[:-4]
            if len(arrays) < MAX_DETAIL_ITEMS:
                arrays[key] = {"shape": list(header["shape"]), "dtype": descr}
        return Sniffed("npz", {**base, "array_count": len(infos), "arrays": arrays})


def sniff_dataset(path: Path, *, max_unpacked_bytes: int, max_entries: int) -> Sniffed:
    """Recognises and screens an uploaded dataset (.npz or .safetensors); raises ScreeningError when refused."""
    path = Path(path)
    head, size = _read_head(path)
    if size == 0:
        raise _unsupported(ACCEPTED_DATASETS, "empty file")
    if head.startswith((ZIP_MAGIC, EMPTY_ZIP_MAGIC)):
        return _screen_npz(path, max_unpacked_bytes=max_unpacked_bytes, max_entries=max_entries)
    if _looks_like_pickle(head):
        raise ScreeningError(415, "unsafe_pickle", f"pickled datasets are refused: they execute code when loaded; "
                             f"upload {ACCEPTED_DATASETS}", {"accepted": ACCEPTED_DATASETS})
    if head.startswith(_NPY_MAGIC):
        raise _unsupported(ACCEPTED_DATASETS, "a single .npy is not accepted: wrap it with numpy.savez(path, x=array)")
    if _looks_like_safetensors(path, head, size):
        with open(path, "rb") as f:
            return Sniffed("safetensors", check_safetensors(f, size, "safetensors"))
    raise _unsupported(ACCEPTED_DATASETS)


# --------------------------------------------------------------------------------------------------
# Screening an upload in a child process, with a time budget.

SCREENERS = {"model": sniff_model, "dataset": sniff_dataset}
# The folder holding the `app` package: the child's cwd, so that `python -m app.screening` finds it without any
# environment (the child gets none: it reads hostile bytes and needs no credentials).
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def _timeout(timeout_s: float) -> ScreeningError:
    return ScreeningError(
        422, "screening_timeout",
        f"the upload could not be screened within {timeout_s:g} s (the server's SQUEEZE_SCREENING_TIMEOUT_S) and was "
        "not stored; upload a smaller or simpler file (fewer archive entries, no nested archives), or ask the "
        "operator to raise the limit", {"timeout_s": timeout_s})


async def screen(kind: Literal["model", "dataset"], path: Path, *, max_unpacked_bytes: int, max_entries: int,
                 timeout_s: float) -> Sniffed:
    """sniff_model / sniff_dataset in a child process, off the API's event loop and thread pool: killed (and the
    upload refused with `screening_timeout`) past timeout_s, or when the request is canceled."""
    import asyncio  # here: the child never needs it (40 ms less per upload)

    # -S: no site-packages, the child runs on the standard library alone (and starts 30 ms sooner).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-S", "-m", "app.screening", kind, str(Path(path).resolve()), str(max_unpacked_bytes),
        str(max_entries), str(math.ceil(timeout_s) + 1),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=_PACKAGE_ROOT, env={})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        _kill(proc)
        await proc.wait()
        raise _timeout(timeout_s) from None
    except BaseException:  # canceled: the child goes too (the event loop reaps it)
        _kill(proc)
        raise
    return _child_result(proc.returncode, out, err)


def _kill(proc: Any) -> None:  # an asyncio.subprocess.Process
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:  # exited meanwhile
            pass


def _child_result(returncode: int | None, out: bytes, err: bytes) -> Sniffed:
    try:
        result = json.loads(out) if returncode == 0 else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        tail = err.decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"screening child exited with {returncode}: {tail}")
    if "error" in result:
        e = result["error"]
        raise ScreeningError(e["status"], e["code"], e["message"], e["details"])
    return Sniffed(result["kind"], result["details"])


def _child_main(argv: list[str]) -> int:
    """`python -m app.screening KIND PATH MAX_UNPACKED_BYTES MAX_ENTRIES CPU_S`: one JSON object on stdout, the
    Sniffed or the ScreeningError. CPU_S caps its CPU time should the parent die before it can kill the child."""
    kind, path, max_unpacked, max_entries, cpu_s = argv
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_s), int(cpu_s) + 1))
    except (ValueError, OSError):  # a lower hard limit is already set: it stands
        pass
    try:
        sniffed = SCREENERS[kind](Path(path), max_unpacked_bytes=int(max_unpacked), max_entries=int(max_entries))
        result: dict[str, Any] = {"kind": sniffed.kind, "details": sniffed.details}
    except ScreeningError as exc:
        result = {"error": {"status": exc.status, "code": exc.code, "message": exc.message, "details": exc.details}}
    sys.stdout.write(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
