"""GGUF output for llama.cpp: a transformers causal LM written as llama.cpp's own converter (convert_hf_to_gguf.py)
writes it, with its 2-D weights quantized by gguf-py's reference quantizers, and read back through transformers'
GGUF loader so the result is measured from the file itself.

What follows llama.cpp, and why it matters:
- tensor names come from gguf's TensorNameMap, the table llama.cpp's converter uses;
- the llama architecture's q/k projections are permuted (rotary halves interleaved) as LlamaModel.permute does:
  llama.cpp's rope kernel expects that layout, and transformers' loader undoes it on the way back;
- 1-D tensors, norms and biases stay float32; a weight whose row width is not a multiple of the block size is
  written float16 (the converter's QuantError fallback);
- at 4 and 5 bits the output projection (the token embedding when the two are tied) is written q8_0, as
  llama-quantize does for a row it cannot give q6_K (gguf-py has no q6_K quantizer), so the logits keep 8 bits;
- the tokenizer is written from the folder's tokenizer.json as the converter does: 'gpt2' (byte-level BPE) with
  its pre-tokenizer name, or 'llama' (SentencePiece-style BPE with byte fallback) through gguf.LlamaHfVocab.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from worker.engine.errors import EngineError

GGUF_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "f16")
_QTYPES = {
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
}
_LOW_BIT = {"q4_0", "q4_1", "q5_0"}
# model_type -> (llama.cpp architecture, permute q/k). Mistral is llama in llama.cpp (its converter registers
# MistralForCausalLM under LlamaModel).
_ARCHS = {"llama": (gguf.MODEL_ARCH.LLAMA, True), "mistral": (gguf.MODEL_ARCH.LLAMA, True),
          "qwen2": (gguf.MODEL_ARCH.QWEN2, False)}
SUPPORTED = "LlamaForCausalLM (SmolLM2, TinyLlama, ...), MistralForCausalLM, Qwen2ForCausalLM"

# tokenizer.json pre-tokenizer -> llama.cpp's tokenizer.ggml.pre, for byte-level BPE vocabularies. llama.cpp's
# converter names it by hashing the tokenizer's output on a test text; the structure identifies the same splits.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def write_gguf(model: torch.nn.Module, tokenizer_folder: Path | None, path: Path, qtype: str) -> list[str]:
    """Write a transformers causal LM (Llama family: LlamaForCausalLM incl. SmolLM2, MistralForCausalLM,
    Qwen2ForCausalLM) as a GGUF file llama.cpp loads, its 2-D weights quantized to `qtype` (one of GGUF_TYPES).
    The tokenizer comes from tokenizer.json/tokenizer_config.json in tokenizer_folder. Returns notes: what stayed
    unquantized or took another type, and why."""
    config = model.config
    arch, permute = _check_model(config, qtype)
    folder = _check_tokenizer_folder(tokenizer_folder)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    notes: list[str] = []
    try:
        _write_hparams(writer, config, _QTYPES[qtype][1], permute)
        _write_vocab(writer, folder, config)
        notes = _write_tensors(writer, model, arch, permute, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return notes


def load_gguf(path: Path) -> torch.nn.Module:
    """Reload a GGUF with transformers' GGUF loader (local only), dequantized to float32, in eval mode: the model
    llama.cpp would run, as torch can measure it. Returned as a plain transformers model (the weights copied into a
    fresh one of the same config), so .to(), .float() and save_pretrained work as on any other."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                      dtype=torch.float32)
    except (ValueError, OSError, KeyError) as exc:
        raise EngineError("bad_model", f"{path.name} does not load as a GGUF causal LM ({exc}); write it with "
                                       f"one of {GGUF_TYPES}") from exc
    config = loaded.config
    for attribute in ("quantization_config", "_model_name_or_path"):  # the loader's marks of a GGUF source
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=not config.tie_word_embeddings)
    model.tie_weights()
    return model.eval()


def _check_model(config, qtype: str) -> tuple[gguf.MODEL_ARCH, bool]:
    """The llama.cpp architecture for this config, or EngineError('unsupported') naming what is supported."""
    if qtype not in GGUF_TYPES:
        raise EngineError("unsupported", f"GGUF type {qtype!r} is not supported; choose one of {GGUF_TYPES}")
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHS:
        raise EngineError("unsupported", f"GGUF output supports {SUPPORTED}; this model is {model_type!r}. "
                                         "Choose another output format for it")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise EngineError("unsupported", f"GGUF output supports plain rotary embeddings; this model uses rope "
                                         f"scaling {rope.get('rope_type')!r} (Llama 3.1+ style), not written yet")
    if model_type != "qwen2" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise EngineError("unsupported", "GGUF output of a Llama with attention or MLP biases is not supported")
    return _ARCHS[model_type]


def _check_tokenizer_folder(folder: Path | None) -> Path:
    if folder is None or not (Path(folder) / "tokenizer.json").is_file():
        raise EngineError("bad_model", "GGUF output needs the tokenizer: put tokenizer.json and "
                                       "tokenizer_config.json in the uploaded folder (tokenizer.save_pretrained)")
    return Path(folder)


def _write_hparams(writer: gguf.GGUFWriter, config, file_type: int, permute: bool) -> None:
    """The hyperparameters TextModel.set_gguf_parameters (and LlamaModel's) write."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_model_name(config))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(int(file_type))
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "head_dim", None):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if permute:  # LlamaModel: the rope dimension is the head size
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_rope_dimension_count(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _model_name(config) -> str:
    """general.name: the folder's name. Never exactly 'mistral': transformers' loader takes a llama GGUF of that
    name for its Mistral class, which gguf-py cannot map, and the file would not reload."""
    name = str(getattr(config, "_name_or_path", "") or "").rstrip("/").split("/")[-1]
    name = name or f"squeeze-{config.model_type}"
    return "Mistral" if name == "mistral" else name


# Parameters llm-compressor adds beside a quantized weight: the weight already computes through them.
_QUANT_PARAMS = ("_scale", "_zero_point", "_g_idx", "_global_scale", "_shape", "_packed")


def _effective_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict as the model computes: a weight an llm-compressor step quantized is written as its
    quantized values (scales and zero points applied), without the quantization parameters themselves; the
    names of those weights (GGUF then rounds them to its own grid)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(_QUANT_PARAMS)}
    requantized = []
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or f"{name}.weight" not in state:
            continue
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        with torch.no_grad():
            state[f"{name}.weight"] = forward_quantize(module, module.weight, "weight", scheme.weights)
        requantized.append(name)
    return state, requantized


def _write_tensors(writer: gguf.GGUFWriter, model: torch.nn.Module, arch: gguf.MODEL_ARCH, permute: bool,
                   qtype: str) -> list[str]:
    """Every parameter under its llama.cpp name, permuted and quantized; the tied output projection is left out
    (llama.cpp reuses token_embd, and transformers' loader ties them again when output.weight is absent)."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = _tied_output(model)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    skipped, quantized = [], []
    state, requantized = _effective_state(model)
    for key, tensor in state.items():
        if tied and key == "lm_head.weight":
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise EngineError("unsupported", f"GGUF output: tensor {key} has no llama.cpp name; the model must be a "
                                             f"plain {SUPPORTED} (no extra quantization parameters)")
        data = tensor.detach().to(torch.float32).cpu()
        if permute and key.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, heads, heads)
        elif permute and key.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, heads, kv_heads)
        is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        array, chosen, why = _quantize(gguf_name, data.numpy(), qtype, is_output)
        writer.add_tensor(gguf_name, array, raw_dtype=chosen)
        (skipped if why else quantized).append((gguf_name, chosen.name, why))
    notes = _notes(skipped, quantized, qtype)
    if requantized:
        notes.append(f"{len(requantized)} layer(s) quantized by an earlier step are written as their quantized "
                     f"values, rounded again to {qtype}'s grid (GGUF has its own block formats)")
    return notes


def _tied_output(model: torch.nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is None or (inp is not None and out.weight.data_ptr() == inp.weight.data_ptr())


def _permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: HF's rotary halves [x0..x_{d/2}, y0..] become interleaved pairs per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _quantize(name: str, data: np.ndarray, qtype: str, is_output: bool
              ) -> tuple[np.ndarray, gguf.GGMLQuantizationType, str]:
    """(bytes, type, why it is not `qtype`, '' when it is), as convert_hf_to_gguf's prepare_tensors decides."""
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32, "1-D (norm or bias): float32"
    target, why = _QTYPES[qtype][0], ""
    if qtype in _LOW_BIT and is_output:
        target, why = gguf.GGMLQuantizationType.Q8_0, "output projection: q8_0, as llama-quantize keeps it"
    try:
        return gguf.quants.quantize(data, target), target, why
    except gguf.QuantError:
        block = gguf.GGML_QUANT_SIZES[target][0]
        reason = f"row width {data.shape[-1]} is not a multiple of {target.name}'s block of {block}: float16"
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16, reason


def _notes(skipped: list[tuple[str, str, str]], quantized: list[tuple[str, str, str]], qtype: str) -> list[str]:
    """One line per reason, naming the tensors (the 1-D ones counted, not listed)."""
    notes = [f"GGUF {qtype}: {len(quantized)} weight tensors quantized to {qtype}"]
    by_reason: dict[str, list[str]] = {}
    for name, _, why in skipped:
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        listed = f"{len(names)} tensors" if why.startswith("1-D") else ", ".join(names)
        notes.append(f"{listed} stayed unquantized-to-{qtype}: {why}")
    return notes


def _write_vocab(writer: gguf.GGUFWriter, folder: Path, config) -> None:
    """The tokenizer metadata, as LlamaModel.set_vocab (and Qwen2Model's) choose it from tokenizer.json."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    settings_file = folder / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else {}
    if config.model_type != "qwen2" and settings.get("add_prefix_space") is not None:  # LlamaModel.set_vocab
        writer.add_add_space_prefix(bool(settings["add_prefix_space"]))
    if model.get("type") == "BPE" and model.get("byte_fallback") and config.model_type != "qwen2":
        _write_llama_hf_vocab(writer, folder, model.get("merges") or [])
    elif model.get("type") == "BPE" and (data.get("decoder") or {}).get("type") == "ByteLevel":
        _write_gpt2_vocab(writer, folder, config, _pre_name(data.get("pre_tokenizer")))
    else:
        raise EngineError("unsupported", "GGUF output supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, "
                                         "SmolLM style) and SentencePiece-style BPE with byte fallback (Llama 2, "
                                         f"Mistral); this tokenizer.json is {model.get('type')!r}")


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json pre_tokenizer."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        known = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}
        if regex in known:
            return known[regex]
    raise EngineError("unsupported", f"GGUF output: this byte-level tokenizer's pre-tokenizer ({kinds}) is not one "
                                     "llama.cpp knows here (GPT-2, SmolLM, Llama 3, Qwen2)")


def _write_gpt2_vocab(writer: gguf.GGUFWriter, folder: Path, config, pre: str) -> None:
    """convert_hf_to_gguf's _set_vocab_gpt2 / get_vocab_base: every id up to vocab_size, added tokens typed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    vocab = tokenizer.get_vocab()
    reverse = {index: token for token, index in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(max(config.vocab_size, len(vocab))):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            if not decoder[index].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            tokens.append(token)
            special = decoder[index].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _write_special(writer, folder, tokenizer, len(tokens), load_merges=True)


def _write_llama_hf_vocab(writer: gguf.GGUFWriter, folder: Path, merges: list) -> None:
    """convert_hf_to_gguf's _set_vocab_llama_hf (SentencePiece-style pieces, byte tokens), with one change: each
    piece's score is minus the rank of the merge that makes it, where the converter writes -1000 for all.
    llama.cpp's SentencePiece tokenizer merges the highest-scoring pair first, so equal scores make it merge left
    to right and split words unlike the HF tokenizer; merge ranks make it follow the same merge order."""
    from transformers import AutoTokenizer

    rank: dict[str, int] = {}
    for index, pair in enumerate(merges):
        left, right = pair.split(" ", 1) if isinstance(pair, str) else pair
        rank.setdefault(left + right, index)
    vocab = gguf.LlamaHfVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        piece = text.decode("utf-8")
        tokens.append(text)
        scores.append(-float(rank[piece]) if piece in rank else (0.0 if len(piece) == 1 else score))
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _write_special(writer, folder, AutoTokenizer.from_pretrained(folder, local_files_only=True), len(tokens),
                   load_merges=False)


def _write_special(writer: gguf.GGUFWriter, folder: Path, tokenizer, n_vocab: int, load_merges: bool) -> None:
    """Merges, special token ids and the chat template (gguf.SpecialVocab), then whether BOS/EOS are added as the
    HF tokenizer really does, when tokenizer_config.json does not say."""
    special = gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    probe = tokenizer("a")["input_ids"]
    for kind, token_id, position in (("bos", tokenizer.bos_token_id, 0), ("eos", tokenizer.eos_token_id, -1)):
        if kind not in special.add_special_token:
            getattr(writer, f"add_add_{kind}_token")(token_id is not None and probe[position] == token_id)


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or bool(re.fullmatch(r"<\|.*\|>", token))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))
