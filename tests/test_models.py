"""Model loading: clear one-line errors for what users get wrong; devices and dtypes chosen sensibly."""

from __future__ import annotations

import pytest
import torch

from learndyn.errors import LearndynError
from learndyn.models import clear_quantizer_marker, load_model, pick_dtype


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LearndynError, match="model not found"):
        load_model(str(tmp_path / "no-such-model"))


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(LearndynError, match="model file not found"):
        load_model(str(tmp_path / "x.gguf"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LearndynError, match="cannot load model 'nobody-xyz/no-such-model'"):
        load_model("nobody-xyz/no-such-model")


def test_model_without_tokenizer_is_a_clear_error(tiny_llama, tmp_path):
    model, _ = tiny_llama
    model.save_pretrained(tmp_path)
    with pytest.raises(LearndynError, match="has no usable tokenizer"):
        load_model(str(tmp_path))


def test_local_folder_loads_in_eval_mode_with_pad_token(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    model.save_pretrained(tmp_path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path), device="cpu")
    assert not loaded.training and loaded.dtype == torch.float32
    assert tok.pad_token_id == tok.eos_token_id
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_dtype_defaults_to_fp32_on_cpu_and_bf16_on_gpu():
    assert pick_dtype("cpu") == torch.float32
    assert pick_dtype("cuda") == torch.bfloat16
    assert pick_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(LearndynError, match="unknown dtype 'float8'"):
        pick_dtype("cpu", "float8")


def test_clearing_the_quantizer_marker_lets_save_pretrained_work(tiny_llama, tmp_path):
    model, _ = tiny_llama
    model.is_quantized = True
    model.hf_quantizer = object()
    model.config.quantization_config = {"quant_method": "gguf"}
    clear_quantizer_marker(model)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in (tmp_path / "config.json").read_text()
