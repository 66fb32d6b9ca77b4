"""A training step under `torch.compile(fullgraph=True)`: no graph break, eager's gradients.

A step here is the user's whole function, forward and `loss.backward()` (traced with dynamo's
`trace_autograd_ops`), or the compiled model's forward with its AOTAutograd backward, run inside
`wtacrs.batch(ids, mask)`, which plans the step's host work at enter and commits at exit.
Gradients are compared with the eager step planned at the forward's pre-hook (no host mask given
to the block), for the same seed.
"""

from __future__ import annotations

import pytest
import torch

import wtacrs
from models import CASES_BY_NAME
from test_modeling import _qa_bert_and_batch

IDS = torch.arange(3)


def _model(name: str) -> torch.nn.Module:
    """The tiny model of `name` with dropout off (compiled code draws dropout masks from another
    stream than eager), sampled at ratio 0.3."""
    model = CASES_BY_NAME[name].model()
    model.config.use_cache = False
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, seed=3))


def _step(model: torch.nn.Module):
    """The training step a user writes: forward, then backward."""
    def step(inputs: dict) -> torch.Tensor:
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach()  # dynamo refuses to return a tensor whose graph backward consumed
    return step


def _batches(name: str, steps: int) -> list[dict[str, torch.Tensor]]:
    """`steps` batches of the tiny model's inputs, the second example's length changing from the
    third on (another count of real tokens: another k)."""
    batches = []
    for step in range(steps):
        batch = CASES_BY_NAME[name].batch()
        mask = batch["attention_mask"].clone()
        length = 6 + max(0, step - 1)
        mask[1] = torch.arange(mask.shape[1]) < length if CASES_BY_NAME[name].padding == "right" else (
            torch.arange(mask.shape[1]) >= mask.shape[1] - length)
        batches.append({**batch, "attention_mask": mask})
    return batches


def _train(model: torch.nn.Module, batches: list[dict], planned: bool, step=None) -> list[dict[str, torch.Tensor]]:
    """Gradients of a training step on each batch (by `step`, else `_step(model)`), by parameter name."""
    step = step or _step(model)
    grads = []
    for batch in batches:
        model.zero_grad()
        with wtacrs.batch(IDS, batch["attention_mask"] if planned else None):
            step(batch)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return grads


def _assert_same(expected: list[dict], got: list[dict], exact: bool) -> None:
    for step, (e, g) in enumerate(zip(expected, got, strict=True)):
        assert e.keys() == g.keys(), step
        for name in e:
            if exact:
                assert torch.equal(e[name], g[name]), (step, name)
            else:
                torch.testing.assert_close(g[name], e[name], rtol=1e-4, atol=1e-5, msg=f"step {step}, {name}")


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_planned_step_equals_the_plain_step_draws_norms_and_cache(name):
    """Planning at the block's enter from the host mask moves the host work, not the result: same
    gradients (bitwise) and the same cache as planning at the forward from its own mask."""
    batches = _batches(name, 4)
    plain, planned = _model(name), _model(name)
    _assert_same(_train(plain, batches, planned=False), _train(planned, batches, planned=True), exact=True)
    expected, got = (wtacrs.sampling_state(m).state_dict() for m in (plain, planned))
    assert expected.keys() == got.keys() and "cache.data" in got
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_planned_step_composes_with_gradient_checkpointing(reentrant):
    """The recompute runs after the forward dropped its draws: it draws the same rows again from
    the step's key and tables, and its backward fills the norm sinks once."""
    batches = _batches("bert", 3)
    plain, checkpointed = _model("bert"), _model("bert")
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    expected = _train(plain, batches, planned=False)
    _assert_same(expected, _train(checkpointed, batches, planned=True), exact=False)
    assert torch.equal(wtacrs.sampling_state(plain).state_dict()["cache.data"],
                       wtacrs.sampling_state(checkpointed).state_dict()["cache.data"])


def test_a_planned_step_checks_padding_gradients():
    model, batch = _qa_bert_and_batch()
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    with wtacrs.batch(IDS, batch["attention_mask"]):
        model(**batch).loss.backward()
    with pytest.raises(wtacrs.PaddingGradientError):
        wtacrs.sampling_state(model).state_dict()


def _compiled_run(name: str, batches: list[dict], backend: str, region: str = "step") -> tuple[list[dict], dict]:
    """Compiled steps on `batches` (gradients, and the sampling state after them). The compiled
    region is the whole step (`region="step"`: forward and `loss.backward()`) or the model
    (`"model"`: its forward, and AOTAutograd's backward graph when the loss is backpropagated).
    Two compiles: the first step, and the second (the first learns which layers share a draw and
    creates the cache: new graph inputs); then nothing may recompile, not even for batches with
    another number of real tokens: every per-step value reaches the graph as a tensor (k as a
    dynamic size)."""
    model = _model(name)
    model.config.problem_type = "single_label_classification"  # else HF's first forward sets it: a recompile
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        if region == "step":
            step = torch.compile(_step(model), fullgraph=True, backend=backend)
        else:
            step = _step(torch.compile(model, fullgraph=True, backend=backend))
        grads = _train(model, batches[:2], planned=True, step=step)
        with torch._dynamo.config.patch(error_on_recompile=True):
            grads += _train(model, batches[2:], planned=True, step=step)
    return grads, wtacrs.sampling_state(model).state_dict()


def test_a_step_traces_whole_and_keeps_eagers_gradients():
    """The default suite's check (about 20 s on a busy 2-core CPU): dynamo's own "eager" backend
    runs the captured graph without AOTAutograd, so this checks the trace (no graph break, no
    recompile after the second step) and that the traced step draws what eager draws; the tests
    below compile."""
    batches = _batches("bert", 3)
    expected = _model("bert")
    expected_grads = _train(expected, batches, planned=False)
    grads, state = _compiled_run("bert", batches, "eager")
    _assert_same(expected_grads, grads, exact=True)
    assert torch.equal(wtacrs.sampling_state(expected).state_dict()["cache.data"], state["cache.data"])


@pytest.mark.slow
@pytest.mark.parametrize("region", ["step", "model"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_compiled_step_has_no_graph_break_and_eager_gradients(name, region):
    """fullgraph=True fails on any graph break. aot_eager runs AOTAutograd's forward and backward
    graphs (the sampled op's backward included) without inductor's code generation, so the draws,
    gradients and cached norms match eager's bitwise."""
    batches = _batches(name, 5)
    expected = _model(name)
    expected_grads = _train(expected, batches, planned=False)
    grads, state = _compiled_run(name, batches, "aot_eager", region)
    _assert_same(expected_grads, grads, exact=True)
    expected_state = wtacrs.sampling_state(expected).state_dict()
    assert expected_state.keys() == state.keys()
    for key in state:
        assert torch.equal(expected_state[key], state[key]), key


@pytest.mark.slow
def test_an_inductor_compiled_step_draws_eagers_rows():
    """The default backend generates its own kernels (several minutes of compiling on a busy
    2-core CPU): the counter-based draws are integer ops, equal in any code, and the float sums
    feeding them (norms, cumulative sums) round alike here, so the same rows are drawn and the
    gradients and cached norms agree with eager's to rounding."""
    batches = _batches("bert", 3)
    expected = _model("bert")
    expected_grads = _train(expected, batches, planned=False)
    grads, state = _compiled_run("bert", batches, "inductor")
    _assert_same(expected_grads, grads, exact=False)
    expected_state = wtacrs.sampling_state(expected).state_dict()
    assert torch.equal(expected_state["group_leader"], state["group_leader"])
    codes, expected_codes = state["cache.data"].int(), expected_state["cache.data"].int()
    assert (codes - expected_codes).abs().max() <= 1  # a norm on a code boundary may round across it


def _recommended(name: str, checkpointing: bool = False) -> torch.nn.Module:
    """The tiny model of `name` under the recommended recipe (`WTACRSConfig()`: both recomputes,
    every layer drawing in backward), dropout off; or with `checkpointing`, under Hugging Face
    gradient checkpointing and the bare sampler (dynamo cannot trace a checkpoint nested in
    another, so the recomputes are left to the checkpointing they duplicate)."""
    model = CASES_BY_NAME[name].model()
    model.config.use_cache = False
    model.config.problem_type = "single_label_classification"
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, seed=3))
    return wtacrs.apply(model, wtacrs.WTACRSConfig(ratio=0.3, seed=3))


def _compiled_model_run(name: str, batches: list[dict], backend: str, fullgraph: bool,
                        checkpointing: bool = False) -> list[dict]:
    """`torch.compile(model)`, the usual idiom, inside `wtacrs.batch(ids, mask)`: the first two
    steps compile, then nothing may recompile or break the graph."""
    from torch._dynamo.utils import counters

    model = _recommended(name, checkpointing)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=fullgraph, backend=backend)
    grads = _train(model, batches[:2], planned=True, step=_step(compiled))
    with torch._dynamo.config.patch(error_on_recompile=True):
        grads += _train(model, batches[2:], planned=True, step=_step(compiled))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    return grads


@pytest.mark.parametrize("fullgraph", [False, True])
def test_the_usual_compile_idiom_keeps_the_recommended_recipes_gradients(fullgraph):
    """dynamo's "eager" backend (the trace, no code generation): the recomputed regions trace
    whole, the draws are eager's, and batches with other real-token counts run the same graph."""
    batches = _batches("bert", 3)
    expected = _recommended("bert")
    expected_grads = _train(expected, batches, planned=True)
    _assert_same(expected_grads, _compiled_model_run("bert", batches, "eager", fullgraph), exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_compiled_recommended_recipe_has_eagers_gradients_through_aot_autograd(checkpointing):
    """aot_eager runs AOTAutograd's forward and backward graphs (the recomputes, or Hugging Face
    checkpointing, inside the compiled region), bitwise eager's."""
    batches = _batches("bert", 4)
    expected = _recommended("bert", checkpointing)
    expected_grads = _train(expected, batches, planned=True)
    got = _compiled_model_run("bert", batches, "aot_eager", fullgraph=True, checkpointing=checkpointing)
    _assert_same(expected_grads, got, exact=True)


@pytest.mark.slow
def test_the_inductor_compiled_recommended_recipe_has_eagers_gradients_to_rounding():
    """The usual idiom with the default backend: inductor generates the norms, the draws' sums and
    the recomputed regions' kernels; the rows drawn in backward come from the same counter-based
    uniforms, so the gradients agree with eager's to rounding."""
    batches = _batches("bert", 3)
    expected = _recommended("bert")
    expected_grads = _train(expected, batches, planned=True)
    _assert_same(expected_grads, _compiled_model_run("bert", batches, "inductor", fullgraph=False), exact=False)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_hugging_face_checkpointing_around_the_recomputes_is_refused_under_compile_by_name(fullgraph):
    """Dynamo cannot trace a checkpoint nested in another: the error says which two and what to use."""
    batches = _batches("bert", 1)
    model = _recommended("bert")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=fullgraph, backend="eager")
    with pytest.raises(Exception, match="cannot trace Hugging Face gradient checkpointing around the recompute"):
        _train(model, batches, planned=True, step=_step(compiled))
