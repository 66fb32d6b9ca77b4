"""TRL's SFTTrainer with wtacrs (`WTACRSSFTTrainer`): plain language modelling, packing and
completion-only loss train with the recommended recipe, exactly as SFTTrainer at ratio 1, with
the chunked LM loss and the sampling state in checkpoints."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
import datasets  # noqa: E402
import transformers as hf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import wtacrs  # noqa: E402
from wtacrs.companions.usage import companion_usage  # noqa: E402
from wtacrs.integrations import WTACRSSFTTrainer, add_example_ids  # noqa: E402
from wtacrs.integrations.trainer import EXAMPLE_ID_COLUMN, STATE_FILE  # noqa: E402
from wtacrs.memory import AllocatorPeak, parameter_tensors  # noqa: E402
from wtacrs.modeling import sampled_modules  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz ?."
MODES = ("plain", "packing", "completion")


@pytest.fixture(autouse=True)
def _quiet():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _tokenizer() -> hf.PreTrainedTokenizerFast:
    """One token per character, no special tokens added: a prompt's tokens are a prefix of its
    prompt + completion's, as SFTTrainer's completion mask wants."""
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return hf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def _llama(vocab_size: int = len(CHARS) + 2, seed: int = 0) -> hf.LlamaForCausalLM:
    config = hf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                            pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(seed)
    return hf.LlamaForCausalLM(config)


def _sampled(ratio: float = 0.3, **llama) -> hf.LlamaForCausalLM:
    """The recommended recipe (`WTACRSConfig()`: recomputes, backward draws, and on a decoder-only
    LM the companions, the chunked LM loss among them)."""
    return wtacrs.apply(_llama(**llama), wtacrs.WTACRSConfig(ratio=ratio))


def _dataset(mode: str, n: int = 12) -> datasets.Dataset:
    letters = CHARS[:n]
    if mode == "completion":  # the prompt is most of each example: its tokens must not count
        return datasets.Dataset.from_dict({"prompt": [f"what is {c}{c} and {c}?" for c in letters],
                                           "completion": [f" {c}." for c in letters]})
    return datasets.Dataset.from_dict({"text": [f"{c}{c} is {c}." for c in letters]})


def _args(out, mode: str, **overrides) -> SFTConfig:
    packing = dict(packing=True) if mode == "packing" else {}  # strategy "bfd": padding-free batches
    settings = dict(per_device_train_batch_size=2 if mode == "packing" else 4, max_steps=3, max_length=32,
                    learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
                    save_strategy="no", seed=0, bf16=False, gradient_checkpointing=False, **packing)
    return SFTConfig(str(out), **{**settings, **overrides})


def _trainer(cls, model, out, mode: str, dataset=None, **overrides):
    return cls(model=model, args=_args(out, mode, **overrides), train_dataset=_dataset(mode) if dataset is None
               else dataset, processing_class=_tokenizer())


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


SETTINGS = {"checkpointing": dict(gradient_checkpointing=True),
            "accumulation": dict(gradient_accumulation_steps=2, per_device_train_batch_size=2)}


@pytest.mark.parametrize("mode, settings", [*((mode, None) for mode in MODES), ("completion", "checkpointing"),
                                            ("completion", "accumulation")])
def test_sft_at_ratio_one_trains_as_sft_trainer(tmp_path, mode, settings):
    """At ratio 1 every row is kept: the recipe's weights after 3 steps are SFTTrainer's (whose
    loss is TRL's fused head), to rounding, also with gradient checkpointing or accumulation
    (the loss divided by the labelled tokens of all accumulated batches); completion-only loss
    counts the completion alone in both, and the chunked LM loss computed the recipe's loss."""
    # SGD: Adam's first steps would magnify rounding near zero gradients
    sgd = dict(optim="sgd", learning_rate=0.5, **SETTINGS.get(settings, {}))
    plain = _trainer(SFTTrainer, _llama(), tmp_path / "plain", mode, **sgd)
    plain.train()
    sampled = _trainer(WTACRSSFTTrainer, _sampled(ratio=1.0), tmp_path / "sampled", mode, **sgd)
    sampled.train()
    assert companion_usage(sampled.model)["chunked_lm_loss"][1] == [""]
    torch.testing.assert_close(_losses(sampled), _losses(plain), rtol=1e-5, atol=0)
    for (name, p), q in zip(plain.model.named_parameters(), sampled.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_sft_with_the_recommended_recipe_learns_and_checkpoints_its_sampling_state(tmp_path, mode):
    trainer = _trainer(WTACRSSFTTrainer, _sampled(), tmp_path, mode, max_steps=6, learning_rate=3e-2,
                       save_strategy="steps", save_steps=6)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6 and max(losses[-2:]) < 0.8 * losses[0], losses
    state = wtacrs.sampling_state(trainer.model)
    assert state.step == 6
    saved = load_file(tmp_path / "checkpoint-6" / STATE_FILE)
    live = state.state_dict()
    assert saved.keys() == live.keys()
    for key, value in live.items():
        assert torch.equal(saved[key], value), key


def test_packed_sft_resumes_exactly(tmp_path):
    """Resuming from a checkpoint restores the sampling state (and the packed dataset comes out
    the same): the resumed run ends with the uninterrupted run's weights."""
    full = _trainer(WTACRSSFTTrainer, _sampled(), tmp_path, "packing", max_steps=4, save_strategy="steps",
                    save_steps=2)
    full.train()
    resumed = _trainer(WTACRSSFTTrainer, _sampled(), tmp_path, "packing", max_steps=4, save_strategy="steps",
                       save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert wtacrs.sampling_state(resumed.model).step == wtacrs.sampling_state(full.model).step == 4
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["user ids", "own ids", "wrapped packing", "padding-free", "padding-free, 1 row"])
def test_each_batch_row_carries_the_id_of_its_prepared_example(tmp_path, case):
    """TRL's collator keeps only the model's inputs: the ids still reach the step, one per row,
    naming the prepared example (or packed row) the row holds; a padding-free batch of several
    packed rows (joined into one row) carries none."""
    dataset = _dataset("plain")
    overrides = {}
    if case == "user ids":
        dataset = add_example_ids(dataset).map(lambda e: {EXAMPLE_ID_COLUMN: 100 + e[EXAMPLE_ID_COLUMN]})
    elif case == "wrapped packing":
        overrides = dict(packing=True, packing_strategy="wrapped")
    elif case.startswith("padding-free"):
        overrides = dict(packing=True, per_device_train_batch_size=1 if case.endswith("1 row") else 2)
    trainer = _trainer(WTACRSSFTTrainer, _sampled(), tmp_path, "plain", dataset=dataset, **overrides)
    prepared = trainer.train_dataset
    seen = []
    for batch in trainer.get_train_dataloader():
        if case == "padding-free":
            assert batch["input_ids"].shape[0] == 1 and EXAMPLE_ID_COLUMN not in batch
            continue
        for row, example_id in zip(batch["input_ids"], batch[EXAMPLE_ID_COLUMN].tolist(), strict=True):
            index = example_id - 100 if case == "user ids" else example_id
            tokens = prepared[index]["input_ids"]
            assert row[:len(tokens)].tolist() == tokens
            seen.append(example_id)
    if case != "padding-free":
        offset = 100 if case == "user ids" else 0
        assert sorted(seen) == list(range(offset, offset + len(prepared)))


def test_lora_from_peft_config_trains_on_the_chunked_loss(tmp_path):
    """SFTTrainer wraps the sampled model in LoRA (`peft_config`): the LoRA matrices are sampled
    too, the chunked LM loss computes the loss, and the adapters learn."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = WTACRSSFTTrainer(model=_sampled(), args=_args(tmp_path, "completion", max_steps=6, learning_rate=3e-2),
                               train_dataset=_dataset("completion"), processing_class=_tokenizer(), peft_config=lora)
    trainer.train()
    assert any("lora_A" in name for name, _ in sampled_modules(trainer.model))
    assert companion_usage(trainer.model)["chunked_lm_loss"][1] == ["base_model.model"]
    losses = _losses(trainer)
    assert max(losses[-2:]) < losses[0], losses


def test_a_forward_draw_sampler_caches_every_prepared_example(tmp_path):
    """Layers that draw in forward read the gradient-norm cache by example id: one epoch of
    SFTTrainer's batches fills it with each prepared example once."""
    model = wtacrs.apply(_llama(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    trainer = _trainer(WTACRSSFTTrainer, model, tmp_path, "plain")
    trainer.train()
    assert len(trainer.train_dataset) == 12 and trainer.state.epoch == 1
    assert wtacrs.sampling_state(trainer.model).cache.num_examples == 12


def test_training_step_never_holds_the_whole_logits(tmp_path):
    """A 32,000-token vocabulary, 1,024 tokens: one step's peak above the weights stays under the
    (tokens x vocabulary) float32 logits alone (TRL's fused head, on the CPU, holds them twice)."""
    vocab, rows, length = 32_000, 16, 64
    dataset = datasets.Dataset.from_dict({"text": [CHARS * 3] * rows})
    trainer = _trainer(WTACRSSFTTrainer, _sampled(vocab_size=vocab), tmp_path, "plain", dataset=dataset,
                       per_device_train_batch_size=rows, max_length=length)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape == (rows, length)
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this step runs without
    with AllocatorPeak(parameter_tensors(model)) as peak:
        trainer.training_step(model, batch)
    assert companion_usage(model)["chunked_lm_loss"][1] == [""]
    logits_bytes = rows * length * vocab * 4
    assert peak.peak - peak.baseline < logits_bytes, (peak.peak - peak.baseline, logits_bytes)


def test_only_the_trl_module_imports_trl_when_loaded():
    """TRL stays optional: no module of the library but wtacrs.integrations.trl imports it at
    load time (the integrations package imports it on first use of WTACRSSFTTrainer)."""
    src = Path(wtacrs.__file__).parent
    importers = []
    for path in src.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name == "trl" or name.startswith("trl.") for name in names):
                importers.append(path.relative_to(src).as_posix())
    assert importers == ["integrations/trl.py"]
