"""GGUF output: a tiny Llama (real byte-level BPE tokenizer) written at each type, reloaded through transformers'
GGUF loader (which undoes llama.cpp's q/k permutation), compared with the original; metadata read back with
gguf's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from testing.llm_assets import (
    pydoc_text,
    save_tiny_tokenizer,
    text_split,
    tiny_llama_folder,
    zip_folder,
)
from worker.engine.errors import EngineError
from worker.engine.llm.gguf_io import GGUF_TYPES, load_gguf, write_gguf

SENTENCE = "The quick brown fox, 12345 times; def f(x): return x ** 2  # done\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module, torch.Tensor, torch.Tensor]:
    folder = tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    return folder, model, ids, logits


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    folder, model, _, _ = tiny
    root = tmp_path_factory.mktemp("gguf")
    return {qtype: (root / f"model-{qtype}.gguf", write_gguf(model, folder, root / f"model-{qtype}.gguf", qtype))
            for qtype in GGUF_TYPES}


def _reloaded_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_gguf(path)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        return model(ids).logits


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_f16_round_trip_is_close(tiny, written):
    _, _, ids, logits = tiny
    assert _relative(_reloaded_logits(written["f16"][0], ids), logits) < 2e-3  # 4e-4 here; q/k unpermuted: 0.15


def test_q8_0_keeps_the_top_token(tiny, written):
    _, _, ids, logits = tiny
    out = _reloaded_logits(written["q8_0"][0], ids)
    assert (out.argmax(-1) == logits.argmax(-1)).float().mean() >= 0.95
    assert 0 < _relative(out, logits) < 0.05  # really quantized, and still close


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q5_0"])
def test_low_bit_runs_and_is_far_closer_than_random(tiny, written, qtype):
    _, _, ids, logits = tiny
    out = _reloaded_logits(written[qtype][0], ids)
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)) * logits.std() + logits.mean()
    error = _relative(out, logits)
    assert 0.01 < error < 0.3 * _relative(noise, logits)  # changed by quantization, yet nowhere near random


def test_sizes_shrink_with_the_bits(written):
    sizes = {qtype: path.stat().st_size for qtype, (path, _) in written.items()}
    assert sizes["q4_0"] < sizes["q5_0"] < sizes["q8_0"] < sizes["f16"]
    assert sizes["q4_0"] < sizes["q4_1"] < sizes["q8_0"]


def test_tensor_types_and_names_follow_llama_cpp(tiny, written):
    _, model, _, _ = tiny
    reader = gguf.GGUFReader(written["q4_0"][0])
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    q = gguf.GGMLQuantizationType
    assert types["blk.0.attn_q.weight"] == q.Q4_0 and types["blk.1.ffn_down.weight"] == q.Q4_0
    assert types["token_embd.weight"] == q.Q4_0 and types["output.weight"] == q.Q8_0  # untied: output keeps 8 bits
    assert types["blk.0.attn_norm.weight"] == q.F32 and types["output_norm.weight"] == q.F32
    assert len(types) == len(model.state_dict())
    notes = written["q4_0"][1]
    assert any("output.weight" in note and "q8_0" in note for note in notes)
    assert any("float32" in note for note in notes)


def test_metadata_holds_architecture_and_tokenizer(tiny, written):
    folder, model, _, _ = tiny
    reader = gguf.GGUFReader(written["q8_0"][0])
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["llama.block_count"].contents() == 2 and fields["llama.embedding_length"].contents() == 64
    assert fields["llama.attention.head_count_kv"].contents() == model.config.num_key_value_heads
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == model.config.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert len(fields["tokenizer.ggml.merges"].contents()) > 500
    assert fields["tokenizer.ggml.token_type"].contents()[:3] == [gguf.TokenType.CONTROL] * 3


def test_tokenizer_from_the_gguf_encodes_like_the_folder(tiny, written):
    folder = tiny[0]
    path = written["q8_0"][0]
    original = AutoTokenizer.from_pretrained(folder)
    reloaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    expected = original(SENTENCE)["input_ids"]
    assert len(expected) > 10 and reloaded(SENTENCE)["input_ids"] == expected
    text = pydoc_text()[:3000]
    assert reloaded(text, add_special_tokens=False)["input_ids"] == original(text, add_special_tokens=False)[
        "input_ids"]


def test_tied_embeddings_write_no_output_tensor_and_reload_tied(tiny, tmp_path):
    folder, model, ids, _ = tiny
    config = LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(3)
    tied = AutoModelForCausalLM.from_config(config).eval()
    notes = write_gguf(tied, folder, tmp_path / "tied.gguf", "q4_0")
    names = {tensor.name for tensor in gguf.GGUFReader(tmp_path / "tied.gguf").tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert any("token_embd.weight" in note and "q8_0" in note for note in notes)  # the tied embedding is the output
    reloaded = load_gguf(tmp_path / "tied.gguf")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert _relative(reloaded(ids).logits, tied(ids).logits) < 0.25  # q4_0 level (0.07 here)


def test_rows_off_the_block_size_stay_float16(tmp_path):
    folder = tiny_llama_folder(tmp_path / "h48", hidden=48, layers=1)  # 48 is not a multiple of q4_0's 32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    notes = write_gguf(model, folder, tmp_path / "h48.gguf", "q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "h48.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0  # its rows are 96 wide
    assert any("blk.0.attn_q.weight" in note and "float16" in note for note in notes)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _relative(load_gguf(tmp_path / "h48.gguf")(ids).logits, model(ids).logits) < 0.3


def test_unsupported_architecture_is_refused(tiny, tmp_path):
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    with pytest.raises(EngineError) as error:
        write_gguf(gpt2, tiny[0], tmp_path / "gpt2.gguf", "q8_0")
    assert error.value.code == "unsupported" and "LlamaForCausalLM" in error.value.message
    assert not (tmp_path / "gpt2.gguf").exists()


def test_missing_tokenizer_is_a_bad_model(tiny, tmp_path):
    bare = tiny_llama_folder(tmp_path / "bare", with_tokenizer=False)
    assert not (bare / "tokenizer.json").exists()
    with pytest.raises(EngineError) as error:
        write_gguf(tiny[1], bare, tmp_path / "x.gguf", "q8_0")
    assert error.value.code == "bad_model" and "tokenizer.json" in error.value.message


def test_unknown_type_is_refused(tiny, tmp_path):
    with pytest.raises(EngineError) as error:
        write_gguf(tiny[1], tiny[0], tmp_path / "x.gguf", "q2_k")
    assert error.value.code == "unsupported" and "q8_0" in error.value.message


def test_assets_are_deterministic_and_zip_at_the_root(tmp_path):
    a = tiny_llama_folder(tmp_path / "a", seed=5)
    b = tiny_llama_folder(tmp_path / "b", seed=5)
    c = tiny_llama_folder(tmp_path / "c", seed=6)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    import zipfile

    names = set(zipfile.ZipFile(zip_folder(a, tmp_path / "a.zip")).namelist())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    calibration, evaluation = text_split(10_000, 5_000)
    assert len(calibration) == 10_000 and len(evaluation) == 5_000
    assert pydoc_text().find(evaluation) >= len(calibration)  # disjoint


def _sharp_random(config) -> torch.nn.Module:
    """A random model whose attention matters (q/k x4, random q/k biases where it has them), so a wrong rotary
    layout shows in its logits."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)
            elif name.endswith(("q_proj.bias", "k_proj.bias")):
                param.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_round_trip(family, tmp_path):
    size = save_tiny_tokenizer(tmp_path / "tok")
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": size}
    config = (Qwen2Config(**shape, tie_word_embeddings=True) if family == "qwen2"
              else MistralConfig(**shape, head_dim=16))
    model = _sharp_random(config)
    write_gguf(model, tmp_path / "tok", tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == ("qwen2" if family == "qwen2" else "llama")
    if family == "qwen2":
        assert "blk.0.attn_q.bias" in {t.name for t in reader.tensors}
    ids = torch.randint(0, size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _relative(load_gguf(tmp_path / "m.gguf")(ids).logits, model(ids).logits) < 2e-3


def _sentencepiece_style_tokenizer(dest: Path) -> int:
    """A Llama-2/Mistral style tokenizer.json: BPE over '▁'-joined words with byte fallback (<0x00>..<0xFF>)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(pydoc_text().split("\n\n"), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(dest)
    data = json.loads((dest / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab.update({f"<0x{i:02X}>": len(vocab) + i for i in range(256)})
    (dest / "tokenizer.json").write_text(json.dumps(data))
    return len(AutoTokenizer.from_pretrained(dest))


def test_sentencepiece_style_tokenizer_is_written_as_llama_vocab(tmp_path):
    size = _sentencepiece_style_tokenizer(tmp_path)
    model = _sharp_random(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=size))
    write_gguf(model, tmp_path, tmp_path / "spm.gguf", "q8_0")
    fields = gguf.GGUFReader(tmp_path / "spm.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    scores = fields["tokenizer.ggml.scores"].contents()
    assert len(scores) == size
    merges = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    made = [vocab["".join(pair.split(" ") if isinstance(pair, str) else pair)] for pair in merges]
    assert [scores[i] for i in made] == sorted((scores[i] for i in made), reverse=True)  # merge order, for llama.cpp
    assert scores[made[0]] > scores[made[-1]]
    assert fields["tokenizer.ggml.token_type"].contents().count(gguf.TokenType.BYTE) == 256
    original = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf", local_files_only=True)
    text = "Hello world, the quick brown fox; h\u00e9llo \u2603"  # the snowman needs the byte fallback
    assert reloaded(text)["input_ids"] == original(text)["input_ids"]
    assert any(token.startswith("<0x") for token in original.convert_ids_to_tokens(original(text)["input_ids"]))
