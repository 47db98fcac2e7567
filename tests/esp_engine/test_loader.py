"""Model loading: the embedded model, local directories, and clear errors for the rest."""

import json

import pytest
import torch

from esp_engine.errors import ModelLoadError
from esp_engine.loader import EMBEDDED_MODEL, load_model, prepare_embedded_model


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
