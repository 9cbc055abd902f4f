"""The LLM block of `squeeze compress` / `squeeze jobs show` (metrics.llm): perplexity per model and its change,
decode and prefill speed, the eval it was measured on, at 80 columns; missing figures read "-"."""

from __future__ import annotations

import io

from rich.console import Console
from squeeze_client.cli.llm_summary import eval_line, perplexity_change
from squeeze_client.cli.summary import print_results

from tests.client.test_cli import _job


def _llm() -> dict:
    return {
        "eval": {"dataset": "eval", "tokens": 2048, "windows": 8, "seq_len": 256, "stride": 256},
        "original": {"perplexity": 15.26, "prefill_tokens_per_s": 812.0, "decode_tokens_per_s": 21.3,
                     "peak_rss_mb": 700.1, "runtime": "torch"},
        "outputs": {"hf": {"perplexity": 16.1, "prefill_tokens_per_s": 640.5, "decode_tokens_per_s": 12.25,
                           "runtime": "transformers (compressed-tensors)", "size_bytes": 420 * 1024 * 1024},
                    "gguf": {"perplexity": 15.9, "prefill_tokens_per_s": None, "decode_tokens_per_s": 30.0,
                             "runtime": "transformers GGUF loader (dequantized)", "size_bytes": 123}},
        "perplexity_increase": 0.055,
        "notes": [("decode speed: 32 new tokens after a 64-token prompt, greedy, batch 1, on the worker's CPU "
                   "threads (not a serving benchmark)")],
    }


def _printed(metrics: dict, width: int = 80) -> str:
    job = _job(status="succeeded", progress=1.0, stage="report", metrics=metrics,
               recipe={"steps": [{"type": "quantize", "method": "weight_int4", "algorithm": "gptq"}]})
    out = io.StringIO()
    print_results(Console(file=out, width=width, color_system=None, soft_wrap=True, markup=False), job, None)
    return out.getvalue()


def _row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"│ {name} "))
    return [cell.strip() for cell in line.strip("│").split("│")]


def test_llm_block_at_80_columns():
    text = _printed({"flags": [], "llm": _llm()})
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "perplexity on 2,048 tokens of 'eval', 8 windows of 256" in text and "stride" not in text
    assert _row(text, "original") == ["original", "15.26", "", "21.3", "812.0", "-"]
    assert _row(text, "hf") == ["hf", "16.10", "+5.5%", "12.2", "640.5", "420.0 MiB"]  # (16.1 / 15.26 - 1) = 5.5%
    assert _row(text, "gguf") == ["gguf", "15.90", "+4.2%", "30.0", "-", "123 B"]
    flat = " ".join(text.split())
    assert "hf: run on transformers (compressed-tensors)" in flat
    assert "gguf: run on transformers GGUF loader (dequantized)" in flat
    assert "original: run on torch, peak RSS 700 MB" in flat
    assert "perplexity increase (the worst output's): +5.5%" in flat
    assert "note: decode speed: 32 new tokens after a 64-token prompt" in flat
    assert text.index("job job_") < text.index("LLM: perplexity")  # under the results table


def test_llm_block_with_missing_figures():
    sparse = {"eval": {"dataset": None, "tokens": 512}, "original": {"perplexity": None},
              "outputs": {"hf": {"perplexity": 9.0}, "broken": None}, "perplexity_increase": None, "notes": None}
    text = _printed({"llm": sparse})
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "perplexity on 512 tokens of -, - windows of -" in text
    assert _row(text, "hf") == ["hf", "9.00", "-", "-", "-", "-"]
    assert _row(text, "broken") == ["broken", "-", "-", "-", "-", "-"]
    assert "perplexity increase" not in text and "note:" not in text
    assert "LLM" not in _printed({"flags": []})  # no llm section, no block


def test_eval_line_and_change():
    assert eval_line({"eval": {"dataset": "wiki", "tokens": 4096, "windows": 31, "seq_len": 256, "stride": 128}}) \
        == "perplexity on 4,096 tokens of 'wiki', 31 windows of 256, stride 128"
    assert perplexity_change(10.0, 10.0) == "0.0%" and perplexity_change(9.5, 10.0) == "-5.0%"
    assert perplexity_change(None, 10.0) == "-" and perplexity_change(11.0, None) == "-"
