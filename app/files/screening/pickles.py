"""Pickles: walked opcode by opcode with `pickletools.genops`, never loaded."""

from __future__ import annotations

import pickletools
from dataclasses import dataclass
from typing import IO, Any

from app.files.screening.common import ScreeningError

# What benign torch.export archives hold in their pickled entries (sample inputs, tensor-subclass
# weights and constants are all torch.save zips; see tests/app/files/test_screening.py), plus the close
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


def unsafe(entry: str, why: str, **details: Any) -> ScreeningError:
    return ScreeningError(
        415, "unsafe_pickle",
        f"{entry}: {why}. Pickled entries may only rebuild plain tensors; re-export the model with "
        "torch.export.save from plain tensors, or upload ONNX or a model package",
        {"entry": entry, **details})


class _Walk:
    """The unpickler's stack and memo, simulated symbolically (strings only), so that STACK_GLOBAL operands are
    resolved the way the unpickler would."""

    def __init__(self, entry: str):
        self.entry = entry
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}
        self.found: set[tuple[str, str]] = set()

    def check(self, module: str, name: str) -> _Global:
        if (module, name) not in PICKLE_ALLOWLIST:
            raise unsafe(self.entry, f"pickle references {module}.{name}, which is not allowed",
                         **{"global": f"{module}.{name}"})
        self.found.add((module, name))
        return _Global(module, name)

    def pop(self) -> Any:
        if not self.stack:
            raise ValueError("stack underflow")
        return self.stack.pop()

    def top(self, why: str) -> Any:
        if not self.stack:
            raise ValueError(why)
        return self.stack[-1]

    def pop_mark(self) -> None:
        while self.pop() is not _MARK:
            pass

    def step(self, op: pickletools.OpcodeInfo, arg: Any) -> bool:
        """Applies one opcode; False once the pickle's STOP is reached."""
        name = op.name
        if name in _STRING_OPS:
            self.stack.append(arg)
        elif name == "MARK":
            self.stack.append(_MARK)
        elif name in _PUT_OPS:
            self.memo[arg] = self.top("memo of empty stack")
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top("memo of empty stack")
        elif name in _GET_OPS:
            if arg not in self.memo:
                raise ValueError(f"memo key {arg} missing")
            self.stack.append(self.memo[arg])
        elif name == "DUP":
            self.stack.append(self.top("stack underflow"))
        elif name in ("GLOBAL", "INST", "STACK_GLOBAL"):
            self.global_(name, arg)
        elif name in ("EXT1", "EXT2", "EXT4"):
            raise unsafe(self.entry, "pickle uses the copyreg extension registry")
        elif name == "STOP":
            self.pop()
            return False
        else:
            self.generic(op)
        return True

    def global_(self, name: str, arg: Any) -> None:
        if name == "STACK_GLOBAL":
            gname, module = self.pop(), self.pop()
            if not (isinstance(module, str) and isinstance(gname, str)):
                raise unsafe(self.entry, "pickle builds a global from values that are not literal strings")
            self.stack.append(self.check(module, gname))
            return
        module, _, gname = str(arg).partition(" ")
        g = self.check(module, gname)
        if name == "INST":
            self.pop_mark()
            self.stack.append(_UNKNOWN)
        else:
            self.stack.append(g)

    def generic(self, op: pickletools.OpcodeInfo) -> None:
        before = op.stack_before
        if pickletools.markobject in before:
            self.pop_mark()
            for _ in range(before.index(pickletools.markobject)):
                self.pop()
        else:
            for _ in before:
                self.pop()
        self.stack.extend(_UNKNOWN for _ in op.stack_after)


def scan_pickle(stream: IO[bytes], entry: str) -> set[tuple[str, str]]:
    """Walks one pickle's opcodes and returns the globals it names; raises unless all are allowed.

    Symbolically tracks the stack and memo (strings only) so that STACK_GLOBAL operands are resolved
    the way the unpickler would; an operand that is not a known string is refused, as is anything
    the walk cannot parse.
    """
    walk = _Walk(entry)
    try:
        for op, arg, _pos in pickletools.genops(stream):
            if not walk.step(op, arg):
                break
        else:
            raise ValueError("no STOP opcode")
    except ScreeningError:
        raise
    except Exception as exc:  # genops raises ValueError and friends on malformed input
        raise unsafe(entry, f"pickle could not be parsed statically ({exc})") from None
    return walk.found


def looks_like_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
