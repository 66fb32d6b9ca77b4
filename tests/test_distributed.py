"""Data parallel on two CPU processes (gloo, loopback): gradients, the shared cache, one writer.

Each test spawns two ranks with torch.multiprocessing and joins them with a timeout; a rank's
failure comes back as its traceback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import multiprocessing as mp
import transformers as hf
from torch.nn.parallel import DistributedDataParallel

import wtacrs
from stats import unbiased_violations
from test_finetune import tiny_model  # noqa: F401 (a fixture: the 2-layer BERT saved like a hub model)
from wtacrs.integrations.distributed import enable_data_parallel, pack_records, unpack_records

WORLD = 2
JOIN_TIMEOUT_S = 120
TORCHRUN_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bert() -> torch.nn.Module:
    """A tiny BERT without dropout, so runs differ only by their sampling."""
    torch.manual_seed(0)
    config = hf.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, pad_token_id=0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return hf.BertForSequenceClassification(config).train()


def _global_batch(size: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([9, 5, 7, 10, 6, 8])[:size]
    real = torch.arange(10).expand(size, 10) < lengths[:, None]
    return {
        "input_ids": torch.where(real, torch.randint(3, 99, (size, 10), generator=g), 0),
        "attention_mask": real.long(),
        "labels": torch.arange(size) % 2,
    }


def _local(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank's half of the global batch, re-padded to its own longest example (as a collator would)."""
    half = batch["labels"].numel() // WORLD
    part = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}
    width = int(part["attention_mask"].sum(1).max())
    return {k: v[:, :width] if v.dim() == 2 else v for k, v in part.items()}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- rank bodies (module level: spawn pickles them by name) ---------------------------------------
def _ratio_one_gradients(rank: int, out: dict) -> None:
    model = DistributedDataParallel(wtacrs.apply(_bert(), wtacrs.WTACRSConfig.preset("sampler", ratio=1.0)))
    enable_data_parallel(model)
    with wtacrs.batch(torch.arange(2) + 2 * rank):
        model(**_local(_global_batch(), rank)).loss.backward()
    out["grads"] = _grads(model.module)


def _sampled_mean_gradient(rank: int, out: dict, steps: int = 40) -> None:
    model = DistributedDataParallel(wtacrs.apply(_bert(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3)))
    enable_data_parallel(model)
    samples = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with wtacrs.batch(torch.arange(2) + 2 * rank):
            model(**_local(_global_batch(), rank)).loss.backward()
        samples.append(model.module.bert.encoder.layer[0].intermediate.dense.weight.grad.clone())
    out["samples"] = torch.stack(samples)


def _shared_cache(rank: int, out: dict) -> None:
    model = DistributedDataParallel(wtacrs.apply(_bert(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3)))
    sync = enable_data_parallel(model)
    assert enable_data_parallel(model) is sync, "not idempotent"
    state = wtacrs.sampling_state(model.module)
    ids = torch.tensor([10, 11]) + 2 * rank  # rank 0 sees 10, 11; rank 1 sees 12, 13
    batch = _local(_global_batch(), rank)
    with wtacrs.batch(ids):
        model(**batch).loss.backward()
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, {k: v for k, v in state.cache.state_dict().items()})
    out.update(
        caches=everyone,
        own_norms=state.cache.lookup(0, ids, batch["attention_mask"].bool()),
        num_examples=state.cache.num_examples,
        bytes_sent=sync.bytes_sent,
        bytes_received=sync.bytes_received,
        slots=state.cache.num_slots,
        real_tokens=int(batch["attention_mask"].sum()),
    )
    if rank == 0:  # what rank 1 recorded for its examples, looked up on rank 0
        other = _local(_global_batch(), 1)
        out["found_from_rank1"] = state.cache.lookup(0, torch.tensor([12, 13]), other["attention_mask"].bool())


def _trainer(output_dir: str, max_steps: int = 4, callbacks=()):
    """WTACRSTrainer on 16 examples, 2 per rank and step, a checkpoint every 2 steps."""
    from test_integrations import _collate, _dataset
    from wtacrs.integrations import WTACRSTrainer

    args = hf.TrainingArguments(
        output_dir, per_device_train_batch_size=2, max_steps=max_steps, save_steps=2, report_to=[], use_cpu=True,
        disable_tqdm=True, logging_steps=1000, ddp_backend="gloo" if dist.is_initialized() else None, seed=0,
    )
    return WTACRSTrainer(model=wtacrs.apply(_bert(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3)), args=args,
                         train_dataset=_dataset(16), data_collator=_collate, callbacks=list(callbacks))


class _SamplingStateAtFirstStep(hf.TrainerCallback):
    """Copies the sampling state when the first step (after a resume: the first new one) begins,
    i.e. what the resume loaded."""

    def __init__(self):
        self.step, self.cache = None, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.step is None:
            sampling = wtacrs.sampling_state(model)
            self.step = sampling.step
            self.cache = {k: v.clone() for k, v in sampling.cache.state_dict().items()}


def _resumed_state(output_dir: str, checkpoint: str) -> dict:
    """Resume `checkpoint` to step 4: the sampling state it loaded, and the state at the end."""
    loaded = _SamplingStateAtFirstStep()
    trainer = _trainer(output_dir, callbacks=[loaded])
    trainer.train(resume_from_checkpoint=checkpoint)
    state = wtacrs.sampling_state(trainer.model)
    return dict(loaded_step=loaded.step, loaded_cache=loaded.cache, step=state.step,
                num_examples=state.cache.num_examples, world=trainer.args.world_size)


def _resume_on_two_ranks(rank: int, out: dict, output_dir: str, checkpoint: str) -> None:
    out.update(_resumed_state(output_dir, checkpoint))


def _trainer_writes_once(rank: int, out: dict, output_dir: str) -> None:
    trainer = _trainer(output_dir)
    trainer.train()
    state = wtacrs.sampling_state(trainer.model)
    out.update(num_examples=state.cache.num_examples, data=state.cache.state_dict()["data"], step=state.step,
               world=trainer.args.world_size)


def _fsdp2_bert(ratio: float) -> torch.nn.Module:
    """The tiny BERT with WTA-CRS applied first, then FSDP2 per encoder block and at the root."""
    from torch.distributed.fsdp import fully_shard

    model = wtacrs.apply(_bert(), wtacrs.WTACRSConfig.preset("sampler", ratio=ratio))
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    return fully_shard(model)


def _train_two_steps(model: torch.nn.Module, batch, ids: torch.Tensor) -> dict:
    """Two AdamW steps on one batch: the first step's gradients and the final weights (full
    tensors, gathered from the FSDP2 shards)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with wtacrs.batch(ids):
            model(**batch).loss.backward()
        first = first or {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
    return {"grads": first, "weights": {n: _full(p.detach()) for n, p in model.named_parameters()}}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.clone()  # DTensor shard → whole


def _fsdp2_training(rank: int, out: dict) -> None:
    for ratio in (1.0, 0.3):
        model = _fsdp2_bert(ratio)
        enable_data_parallel(model)
        out[ratio] = _train_two_steps(model, _local(_global_batch(), rank), torch.arange(2) + 2 * rank)
        out[ratio]["num_examples"] = wtacrs.sampling_state(model).cache.num_examples if ratio < 1 else None


def _cli_run(output_dir: str, **flags):
    """The RunSpec of `wtacrs finetune --method full` on RTE into `output_dir`."""
    from wtacrs.finetuning.spec import Settings
    from wtacrs.recipes import parse_recipe

    settings = Settings(task="rte", model="tiny", data_dir=None, recipes=(parse_recipe("full"),), seeds=(0,),
                        output_dir=output_dir, epochs=1.0, batch_size=8, max_length=32, warmup_ratio=0.0,
                        weight_decay=0.0, max_train_samples=None, max_eval_samples=None, default_lr=1e-4,
                        default_lora_lr=1e-3, **flags)
    return settings.runs()[0]


def _cli_run_folder(rank: int, out: dict, output_dir: str) -> None:
    """`wtacrs finetune`'s run-folder handling on every rank: rank 0 alone locks and empties it,
    the others wait for it, and a refusal stops both ranks."""
    from wtacrs.finetuning.run_folder import RunFolder, RunFolderError
    from wtacrs.finetuning.train import claim_folder
    from wtacrs.integrations.distributed import on_rank_zero

    emptied, empty = [], RunFolder._empty
    RunFolder._empty = lambda self: (emptied.append(str(self.path)), empty(self))
    try:
        folder, action = claim_folder(_cli_run(output_dir, overwrite=True, resume=False))
    finally:
        RunFolder._empty = empty
    out.update(folder=str(folder.path), emptied=emptied, action=action, contents=sorted(os.listdir(folder.path)))
    dist.barrier()  # both ranks have looked at the emptied folder; now it holds a finished run
    if rank == 0:
        folder.release()
        (folder.path / "results.json").write_text("{}")
    dist.barrier()
    try:
        claim_folder(_cli_run(output_dir, overwrite=False, resume=False))
    except RunFolderError as e:
        out["refused"] = str(e)
    out["value"] = on_rank_zero(lambda: f"from rank {dist.get_rank()}")
    try:
        on_rank_zero(lambda: 1 / 0)
    except (ZeroDivisionError, RuntimeError) as e:
        out["error"] = f"{type(e).__name__}: {e}"


def _left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with each row's real tokens moved to the end (left padding)."""
    width = batch["attention_mask"].shape[1]
    shift = width - batch["attention_mask"].sum(1, keepdim=True)
    index = (torch.arange(width) - shift) % width  # (B, T) source column of each column
    return {k: v.gather(1, index) if v.dim() == 2 else v for k, v in batch.items()}


ANCHORED_CONFIG = wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, skip_padding=False)  # the pooler reads rank 1's left padding


def _anchored_inputs(rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Rank's local batch (rank 1's left-padded) and its `wtacrs.batch` arguments with anchors: an
    anchor at [CLS], one next to padding (so padding rows get anchor keys), an example without any,
    and segment B from each example's fourth real token."""
    batch = _local(_global_batch(), rank)
    batch = _left_padded(batch) if rank == 1 else batch
    mask = batch["attention_mask"].bool()
    anchors = torch.tensor([[[3, 5], [0, 4]], [[5, 8], [-1, -1]]][rank])
    segments = ((mask.cumsum(1) > 3) & mask).long()
    context = dict(example_ids=torch.arange(2) + 2 * rank, attention_mask=batch["attention_mask"], anchors=anchors,
                   token_type_ids=segments)
    return batch, context


def _anchored_cache(rank: int, out: dict) -> None:
    """One DDP step with anchors; the cache it commits (every rank's records, prior tables included)."""
    model = DistributedDataParallel(wtacrs.apply(_bert(), ANCHORED_CONFIG))
    enable_data_parallel(model)
    batch, context = _anchored_inputs(rank)
    with wtacrs.batch(**context):
        model(**batch).loss.backward()
    out["cache"] = wtacrs.sampling_state(model.module).cache.state_dict()


def _all_checks(rank: int, out: dict, run_dir: str, cli_dir: str, resume_dirs: tuple[str, str]) -> None:
    """Everything the tests check, in one pair of processes (spawning costs seconds)."""
    for name, body, args in (("ratio_one", _ratio_one_gradients, ()), ("sampled", _sampled_mean_gradient, ()),
                             ("cache", _shared_cache, ()), ("anchored", _anchored_cache, ()),
                             ("trainer", _trainer_writes_once, (run_dir,)),
                             ("cli", _cli_run_folder, (cli_dir,)), ("resume", _resume_on_two_ranks, resume_dirs),
                             ("fsdp2", _fsdp2_training, ())):
        out[name] = {}
        body(rank, out[name], *args)


def _rank_main(rank: int, body, port: int, result_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    out: dict = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
        body(rank, out, *args)
        dist.barrier()
    except BaseException:
        out = {"error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))


def run_ranks(result_dir, body, *args) -> list[dict]:
    """Run `body(rank, out, *args)` on two gloo ranks; returns each rank's `out` (passed back
    through files: a queue would hand tensors over through shared memory of exited processes).

    Forked, not spawned: the ranks inherit the imported modules instead of spending seconds
    importing transformers again; each rank sets one intra-op thread, as DataLoader workers do."""
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, body, port, str(result_dir), args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=JOIN_TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    outs = []
    for rank, p in enumerate(procs):
        path = os.path.join(result_dir, f"rank{rank}.pt")
        assert os.path.exists(path), f"rank {rank} died (exit code {p.exitcode}) or hung past {JOIN_TIMEOUT_S} s"
        outs.append(torch.load(path, weights_only=True))
        assert "error" not in outs[-1], f"rank {rank} failed:\n{outs[-1]['error']}"
    return outs


# -- tests ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("ddp")
    earlier = _cli_run(str(root / "cli")).folder  # a finished run that --overwrite deletes
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text('{"score": 0.9}')
    one_rank = _trainer(str(root / "one-rank"), max_steps=2)  # a checkpoint for two ranks to resume
    one_rank.train()
    checkpoint = root / "one-rank" / "checkpoint-2"
    outs = run_ranks(root, _all_checks, str(root / "run"), str(root / "cli"), (str(root / "resumed"), str(checkpoint)))
    for out in outs:
        out.update(run_dir=root / "run", one_rank_checkpoint=checkpoint)
    return outs


@pytest.mark.timeout(JOIN_TIMEOUT_S + 30)
def test_ratio_one_all_reduced_gradients_equal_one_process_on_the_whole_batch(ranks):
    model = wtacrs.apply(_bert(), wtacrs.WTACRSConfig.preset("sampler", ratio=1.0))
    model(**_global_batch()).loss.backward()
    reference = _grads(model)
    for rank in (r["ratio_one"] for r in ranks):
        assert rank["grads"].keys() == reference.keys()
        for name, g in reference.items():
            torch.testing.assert_close(rank["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.timeout(JOIN_TIMEOUT_S + 30)
def test_sampled_all_reduced_gradient_is_unbiased(ranks):
    model = wtacrs.apply(_bert(), wtacrs.WTACRSConfig.preset("sampler", ratio=1.0))
    model(**_global_batch()).loss.backward()
    exact = model.bert.encoder.layer[0].intermediate.dense.weight.grad
    samples = ranks[0]["sampled"]["samples"]
    assert torch.equal(samples, ranks[1]["sampled"]["samples"]), "ranks disagree after all-reduce"
    assert samples.std(0).max() > 0, "nothing was sampled"
    assert not unbiased_violations(samples, exact).any()


@pytest.mark.timeout(JOIN_TIMEOUT_S + 30)
def test_cache_is_shared_across_ranks_and_identical(ranks):
    rank0, rank1 = (r["cache"] for r in ranks)
    assert rank0["num_examples"] == rank1["num_examples"] == 4
    found = rank0["found_from_rank1"]
    torch.testing.assert_close(found, rank1["own_norms"], equal_nan=True)
    assert torch.isfinite(found[rank1["own_norms"].isfinite()]).all() and found.isfinite().any()
    for key, value in rank0["caches"][0].items():
        torch.testing.assert_close(value, rank0["caches"][1][key], rtol=0, atol=0, equal_nan=True, msg=key)
    # one step's traffic: 16 B of counts; per layer 16 B and 1 B per real token; its one layout
    # once: 16 B and 12 B per example (2 per rank)
    def traffic(rank):
        return 16 + rank["slots"] * (16 + rank["real_tokens"]) + 16 + 12 * 2
    assert rank0["bytes_sent"] == traffic(rank0)
    assert rank0["bytes_received"] == WORLD * max(traffic(rank0), traffic(rank1))


@pytest.mark.timeout(JOIN_TIMEOUT_S + 30)
def test_anchored_step_teaches_every_rank_the_prior_a_single_process_learns(ranks):
    """The DDP commit writes rank 0's layout, then rank 1's; one process committing the two local
    batches as consecutive steps does the same writes and prior updates (the norms are the local
    losses' in both), so its cache, anchor and type tables included, is the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same float sums, so the same codes
    try:
        model = wtacrs.apply(_bert(), ANCHORED_CONFIG)
        for rank in range(WORLD):
            batch, context = _anchored_inputs(rank)
            with wtacrs.batch(**context):
                model(**batch).loss.backward()
    finally:
        torch.set_num_threads(threads)
    reference = wtacrs.sampling_state(model).cache.state_dict()
    assert reference["prior_anchor"].isfinite().any() and reference["prior_type"].isfinite().any()
    for rank in (r["anchored"]["cache"] for r in ranks):
        assert rank.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(rank[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.timeout(JOIN_TIMEOUT_S + 30)
def test_trainer_on_two_ranks_shares_the_cache_and_writes_checkpoints_once(ranks):
    rank0, rank1 = (r["trainer"] for r in ranks)
    assert rank0["world"] == 2
    assert rank0["num_examples"] == rank1["num_examples"] == 16  # 4 steps × 2 ranks × 2 examples
    assert torch.equal(rank0["data"], rank1["data"])
    assert rank0["step"] == rank1["step"] == 4
    run = ranks[0]["run_dir"]
    checkpoints = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        files = sorted(p.name for p in (run / name).iterdir())
        assert files.count("wtacrs_state.safetensors") == 1 and "model.safetensors" in files
        assert not [f for f in files if f.endswith(".tmp")]


@pytest.mark.timeout(JOIN_TIMEOUT_S + 30)
def test_cli_run_folder_is_prepared_by_rank_zero_alone(ranks):
    rank0, rank1 = (r["cli"] for r in ranks)
    assert rank0["folder"] == rank1["folder"]
    assert rank0["emptied"] == [rank0["folder"]] and rank1["emptied"] == [], "--overwrite must empty once, on rank 0"
    assert rank0["action"] == rank1["action"] == "start"
    assert rank0["contents"] == rank1["contents"] == [".lock", "run.json"], "rank 1 saw the folder before rank 0 " \
        "had emptied it"
    for rank in (rank0, rank1):  # the refusal reaches every rank instead of leaving rank 1 waiting
        assert "already holds a finished run; pass --overwrite" in rank["refused"]
        assert rank["value"] == "from rank 0"
    assert rank0["error"] == "ZeroDivisionError: division by zero"
    assert rank1["error"] == "RuntimeError: rank 0 failed: ZeroDivisionError: division by zero"


@pytest.mark.timeout(JOIN_TIMEOUT_S + 30)
def test_fsdp2_ratio_one_training_equals_one_process_on_the_whole_batch(ranks):
    reference = _train_two_steps(wtacrs.apply(_bert(), wtacrs.WTACRSConfig.preset("sampler", ratio=1.0)), _global_batch(),
                                 torch.arange(4))
    for rank in (r["fsdp2"][1.0] for r in ranks):
        for kind in ("grads", "weights"):
            assert rank[kind].keys() == reference[kind].keys()
            for name, value in reference[kind].items():
                torch.testing.assert_close(rank[kind][name], value, rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")


@pytest.mark.timeout(JOIN_TIMEOUT_S + 30)
def test_fsdp2_samples_like_ddp_and_shares_the_cache(ranks):
    """Same seeds, same local batches: FSDP2's reduce-scattered sampled gradient is DDP's
    all-reduced one (so it is unbiased for the same reason), and the cache is replicated."""
    rank0, rank1 = (r["fsdp2"][0.3] for r in ranks)
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    torch.testing.assert_close(rank0["grads"][name], ranks[0]["sampled"]["samples"][0], rtol=1e-4, atol=1e-6)
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key
    assert rank0["num_examples"] == rank1["num_examples"] == 4


def _saved_cache(checkpoint) -> tuple[int, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "wtacrs_state.safetensors"))
    return int(state["step"]), {k.removeprefix("cache."): v for k, v in state.items() if k.startswith("cache.")}


def _assert_loaded(resumed: dict, checkpoint) -> None:
    step, cache = _saved_cache(checkpoint)
    assert resumed["loaded_step"] == step
    assert resumed["loaded_cache"].keys() == cache.keys()
    for key, value in cache.items():
        torch.testing.assert_close(resumed["loaded_cache"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.timeout(JOIN_TIMEOUT_S + 60)
def test_two_rank_checkpoint_resumes_on_one_rank_with_the_cache(ranks, tmp_path):
    checkpoint = ranks[0]["run_dir"] / "checkpoint-2"
    assert int((_saved_cache(checkpoint)[1]["offset"] >= 0).sum()) == 8  # 2 steps × 2 ranks × 2 examples
    resumed = _resumed_state(str(tmp_path), str(checkpoint))
    assert resumed["world"] == 1
    _assert_loaded(resumed, checkpoint)
    assert resumed["step"] == 4 and resumed["num_examples"] >= 8


@pytest.mark.timeout(JOIN_TIMEOUT_S + 30)
def test_one_rank_checkpoint_resumes_on_two_ranks_with_the_cache(ranks):
    rank0, rank1 = (r["resume"] for r in ranks)
    checkpoint = ranks[0]["one_rank_checkpoint"]
    assert int((_saved_cache(checkpoint)[1]["offset"] >= 0).sum()) == 4  # 2 steps × 2 examples
    for rank in (rank0, rank1):
        assert rank["world"] == 2
        _assert_loaded(rank, checkpoint)
        assert rank["step"] == 4
    assert rank0["num_examples"] == rank1["num_examples"] >= 4


def test_wire_format_round_trips_with_any_padding():
    from wtacrs.cache import GradNormCache, PendingRecord

    mask = torch.tensor([[True, True, False], [False, True, True]])  # right- and left-padded rows
    direct, exchanged = GradNormCache(2), GradNormCache(2)
    for cache in (direct, exchanged):
        cache.record(1, torch.tensor([5, 2]), mask, torch.tensor([[1.0, 2.0, 0.0], [0.0, 3.0, 4.0]]))
    exchanged.exchange_pending(lambda records: unpack_records(pack_records(records)))
    direct.commit(), exchanged.commit()
    for key, value in direct.state_dict().items():  # the position prior is NaN where no record reached
        torch.testing.assert_close(value, exchanged.state_dict()[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert unpack_records(pack_records([])) == []
    with pytest.raises(ValueError, match="host memory"):  # parsing it must never wait for a device
        unpack_records(pack_records([]).to("meta"))
    one = [PendingRecord(0, torch.tensor([1]), mask[:1], torch.ones(1, 3, dtype=torch.uint8))]
    with pytest.raises(ValueError, match="truncated"):
        unpack_records(pack_records(one)[:-1])


def _compact_buffer(records) -> torch.Tensor:
    """The format of records without keys, built by hand: each layout (ids and mask tensors) once."""
    from wtacrs.cache.records import layout_of

    layouts = list(dict.fromkeys(layout_of(r) for r in records))
    firsts = [next(r for r in records if layout_of(r) == layout) for layout in layouts]
    header = [len(records), len(layouts), *(v for r in records for v in (r.slot, layouts.index(layout_of(r)))),
              *(v for f in firsts for v in (f.example_ids.numel(), int(f.row_mask.sum())))]
    parts = [torch.tensor(header)] + [p for f in firsts for p in (f.example_ids, f.row_mask.sum(1).int())]
    return torch.cat([p.view(torch.uint8) for p in parts] + [r.codes[r.row_mask] for r in records])


def test_records_without_keys_send_their_layout_once_and_share_it_back():
    """A step's layers share one layout: ids and counts travel once (16 B of counts, 16 B per
    record, 16 B per layout, 12 B per example, the real tokens' codes), and the records come back
    sharing it, so a commit groups them as it would have the originals: ALBERT's layer called
    twice updates the prior once, from its last call, as on one rank."""
    from wtacrs.cache import GradNormCache, PendingRecord

    mask = torch.tensor([[True, True, False], [False, True, True]])
    ids = torch.tensor([5, 2])
    records = [PendingRecord(slot, ids, mask, torch.tensor([[7, 8, 9], [10, 11, 12]], dtype=torch.uint8) + slot)
               for slot in (0, 1, 1)]
    buffer = pack_records(records)
    assert torch.equal(buffer, _compact_buffer(records))
    assert buffer.numel() == 16 + 3 * 16 + 16 + 2 * 12 + 3 * 4
    unpacked = unpack_records(buffer)
    assert unpacked[0].row_mask is unpacked[2].row_mask and unpacked[0].example_ids is unpacked[1].example_ids
    direct, exchanged = GradNormCache(2), GradNormCache(2)
    for cache in (direct, exchanged):
        cache._pending.extend(records)
    exchanged.exchange_pending(lambda pending: unpack_records(pack_records(pending)))
    direct.commit(), exchanged.commit()
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(exchanged.state_dict()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def _record_anchored_and_plain(cache) -> None:
    """A plain step, an anchored one (right- and left-padded rows, an anchor at [CLS], one next to
    padding, an example without anchors; slot 1 recorded twice, as ALBERT does), a plain one."""
    from wtacrs.cache import encode_norms
    from wtacrs.cache.first_visit import first_visit_keys

    g = torch.Generator().manual_seed(0)
    plain = torch.tensor([[True, True, True, False], [False, True, True, True]])
    cache.record(0, torch.tensor([7, 8]), plain, torch.rand(2, 4, generator=g))
    mask = torch.tensor([[True, True, True, True, False, False], [False, False, True, True, True, True],
                         [True, True, False, False, False, False]])
    keys = first_visit_keys(mask, torch.tensor([[2, 3], [2, 4], [-1, -1]]), (mask.cumsum(1) > 2) & mask)
    norms = torch.rand(3, 3, 6, generator=g) + 0.1  # padding rows have norms too
    cache.record_layers([0, 1, 1], torch.tensor([0, 1, 2]), mask, encode_norms(norms), keys)
    cache.record(1, torch.tensor([8, 9]), plain, torch.rand(2, 4, generator=g))


def test_records_with_keys_round_trip_into_the_same_cache():
    from wtacrs.cache import GradNormCache

    direct, exchanged = GradNormCache(2), GradNormCache(2)
    for cache in (direct, exchanged):
        _record_anchored_and_plain(cache)
    exchanged.exchange_pending(lambda records: unpack_records(pack_records(records)))
    direct.commit(), exchanged.commit()
    expected = direct.state_dict()
    assert expected["prior_anchor"].isfinite().any() and expected["prior_type"].isfinite().any()
    assert expected["prior_type"][:, 0].isfinite().all(), "the padding type learns from padding rows"
    for key, value in expected.items():
        torch.testing.assert_close(exchanged.state_dict()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def test_records_with_keys_add_their_layout_once():
    from wtacrs.cache import GradNormCache

    cache = GradNormCache(2)
    _record_anchored_and_plain(cache)
    records = cache._pending
    plain = [r for r in records if r.keys is None]
    buffer = pack_records(records)
    assert torch.equal(buffer[: _compact_buffer(plain).numel()], _compact_buffer(plain))
    # keyed section: 16 B counts, 24 B per record, 16 B per layout; ids, mask, keys once; codes per record
    assert buffer.numel() == _compact_buffer(plain).numel() + 16 + 3 * 24 + 16 + 3 * 8 + 18 * (1 + 4 + 1) + 3 * 18
    for cut in (1, 18, buffer.numel() - _compact_buffer(plain).numel() - 8):
        with pytest.raises(ValueError, match="truncated"):
            unpack_records(buffer[:-cut])
    unpacked = unpack_records(buffer)
    assert [(r.slot, r.keys is None) for r in unpacked] == [(r.slot, r.keys is None) for r in records]
    assert unpacked[1].row_mask is unpacked[3].row_mask, "records of a layout share it, as the originals did"


def test_single_process_needs_no_sync():
    model = wtacrs.apply(_bert(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    assert enable_data_parallel(model) is None
    assert wtacrs.sampling_state(model).sync is None


# -- `wtacrs finetune` under torchrun -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(TORCHRUN_TIMEOUT_S + 30)
def test_finetune_under_torchrun_writes_the_results_once(tiny_model, tmp_path):  # noqa: F811 (the fixture above)
    """Two CPU ranks (gloo, loopback) through the real launcher: rank 0 alone empties the earlier
    run (--overwrite) and writes one valid results.json; the table is printed once."""
    from test_finetune import FAST, check_schema

    earlier = tmp_path / "tweet_sentiment" / Path(tiny_model).name / "wtacrs@0.3" / "seed0"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text('{"score": -1}')
    (earlier / "stale.txt").write_text("from an earlier run")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "wtacrs.cli", "finetune", "--model", tiny_model, "--output-dir", str(tmp_path),
               "--method", "wtacrs", "--overwrite", *FAST]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (results,) = tmp_path.glob("*/*/wtacrs@0.3/seed0/results.json")
    assert results.parent == earlier
    record = json.loads(results.read_text())
    check_schema(record)
    assert record["world_size"] == 2 and record["train_examples"] == 16
    assert sorted(p.name for p in earlier.iterdir() if p.is_file()) == [".lock", "results.json", "run.json",
                                                                        "training.json"], "stale or temp files left"
    assert done.stdout.count("wrote ") == 1 and done.stdout.count("live peak MiB") == 1  # one writer, one table
