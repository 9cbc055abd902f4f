"""Text datasets for language models (.txt, .jsonl, .parquet) and Hugging Face folders with tokenizer files, through
HTTP on the real database: what is accepted and with which details, what is refused and with which message, and a
job created on text datasets whose inputs stage under their format's suffix."""

from __future__ import annotations

import io
import json
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.files.screening import ScreeningError, sniff_dataset
from app.files.screening.text import MAX_LINE_BYTES

LIMITS = {"max_unpacked_bytes": 1 << 30, "max_entries": 1000}
CORPUS = "The quick brown fox jumps over the lazy dog.\nZwölf Boxkämpfer jagen Viktor quer über den Sylter Deich.\n"


def upload_dataset(api, data: bytes, name: str):
    return api.post("/v1/datasets", params={"name": name}, content=data)


def parquet_bytes(table: pa.Table, **kw) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], int]]) -> bytes:
    """A safetensors file from (dtype, shape, itemsize in bytes) per tensor, written by hand so that any dtype
    (F8_E4M3 included) can be stored; the data is zeros."""
    header, data = {}, b""
    for name, (dtype, shape, itemsize) in tensors.items():
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += b"\0" * n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 256}
TOKENIZER = {
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}).encode(),
    "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}).encode(),
    "special_tokens_map.json": b'{"bos_token": "<s>"}',
    "generation_config.json": b'{"do_sample": false}',
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
}


def hf_zip(config: dict | None = None, extra: dict[str, bytes] | None = None, folder: str = "") -> bytes:
    weights = safetensors_bytes({"model.embed_tokens.weight": ("F32", [1000, 64], 4)})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr(f"{folder}config.json", json.dumps(config or LLAMA_CONFIG))
        z.writestr(f"{folder}model.safetensors", weights)
        for name, data in (extra or {}).items():
            z.writestr(folder + name, data)
    return out.getvalue()


# ------------------------------------------------------------------------------------------------ text datasets

def test_text_datasets_are_accepted_with_their_details(api):
    txt = upload_dataset(api, b"\xef\xbb\xbf" + CORPUS.encode(), "corpus.txt")
    assert txt.status_code == 201, txt.text
    body = txt.json()
    assert body["format"] == "txt" and body["size_bytes"] == len(CORPUS.encode()) + 3
    details = body["details"]
    assert details["characters"] == len(CORPUS) and details["lines"] == 2 and details["encoding"] == "utf-8-sig"
    assert details["bytes"] == body["size_bytes"] and "tokenizer" in details["note"]

    records = [{"text": line, "source": "pangram", "id": i} for i, line in enumerate(CORPUS.splitlines())]
    jsonl = "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n"
    r = upload_dataset(api, jsonl.encode(), "corpus.jsonl")
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "jsonl"
    assert r.json()["details"]["records"] == 2 and r.json()["details"]["lines"] == 3
    assert r.json()["details"]["characters"] == sum(len(line) for line in CORPUS.splitlines())

    table = pa.table({"text": CORPUS.splitlines() * 5, "id": list(range(10))})
    r = upload_dataset(api, parquet_bytes(table, row_group_size=4), "corpus.parquet")
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "parquet"
    assert r.json()["details"] | {"note": None} == {"bytes": r.json()["size_bytes"], "rows": 10, "row_groups": 3,
                                                     "text_column": "text", "columns": ["text", "id"], "note": None}
    listed = api.get("/v1/datasets").json()["data"]
    assert sorted(d["format"] for d in listed) == ["jsonl", "parquet", "txt"]
    assert api.get(f"/v1/datasets/{txt.json()['id']}/file").content == b"\xef\xbb\xbf" + CORPUS.encode()


def test_text_datasets_refused_with_what_to_do(api):
    latin1 = ("Caf\u00e9 au lait\n" * 3).encode("latin-1")
    r = upload_dataset(api, latin1, "latin1.txt")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_text", r.text
    assert "byte offset 3" in r.json()["error"]["message"] and "save it as UTF-8" in r.json()["error"]["message"]
    assert r.json()["error"]["details"]["offset"] == 3

    r = upload_dataset(api, CORPUS.encode("utf-16"), "utf16.txt")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_text" and "UTF-16" in r.text

    jsonl = b'{"text": "one"}\n\n{"body": "two"}\n{"text": "three"}\n'
    r = upload_dataset(api, jsonl, "bad.jsonl")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_jsonl", r.text
    assert "line 3" in r.json()["error"]["message"] and '"text"' in r.json()["error"]["message"]
    assert r.json()["error"]["details"]["line"] == 3
    r = upload_dataset(api, b'{"text": "one"}\n{"text": 2}\n', "bad.jsonl")
    assert r.status_code == 422 and "line 2" in r.json()["error"]["message"]

    blob = random.Random(0).randbytes(4096)
    r = upload_dataset(api, blob, "blob.bin")
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_format", r.text
    assert ".npz" in r.json()["error"]["message"] and ".jsonl" in r.json()["error"]["message"]

    for data, name in [(b" \n\t\n", "blank.txt"), (b'{"text": "  "}\n', "blank.jsonl"),
                       (parquet_bytes(pa.table({"text": pa.array([], pa.string())})), "empty.parquet")]:
        r = upload_dataset(api, data, name)
        assert r.status_code == 422 and r.json()["error"]["code"] == "empty_dataset", (name, r.text)

    r = upload_dataset(api, parquet_bytes(pa.table({"body": ["a"]})), "no-text.parquet")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parquet"
    assert "body" in r.json()["error"]["message"] and "\"text\"" in r.json()["error"]["message"]
    r = upload_dataset(api, parquet_bytes(pa.table({"text": [1, 2]})), "ints.parquet")
    assert r.status_code == 422 and "INT64" in r.json()["error"]["message"]
    assert api.get("/v1/datasets").json()["data"] == []


def test_binary_formats_are_sniffed_before_text(tmp_path):
    """npz, pickles and safetensors keep their own verdicts; text is only the fallback."""
    import pickle

    from safetensors.numpy import save_file

    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3), np.float32))
    save_file({"x": np.zeros((2, 3), np.float32)}, str(tmp_path / "d.safetensors"))
    (tmp_path / "d.pkl").write_bytes(pickle.dumps({"text": "a"}, protocol=4))
    assert sniff_dataset(tmp_path / "d.npz", **LIMITS).kind == "npz"
    assert sniff_dataset(tmp_path / "d.safetensors", **LIMITS).kind == "safetensors"
    with pytest.raises(ScreeningError) as err:
        sniff_dataset(tmp_path / "d.pkl", **LIMITS)
    assert err.value.code == "unsafe_pickle"


def test_offsets_and_lines_are_exact(tmp_path):
    """The offset of a bad byte is exact across the 1 MiB chunks; a NUL past the head; an overlong JSON line."""
    path = tmp_path / "split.txt"
    path.write_bytes(b"a" * (1024 * 1024 - 1) + "\u00e9".encode() + b"ok\xff")  # \xc3\xa9 straddles the chunks
    with pytest.raises(ScreeningError) as err:
        sniff_dataset(path, **LIMITS)
    assert err.value.code == "invalid_text" and err.value.details["offset"] == 1024 * 1024 + 3
    path.write_bytes(b"text " * 10_000 + b"\0")
    with pytest.raises(ScreeningError) as err:
        sniff_dataset(path, **LIMITS)
    assert err.value.code == "invalid_text" and err.value.details["offset"] == 50_000
    path.write_bytes(b'{"text": "a"}\n{"text": "\xe9"}\n')
    with pytest.raises(ScreeningError) as err:
        sniff_dataset(path, **LIMITS)
    assert err.value.details == {"offset": 24, "line": 2}
    path.write_bytes(b'{"text": "a"}\n{"text": "' + b"a" * MAX_LINE_BYTES + b'"}\n')
    with pytest.raises(ScreeningError) as err:
        sniff_dataset(path, **LIMITS)
    assert err.value.code == "invalid_jsonl" and err.value.details["line"] == 2


def test_corrupt_parquet_footers_are_refused_not_crashed(tmp_path):
    raw = parquet_bytes(pa.table({"text": ["a", "b"], "n": [1, 2]}))
    (n,) = struct.unpack("<I", raw[-8:-4])
    path, rng, seen = tmp_path / "f.parquet", random.Random(0), set()
    for _ in range(300):
        mutated = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            mutated[len(raw) - 8 - n + rng.randrange(n)] = rng.randrange(256)
        path.write_bytes(bytes(mutated))
        try:
            seen.add(sniff_dataset(path, **LIMITS).kind)
        except ScreeningError as exc:
            seen.add(exc.code)
    assert "invalid_parquet" in seen and seen <= {"parquet", "invalid_parquet", "empty_dataset"}
    path.write_bytes(raw[:-8] + struct.pack("<I", len(raw)) + b"PAR1")
    with pytest.raises(ScreeningError) as err:
        sniff_dataset(path, **LIMITS)
    assert err.value.code == "truncated" and "footer length" in err.value.message


# ---------------------------------------------------------------------------------- Hugging Face tokenizer files

def test_hf_folder_with_tokenizer_files_is_accepted_and_listed(api):
    r = api.post("/v1/models", params={"name": "tiny-llama.zip"}, content=hf_zip(extra=TOKENIZER, folder="tiny/"))
    assert r.status_code == 201, r.text
    details = r.json()["details"]
    assert r.json()["format"] == "hf" and details["model_type"] == "llama"
    assert details["tokenizer"] == sorted(TOKENIZER) and details["max_position_embeddings"] == 256
    bare = api.post("/v1/models", params={"name": "bare.zip"}, content=hf_zip({**LLAMA_CONFIG,
                                                                               "max_position_embeddings": None}))
    assert bare.status_code == 201 and bare.json()["details"]["tokenizer"] == []
    assert "max_position_embeddings" not in bare.json()["details"]


@pytest.mark.parametrize("case", ["tokenizer_auto_map", "config_auto_map", "bad_tokenizer_json"])
def test_hf_folder_tokenizer_refusals(api, case):
    extra, config, status, code = {
        "tokenizer_auto_map": ({**TOKENIZER, "tokenizer_config.json": json.dumps(
            {"auto_map": {"AutoTokenizer": ["tok.MyTokenizer", None]}}).encode()}, None, 415, "unsupported_format"),
        "config_auto_map": (TOKENIZER, {**LLAMA_CONFIG, "auto_map": {"AutoModel": "m.M"}}, 415, "unsupported_format"),
        "bad_tokenizer_json": ({**TOKENIZER, "tokenizer.json": b'{"model": '}, None, 422, "invalid_hf"),
    }[case]
    r = api.post("/v1/models", params={"name": "m.zip"}, content=hf_zip(config, extra))
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    if status == 415:
        assert "custom code is never run" in r.json()["error"]["message"]
    else:
        assert "tokenizer.json" in r.json()["error"]["message"]
    assert api.get("/v1/models").json()["data"] == []


def test_compressed_tensors_folder_is_accepted(api):
    """A folder Squeeze itself writes after int4/int8/fp8 quantization: packed int32 weights, int8 and uint8 zero
    points, fp8 weights, 16-bit scales."""
    config = {**LLAMA_CONFIG, "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                                      "config_groups": {}}}
    weights = safetensors_bytes({"layers.0.q.weight_packed": ("I32", [64, 8], 4),
                                 "layers.0.q.weight_scale": ("BF16", [64, 1], 2),
                                 "layers.0.q.weight_shape": ("I64", [2], 8),
                                 "layers.0.k.weight": ("I8", [64, 64], 1),
                                 "layers.0.k.weight_zero_point": ("U8", [64, 1], 1),
                                 "layers.0.v.weight": ("F8_E4M3", [64, 64], 1)})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("config.json", json.dumps(config))
        z.writestr("model.safetensors", weights)
        for name, data in TOKENIZER.items():
            z.writestr(name, data)
    r = api.post("/v1/models", params={"name": "int4.zip"}, content=out.getvalue())
    assert r.status_code == 201, r.text
    assert r.json()["details"]["quantization"] == "compressed-tensors" and r.json()["details"]["tensor_count"] == 6


# --------------------------------------------------------------------------------------- jobs on text datasets

def test_job_created_on_text_datasets_stages_them_by_format(api, tmp_path):
    """The route accepts text datasets as calibration and eval; the supervisor stages them as inputs/<role>.<format>
    (the sandbox reads them by suffix)."""
    from app.blobs.store import make_store
    from app.core.config import get_settings
    from app.core.db import session_scope
    from app.jobs.lifecycle import claim
    from worker.supervisor import stage

    model = api.post("/v1/models", params={"name": "llm.zip"}, content=hf_zip(extra=TOKENIZER)).json()
    calibration = upload_dataset(api, CORPUS.encode(), "calib.txt").json()
    jsonl = b'{"text": "held-out text"}\n'
    evaluation = upload_dataset(api, jsonl, "eval.jsonl").json()
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50",
                                   "datasets": {"calibration": calibration["id"], "eval": evaluation["id"]}})
    assert r.status_code == 202, r.text
    assert r.json()["datasets"] == {"calibration": calibration["id"], "eval": evaluation["id"]}

    with session_scope() as db:
        taken = claim(db, r.json()["id"], "test-worker")
    assert taken.datasets["calibration"]["format"] == "txt" and taken.datasets["eval"]["format"] == "jsonl"
    jobdir = tmp_path / "job"
    jobdir.mkdir()
    stage(taken, jobdir, make_store(get_settings()), get_settings())
    spec = json.loads((jobdir / "job.json").read_text())
    assert spec["datasets"] == {"calibration": "inputs/calibration.txt", "eval": "inputs/eval.jsonl"}
    assert (jobdir / "inputs/calibration.txt").read_bytes() == CORPUS.encode()
    assert Path(jobdir / "inputs/eval.jsonl").read_bytes() == jsonl


def test_text_dataset_for_a_model_without_a_tokenizer_is_a_422(api, tmp_path):
    """Text is tokenized by the model's own tokenizer: a job on an ONNX model with a text dataset is refused at
    submit, naming the dataset and saying what to upload instead."""
    from testing import modelzoo as mz

    _, _, x_test, _ = mz.digits_split()
    onnx_path = mz.export_onnx(mz.train_mlp(epochs=1), x_test, tmp_path / "mlp.onnx")
    model = api.post("/v1/models", params={"name": "mlp.onnx"}, content=onnx_path.read_bytes()).json()
    text = upload_dataset(api, CORPUS.encode(), "calib.txt").json()
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "int8", "datasets": {"calibration": text["id"]}})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_dataset" and error["details"]["field"] == "datasets.calibration"
    assert "needs a Hugging Face model" in error["message"] and ".npz" in error["message"]
