"""Model loading: GGUF files, the embedded model, local directories, and clear errors for the rest."""

import json
import os

import numpy as np
import pytest
import torch

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.engine import LLMEngine
from esp_engine.errors import ModelLoadError
from esp_engine.loader import EMBEDDED_MODEL, embedded_gguf_path, load_model, prepare_embedded_model, prepare_gguf
from tests.conftest import chat_ids


def write_gguf(path, architecture, *, q_k_v_bias=False):
    """A tiny GGUF as llama.cpp lays one out (byte-level BPE vocabulary, 2 layers, f32); returns its tensors."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, ffn, heads, kv_heads, layers = 32, 64, 4, 2, 2
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    spelling = bytes_to_unicode()
    merges = ["h e", "l l", "\u0120 w"]
    tokens = [spelling[b] for b in range(256)] + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rng = np.random.default_rng(0)
    kv_dim = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (kv_dim, hidden), f"blk.{i}.attn_v.weight": (kv_dim, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        })
        if q_k_v_bias:
            shapes.update({f"blk.{i}.attn_q.bias": (hidden,), f"blk.{i}.attn_k.bias": (kv_dim,),
                           f"blk.{i}.attn_v.bias": (kv_dim,)})
    tensors = {name: (rng.standard_normal(shape) * 0.3).astype(np.float32) for name, shape in shapes.items()}
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty model cache, so a load really dequantizes."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ESP_SERVE_CACHE", str(root))
    return root


def cached_models(cache):
    return sorted(p.name for p in (cache / "models").iterdir()) if (cache / "models").exists() else []


def test_embedded_model_is_cached_as_plain_weights(smol):
    assert smol.name == EMBEDDED_MODEL
    directory = prepare_embedded_model()
    assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    assert smol.dtype == torch.float32 and smol.eos_token_ids
    assert smol.tokenizer.chat_template


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=smol.model.shape.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(path)
    smol.tokenizer.save_pretrained(path)
    return path


def test_local_directory_in_a_chosen_dtype(tiny_dir):
    loaded = load_model(str(tiny_dir), device="cpu", dtype="bfloat16", max_model_len=64)
    assert loaded.dtype == torch.bfloat16 and loaded.max_model_len == 64
    assert loaded.name == str(tiny_dir)


def test_a_model_that_is_not_llama_family_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="Llama family"):
        load_model(str(tmp_path))


def test_missing_things_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("./definitely/missing")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(EMBEDDED_MODEL, dtype="float8")


def test_the_embedded_gguf_by_its_path_gives_the_same_greedy_output(smol_engine, smol, cache):
    path = embedded_gguf_path()
    loaded = load_model(str(path), device="cpu", dtype="float32")
    assert loaded.name == path.stem
    assert [name.rsplit("-", 1)[0] for name in cached_models(cache)] == [path.stem]
    engine = LLMEngine(loaded)
    for text in ["What is the capital of Italy?", "Write a haiku about snow."]:
        ids = chat_ids(smol.tokenizer, text)
        assert chat_ids(loaded.tokenizer, text) == ids
        params = SamplingParams(max_new_tokens=24, ignore_eos=True)
        ours = engine.generate(ids, params, SpecConfig(method="ar")).output_ids
        assert ours == smol_engine.generate(ids, params, SpecConfig(method="ar")).output_ids


def test_a_gguf_file_is_dequantized_once_per_version_of_the_file(tmp_path, cache):
    path = tmp_path / "tiny-llama.Q8_0.gguf"
    write_gguf(path, "llama")
    loaded = load_model(str(path), device="cpu", dtype="bfloat16")
    assert loaded.name == "tiny-llama.Q8_0" and loaded.dtype == torch.bfloat16
    assert loaded.model.shape.num_layers == 2 and loaded.eos_token_ids
    first = prepare_gguf(path)
    assert str(first) == loaded.source and cached_models(cache) == [first.name]
    assert prepare_gguf(path) == first, "an unchanged file is read from the cache"

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = prepare_gguf(path)
    assert touched != first, "a rewritten file is dequantized again"

    copy = tmp_path / "elsewhere" / path.name
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert prepare_gguf(copy) not in (first, touched)


def test_a_qwen2_gguf_keeps_its_q_k_v_biases_and_decodes_as_transformers_does(tmp_path, cache):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny-qwen2.gguf"
    written = write_gguf(path, "qwen2", q_k_v_bias=True)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(loaded.source, dtype=torch.float32).eval()
    assert hf.config.model_type == "qwen2"
    attention = hf.model.layers[1].self_attn
    for proj, name in [(attention.q_proj, "q"), (attention.k_proj, "k"), (attention.v_proj, "v")]:
        assert torch.equal(proj.bias, torch.from_numpy(written[f"blk.1.attn_{name}.bias"]))

    ids = loaded.tokenizer.encode("hello world")
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0,
                          temperature=None, top_p=None, top_k=None)
    ours = LLMEngine(loaded).generate(ids, SamplingParams(max_new_tokens=12, ignore_eos=True), SpecConfig(method="ar"))
    assert ours.output_ids == out[0, len(ids):].tolist()


@pytest.mark.parametrize("architecture", ["bert", "mamba"])
def test_a_gguf_of_an_architecture_we_do_not_run_is_refused_before_dequantizing(tmp_path, cache, architecture):
    path = tmp_path / f"tiny-{architecture}.gguf"
    write_gguf(path, architecture)
    with pytest.raises(ModelLoadError) as refused:
        load_model(str(path))
    message = str(refused.value)
    assert f"architecture {architecture!r}" in message and "Llama family" in message
    assert all(name in message for name in ("llama", "mistral", "qwen2", "qwen3"))
    assert cached_models(cache) == []


def test_files_that_are_not_usable_ggufs_give_clear_errors(tmp_path, cache):
    text = tmp_path / "notes.gguf"
    text.write_text("these are not weights\n")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(text))
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(bytes(range(256)))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(weights))
    with pytest.raises(ModelLoadError, match="GGUF file .*missing.gguf.* not found"):
        load_model(str(tmp_path / "missing.gguf"))

    whole = tmp_path / "whole.gguf"
    write_gguf(whole, "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:40])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(str(cut))
    assert cached_models(cache) == []


def test_dtype_auto_takes_bf16_only_where_the_cpu_computes_it_natively():
    from esp_engine.loader import auto_dtype, resolve_dtype

    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire_rapids = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    older = "flags\t\t: fpu sse2 avx2 fma\n"
    assert auto_dtype("cpu", zen4) == (torch.bfloat16, "the CPU has native bf16 matrix instructions (avx512_bf16)")
    assert auto_dtype("cpu", sapphire_rapids)[1].endswith("(amx_bf16)")
    dtype, why = auto_dtype("cpu", older)
    assert dtype is torch.float32 and "emulated" in why
    assert auto_dtype("cuda", older)[0] is torch.bfloat16


def test_without_a_dtype_asked_for_the_loader_takes_what_auto_takes(monkeypatch):
    import esp_engine.loader as loader
    from esp_engine.cpu_info import parse_cpu_info

    for flags, want in (("avx2 avx512f avx512_bf16", torch.bfloat16), ("avx2 fma", torch.float32)):
        monkeypatch.setattr(loader, "cpu_info", lambda flags=flags: parse_cpu_info(f"flags\t\t: {flags}\n"))
        assert loader.resolve_dtype(None, "cpu") is want
        assert loader.resolve_dtype("auto", "cpu") is want
    assert loader.resolve_dtype(None, "cuda") is torch.bfloat16
