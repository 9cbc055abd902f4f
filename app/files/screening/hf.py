"""Hugging Face folders: a zip of config.json (no auto_map: no remote code) and safetensors weights, from
save_pretrained, with the tokenizer's files beside them (tokenizer.save_pretrained); no Python files, no pickled
weights. A compressed-tensors folder (config.json with a quantization_config, int32/int8/fp8 tensors) is accepted."""

from __future__ import annotations

import json
import zipfile
from typing import Any

from app.files.screening.common import MAX_DETAIL_ITEMS, MAX_JSON_BYTES, ScreeningError, Sniffed
from app.files.screening.safetensors_header import check_safetensors
from app.files.screening.zips import read_entry, root_of

HF_PICKLED = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# What tokenizer.save_pretrained (and generation_config.save_pretrained) write; listed in details["tokenizer"].
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")
CUSTOM_CODE = ("custom code is never run: only architectures and tokenizers built into transformers are accepted; "
               "remove auto_map (and the code it names) or pick a model that needs no trust_remote_code")


def hf_prefix(names: list[str]) -> str | None:
    """"" or "folder/" when the zip is a Hugging Face folder (config.json at the top or in the single top folder,
    and no model package's weights.safetensors), else None."""
    if "weights.safetensors" in {n.rsplit("/", 1)[-1] for n in names}:
        return None
    if "config.json" in names:
        return ""
    root = root_of(names)
    if root is not None and f"{root}/config.json" in names:
        return f"{root}/"
    return None


def _json_entry(zf: zipfile.ZipFile, name: str, label: str) -> Any:
    """One JSON file of the folder, parsed as data (at most MAX_JSON_BYTES); a dict with auto_map is refused."""
    try:
        value = json.loads(read_entry(zf, name, MAX_JSON_BYTES, "Hugging Face folder").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ScreeningError(422, "invalid_hf", f"{label} is not valid JSON ({str(exc)[:200]}); save it again "
                             "with save_pretrained", {"entry": name}) from None
    if isinstance(value, dict) and "auto_map" in value:
        raise ScreeningError(415, "unsupported_format", f"{label} has auto_map (trust_remote_code): {CUSTOM_CODE}",
                             {"auto_map": True, "entry": name})
    return value


def _tokenizer_files(zf: zipfile.ZipFile, names: list[str], prefix: str) -> list[str]:
    """The tokenizer files next to config.json; each JSON one parsed (valid JSON, no auto_map)."""
    found = sorted(n[len(prefix):] for n in names if n.startswith(prefix) and n[len(prefix):] in TOKENIZER_FILES)
    for name in found:
        if name.endswith(".json"):
            _json_entry(zf, f"{prefix}{name}", name)
    return found


def _max_positions(config: dict[str, Any]) -> int | None:
    """config.json's max_position_embeddings (a multimodal model's text_config holds it), if it is an integer."""
    text_config = config.get("text_config")
    for source in (config, text_config if isinstance(text_config, dict) else {}):
        value = source.get("max_position_embeddings")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def screen_hf(zf: zipfile.ZipFile, base: dict[str, Any], prefix: str) -> Sniffed:
    """A Hugging Face folder: config.json (no auto_map: no remote code) + safetensors weights, tokenizer files
    beside them; no Python files, no pickled weights."""
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
    raw = read_entry(zf, f"{prefix}config.json", MAX_CONFIG_BYTES, "Hugging Face folder")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ScreeningError(422, "invalid_hf", f"config.json is not JSON ({exc})", {}) from None
    if not isinstance(config, dict):
        raise ScreeningError(422, "invalid_hf", "config.json is not a JSON object", {})
    if "auto_map" in config:
        raise ScreeningError(415, "unsupported_format", f"config.json has auto_map (trust_remote_code): {CUSTOM_CODE}",
                             {"auto_map": True, "entry": "config.json"})
    tokenizer = _tokenizer_files(zf, names, prefix)
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
            index = json.loads(read_entry(zf, index_name, MAX_CONFIG_BYTES, "Hugging Face folder").decode("utf-8"))
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
                   files=sorted(names)[:MAX_DETAIL_ITEMS], tokenizer=tokenizer)
    if (positions := _max_positions(config)) is not None:
        details["max_position_embeddings"] = positions
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict):  # e.g. a compressed-tensors folder that Squeeze itself wrote
        details["quantization"] = str(quantization.get("quant_method") or "unknown")[:100]
    return Sniffed("hf", details)
