"""torch.compile paths of the generator: the compiled training forward (chunked loss) gives the eager loss and
gradients; the compiled decode step has no host syncs (``fullgraph=True`` compiles: no ``.item()``, no branching on
tensor values) and draws the same tokens as eager decoding; ``task.compile`` chooses (``auto``: CUDA only).

The fast tests compile with the ``eager`` backend (dynamo's whole-graph tracing, seconds); the ``slow`` ones with CPU
inductor (generated C++ kernels: one to two minutes each on 2 shared cores)."""

from __future__ import annotations

import functools

import pytest
import torch

from arlab.errors import ConfigError
from arlab.registry import get
from arlab.task.generator import GeneratorModule
from tests.generator.test_model import conditions, make, random_codes

SAMPLING = dict(cfg_scale=2.0, cfg_schedule="linear", top_k=5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def check_training(order: str, s: int, backend: str) -> None:
    g = make(order, s, depth=1).train()
    g.loss_chunk, g.z_loss_weight = 50, 1e-3
    codes, cond = random_codes(g, 2), conditions(g, 2)
    params = [p for p in g.parameters() if p.requires_grad]
    want = g(codes, cond, return_logits=False)
    want_g = torch.autograd.grad(want.loss, params)
    fn = torch.compile(functools.partial(g.forward, return_logits=False), backend=backend, fullgraph=True)
    got = fn(codes, cond)
    got_g = torch.autograd.grad(got.loss, params)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.ce_per_window_pos, want.ce_per_window_pos, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def check_decoding(order: str, s: int, backend: str) -> None:
    g = make(order, s, depth=1)
    cond = conditions(g, 2)
    want = g.sample(cond, generator=torch.Generator().manual_seed(0), **SAMPLING)
    g.compile_decode("default", backend=backend)  # fullgraph=True: a graph break (a host sync) fails
    for _ in range(2):  # the second call reuses the compiled step and the pooled decode states
        assert torch.equal(g.sample(cond, generator=torch.Generator().manual_seed(0), **SAMPLING), want)
    g.compile_decode(None)
    assert torch.equal(g.sample(cond, generator=torch.Generator().manual_seed(0), **SAMPLING), want)


def test_compiled_training_forward_traces_whole_and_equals_eager():
    check_training("raster", 2, "eager")


@pytest.mark.parametrize("order,s", [("raster", 2), ("next_scale", 1)])
def test_compiled_decode_step_has_no_host_syncs_and_draws_the_same_tokens(order, s):
    check_decoding(order, s, "eager")


@pytest.mark.slow
@pytest.mark.parametrize("order,s", [("raster", 2), ("next_scale", 1), ("neighbor", 1)])
def test_inductor_training_equals_eager(order, s):
    check_training(order, s, "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("order,s", [("raster", 1), ("raster", 2), ("next_scale", 1), ("neighbor", 1)])
def test_inductor_decode_draws_the_same_tokens(order, s):
    check_decoding(order, s, "inductor")


def module(compile_opt) -> GeneratorModule:
    exp = {"backbone": {"type": "llama", "dim": 32, "depth": 1, "heads": 2, "multiple_of": 32},
           "order": {"type": "raster"}, "shuffle": {"type": "window", "s": 1}, "conditioner": {"type": "class"},
           "task": {"type": "generator", "tokenizer_ckpt": "unused.ckpt", "compile": compile_opt}}
    meta = {"vocab_size": 16, "grid": [4, 4], "scales": [4], "num_classes": 3, "classes": ["a", "b", "c"]}
    return GeneratorModule(experiment=exp, meta=meta)


def test_task_compile_option():
    assert isinstance(module("auto").train_forward(), functools.partial)  # auto: eager on CPU
    assert not isinstance(module(True).train_forward(), functools.partial)  # compiled (lazily, on the first call)
    assert module(True).cfg.loss_chunk == 4096  # the chunked loss is the task's default
    with pytest.raises(ConfigError, match="compile='yes': must be true, false or auto"):
        get("task", "generator").config(compile="yes")
