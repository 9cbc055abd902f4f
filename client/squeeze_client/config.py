"""Which server and which API key: the client's only settings, read here and nowhere else in the package.

Explicit arguments win over SQUEEZE_URL / SQUEEZE_API_KEY, which win over the config file (`url`, `api_key` in
SQUEEZE_CONFIG, else $XDG_CONFIG_HOME/squeeze/config.toml or config.json, XDG_CONFIG_HOME being ~/.config by
default); the URL defaults to the embedded server's.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class ClientConfig:
    url: str
    api_key: str | None
    config_file: Path | None  # the file that was read, if any


def _config_files() -> tuple[list[Path], bool]:
    """The files to try, and whether SQUEEZE_CONFIG named them (then a missing file is an error)."""
    named = os.environ.get("SQUEEZE_CONFIG")
    if named:
        return [Path(named).expanduser()], True
    folder = Path(os.environ.get("XDG_CONFIG_HOME") or "~/.config").expanduser() / "squeeze"
    return [folder / "config.toml", folder / "config.json"], False


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'TOML/JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table with url and api_key")
    return data


def client_config(url: str | None = None, api_key: str | None = None) -> ClientConfig:
    """The server and key to use; ValueError for a config file that is missing (when named) or does not parse."""
    paths, named = _config_files()
    from_file: dict = {}
    read: Path | None = None
    for path in paths:
        if path.is_file():
            from_file, read = _read(path), path
            break
        if named:
            raise ValueError(f"SQUEEZE_CONFIG names {path}, which is not a file")
    resolved_url = url or os.environ.get("SQUEEZE_URL") or from_file.get("url") or DEFAULT_SERVER_URL
    resolved_key = api_key or os.environ.get("SQUEEZE_API_KEY") or from_file.get("api_key") or None
    return ClientConfig(url=str(resolved_url).rstrip("/"), api_key=resolved_key, config_file=read)
