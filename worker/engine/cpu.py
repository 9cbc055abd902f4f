"""The host CPU's SIMD features, as /proc/cpuinfo lists them: what int8 kernels a runtime can use here."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# The features int8 speed and exactness depend on: AVX2 (vpmaddubsw, which adds u8 x s8 pairs in saturating int16),
# AVX-512, and the instructions that accumulate those products in int32 without saturating (VNNI in its AVX-512
# and AVX forms, AMX).
INT8_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def parse_flags(cpuinfo: str) -> frozenset[str] | None:
    """The flags of the first processor in a /proc/cpuinfo text (x86 `flags`, ARM `Features`); None if none."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


@functools.cache
def host_flags() -> frozenset[str] | None:
    """This host's CPU flags, or None where /proc/cpuinfo cannot be read or lists none."""
    try:
        return parse_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def int8_features(flags: frozenset[str] | set[str] | None) -> list[str]:
    """Of INT8_FEATURES, those in `flags`, in that order."""
    return [f for f in INT8_FEATURES if flags and f in flags]
