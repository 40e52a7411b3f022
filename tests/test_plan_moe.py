"""jmp.plan for a mixture of experts (GPT with ``n_experts``), against what XLA compiles.

Under ep, dp_ep, fsdp_ep and dp the planner's bytes per mesh axis (the dispatch and combine
all-to-alls over 'expert', the gradient reductions over the joint batch axes, the routing
statistics) must equal those of the compiled train step on simulated CPU devices; the
parameter arrays must be the model's; memory and FLOPs count total and active parameters.
"""

from __future__ import annotations

import pytest

import jmp
from jmp import plan
from jmp.models.gpt import GPTConfig
from tests.test_plan import assert_bytes_per_axis_equal, real_param_arrays
from tests.test_plan_cp import BATCH, compiled_step

ROUTED = GPTConfig.named("tiny", n_experts=8, top_k=2)  # every block a MoE block
MIXED = GPTConfig.named(  # a dense block, then a MoE block with a shared expert
    "tiny", n_experts=4, top_k=2, n_shared_experts=1, moe_every=2, moe_d_ff=96
)

CASES = [
    pytest.param("ep", "expert=8", ROUTED, id="ep-expert8"),
    pytest.param("dp_ep", "data=2,expert=4", MIXED, id="dp_ep-data2-expert4-shared"),
    pytest.param("fsdp_ep", "data=2,expert=4", ROUTED, id="fsdp_ep-data2-expert4"),
    pytest.param("dp", "data=8", MIXED, id="dp-data8-dropless"),
]


@pytest.mark.parametrize(("strategy", "spec", "cfg"), CASES)
def test_moe_prediction_equals_compiled_step(strategy, spec, cfg):
    mesh, compiled, batch_bytes = compiled_step(cfg, strategy, spec, 1)
    est = plan.estimate(cfg, dict(mesh.shape), strategy, batch_size=BATCH, device="cpu")

    found = jmp.inspect.collectives(compiled, mesh)
    assert_bytes_per_axis_equal(est, found, f"{strategy} {spec}")
    to_all = jmp.inspect.count(found, "all-to-all", ("expert",))
    assert to_all == sum(c.count for c in est.comm if c.kind == "all-to-all")
    assert (to_all > 0) == ("ep" in strategy)

    memory = jmp.inspect.memory(compiled)
    state = memory.arguments - batch_bytes
    assert abs(est.state_bytes - state) <= 0.10 * state, (est.state_bytes, state)
    working = est.grads_bytes + est.activations_bytes + est.gathered_bytes
    assert 0.3 <= working / memory.temporaries <= 2.0, (working, memory.temporaries)


def test_moe_param_arrays_are_the_models():
    real = real_param_arrays(MIXED)
    assert {a.path: (a.shape, a.names) for a in plan.param_arrays(MIXED)} == real


def test_moe_total_and_active_parameters():
    cfg = GPTConfig.named("1b", dtype="bfloat16", n_experts=8, top_k=2)
    dense = GPTConfig.named("1b", dtype="bfloat16")
    kw = dict(batch_size=64, device="h100")
    moe = plan.estimate(cfg, {"data": 8, "expert": 8}, "dp_ep", **kw)
    ref = plan.estimate(dense, {"data": 64}, "dp", **kw)
    # model FLOPs follow the active parameters (2 SwiGLU experts of 3 d f each, the router)
    d, f, L = cfg.d_model, cfg.hidden, cfg.n_layers
    extra = L * (d * 8 + 2 * 3 * d * f - 2 * d * f) * 6 * 64 * cfg.seq_len
    assert moe.flops * 64 == pytest.approx(ref.flops * 64 + extra)
    # every expert is stored, split 8 ways over 'expert'; the rest is replicated
    expert_bytes = L * 8 * 3 * d * f * 4
    assert moe.params_bytes == (cfg.num_params() * 4 - expert_bytes) + expert_bytes // 8
    assert cfg.num_active_params() < cfg.num_params()
    assert any(c.kind == "all-to-all" and c.axis == "expert" for c in moe.comm)


def test_moe_strategies_and_refusals():
    with pytest.raises(jmp.ConfigError, match="mixture of experts .* covers dp, ep, dp_ep"):
        plan.estimate(ROUTED, {"model": 8}, "tp", batch_size=16)
    with pytest.raises(jmp.ConfigError, match="n_experts=0"):
        plan.estimate(GPTConfig.named("tiny"), {"expert": 8}, "ep", batch_size=16)
    with pytest.raises(jmp.ShardingError, match="not divisible"):
        plan.estimate(MIXED, {"expert": 8}, "ep", batch_size=16)  # 4 experts over 8
    ranked = plan.search(ROUTED, 8, "cpu", batch_size=16)
    assert ranked and {e.strategy for e in ranked} <= {"dp", "ep", "dp_ep", "fsdp_ep"}
    dense = plan.search(GPTConfig.named("tiny"), 8, "cpu", batch_size=16)
    assert not any("ep" in e.strategy.split("_") for e in dense)
