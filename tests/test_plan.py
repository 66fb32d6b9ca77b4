"""`wtacrs plan`: the fake-tensor trace against the CPU allocator's measured peak, the CUDA
models (allocator rounding, SDPA choice), the time model and the command line."""

from __future__ import annotations

import pytest
import torch

from wtacrs.bench.training import make_trial, measure_step_memory
from wtacrs.cli import main
from wtacrs.planning.gpus import DEVICE_S_PER_KERNEL, HOST_S_PER_CALL, gpu, step_seconds
from wtacrs.planning.models import model_spec
from wtacrs.planning.plan import fastest_fitting, plan
from wtacrs.planning.tracer import Kernel, cuda_block_bytes, cuda_sdp_choice, trace_step
from wtacrs.recipes import parse_recipe

RECOMMENDED = "lora+wtacrs@0.3+companions+recompute+recompute-attention"


def _measured_cpu_peak(size: str, recipe: str, batch: int, seq: int) -> int:
    trial = make_trial(size, recipe, batch, seq)
    trial.step()  # a steady step, as `wtacrs bench memory` measures
    return measure_step_memory(trial)["peak_bytes"]


@pytest.mark.parametrize("size,recipe,batch,seq", [
    ("bert-tiny", "full", 4, 16),
    ("bert-tiny", "lora", 4, 16),
    ("bert-tiny", "checkpointing", 4, 16),
    ("llama-tiny", "full", 2, 32),
    ("llama-tiny", "lora", 2, 32),
])
def test_traced_peak_matches_the_cpu_allocator_within_1_percent(size, recipe, batch, seq):
    traced = trace_step(model_spec(size), parse_recipe(recipe), batch, seq, target="cpu")
    measured = _measured_cpu_peak(size, recipe, batch, seq)
    assert traced.peak_bytes == pytest.approx(measured, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("size,recipe,batch,seq", [
    ("bert-base", "full", 8, 128), ("bert-base", "checkpointing", 8, 128), ("bert-base", RECOMMENDED, 8, 128),
    ("smollm2-135m", "lora", 1, 256), ("smollm2-135m", RECOMMENDED, 1, 256),
])
def test_traced_peak_matches_the_cpu_allocator_on_small_models(size, recipe, batch, seq):
    traced = trace_step(model_spec(size), parse_recipe(recipe), batch, seq, target="cpu")
    assert traced.peak_bytes == pytest.approx(_measured_cpu_peak(size, recipe, batch, seq), rel=0.01)


@pytest.mark.slow
def test_trace_allocates_no_weights():
    """An 8B-parameter decoder's step is traced without its 32 GB of fp32 weights."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    traced = trace_step(model_spec("llama-3.1-8b"), parse_recipe("lora"), 1, 16, dtype=torch.bfloat16)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert traced.weights_bytes > 15e9  # 8.0B parameters in bf16
    assert traced.peak_bytes > traced.weights_bytes
    assert grown_kib < 2 * 2**20  # under 2 GiB of this process's memory


def test_cuda_block_rounding():
    assert [cuda_block_bytes(n) for n in (0, 1, 511, 512, 513, 4096)] == [0, 512, 512, 512, 1024, 4096]


def test_cuda_sdpa_choice_keeps_no_square_matrix():
    from torch.nn.attention import SDPBackend

    q = torch.empty(2, 4, 64, 32)
    assert cuda_sdp_choice(q, q, q) == int(SDPBackend.EFFICIENT_ATTENTION)  # fp32: no flash
    half = q.to(torch.bfloat16)
    assert cuda_sdp_choice(half, half, half) == int(SDPBackend.FLASH_ATTENTION)
    mask = torch.ones(2, 1, 64, 64, dtype=torch.bool)
    assert cuda_sdp_choice(half, half, half, mask) == int(SDPBackend.EFFICIENT_ATTENTION)
    # BERT trains with attention dropout: the CPU runs the math kernel and keeps the L x L
    # probabilities and mask, CUDA's fused kernel keeps neither
    cpu = trace_step(model_spec("bert-tiny"), parse_recipe("full"), 4, 256, target="cpu")
    cuda = trace_step(model_spec("bert-tiny"), parse_recipe("full"), 4, 256, target="cuda")
    squares = 2 * 2 * 4 * 2 * 256 * 256 * 4  # probabilities and dropout mask, 2 layers, 2 heads, fp32
    assert (cpu.peak_bytes - cpu.baseline_bytes) - (cuda.peak_bytes - cuda.baseline_bytes) > squares / 2


def test_time_model_host_sync_splits_the_stream():
    device = gpu("h100-80gb")
    big = Kernel("mm", flops=int(67e9), bytes=0)  # 1 ms at fp32 peak
    small = Kernel("add", flops=0, bytes=0)
    overlapped = step_seconds([big, small, small], device, torch.float32)
    assert overlapped == pytest.approx(HOST_S_PER_CALL + 1e-3 + 2 * DEVICE_S_PER_KERNEL)
    synced = step_seconds([big, Kernel("item", 0, 0, sync=True), small], device, torch.float32)
    # after the sync the host issues the last kernel only once the device is done
    assert synced == pytest.approx(HOST_S_PER_CALL + 1e-3 + DEVICE_S_PER_KERNEL + HOST_S_PER_CALL
                                   + DEVICE_S_PER_KERNEL)
    assert synced > overlapped


def test_plan_rows_budget_and_largest_batch():
    rows = plan("bert-tiny", ["full", "lora"], seq=16, batch=4, gpu_name="h200", budget_bytes=0.1e9, multiple=64,
                max_batch=256)
    assert [r.recipe for r in rows] == ["full", "lora"]
    assert rows[0].time_vs_full == 1.0 and rows[1].time_vs_lora == 1.0
    assert all(r.fits == (r.predicted_peak_bytes <= 0.1e9) for r in rows)
    assert all(r.largest_batch == 256 for r in rows)  # bert-tiny: ~70 MB at batch 256
    assert fastest_fitting(rows) in rows
    tight = plan("bert-tiny", ["full"], seq=16, batch=4, budget_bytes=1e6, search_batch=False)
    assert not tight[0].fits and fastest_fitting(tight) is None


def test_plan_command_prints_predictions(capsys, tmp_path):
    assert main(["plan", "--model", "bert-tiny", "--seq", "16", "--batch", "4", "--methods", "full", "lora",
                 "--no-search", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PREDICTIONS" in out and "predicted peak (GB)" in out and "fastest recipe that fits (predicted)" in out
    assert (tmp_path / "plan-h100-80gb.json").is_file() and (tmp_path / "plan-h100-80gb.png").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--model", "no-such-model-folder"], "no-such-model-folder"),
    (["--methods", "lora+nonsense"], "nonsense"),
])
def test_plan_command_bad_input_is_one_line(argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--no-search", *argv])
    text = str(exit_info.value.code)
    assert message in text and "\n" not in text


def test_largest_batch_search_on_an_affine_peak():
    from wtacrs.planning.plan import largest_batch

    probes = []

    def peak(batch: int) -> int:
        probes.append(batch)
        return 1000 + 37 * batch + (batch > 100) * 500  # a kink the line does not know

    assert largest_batch(peak, 1000 + 37 * 64, multiple=8) == 64
    assert len(set(probes)) <= 4  # 8, 16, the line's guess 64 and 72
    assert largest_batch(peak, 1000 + 37 * 120 + 500, multiple=8) == 120
    assert largest_batch(peak, 999, multiple=8) == 0
    assert largest_batch(peak, 1e9, multiple=8, max_batch=48) == 48


def test_finetune_plan_refuses_a_run_that_will_not_fit(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["finetune", "--plan", "--plan-budget", "0.01", "--method", "lora", "--output-dir", str(out),
                 "--no-progress"])
    assert code == 2 and not out.exists()  # refused before any run folder or training
    assert "PREDICTIONS for all-minilm-l6-v2" in capsys.readouterr().out


def test_finetune_plan_refuses_autocast_runs(tmp_path, capsys):
    """--bf16's autocast is not traced: refused with a message, not planned as fp32."""
    out = tmp_path / "runs"
    code = main(["finetune", "--plan", "--bf16", "--method", "lora", "--output-dir", str(out), "--no-progress"])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "cannot plan a --bf16 run" in err and "autocast" in err


@pytest.mark.parametrize("recipe", ["full", "lora+checkpointing"])
def test_allocation_streams_of_two_batches_give_a_third_batchs_peak(recipe):
    """Traces at batches 2 and 3 make the same storages in the same order: replayed at batch 9 with
    each storage's bytes on its line, the stream's peak is the traced peak at 9, to the byte."""
    from wtacrs.planning.tracer import peak_at_batch

    two, three, nine = (trace_step(model_spec("llama-tiny"), parse_recipe(recipe), b, 32, kernels=False)
                        for b in (2, 3, 9))
    assert two.stream.aligned(three.stream) and two.stream.aligned(nine.stream)
    assert peak_at_batch(two.stream, three.stream, 2) == two.peak_bytes
    assert peak_at_batch(two.stream, three.stream, 9) == nine.peak_bytes


def test_batch_search_traces_few_batches_and_brackets_the_answer():
    from wtacrs.planning.plan import BatchSearch

    spec, recipe = model_spec("llama-tiny"), parse_recipe("lora")
    traced = []

    def trace_at(batch):
        traced.append(batch)
        return trace_step(spec, recipe, batch, 32, kernels=False)

    budget = trace_step(spec, recipe, 37, 32, kernels=False).peak_bytes  # batch 37 just fits
    search = BatchSearch(trace_at, 0, budget, multiple=1, max_batch=4096)
    assert search.run(1) == 37
    assert len(traced) <= 4
    assert 37 in traced and (38 in traced or any("38 not traced" in n for n in search.notes))


def test_a_trace_leaves_no_fake_tensor_in_the_librarys_caches():
    """A trace fills the library's device cache (counter hashes, index ranges) with fake tensors
    unless it keeps it to itself; a real step after it then ran partly on fakes, and
    AllocatorPeak missed those allocations (bert-tiny's full-weight sampled step read 964,512 B
    against 1,030,048 B)."""
    from torch._subclasses.fake_tensor import FakeTensor

    from wtacrs import device_cache

    recipe = "wtacrs@0.3+companions+recompute+recompute-attention"
    before = _measured_cpu_peak("bert-tiny", recipe, 4, 16)
    traced = trace_step(model_spec("bert-tiny"), parse_recipe(recipe), 4, 16, target="cpu")
    assert device_cache.entries() and not any(isinstance(t, FakeTensor) for t in device_cache.entries())
    assert _measured_cpu_peak("bert-tiny", recipe, 4, 16) == before
    assert traced.peak_bytes == pytest.approx(before, rel=0.01)
