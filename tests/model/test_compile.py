"""Static-cache generation, torch.compile, torch.export and torch.jit.trace on a tiny model with the shipped choices.

Graph breaks and recompiles are dynamo's decisions, made before any backend runs, so most tests compile with the
"eager" backend (seconds); one runs inductor end to end. They are marked `compile` and run in CI like the rest.
"""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import StaticCache

from conftest import tiny_model
from modeling_csp import CSPForCausalLM

pytestmark = pytest.mark.compile


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def prompt(B=2, T=7, seed=1):
    return torch.randint(0, 99, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded(ids: torch.Tensor, n_pad: int) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :n_pad] = 0
    return mask


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_generation_equals_the_dynamic_cache(padded):
    model, ids = tiny_model(), prompt()
    kwargs = dict(attention_mask=left_padded(ids, 3)) if padded else {}
    kwargs |= dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        dynamic = model.generate(ids, **kwargs)
        static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    for step, (s, d) in enumerate(zip(static.logits, dynamic.logits)):  # prefill included: no empty slot is seen
        assert (s - d).abs().max() <= 1e-4, step


def test_a_static_cache_without_a_mask_masks_its_empty_slots():
    model, ids = tiny_model(), prompt(B=1, T=8)
    cache = StaticCache(config=model.config, max_cache_len=20)
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :5], cache=cache).logits
        rest = model(ids[:, 5:], cache=cache).logits
    assert (prefix - full[:, :5]).abs().max() <= 1e-5 and (rest - full[:, 5:]).abs().max() <= 1e-5


def test_fullgraph_compiled_forward_equals_eager():
    model, ids = tiny_model(), prompt()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager = model(ids).logits
        assert (compiled(ids).logits - eager).abs().max() <= 1e-5
        mask = left_padded(ids, 3)
        assert (compiled(ids, attention_mask=mask).logits - model(ids, attention_mask=mask).logits).abs().max() <= 1e-5
    assert not counters["graph_break"]


def test_fullgraph_compiled_static_cache_decoding_compiles_twice_and_then_never():
    """Prefill and decoding step compile once each; every later token and every later call reuse them."""
    model, ids = tiny_model(), prompt()
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)
        model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
        first = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
        graphs = [counters["stats"]["unique_graphs"]]
        for _ in range(2):
            again = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
            assert torch.equal(again, expected)
            graphs.append(counters["stats"]["unique_graphs"])
    assert torch.equal(first, expected)
    # Older transformers (5.13) initialise a StaticCache lazily, and its `is_initialized` flag costs one recompile
    # on the second call; from then on nothing compiles, on every version.
    assert graphs[0] == 2 and graphs[1] <= 3 and graphs[2] == graphs[1], graphs
    assert not counters["graph_break"]


def test_default_compile_of_sparse_kernel_model_neither_breaks_nor_recompiles_per_call():
    """The sparse kernels' weight checks and the norms' hook names once made dynamo recompile at every call until it
    gave up (its recompile limit, 8); now the whole forward is one graph per input shape."""
    model = tiny_model()
    assert any(m.use_sparse_kernel for m in model.modules() if hasattr(m, "use_sparse_kernel"))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for _ in range(3):
            for T in (5, 9):
                ids = prompt(T=T)
                assert (compiled(ids, use_cache=False).logits - model(ids, use_cache=False).logits).abs().max() <= 1e-5
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] <= 2  # T=5, then T dynamic


def test_inductor_compiled_forward_equals_eager():
    model, ids = tiny_model(), prompt()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert (compiled(ids, use_cache=False).logits - model(ids, use_cache=False).logits).abs().max() <= 1e-4


def test_export_of_the_forward_equals_eager():
    model, ids = tiny_model(), prompt()
    exported = torch.export.export(model, (ids,), kwargs={"use_cache": False})
    other = prompt(seed=2)  # a program, not a recording of one input's values
    with torch.no_grad():
        assert (exported.module()(other, use_cache=False).logits - model(other, use_cache=False).logits).abs().max() <= 1e-5


def test_jit_trace_of_the_forward_equals_eager():
    model, ids = tiny_model(), prompt()
    model.config.use_cache, model.config.return_dict = False, False
    with torch.no_grad():
        traced = torch.jit.trace(model, (ids,), check_trace=False)
        other = prompt(seed=2)
        assert (traced(other)[0] - model(other)[0]).abs().max() <= 1e-5


def test_hook_points_stay_out_of_compiled_graphs_and_still_work_eagerly():
    model, ids = tiny_model(), prompt()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad(), model.record_activations(["0.resid_mid"]) as acts:
        compiled(ids, use_cache=False)
        assert "0.resid_mid" not in acts
        model(ids, use_cache=False)
        assert acts["0.resid_mid"].shape == (2, 7, 32)


def test_the_model_declares_it_compiles_fullgraph():
    assert CSPForCausalLM._can_compile_fullgraph
