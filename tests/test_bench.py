"""`wtacrs bench` and its measurement code, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from wtacrs.bench import largest_fitting_batch
from wtacrs.bench.rss import peak_rss_of_step
from wtacrs.bench.training import make_trial, measure_step_memory, memory_breakdown
from wtacrs.cli import main
from wtacrs.memory import AllocatorPeak

TINY = ["--model", "bert-tiny", "--seq", "8", "--threads", "1"]


# -- the allocator peak tracker ---------------------------------------------------------------
def test_allocator_peak_hand_computed():
    w = torch.zeros(100)  # 400 B, alive before: counted only as baseline
    with AllocatorPeak(baseline=[w]) as live:
        a = torch.ones(1024)  # +4096
        view = a[:10]  # same storage: +0
        b = torch.ones(2048)  # +8192 → 400 + 12288 live
        b.mul_(2)  # in place, but the scalar 2 becomes a float64 tensor (8 B) and a float32 copy (4 B): the peak
        del a, view  # −4096
        c = torch.ones(512)  # +2048
    assert live.baseline == 400
    assert live.peak == 400 + 4096 + 8192 + 8 + 4
    assert live.current == 400 + 8192 + 2048
    del b, c


def test_allocator_peak_counts_temporaries_freed_inside_an_expression():
    x = torch.ones(256)  # 1 KiB, not in baseline: not counted
    with AllocatorPeak() as live:
        y = (x * 2) + 1  # x*2 (1 KiB) is alive while +1 allocates y (1 KiB), then freed
    # each Python scalar becomes a float64 tensor (8 B) and a float32 copy (4 B) during its op
    assert live.peak == 2048 + 8 + 4 and live.current == 1024
    del y


def test_allocator_peak_ignores_frees_of_blocks_from_before():
    with AllocatorPeak():
        old = torch.ones(4096)  # allocated under an earlier profile: the profiler knows its size
    with AllocatorPeak() as live:
        del old  # −16 KiB of a block from before the block: not counted, as its allocation was not
        a = torch.ones(1024)  # +4 KiB
    assert live.peak == 4096 and live.current == 4096
    del a


def test_allocator_peak_sees_kernel_temporaries():
    """torch.logsumexp subtracts the row maxima into a temporary as large as its input, inside
    the kernel: no op output, yet memory an accelerator must hold."""
    x = torch.randn(64, 1024)  # 256 KiB
    with AllocatorPeak(baseline=[x]) as live:
        lse = torch.logsumexp(x, dim=-1)
    assert live.peak - live.baseline >= x.nbytes
    assert live.current - live.baseline == lse.nbytes


def test_allocator_peak_of_a_linear_layer_step():
    """y = x Wᵀ, loss = Σy, backward: hand count of every storage (float32, 4 B each)."""
    layer = nn.Linear(64, 32, bias=False)  # W: 2048 elements = 8192 B, baseline
    x = torch.randn(16, 64)  # 4096 B, baseline
    with AllocatorPeak(baseline=[layer.weight, x]) as live:
        layer(x).sum().backward()
    # Forward: y (16·32·4 = 2048 B) and the loss (4 B); y is freed once summed (linear saves x
    # and W, sum saves nothing). Backward: the loss, its gradient (4 B), dY (an expanded view of
    # it, which the matmul kernel copies into a contiguous 2048 B buffer: a temporary no tensor
    # bookkeeping sees) and dW (8192 B) are alive together: the peak.
    assert live.baseline == 8192 + 4096
    assert live.peak == live.baseline + 4 + 4 + 2048 + 8192
    assert live.current == live.baseline + 8192  # only W.grad stays
    del live, x


PROFILER_NOISE = ("USDT:", "profiler_start", "profiler_stop", "Memory block of unknown size")


def test_allocator_peak_keeps_the_profilers_lines_off_stderr_and_passes_on_the_rest(capfd):
    """kineto marks each profile's start and stop on stderr, and c10 warns (at every 1000th such
    free) when a block from before the profile is freed inside it: 1000 such frees make sure it tries."""
    import sys

    old = [torch.ones(4) for _ in range(1000)]
    with AllocatorPeak():
        old.clear()
        print("kept line", file=sys.stderr)
    err = capfd.readouterr().err
    assert "kept line\n" in err and not any(noise in err for noise in PROFILER_NOISE), err


def test_cli_stderr_carries_no_profiler_noise(tmp_path, capfd):
    assert main(["bench", "speed", *TINY, "--batch", "2", "--methods", "full", "--warmup", "0", "--steps", "1",
                 "--out", str(tmp_path)]) == 0
    assert _record(tmp_path / "speed.json")["rows"][0]["peak_bytes"] > 0  # the profiled step ran
    err = capfd.readouterr().err
    assert not any(noise in err for noise in PROFILER_NOISE), err


def test_step_peak_includes_weights_gradients_and_optimizer_state():
    trial = make_trial("bert-tiny", "full", batch=2, seq=8)
    parts = memory_breakdown(trial)
    measured = measure_step_memory(trial)
    assert parts["optimizer_bytes"] == 2 * parts["gradients_bytes"] + 4 * sum(1 for _ in trial.model.parameters())
    assert measured["peak_bytes"] > parts["weights_bytes"] + parts["gradients_bytes"] + parts["optimizer_bytes"]
    assert 0 < measured["saved_bytes"] < measured["peak_bytes"]


def test_backward_fused_adamw_updates_like_adamw_and_frees_gradients_during_backward():
    plain, fused = (make_trial("bert-tiny", spec, batch=2, seq=8) for spec in ("full", "full+fused-adamw"))
    for step in range(2):
        for trial in (plain, fused):
            torch.manual_seed(step)  # the same dropout masks
            trial.step()
    for (name, p), q in zip(plain.model.named_parameters(), fused.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-7, msg=name)  # same update, order of ops aside
    assert all(p.grad is None for p in fused.model.parameters())
    assert memory_breakdown(fused)["optimizer_bytes"] == memory_breakdown(plain)["optimizer_bytes"]
    peaks = [measure_step_memory(trial)["peak_bytes"] for trial in (plain, fused)]
    assert peaks[0] - peaks[1] >= memory_breakdown(plain)["gradients_bytes"] // 2  # most gradients never coexist


# -- the batch search -------------------------------------------------------------------------
@pytest.mark.parametrize("base, per_example, budget, expected",
                         [(100, 10, 1000, 88), (0, 1, 4096, 4096), (50, 7, 40, 0)])
def test_largest_fitting_batch_on_an_affine_peak(base, per_example, budget, expected):
    probed = []

    def probe(batch):
        probed.append(batch)
        return base + per_example * batch

    assert largest_fitting_batch(probe, budget, start=8, multiple=8, max_batch=4096) == expected
    assert len(probed) <= 7 and len(set(probed)) == len(probed)


def test_largest_fitting_batch_treats_out_of_memory_as_too_big():
    assert largest_fitting_batch(lambda b: None if b > 40 else float(b), budget=1e9, start=8, multiple=8) == 40


# -- the CLI on bert-tiny ---------------------------------------------------------------------
def _record(path):
    return json.loads(path.read_text())


def test_bench_memory_writes_json_markdown_and_plot(tmp_path):
    assert main(["bench", "memory", *TINY, "--batch", "2", "--methods", "full", "lora", "--no-rss",
                 "--out", str(tmp_path)]) == 0
    record = _record(tmp_path / "memory.json")
    assert record["meta"]["torch"] == torch.__version__ and record["meta"]["seq"] == 8
    assert [r["method"] for r in record["rows"]] == ["full", "lora"]
    assert record["rows"][0]["peak_reduction"] == 1.0 and record["rows"][1]["peak_bytes"] > 0
    assert (tmp_path / "memory.md").read_text().startswith("# Memory") and (tmp_path / "memory.png").stat().st_size


def test_bench_merge_joins_runs_and_redoes_ratios(tmp_path):
    for part, method in (("a", "full"), ("b", "lora")):
        main(["bench", "memory", *TINY, "--batch", "2", "--methods", method, "--no-rss", "--out", str(tmp_path / part)])
    assert main(["bench", "merge", str(tmp_path / "a/memory.json"), str(tmp_path / "b/memory.json"),
                 "--out", str(tmp_path / "m")]) == 0
    rows = _record(tmp_path / "m/memory.json")["rows"]
    assert [r["method"] for r in rows] == ["full", "lora"]
    assert rows[1]["peak_reduction"] == pytest.approx(rows[0]["peak_bytes"] / rows[1]["peak_bytes"])
    with pytest.raises(SystemExit, match="differ in batch"):
        main(["bench", "memory", *TINY, "--batch", "3", "--methods", "full", "--no-rss", "--out", str(tmp_path / "c")])
        main(["bench", "merge", str(tmp_path / "a/memory.json"), str(tmp_path / "c/memory.json"),
              "--out", str(tmp_path)])


def test_bench_speed_writes_the_memory_time_plane(tmp_path):
    assert main(["bench", "speed", *TINY, "--batch", "2", "--methods", "full", "wtacrs@0.3", "--warmup", "0",
                 "--steps", "2", "--profile", "--out", str(tmp_path)]) == 0
    rows = _record(tmp_path / "speed.json")["rows"]
    assert all(r["step_s"] > 0 and r["peak_bytes"] > 0 and len(r["step_times_s"]) == 2 for r in rows)
    assert rows[0]["time_vs_full"] == 1.0 and (tmp_path / "memory_time_plane.png").stat().st_size
    sampled = {c["function"] for c in rows[1]["components"]}
    assert any(name.split(".")[0] in ("functional", "layers", "estimators") for name in sampled)  # attributed
    assert "## wtacrs@0.3" in (tmp_path / "speed_profile.md").read_text()


def test_bench_speed_interleaved_times_every_method_each_round(tmp_path):
    assert main(["bench", "speed", *TINY, "--batch", "2", "--methods", "full", "wtacrs@0.3", "--warmup", "1",
                 "--steps", "3", "--interleave", "--out", str(tmp_path)]) == 0
    record = _record(tmp_path / "speed.json")
    full, sampled = record["rows"]
    assert len(full["step_times_s"]) == len(sampled["step_times_s"]) == 3 and sampled["peak_bytes"] > 0
    assert full["time_vs_full"] == 1.0
    assert record["meta"]["interleave"] and "round-robin" in (tmp_path / "speed.md").read_text()


def test_bench_speed_compiles_every_model_and_counts_the_step_s_kernels(tmp_path):
    """--compile: each model runs under torch.compile (the dynamo eager backend here: no kernels of
    its own, every ATen operator counted), after at least two warm-up steps (the compiles)."""
    assert main(["bench", "speed", *TINY, "--batch", "2", "--methods", "full", "--warmup", "0",
                 "--steps", "1", "--interleave", "--compile", "eager", "--out", str(tmp_path)]) == 0
    record = _record(tmp_path / "speed.json")
    assert record["meta"]["compile"] == "eager" and record["meta"]["warmup"] == 2
    (full,) = record["rows"]
    assert full["generated_kernels"] == 0 and full["aten_ops"] > 100 and full["peak_bytes"] > 0
    assert "generated kernels / step" in (tmp_path / "speed.md").read_text()


@pytest.mark.slow
def test_bench_speed_counts_inductor_s_generated_kernels(tmp_path):
    assert main(["bench", "speed", *TINY, "--batch", "2", "--methods", "full", "--steps", "1", "--compile",
                 "--out", str(tmp_path)]) == 0
    (full,) = _record(tmp_path / "speed.json")["rows"]
    assert full["generated_kernels"] > 0


def test_bench_speed_interleaved_goes_on_when_a_method_fails_midway(tmp_path, monkeypatch):
    """A method failing in round 2 (say, out of memory) keeps its error and first time; the
    others finish every round, and the rows on disk after each round are complete JSON."""
    from wtacrs.bench import suite

    calls = {"n": 0}
    timed = suite.measure_step_time

    def failing_second_round(trial, warmup, steps):
        calls["n"] += 1
        if calls["n"] == 4:  # round 2, second method
            raise RuntimeError("out of memory (simulated)")
        return timed(trial, warmup, steps)

    monkeypatch.setattr(suite, "measure_step_time", failing_second_round)
    assert main(["bench", "speed", *TINY, "--batch", "2", "--methods", "full", "wtacrs@0.3", "--warmup", "0",
                 "--steps", "3", "--interleave", "--out", str(tmp_path)]) == 0
    full, sampled = _record(tmp_path / "speed.json")["rows"]
    assert len(full["step_times_s"]) == 3 and "error" not in full
    assert sampled["error"] == "RuntimeError: out of memory (simulated)" and len(sampled["step_times_s"]) == 1


def test_bench_batch_finds_a_batch_under_the_budget(tmp_path):
    assert main(["bench", "batch", *TINY, "--methods", "full", "--budget-gb", "0.004", "--out", str(tmp_path)]) == 0
    (row,) = _record(tmp_path / "batch.json")["rows"]
    assert row["max_batch"] >= 8 and row["peak_bytes"] <= 0.004e9
    assert any(p["peak_bytes"] > 0.004e9 for p in row["probes"])  # the next size up was measured and failed
    assert (tmp_path / "throughput_vs_batch.png").stat().st_size


def test_bench_variance_reports_every_layer_and_estimator(tmp_path):
    assert main(["bench", "variance", *TINY, "--batch", "2", "--ratios", "0.3", "--draws", "3",
                 "--out", str(tmp_path)]) == 0
    record = _record(tmp_path / "variance.json")
    layers = {r["layer"] for r in record["per_layer"]}
    assert len(layers) == 12  # 2 blocks × 6 linear layers; the pooler and classifier are not sampled
    assert {r["estimator"] for r in record["per_layer"]} == {"wta-crs", "crs", "priority", "uniform", "topk"}
    assert (tmp_path / "variance.png").stat().st_size
    # first visits (scores without ‖dY‖) cost variance on every layer; the table reports both medians
    wta = [r for r in record["per_layer"] if r["estimator"] == "wta-crs"]
    assert all(r["first_visit_variance"] >= r["exact_variance"] * (1 - 1e-9) for r in wta)
    (summary,) = record["rows"]
    assert summary["wta_first_visit"] > summary["wta_cached"] > 0
    assert "WTA-CRS var, first visit" in (tmp_path / "variance.md").read_text()


@pytest.mark.slow
def test_peak_rss_of_a_step_in_a_fresh_process():
    result = peak_rss_of_step("bert-tiny", "full", batch=2, seq=8, threads=1)
    assert result["peak_rss_bytes"] >= result["rss_before_step_bytes"] > 50e6  # torch alone is bigger


@pytest.mark.parametrize("argv, message", [
    (["bench"], "required"),
    (["bench", "memory", "--methods", "lora+magic"], "bad component"),
    (["bench", "speed", "--batch", "0"], "positive"),
    (["bench", "memory", "--model", "gpt-7"], "is neither a named size"),
    (["bench", "variance", "--ratios", "1.5"], "ratio must be in"),
    (["bench", "batch", "--budget-gb", "-1"], "must be positive"),
    (["bench", "speed", "--methods", "wtacrs@0"], "ratio must be in"),
])
def test_cli_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_rejects_one_draw_and_unmatched_layers():
    with pytest.raises(SystemExit, match="draws must be >= 2"):
        main(["bench", "variance", *TINY, "--draws", "1"])
    with pytest.raises(SystemExit, match="no trainable linear layer matches"):
        main(["bench", "variance", *TINY, "--layers", "nothing-here"])


def test_closed_form_variances_match_monte_carlo():
    from wtacrs.bench.variance import exact_variances, layer_variance

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 8, dtype=torch.float64, generator=g)
         * torch.randn(64, 1, dtype=torch.float64, generator=g).exp())
    dy = torch.randn(64, 5, dtype=torch.float64, generator=g)
    exact = exact_variances(x, dy, 0.2)
    measured = layer_variance(x, dy, 0.2, draws=1500, generator=g)
    for estimator in ("crs", "wta-crs"):  # a variance estimate from 1500 draws: about ±4% (1 s.d.)
        assert measured[estimator]["variance"] == pytest.approx(exact[estimator], rel=0.2)
    assert exact["winners"] >= 1 and exact["wta-crs"] <= exact["crs"]


def test_closed_form_variances_with_given_scores():
    """Scores other than the optimal ‖X_i‖‖dY_i‖ (a stale cache, a prior) cost variance: with
    uniform scores one CRS draw has E‖Z‖² = N Σ‖g_i‖²; the optimal scores give the least."""
    from wtacrs.bench.variance import exact_variances
    from wtacrs.estimators import sample_budget

    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, dtype=torch.float64, generator=g) * torch.rand(40, 1, dtype=torch.float64, generator=g)
    dy = torch.randn(40, 3, dtype=torch.float64, generator=g)
    products = x.norm(dim=1) * dy.norm(dim=1)
    assert exact_variances(x, dy, 0.25, scores=products) == pytest.approx(exact_variances(x, dy, 0.25))
    uniform = exact_variances(x, dy, 0.25, scores=torch.ones(40))
    exact2 = float((dy.mT @ x).pow(2).sum())
    k = sample_budget(0.25, 40)
    assert uniform["crs"] == pytest.approx((40 * float((products**2).sum()) - exact2) / k / exact2)
    assert uniform["crs"] > exact_variances(x, dy, 0.25)["crs"]


def test_bench_calls_counts_a_step_and_finds_no_extra_device_syncs(tmp_path):
    assert main(["bench", "calls", *TINY, "--batch", "2", "--methods", "full", "wtacrs@0.3", "--out", str(tmp_path)]) == 0
    full, sampled = _record(tmp_path / "calls.json")["rows"]
    assert full["aten_calls"] > 0 and full["host_store_calls"] == 0 and "sampled_linears" in sampled
    assert sampled["sampled_linears"] > 0 and sampled["host_store_calls"] > 0  # the cache is read and written
    assert sampled["baseline"] == "full" and sampled["extra_device_syncs"] == 0
    assert sampled["extra_device_calls_per_linear"] > 0
