"""What `compress` and `recipes validate` are given: a recipe (a file or a preset name) and models or datasets (an
id, or a local file that is uploaded once: a file the team already has, by SHA-256, is not sent again, and one file
given for several roles is uploaded once)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from squeeze_client.cli.common import INVALID, USAGE, err, fail, size
from squeeze_client.transport import file_sha256

# The model formats a file name says for sure; a .zip is a package or a Hugging Face folder: the server reads it.
FORMAT_OF_SUFFIX = {".pt2": "pt2", ".onnx": "onnx"}


def recipe_arg(value: str) -> dict[str, Any] | str:
    """A recipe file (YAML or JSON) -> its object; anything else is a preset name for the server to resolve."""
    path = Path(value).expanduser()
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    if not path.is_file():
        if path.suffix.lower() in (".yaml", ".yml", ".json") or "/" in value or path.exists():
            raise fail(USAGE, f"{value}: no such recipe file")
        return value
    try:
        text = path.read_text()
        recipe = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise fail(INVALID, f"{value}: not valid {kind}: {exc}") from None
    if not isinstance(recipe, dict):
        raise fail(INVALID, f"{value}: a recipe is a mapping (steps, outputs, evaluate, guard), not "
                            f"{type(recipe).__name__}")
    return recipe


def _looks_like_path(value: str) -> bool:
    # Ids are `<prefix>_<hex>`: a slash or a dot means the user meant a file.
    return "/" in value or os.sep in value or "." in value


def local_file(value: str) -> Path | None:
    """The file `value` names, None for an id; exit 2 for a path that is not a file."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    if path.exists() or _looks_like_path(value):
        raise fail(USAGE, f"{value}: no such file" + (" (a folder: zip it first)" if path.is_dir() else ""))
    return None


class Uploads:
    """Turns ids and local files into ids, sending each file's bytes at most once: not when the team already has
    a file with the same SHA-256, and once for a file named in several roles."""

    def __init__(self, client, quiet: bool):
        self.client, self.quiet = client, quiet
        self._done: dict[tuple[str, Path], str] = {}

    def resolve(self, kind: str, value: str) -> str:
        path = local_file(value)
        if path is None:
            return value
        if (kind, path) not in self._done:
            self._done[kind, path] = self._upload(kind, path)
        return self._done[kind, path]

    def _upload(self, kind: str, path: Path) -> str:
        digest = file_sha256(path)
        row = self.client.find_model(digest) if kind == "models" else self.client.find_dataset(digest)
        if row is not None:
            self._say(f"{path.name}: already uploaded as {row.id} ({row.name}, same sha256); not sent again")
            return row.id
        row = self.client.upload_model(path) if kind == "models" else self.client.upload_dataset(path)
        self._say(f"uploaded {path.name} ({size(row.size_bytes)}, {row.format}) as {row.id}")
        return row.id

    def _say(self, message: str) -> None:
        if not self.quiet:
            err.print(message, highlight=False)
