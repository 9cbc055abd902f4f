"""Text datasets (.txt, .jsonl with a `text` field, .parquet with a `text` column), tokenized in the sandbox by the
model's own tokenizer into windows of `text.seq_len` tokens (docs/llm.md).

A text file is read at load time (`read_text`); once the model is loaded, `tokenize` turns it into a Dataset whose
one input is `input_ids` (windows, int64) and which keeps the whole token stream for perplexity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.recipes import TextSpec
from worker.engine.datasets import Dataset
from worker.engine.errors import EngineError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass
class RawText:
    """A text dataset as read, before the model's tokenizer is known."""

    name: str
    documents: list[str]
    kind: str  # txt, jsonl, parquet


@dataclass
class TextDataset(Dataset):
    """A tokenized text dataset: `inputs["input_ids"]` are the windows; `stream` every token, in order."""

    stream: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    kind: str = "txt"


def read_text(path: Path, name: str) -> RawText:
    """The documents of a .txt (one document), .jsonl (one per record) or .parquet (one per row) file."""
    kind = path.suffix.lstrip(".")
    try:
        if kind == "txt":
            docs = [path.read_text(encoding="utf-8-sig")]
        elif kind == "jsonl":
            docs = _jsonl(path, name)
        else:
            docs = _parquet(path, name)
    except UnicodeDecodeError as exc:
        raise EngineError("bad_dataset", f"dataset {name!r} is not UTF-8 text ({exc}): save it as UTF-8") from exc
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise EngineError("bad_dataset", f"dataset {name!r} holds no text")
    return RawText(name=name, documents=docs, kind=kind)


def _jsonl(path: Path, name: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise EngineError("bad_dataset", f"dataset {name!r} line {number} is not JSON: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise EngineError("bad_dataset", f"dataset {name!r} line {number} has no string 'text' field")
            docs.append(record["text"])
    return docs


def _parquet(path: Path, name: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path), columns=["text"])
    except Exception as exc:
        raise EngineError("bad_dataset", f"dataset {name!r}: cannot read a 'text' column from the parquet file "
                                         f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    column = table.column("text").to_pylist()
    if not all(isinstance(v, str) or v is None for v in column):
        raise EngineError("bad_dataset", f"dataset {name!r}: the parquet 'text' column is not strings")
    return [v for v in column if v]


def load_tokenizer(folder: Path) -> Any:
    """The model folder's own tokenizer (its files only: no download, no custom code)."""
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise EngineError("bad_dataset", "text datasets are tokenized by the model's tokenizer, and the Hugging Face "
                                         "folder has no tokenizer files: upload the folder with tokenizer.json and "
                                         "tokenizer_config.json (tokenizer.save_pretrained(folder))")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise EngineError("bad_model", f"cannot load the folder's tokenizer: {type(exc).__name__}: "
                                       f"{str(exc)[:500]}") from exc


def context_length(config: Any) -> int | None:
    """The model's context (max_position_embeddings, n_positions...), or None when the config does not say."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize(raw: RawText, tokenizer: Any, spec: TextSpec, context: int | None) -> TextDataset:
    """Token windows of `spec.seq_len` (packed from the document stream, or one per document)."""
    seq_len = spec.seq_len
    if context is not None and seq_len > context:
        raise EngineError("bad_dataset", f"text.seq_len {seq_len} is above the model's context of {context} tokens: "
                                         f"set text.seq_len to at most {context}")
    eos = tokenizer.eos_token_id
    tokenizer.model_max_length = int(1e12)  # a document longer than the context is cut into windows below
    encoded = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in raw.documents]
    stream = np.asarray([t for ids in encoded for t in (*ids, *([eos] if eos is not None else []))], np.int64)
    if spec.packing:
        n = len(stream) // seq_len
        windows = stream[: n * seq_len].reshape(n, seq_len)
    else:
        kept = [ids[:seq_len] for ids in encoded if len(ids) >= seq_len]
        windows = np.asarray(kept, np.int64).reshape(len(kept), seq_len)
    if len(windows) == 0:
        raise EngineError("bad_dataset", f"dataset {raw.name!r} gives {len(stream)} tokens, not one window of "
                                         f"text.seq_len {seq_len}" + ("" if spec.packing else " (packing is off: "
                                                                      "each document needs that many)")
                          + ": upload more text or lower text.seq_len")
    return TextDataset(name=raw.name, inputs={"input_ids": windows}, labels=None, stream=stream, kind=raw.kind)
