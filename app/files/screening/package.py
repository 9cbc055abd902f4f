"""Model packages: a zip with model.py defining build_model() and weights.safetensors (optionally
example_inputs.safetensors). model.py is only searched for its build_model definition here: it runs in the sandbox."""

from __future__ import annotations

import re
import zipfile
from typing import Any

from app.files.screening.common import MAX_DETAIL_ITEMS, ScreeningError, Sniffed
from app.files.screening.safetensors_header import check_safetensors
from app.files.screening.zips import read_entry

MAX_SOURCE_BYTES = 16 * 1024 * 1024  # model.py
_BUILD_MODEL = re.compile(rb"^[ \t]*def[ \t]+build_model[ \t]*\(", re.MULTILINE)


def screen_package(zf: zipfile.ZipFile, base: dict[str, Any]) -> Sniffed:
    names = set(zf.namelist())
    missing = [n for n in ("model.py", "weights.safetensors") if n not in names]
    if missing:
        nested = sorted(n for n in names if n.rsplit("/", 1)[-1] in missing and "/" in n)
        hint = f" (found {', '.join(nested[:3])}: put them at the top level of the zip)" if nested else ""
        raise ScreeningError(422, "invalid_package",
                             f"model package is missing {' and '.join(missing)}{hint}; a package is a zip with "
                             "model.py (defining build_model()), weights.safetensors and optionally "
                             "example_inputs.safetensors", {"missing": missing})
    source = read_entry(zf, "model.py", MAX_SOURCE_BYTES, "model package")
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
