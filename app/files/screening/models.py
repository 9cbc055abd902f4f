"""An uploaded model recognised by its bytes and sent to its format's screener: a zip (.pt2, model package, Hugging
Face folder; TorchScript and torch.save zips refused), an ONNX protobuf, or a refused pickle or bare safetensors."""

from __future__ import annotations

import mmap
from pathlib import Path

from app.files.screening.common import (
    ACCEPTED_MODELS,
    PICKLE_ADVICE,
    ScreeningError,
    Sniffed,
    is_zip,
    looks_like_safetensors,
    read_head,
    unsupported,
)
from app.files.screening.hf import hf_prefix, screen_hf
from app.files.screening.onnx_model import sniff_onnx
from app.files.screening.package import screen_package
from app.files.screening.pickles import looks_like_pickle
from app.files.screening.pt2 import screen_pt2
from app.files.screening.zips import check_zip, open_zip, read_entry, root_of


def _classify_zip(path: Path, *, max_unpacked_bytes: int, max_entries: int) -> Sniffed:
    label = path.name or "upload"
    zf = open_zip(path, "zip")
    with zf:
        base = check_zip(zf, max_unpacked_bytes=max_unpacked_bytes, max_entries=max_entries, label="zip")
        names = zf.namelist()
        if not names:
            raise unsupported(ACCEPTED_MODELS, "empty zip")
        root = root_of(names)
        if root is not None and f"{root}/archive_format" in zf.NameToInfo:
            if read_entry(zf, f"{root}/archive_format", 16, label).strip() == b"pt2":
                # Nested zips are copied next to the upload (its disk, not a tmpfs /tmp) while screened.
                return screen_pt2(zf, root, base, {"max_unpacked_bytes": max_unpacked_bytes,
                                                   "max_entries": max_entries, "tmp_dir": path.parent})
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            raise ScreeningError(415, "torchscript",
                                 "TorchScript archives are refused: they run code when loaded and torch.jit is "
                                 "deprecated. Export with torch.export.save (.pt2), torch.onnx.export (.onnx), or "
                                 "upload a model package (zip with model.py + weights.safetensors)", {})
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise ScreeningError(415, "pickled_model", PICKLE_ADVICE, {"format": "torch.save (zip)"})
        prefix = hf_prefix(names)
        if prefix is not None:
            return screen_hf(zf, base, prefix)
        if any(n.rsplit("/", 1)[-1] in ("model.py", "weights.safetensors") for n in names):
            return screen_package(zf, base)
        raise unsupported(ACCEPTED_MODELS, "zip is neither a torch.export .pt2 nor a model package")


def sniff_model(path: Path, *, max_unpacked_bytes: int, max_entries: int) -> Sniffed:
    """Recognises and statically screens an uploaded model; raises ScreeningError when refused."""
    path = Path(path)
    head, size = read_head(path, ACCEPTED_MODELS)
    if is_zip(head):
        return _classify_zip(path, max_unpacked_bytes=max_unpacked_bytes, max_entries=max_entries)
    if looks_like_pickle(head):
        raise ScreeningError(415, "pickled_model", PICKLE_ADVICE, {"format": "torch.save (legacy pickle)"})
    if looks_like_safetensors(head, size):
        raise unsupported(ACCEPTED_MODELS, "a bare .safetensors holds weights but no architecture; "
                          "put it in a model package with a model.py")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        found = sniff_onnx(buf, size)
    if found is not None:
        return found
    raise unsupported(ACCEPTED_MODELS)
