"""torch.export archives (.pt2): version, no native code, and every entry torch.load would unpickle walked."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from app.files.screening.common import MAX_DETAIL_ITEMS, MAX_JSON_BYTES, ZIP_MAGIC, ScreeningError, Sniffed
from app.files.screening.pickles import looks_like_pickle, scan_pickle, unsafe
from app.files.screening.pt2_inputs import pt2_inputs
from app.files.screening.zips import check_zip, entry_copy, head, open_zip, read_entry

MAX_PKL_BYTES = 256 * 1024 * 1024


def _scan_torch_zip(outer: zipfile.ZipFile, entry: str, *, max_unpacked_bytes: int, max_entries: int,
                    tmp_dir: Path, found: set[tuple[str, str]]) -> None:
    """A torch.save zip nested in an entry: torch.load unpickles its data.pkl, so walk every .pkl."""
    with entry_copy(outer, entry, cap=max_unpacked_bytes, tmp_dir=tmp_dir) as raw:
        inner = open_zip(raw, entry)
        with inner:
            check_zip(inner, max_unpacked_bytes=max_unpacked_bytes, max_entries=max_entries, label=entry, crc=False)
            names = inner.namelist()
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                raise ScreeningError(415, "torchscript", f"{entry}: holds a TorchScript archive, which runs code when loaded",
                                     {"entry": entry})
            pkls = [n for n in names if n.endswith(".pkl")]
            if not any(n.endswith("data.pkl") for n in pkls):
                raise unsafe(entry, "nested archive has no data.pkl")
            for n in pkls:
                if inner.getinfo(n).file_size > MAX_PKL_BYTES:
                    raise unsafe(f"{entry}:{n}", "pickle too large to screen")
                with inner.open(n) as f:
                    found |= scan_pickle(f, f"{entry}:{n}")


def _scan_torch_load_entry(zf: zipfile.ZipFile, entry: str, found: set[tuple[str, str]], **limits: Any) -> None:
    """An entry that torch.load reads: only the zip form of torch.save is accepted."""
    if entry not in zf.NameToInfo:
        return  # the loader fails on a missing entry; nothing to unpickle
    first = head(zf, entry, 4)
    if first == b"":
        return  # empty sample inputs load as {} without unpickling
    if first != ZIP_MAGIC:
        raise unsafe(entry, "pickled entry is not in torch.save's zip format (legacy pickles are refused)")
    _scan_torch_zip(zf, entry, found=found, **limits)


def _archive_version(zf: zipfile.ZipFile, root: str, rel: set[str]) -> str:
    version = read_entry(zf, f"{root}/archive_version", 64, "pt2").decode("latin-1").strip() \
        if "archive_version" in rel else None
    if version != "0":
        raise ScreeningError(422, "unsupported_pt2_version",
                             f"pt2 archive_version {version!r} is not supported; re-export with torch.export.save "
                             "from torch 2.13", {"archive_version": version})
    return version


def _payload_path(meta: Any, cfg_entry: str) -> str:
    """A payload's file name from a weights/constants config: one plain name inside the config's folder."""
    path_name = meta.get("path_name") if isinstance(meta, dict) else None
    if not isinstance(path_name, str) or not path_name or "/" in path_name or "\\" in path_name \
            or path_name.startswith("."):
        raise ScreeningError(415, "path_traversal", f"{cfg_entry} names an invalid payload path",
                             {"entry": cfg_entry, "path_name": str(path_name)[:200]})
    return path_name


class _Pt2Scan:
    """Walks every entry of one archive that a loader unpickles, each once."""

    def __init__(self, zf: zipfile.ZipFile, root: str, limits: dict[str, Any]):
        self.zf, self.root, self.limits = zf, root, limits
        self.names = [n[len(root) + 1:] for n in zf.namelist()]
        self.rel = set(self.names)
        self.found: set[tuple[str, str]] = set()
        self.screened: set[str] = set()
        self.pickled: list[str] = []

    def full(self, rel_name: str) -> str:
        return f"{self.root}/{rel_name}"

    def torch_load(self, rel_name: str) -> None:
        if rel_name in self.screened:
            return
        self.screened.add(rel_name)
        self.pickled.append(self.full(rel_name))
        _scan_torch_load_entry(self.zf, self.full(rel_name), self.found, **self.limits)

    def plain_pickle(self, rel_name: str) -> None:
        self.screened.add(rel_name)
        self.pickled.append(self.full(rel_name))
        with self.zf.open(self.full(rel_name)) as f:
            self.found |= scan_pickle(f, self.full(rel_name))

    def model(self, model: str) -> None:
        self.torch_load(f"data/sample_inputs/{model}.pt")
        for kind in ("weights", "constants"):
            legacy = f"data/{kind}/{model}.pt"
            if legacy in self.rel:
                self.torch_load(legacy)
            elif f"data/{kind}/{model}_{kind}_config.json" in self.rel:
                self.payloads(kind, f"data/{kind}/{model}_{kind}_config.json")

    def payloads(self, kind: str, cfg_name: str) -> None:
        try:
            cfg = json.loads(read_entry(self.zf, self.full(cfg_name), MAX_JSON_BYTES, "pt2"))
            payloads = cfg["config"].values()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ScreeningError(422, "invalid_pt2", f"{self.full(cfg_name)} is not a valid payload config ({exc})",
                                 {"entry": self.full(cfg_name)}) from None
        for meta in payloads:
            path_name = _payload_path(meta, self.full(cfg_name))
            entry = f"data/{kind}/{path_name}"
            if path_name.startswith("custom_obj_"):
                raise unsafe(self.full(entry), "TorchScript custom-class constants are refused")
            if path_name.startswith("opaque_obj_"):
                if entry in self.rel and entry not in self.screened:
                    self.plain_pickle(entry)
            elif meta.get("use_pickle"):
                self.torch_load(entry)

    def leftovers(self) -> None:
        """Anything else that looks like a pickle or a nested archive is screened too, in case some other loader
        path reads it; raw tensor payloads are never unpickled and are left alone."""
        raw_payloads = {n for n in self.rel
                        if n.startswith(("data/weights/", "data/constants/")) and not n.endswith(".json")}
        for n in self.names:
            if n in self.screened or n in raw_payloads or n.endswith("/"):
                continue
            first = head(self.zf, self.full(n), 4)
            if first == ZIP_MAGIC:
                self.torch_load(n)
            elif looks_like_pickle(first):
                self.plain_pickle(n)


def screen_pt2(zf: zipfile.ZipFile, root: str, base: dict[str, Any], limits: dict[str, Any]) -> Sniffed:
    scan = _Pt2Scan(zf, root, limits)
    version = _archive_version(zf, root, scan.rel)
    native = [n for n in scan.names if n.startswith(("data/aotinductor/", "data/executorch/", "data/mtia"))]
    if native:
        raise ScreeningError(415, "native_code",
                             "pt2 holds compiled (AOTInductor/ExecuTorch) artifacts, which load native code; "
                             "upload the plain torch.export.save output", {"entry": scan.full(native[0])})
    models = sorted(n[len("models/"):-len(".json")] for n in scan.names
                    if n.startswith("models/") and n.endswith(".json"))
    if not models:
        raise ScreeningError(422, "invalid_pt2", "pt2 archive has no models/*.json", {})
    for model in models:
        scan.model(model)
    scan.leftovers()
    details = {**base, "archive_version": version, "models": models[:MAX_DETAIL_ITEMS],
               "pickled_entries": sorted(scan.pickled)[:MAX_DETAIL_ITEMS],
               "pickle_globals": sorted(f"{m}.{g}" for m, g in scan.found), **pt2_inputs(zf, root, models)}
    return Sniffed("pt2", details)
