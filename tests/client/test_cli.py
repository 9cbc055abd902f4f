"""The `squeeze` command: `squeeze keys` from the shell against the real database, then used over HTTP; and how its
tables and summaries read (80 columns, no negative zero, a reason for each odd-looking figure), on job answers as
the server sends them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

from rich.console import Console

from squeeze_client import FileOut, JobOut
from squeeze_client.cli.common import num, signed
from squeeze_client.cli.summary import print_results, reasons
from squeeze_client.cli.tables import file_table, jobs_table, presets_table
from testing.stack import ROOT

NOW = datetime(2026, 12, 3, 13, 56, tzinfo=timezone.utc)


def _squeeze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squeeze_client", *args], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ.copy(), timeout=60)


def test_keys_create_list_revoke(api):
    created = _squeeze("keys", "create", "--team", "shell-team", "--name", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("sqz_")
    headers = {"Authorization": f"Bearer {key}"}
    assert api.get("/v1/models", headers=headers).status_code == 200
    key_id = next(k["id"] for k in api.get("/v1/keys").json() if k["team"] == "shell-team")
    listed = _squeeze("keys", "list")
    assert key_id in listed.stdout and key not in listed.stdout
    as_json = json.loads(_squeeze("keys", "list", "--json").stdout)
    assert {"id": key_id, "team": "shell-team", "name": "ci"}.items() <= next(
        k for k in as_json if k["id"] == key_id).items()
    assert _squeeze("keys", "revoke", key_id).returncode == 0
    missing = _squeeze("keys", "revoke", "key_missing")
    assert missing.returncode == 1 and "no key key_missing" in missing.stderr
    from app.core import auth

    auth._cache.clear()  # another process revoked it: this process would see it within the cache TTL
    assert api.get("/v1/models", headers=headers).status_code == 401


def _job(**fields) -> JobOut:
    answer = {"id": "job_018f3a2b4c5d6e7f8a9b0c1d", "status": "running", "progress": 0.45, "stage": "evaluate_original",
              "model_id": "mdl_018f3a2b4c5d6e7f8a9b0c1e", "created_at": NOW.isoformat(), "error": None,
              "metrics": None, "artifacts": [], "recipe": {"steps": [{"type": "quantize", "method": "static_int8"}]},
              "datasets": {"eval": "ds_1"}, "priority": 5}
    return JobOut(**{**answer, **fields})


def _render(renderable, width: int = 80) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue().splitlines()


def test_lists_fit_80_columns_with_whole_ids():
    failed = _job(status="failed", stage="steps", error={"code": "guard_failed", "message": "missed " * 30})
    queued = _job(status="queued", stage=None, progress=0.0)
    lines = _render(jobs_table([_job(), failed, queued]))
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    row = next(line for line in lines if "running" in line)
    assert "job_018f3a2b4c5d6e7f8a9b0c1d" in row and "evaluate_original 45%" in row  # stage and % stay whole
    assert "guard_failed" in next(line for line in lines if "failed" in line)
    wide = "\n".join(_render(jobs_table([failed], wide=True), width=200))
    assert "mdl_018f3a2b4c5d6e7f8a9b0c1e" in wide and "missed missed" in wide

    long = FileOut(id="mdl_018f3a2b4c5d6e7f8a9b0c1e", name="a-really-long-model-name-" * 3 + ".pt2", format="pt2",
                   sha256="ab" * 32, size_bytes=123456789, created_at=NOW, url="/v1/models/x/file")
    lines = _render(file_table([long]))
    assert max(map(len, lines)) <= 80 and len([line for line in lines if "mdl_" in line]) == 1  # cut, not wrapped
    assert "mdl_018f3a2b4c5d6e7f8a9b0c1e" in next(line for line in lines if "mdl_" in line)
    assert long.name in "".join(_render(file_table([long], wide=True), width=250))


def test_presets_say_what_each_gives_at_80_columns():
    gives = {"smaller_file": True, "faster": False, "formats": ["input", "safetensors"], "note": "sparse storage"}
    lines = _render(presets_table([{"name": "prune-50", "description": "Magnitude pruning to 50%.", "gives": gives},
                                   {"name": "old", "description": "A server before gives."}]))
    text = " ".join(line.strip(" │|") for line in lines)
    assert "Gives: smaller file (input, safetensors), not faster: sparse storage" in " ".join(text.split())
    assert max(len(line) for line in lines) <= 80 and "old" in text


def test_no_negative_zero():
    assert num(-0.0, "{:.2f}") == "0.00" and num(-0.001, "{:.2f} pt") == "0.00 pt" and num(-0.5, "{:.1f}") == "-0.5"
    assert signed(-0.0001, "{:+.2f} pt") == "0.00 pt" and signed(0.0, "{:+.2f} pt") == "0.00 pt"
    assert signed(-1.234, "{:+.2f} pt") == "-1.23 pt" and signed(0.5, "{:+.2f} pt") == "+0.50 pt"


def _measured(**ratios) -> dict:
    side = {"size_bytes": 1000, "nonzero_params": 100, "sparsity": 0.0, "macs": 5000, "accuracy": 0.9,
            "latency_ms": {"onnxruntime": {"1": {"median": 1.0, "p90": 1.1}}}}
    return {"original": side, "compressed": {**side, "sparsity": 0.004, "macs": 5100, "agreement": 0.99},
            "ratios": {"size": 3.9, "nonzero_params": 1.0, "macs": 0.98, "accuracy_drop": 0.00002,
                       "latency": {"onnxruntime": {"1": 1.02}}, **ratios},
            "flags": ["no_speedup", "calibrated_on_eval", "brand_new_flag"]}


def test_summary_gives_each_flag_and_odd_figure_its_reason():
    job = _job(status="succeeded", progress=1.0, stage="report", metrics=_measured())
    lines = reasons(job)
    assert lines[0].startswith("no_speedup: no runtime or batch size is 1.05x faster")
    assert lines[1] == "calibrated_on_eval: int8 calibrated on eval data; give --calibration"
    assert lines[2] == "brand_new_flag (see report.json)"
    assert "sparsity 0.4%: weights that round to exactly 0; no step of this recipe prunes" in lines
    assert "MACs 0.98x: quantizing or zeroing keeps the MAC count; the gap is counting" in lines
    assert any(line.startswith("accuracy 0.00 pt: unchanged") and "99.00%" in line for line in lines)
    assert max(len(line) for line in lines) <= 78  # one line each, under the table
    report = {"notes": ["pt2: exported with a dynamic batch dim"],
              "steps": [{"index": 0, "type": "quantize", "notes": ["no 'calibration' dataset: calibrated on the "
                                                                   "'eval' dataset"]}]}
    out = io.StringIO()
    print_results(Console(file=out, width=80, color_system=None, soft_wrap=True, markup=False), job, report)
    text = out.getvalue()
    assert "  note: pt2: exported with a dynamic batch dim\n" in text
    flat = " ".join(text.split())  # reasons and notes wrap to the terminal's width
    assert "note, steps[0] quantize: no 'calibration' dataset: calibrated on the 'eval' dataset" in flat
    assert "-0.00" not in text and "0.00 pt" in text
    assert max(len(line) for line in text.splitlines()) <= 80  # the table, and the reasons wrapped under it
    size_row = next(line for line in text.splitlines() if line.startswith("│ size "))
    assert "1.00x" in size_row and "3.90x" not in size_row  # its own file's ratio, not the headline's

    told = _job(status="succeeded", metrics={**_measured(), "flags": ["no_size_reduction"], "flag_reasons": {
        "no_size_reduction": "the dense .pt2 stores every zero; add safetensors to outputs"}})
    assert reasons(told)[0] == "no_size_reduction: the dense .pt2 stores every zero; add safetensors to outputs"

    pruned = _job(status="succeeded", recipe={"steps": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]},
                  metrics={**_measured(macs=2.0, accuracy_drop=0.03), "flags": []})
    assert reasons(pruned) == []  # a real change needs no excuse
