"""Causal LMs (docs/llm.md): llm-compressor steps (llmc.py), GGUF output (gguf_io.py), perplexity and generation
speed (evaluate.py); the job measures an LM in worker/engine/job/measure_llm.py."""
