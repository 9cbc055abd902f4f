"""Squeeze compact storage: one safetensors file, each tensor stored dense, sparse (bitmask + values) or as a palette.

Standalone: needs only numpy and safetensors, so it can be copied next to a user's code. To load:

    from storage import load_compact            # this file
    tensors = load_compact("model.safetensors")  # {name: np.ndarray}, the exact dense tensors
    # torch: module.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)

File layout. `__metadata__` holds "format" = "squeeze-compact", "format_version" = "1" and "squeeze_manifest", a
JSON object:

    {"format": "squeeze-compact", "version": 1, "bit_order": "little",
     "tensors": {NAME: {"layout": "dense" | "sparse" | "palette", "dtype": "float32", "shape": [..],
                        "bits": int, "stored_bytes": int, "tensors": {ROLE: STORED_NAME}, ...}}}

- dense:   tensors {"data": NAME}; the array itself. bits = bits of dtype.
- sparse:  tensors {"mask": NAME + "/mask", "values": NAME + "/values"}; "nnz": int. mask is uint8, one bit per
           element in C order, packed with np.packbits(bitorder="little") (element i is bit i % 8 of byte i // 8);
           a set bit means the element's bit pattern is not all-zero (so -0.0 is kept as a value). values are the
           kept elements in C order, in the original dtype. bits = bits of dtype (of each kept value).
- palette: tensors {"codebook": NAME + "/codebook", "indices": NAME + "/indices"}; "clusters": k,
           "codebook_dtype": "float16" or the original dtype. Element i is codebook[index_i]; index_i is a `bits`-bit
           unsigned integer (bits = max(1, ceil(log2 k)) <= 8) at bit offset i * bits of the little-endian bit
           stream `indices` (bit j of the stream is bit j % 8 of byte j // 8; an index's lowest bit comes first).
           The codebook is float16 when every value is exactly a float16 (Squeeze's cluster pass snaps centroids to
           float16 for this), else the original dtype: restoring is always bit-exact.

- binary:  tensors {"signs": NAME + "/signs", "scales": NAME + "/scales"}; for a tensor of >= 2 dims whose every
           row (index along dim 0) holds only +s_r and -s_r for one s_r >= 0. scales[r] = s_r (float16 when exact,
           "scale_dtype"), signs one bit per element in C order packed like a sparse mask: a set bit is +s_r, a clear
           bit -s_r. bits = 1. Squeeze's `binary` quantize step writes weights of this form.

"bfloat16" tensors (from torch) are stored as their raw 16-bit patterns and restored as float32 (exact).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT = "squeeze-compact"
VERSION = 1
MANIFEST_KEY = "squeeze_manifest"
MAX_PALETTE = 256
_CHUNK = 1 << 22  # elements per packing chunk (a multiple of 8, so chunks start on byte boundaries)
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _as_numpy(t: Any) -> tuple[np.ndarray, str]:
    """(array, dtype label); torch tensors without importing torch here."""
    if isinstance(t, (np.ndarray, np.generic)):
        a = np.require(np.asarray(t), requirements="C")  # not ascontiguousarray: it turns 0-d into 1-d
        return a, str(a.dtype)
    dtype = str(getattr(t, "dtype", ""))
    t = t.detach().cpu().contiguous()
    if dtype == "torch.bfloat16":
        import torch

        return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    arr = np.require(t.numpy(), requirements="C")
    return arr, str(arr.dtype)


def _raw(a: np.ndarray) -> np.ndarray:
    """The element bit patterns, so equality is exact (-0.0 != 0.0, NaN payloads kept)."""
    return a.reshape(-1).view(_RAW[a.dtype.itemsize]) if a.dtype.itemsize in _RAW else a.reshape(-1)


def pack_indices(idx: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned indices (< 2**bits) -> little-endian bit stream of `bits` bits each, as uint8."""
    idx = idx.reshape(-1).astype(np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    out = [np.packbits(((idx[s:s + _CHUNK, None] >> shifts) & 1).reshape(-1), bitorder="little")
           for s in range(0, idx.size, _CHUNK)]
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def unpack_indices(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    out = []
    for s in range(0, count, _CHUNK):
        n = min(_CHUNK, count - s)
        start = s * bits // 8
        chunk = np.unpackbits(packed[start:start + (n * bits + 7) // 8], count=n * bits, bitorder="little")
        out.append((chunk.reshape(n, bits).astype(np.uint16) @ weights).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def _palette(a: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(codebook, indices, bits) when the tensor has <= 256 distinct bit patterns, else None."""
    raw = _raw(a)
    if a.dtype.kind not in "fiub" or raw.size == 0:
        return None
    uniq, inverse = np.unique(raw, return_inverse=True)
    if uniq.size > MAX_PALETTE:
        return None
    values = uniq.view(a.dtype) if label != "bfloat16" else uniq
    codebook = values
    if label in ("float32", "float64", "float16"):
        with np.errstate(over="ignore", invalid="ignore"):
            as16 = values.astype(np.float16)
        if np.array_equal(_raw(as16.astype(a.dtype)), uniq):  # exactly representable: store the fp16 codebook
            codebook = as16
    bits = max(1, math.ceil(math.log2(uniq.size)))
    return codebook, inverse.reshape(-1), bits


def _binary(a: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(packed sign bits, per-row scales) when each row of `a` is +-s for one s per row, else None."""
    if a.ndim < 2 or a.size == 0 or label not in ("float32", "float64", "float16"):
        return None
    rows = a.reshape(a.shape[0], -1)
    scales = np.abs(rows[:, 0]).copy()
    if not np.isfinite(scales).all():
        return None
    pos = _raw(rows) == _raw(np.broadcast_to(scales[:, None], rows.shape).copy())
    neg = _raw(rows) == _raw(np.broadcast_to(-scales[:, None], rows.shape).copy())
    if not (pos | neg).all():
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        as16 = scales.astype(np.float16)
    if np.array_equal(_raw(as16.astype(a.dtype)), _raw(scales)):
        scales = as16
    return np.packbits(pos.reshape(-1), bitorder="little"), np.ascontiguousarray(scales)


def write_compact(tensors: dict[str, Any], path: str | Path) -> dict:
    """Write every tensor in its cheapest exact layout; return the manifest (also stored in the file)."""
    out: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    taken = set(tensors)
    for name, t in tensors.items():
        a, label = _as_numpy(t)
        n, item = a.size, a.dtype.itemsize
        entry: dict[str, Any] = {"dtype": label, "shape": list(a.shape)}
        best = ("dense", n * item)
        raw = _raw(a) if a.ndim and n else None
        nz = None
        if raw is not None:
            nz = raw != 0
            nnz = int(nz.sum())
            sparse_bytes = (n + 7) // 8 + nnz * item
            if sparse_bytes < best[1]:
                best = ("sparse", sparse_bytes)
            pal = _palette(a, label)
            if pal is not None:
                codebook, idx, bits = pal
                pal_bytes = codebook.nbytes + (n * bits + 7) // 8
                if pal_bytes < best[1]:
                    best = ("palette", pal_bytes)
            binary = _binary(a, label)
            if binary is not None:
                signs, scales = binary
                if signs.nbytes + scales.nbytes < best[1]:
                    best = ("binary", signs.nbytes + scales.nbytes)
        layout = best[0]
        if layout == "dense":
            names = {"data": name}
            out[name] = a
            entry.update(bits=item * 8)
        elif layout == "sparse":
            names = {"mask": f"{name}/mask", "values": f"{name}/values"}
            out[names["mask"]] = np.packbits(nz, bitorder="little")
            out[names["values"]] = np.ascontiguousarray(a.reshape(-1)[nz])
            entry.update(bits=item * 8, nnz=nnz)
        elif layout == "binary":
            names = {"signs": f"{name}/signs", "scales": f"{name}/scales"}
            out[names["signs"]], out[names["scales"]] = signs, scales
            entry.update(bits=1, scale_dtype=str(scales.dtype))
        else:
            names = {"codebook": f"{name}/codebook", "indices": f"{name}/indices"}
            out[names["codebook"]] = np.ascontiguousarray(codebook)
            out[names["indices"]] = pack_indices(idx, bits)
            entry.update(bits=bits, clusters=int(codebook.size), codebook_dtype=str(codebook.dtype))
        for stored in names.values():
            if stored != name and stored in taken:
                raise ValueError(f"stored tensor name {stored!r} collides with another tensor")
            taken.add(stored)
        entries[name] = {"layout": layout, **entry, "stored_bytes": int(best[1]), "tensors": names}
    manifest = {"format": FORMAT, "version": VERSION, "bit_order": "little", "tensors": entries}
    save_file(out, str(path), metadata={"format": FORMAT, "format_version": str(VERSION),
                                        MANIFEST_KEY: json.dumps(manifest, separators=(",", ":"))})
    return manifest


def read_manifest(path: str | Path) -> dict:
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or MANIFEST_KEY not in meta:
        raise ValueError(f"{path} is not a {FORMAT} file")
    manifest = json.loads(meta[MANIFEST_KEY])
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: {FORMAT} version {manifest.get('version')} is not supported (want {VERSION})")
    return manifest


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def load_compact(path: str | Path) -> dict[str, np.ndarray]:
    """The exact dense tensors of a compact file, by name."""
    manifest = read_manifest(path)
    result: dict[str, np.ndarray] = {}
    with safe_open(str(path), framework="np") as f:
        for name, e in manifest["tensors"].items():
            shape, names, bf16 = tuple(e["shape"]), e["tensors"], e["dtype"] == "bfloat16"
            dtype = np.dtype(np.uint16 if bf16 else e["dtype"])
            n = int(np.prod(shape)) if shape else 1
            if e["layout"] == "dense":
                a = f.get_tensor(names["data"]).reshape(shape)
            elif e["layout"] == "sparse":
                nz = np.unpackbits(f.get_tensor(names["mask"]), count=n, bitorder="little").astype(bool)
                a = np.zeros(n, dtype)
                a[nz] = f.get_tensor(names["values"])
                a = a.reshape(shape)
            elif e["layout"] == "palette":
                codebook = f.get_tensor(names["codebook"]).astype(dtype)
                a = codebook[unpack_indices(f.get_tensor(names["indices"]), int(e["bits"]), n)].reshape(shape)
            elif e["layout"] == "binary":
                scales = f.get_tensor(names["scales"]).astype(dtype)
                signs = np.unpackbits(f.get_tensor(names["signs"]), count=n, bitorder="little").astype(bool)
                rows = np.broadcast_to(scales[:, None], (shape[0], n // shape[0]))
                a = np.where(signs.reshape(shape[0], -1), rows, -rows).astype(dtype).reshape(shape)
            else:
                raise ValueError(f"{path}: tensor {name!r} has unknown layout {e['layout']!r}")
            result[name] = _bf16_to_f32(a) if bf16 else a
    return result
