"""jmp.plan against what XLA compiles.

The key check: for every strategy and several model shapes, compile the real train step on 8
simulated CPU devices and compare the planner's bytes per mesh axis with the collectives
``jmp.inspect`` finds in the HLO (within 5%), and its parameter + optimizer memory with the
compiled step's argument size (within 10%). Then the search (ranking, filtering with jmp's own
strict resolution) and bad input.
"""

from __future__ import annotations

import math
from collections import Counter

import jax
import numpy as np
import pytest
from flax import nnx

import jmp
import jmp.cli
from jmp import plan
from jmp.models.gpt import GPT, GPTConfig
from jmp.sharding import _path_str, logical_names
from jmp.train import TrainConfig, make_optimizer, make_step
from jmp.train.data import TextData

MESHES = {
    "dp": "data=8",
    "fsdp": "data=8",
    "tp": "model=8",
    "dp_tp": "data=2,model=4",
    "fsdp_tp": "data=2,model=4",
}
MODELS = {
    "tiny": GPTConfig.named("tiny"),  # d=64, 2 layers, 8 heads, vocab 256, seq 64
    "wide": GPTConfig(vocab_size=512, seq_len=32, d_model=128, n_layers=3, n_heads=8, d_ff=384),
    "narrow": GPTConfig(vocab_size=384, seq_len=48, d_model=96, n_layers=1, n_heads=8),
}
BATCH = 16

CASES = [pytest.param(m, s, {}, id=f"{m}-{s}") for m in MODELS for s in MESHES]
CASES += [
    pytest.param("tiny", s, {"remat": True}, id=f"tiny-{s}-remat")
    for s in ("fsdp", "dp_tp", "fsdp_tp")
]
CASES += [pytest.param("tiny", s, {"microbatches": 2}, id=f"tiny-{s}-mb2") for s in MESHES]
CASES += [
    pytest.param(
        "tiny", "fsdp_tp", {"dtype": "bfloat16", "param_dtype": "bfloat16"}, id="tiny-fsdp_tp-bf16"
    ),
    pytest.param("tiny", "fsdp", {"seq_len": 32}, id="tiny-fsdp-seq32"),
]


def measured_per_axis(found) -> dict[str, int]:
    out: Counter = Counter()
    for c in found:
        out[",".join(c.axes)] += c.total_bytes
    return dict(out)


def assert_bytes_per_axis_match(est, found, label):
    """Predicted bytes per mesh axis within 5% of the compiled step's; else show both lists."""
    measured = measured_per_axis(found)
    bad = {
        a: (est.comm_bytes.get(a, 0), measured.get(a, 0))
        for a in set(est.comm_bytes) | set(measured)
        if abs(est.comm_bytes.get(a, 0) - measured.get(a, 0)) > 0.05 * measured.get(a, 0)
    }
    assert not bad, (
        f"{label}: bytes per axis (predicted, measured) differ by more than 5%: {bad}\n"
        f"measured collectives (kind, axes, bytes, count):\n{describe_measured(found)}\n"
        f"predicted:\n{est.comm_report()}"
    )


def assert_bytes_per_axis_equal(est, found, label):
    """Predicted bytes per mesh axis equal to the compiled step's, byte for byte."""
    measured = measured_per_axis(found)
    assert est.comm_bytes == measured, (
        f"{label}: bytes per axis (predicted {est.comm_bytes}, measured {measured})\n"
        f"measured collectives:\n{describe_measured(found)}\npredicted:\n{est.comm_report()}"
    )


def real_param_arrays(cfg) -> dict:
    """path -> (shape, logical names) of every parameter of ``GPT(cfg)``, from the model."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    real = {}
    jax.tree_util.tree_map_with_path(
        lambda p, v: real.setdefault(
            _path_str(p), (tuple(v.get_raw_value().shape), logical_names(v))
        ),
        nnx.state(abstract, nnx.Param),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return real


def describe_measured(found) -> str:
    grouped: Counter = Counter()
    for c in found:
        grouped[(c.kind, c.axes, c.bytes)] += c.count
    return "\n".join(
        f"  {k:14s} {a!s:20s} {b:>12,d} B x{n}"
        for (k, a, b), n in sorted(grouped.items(), key=lambda kv: -kv[0][2])
    )


# --- the key check -----------------------------------------------------------------------------


def _compile(cfg: GPTConfig, strategy: str, make_mesh, microbatches: int, seq_len: int):
    mesh = make_mesh(MESHES[strategy])
    rules = jmp.rules.preset(strategy, mesh)
    model = jmp.shard_init(lambda r: GPT(cfg, rngs=r), mesh, rules)
    step = make_step(
        model, make_optimizer(TrainConfig(batch_size=BATCH)), mesh, rules, microbatches=microbatches
    )
    state = step.init_state()
    tokens = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint8)
    batch = TextData.from_tokens(tokens).batch(
        0, batch_size=BATCH, seq_len=seq_len, mesh=mesh, rules=rules
    )
    compiled = step.lower(state, batch).compile()
    batch_bytes = sum(x.addressable_shards[0].data.nbytes for x in batch)
    return mesh, compiled, batch_bytes


@pytest.mark.parametrize(("model", "strategy", "options"), CASES)
def test_prediction_matches_compiled_step(model, strategy, options, make_mesh):
    options = dict(options)
    microbatches = options.pop("microbatches", 1)
    seq_len = options.pop("seq_len", MODELS[model].seq_len)  # shorter: uses part of `position`
    cfg = GPTConfig(**{**MODELS[model].to_dict(), **options})
    mesh, compiled, batch_bytes = _compile(cfg, strategy, make_mesh, microbatches, seq_len)
    est = plan.estimate(
        cfg,
        dict(mesh.shape),
        strategy,
        batch_size=BATCH,
        seq_len=seq_len,
        microbatches=microbatches,
        device="cpu",
    )

    found = jmp.inspect.collectives(compiled, mesh)
    assert_bytes_per_axis_match(est, found, f"{model} {strategy} {options or ''} mb={microbatches}")

    memory = jmp.inspect.memory(compiled)
    state = memory.arguments - batch_bytes
    assert abs(est.state_bytes - state) <= 0.10 * state, (
        f"params+optimizer: predicted {est.state_bytes:,d} B (params {est.params_bytes:,d}, "
        f"optimizer {est.optimizer_bytes:,d}), compiled arguments minus batch {state:,d} B"
    )
    # Activations are an estimate, not a match: XLA's temporaries also hold optimizer-update
    # intermediates and its own copies. Check only that the order of magnitude is right (not
    # with remat: at these sizes XLA:CPU's temporaries do not shrink with it, the model's do).
    working = est.grads_bytes + est.activations_bytes + est.gathered_bytes
    if not cfg.remat:
        assert 0.45 <= working / memory.temporaries <= 1.5, (working, memory.temporaries)


# --- the model's parameters --------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "wide"])
def test_param_arrays_are_the_models(model):
    cfg = MODELS[model]
    real = real_param_arrays(cfg)
    predicted = {a.path: (a.shape, a.names) for a in plan.param_arrays(cfg)}
    assert predicted == real
    assert sum(math.prod(s) for s, _ in predicted.values()) == cfg.num_params()


# --- estimate details --------------------------------------------------------------------------


def test_estimate_times_and_fields():
    est = plan.estimate(
        GPTConfig.named("tiny"), {"data": 2, "model": 4}, "dp_tp", batch_size=8, device="h100"
    )
    assert est.step_time == pytest.approx(est.compute_time + est.comm_time)
    assert 0 < est.mfu <= 1 and est.fits
    assert est.total_bytes == (
        est.params_bytes
        + est.grads_bytes
        + est.optimizer_bytes
        + 4
        + est.activations_bytes
        + est.gathered_bytes
    )
    assert {c.axis for c in est.comm} == {"data", "model"}
    assert any("layer 1 MLP down row-parallel forward" in c.what for c in est.comm)
    for words in ("/device of", "communicated per step", "compute +", "MFU"):
        assert words in est.reason


def test_gpu_reduce_scatters_fsdp_gradients():
    cfg = GPTConfig.named("tiny")
    cpu = plan.estimate(cfg, {"data": 8}, "fsdp", batch_size=8, device="cpu")
    gpu = plan.estimate(cfg, {"data": 8}, "fsdp", batch_size=8, device="h100")
    cpu_grads = sum(c.total_bytes for c in cpu.comm if "gradient all-reduce" in c.what)
    gpu_grads = sum(
        c.total_bytes
        for c in gpu.comm
        if "gradient" in c.what
        and c.kind in ("reduce-scatter", "all-reduce")
        and "norm" not in c.what
    )
    assert {c.kind for c in gpu.comm} >= {"reduce-scatter", "all-gather", "all-to-all"}
    assert "reduce-scatter" not in {c.kind for c in cpu.comm}
    assert gpu_grads < cpu_grads / 4


# --- search ------------------------------------------------------------------------------------


def test_search_7b_on_64_h100():
    cfg = GPTConfig.named("7b", dtype="bfloat16")
    everything = plan.search(cfg, 64, "h100", batch_size=64, include_unfit=True)
    ranked = plan.search(cfg, 64, "h100", batch_size=64)
    dp = [e for e in everything if e.strategy == "dp"]
    assert len(dp) == 1 and not dp[0].fits  # 4 copies of 5.3B float32 parameters: > 80 GB
    assert dp[0].total_bytes > plan.DEVICES["h100"].memory_bytes
    assert ranked and all(e.fits for e in ranked) and "dp" not in {e.strategy for e in ranked}
    assert [e.step_time for e in ranked] == sorted(e.step_time for e in ranked)
    assert ranked[0].fits and "MFU" in ranked[0].reason
    table = plan.format_table(ranked)
    assert table.row_count == len(ranked)


def test_search_keeps_exactly_what_jmp_accepts():
    """Every candidate resolves with jmp.partition_specs on a real mesh; every other doesn't."""
    cfg = GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_layers=1, n_heads=4)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    kept = {
        (e.strategy, e.mesh) for e in plan.search(cfg, 8, "cpu", batch_size=8, include_unfit=True)
    }
    # n_layers=1: no pipeline (a stage axis > 1 has no block to hold)
    assert not {s for s, _ in kept if s.startswith("pp")}
    # a dense model has no experts: ep strategies (a batch split jmp accepts) are not planned
    planned = [s for s in plan.STRATEGIES if not s.startswith("pp") and "ep" not in s.split("_")]
    for strategy in planned:
        for shape in plan.candidate_shapes(strategy, 8):
            mesh = jmp.make_mesh(shape)
            try:
                jmp.partition_specs(abstract, jmp.rules.preset(strategy, mesh), mesh)
                accepted = True
            except jmp.ShardingError:
                accepted = False
            assert accepted == ((strategy, jmp.mesh.format_mesh_shape(shape)) in kept), shape
    assert ("tp", "model=8") not in kept  # 4 heads over 8 devices
    assert ("dp_tp", "data=2,model=4") in kept
    # a batch of 4 rows cannot split over data=8
    assert "dp" not in {e.strategy for e in plan.search(cfg, 8, "cpu", batch_size=4)}


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_errors():
    cfg = GPTConfig.named("tiny")
    with pytest.raises(jmp.ConfigError, match="h100.*h200.*a100.*cpu"):
        plan.get_device("tpu9")
    with pytest.raises(jmp.ConfigError, match="Unknown device 'tpu9'"):
        plan.estimate(cfg, {"data": 8}, "dp", batch_size=8, device="tpu9")
    with pytest.raises(jmp.ConfigError, match="Strategy 'zero3' is not in the.*fsdp_tp"):
        plan.estimate(cfg, {"data": 8}, "zero3", batch_size=8)
    with pytest.raises(jmp.ConfigError, match="n_layers=2"):
        plan.estimate(cfg, {"stage": 4, "data": 2}, "pp_dp", batch_size=8)
    with pytest.raises(jmp.ConfigError, match="schedule='zb'"):
        plan.estimate(cfg, {"stage": 2, "data": 4}, "pp_dp", batch_size=8, schedule="zb")
    with pytest.raises(jmp.ConfigError, match=r"Strategies \['zero3'\] are not"):
        plan.search(cfg, 8, "cpu", batch_size=8, strategies=["dp", "zero3"])
    with pytest.raises(jmp.ShardingError, match="needs mesh axes"):
        plan.estimate(cfg, {"data": 8}, "tp", batch_size=8)
    with pytest.raises(jmp.ShardingError, match="not divisible"):
        plan.estimate(cfg, {"model": 16}, "tp", batch_size=8)  # 8 heads over 16
    with pytest.raises(jmp.ConfigError, match="multiple of 8"):
        plan.estimate(cfg, {"data": 8}, "dp", batch_size=12)
    with pytest.raises(jmp.ConfigError, match="seq_len=128 exceeds"):
        plan.estimate(cfg, {"data": 8}, "dp", batch_size=8, seq_len=128)
    with pytest.raises(jmp.ConfigError, match="positive"):
        plan.Device("x", 0, 1, 1)


# --- pipelines ---------------------------------------------------------------------------------

PP_CFG = GPTConfig.named("tiny", n_layers=4)
PP_MESHES = [
    ("pp_dp", "stage=2,data=4"),
    ("pp_dp", "stage=4,data=2"),
    ("pp_dp_tp", "stage=2,data=2,model=2"),
]
PP_CASES = [
    pytest.param(st, spec, k, schedule, id=f"{spec}-M{k}S-{schedule}")
    for st, spec in PP_MESHES
    for k in (1, 2)
    for schedule in ("1f1b", "gpipe")
]


@pytest.mark.parametrize(("strategy", "spec", "k", "schedule"), PP_CASES)
def test_pipeline_prediction_matches_compiled_step(strategy, spec, k, schedule, make_mesh):
    """The step the GPT loop makes for a stage mesh, compiled from abstract shapes."""
    from jmp.pipeline import PipelinedGPT, make_loss_fn

    mesh = make_mesh(spec)
    S = mesh.shape["stage"]
    M = k * S
    rules = jmp.rules.preset(strategy, mesh)
    with nnx.use_eager_sharding(False):  # shapes only: the loop shard_inits the same
        model = nnx.eval_shape(lambda: PipelinedGPT(PP_CFG, num_stages=S, rngs=nnx.Rngs(0)))
    step = make_step(
        model,
        make_optimizer(TrainConfig(batch_size=BATCH)),
        mesh,
        rules,
        loss_fn=make_loss_fn(mesh=mesh, num_microbatches=M, schedule=schedule),
    )
    batch = step.abstract_batch(BATCH, PP_CFG.seq_len)
    compiled = step.lower(step.abstract_state(), batch).compile()
    est = plan.estimate(
        PP_CFG,
        dict(mesh.shape),
        strategy,
        batch_size=BATCH,
        microbatches=M,
        schedule=schedule,
        device="cpu",
    )

    found = jmp.inspect.collectives(compiled, mesh)
    assert_bytes_per_axis_match(est, found, f"{strategy} {spec} M={M} {schedule}")
    permutes = jmp.inspect.count(found, "collective-permute", ("stage",))
    assert permutes == sum(c.count for c in est.comm if c.kind == "collective-permute")

    arrays = jmp.inspect.memory(compiled).arguments
    batch_bytes = sum(
        x.sharding.shard_shape(x.shape)[0] * x.shape[1] * x.dtype.itemsize for x in batch
    )
    state = arrays - batch_bytes
    assert abs(est.state_bytes - state) <= 0.10 * state, (
        f"params+optimizer: predicted {est.state_bytes:,d} B (params {est.params_bytes:,d}, "
        f"optimizer {est.optimizer_bytes:,d}), compiled arguments minus batch {state:,d} B"
    )
    assert f"bubble {(S - 1) / (M + S - 1):.0%}" in est.reason


def test_pipeline_memory_time_and_search():
    cfg = GPTConfig.named("1b", dtype="bfloat16")
    kw = dict(batch_size=64, device="h100", microbatches=8)
    gpipe = plan.estimate(cfg, {"stage": 4, "data": 2}, "pp_dp", schedule="gpipe", **kw)
    onef = plan.estimate(cfg, {"stage": 4, "data": 2}, "pp_dp", schedule="1f1b", **kw)
    assert gpipe.params_bytes == onef.params_bytes
    assert onef.activations_bytes < gpipe.activations_bytes / 3  # 2S-1 inputs vs M+S-1 ticks
    assert gpipe.bubble == pytest.approx(3 / 11) and gpipe.schedule == "gpipe"
    # the bubble stretches the compute by (M+S-1)/M; the S-1 extra heads are executed work
    head = 2 * cfg.d_model * cfg.vocab_size * 64 * cfg.seq_len  # one forward, whole batch
    executed = gpipe.flops * 8 + 3 * head * (4 - 1)
    achieved = 989e12 * 0.6  # h100's peak at the planner's stated matmul efficiency
    assert gpipe.compute_time == pytest.approx(executed / 8 / achieved * 11 / 8, rel=1e-6)
    assert gpipe.step_time == pytest.approx(gpipe.compute_time + gpipe.comm_time)
    # blocks over 4 stages, the ends replicated: a quarter of the blocks' bytes and every end
    flat = plan.estimate(cfg, {"data": 8}, "dp", batch_size=64, device="h100")
    ends = sum(math.prod(a.shape) for a in plan.param_arrays(cfg) if a.layer is None) * 4
    assert gpipe.params_bytes == pytest.approx((flat.params_bytes - ends) / 4 + ends)

    ranked = plan.search(cfg, 8, "h100", batch_size=64, microbatches=8, include_unfit=True)
    pp = [e for e in ranked if e.strategy.startswith("pp")]
    assert {e.strategy for e in pp} == {"pp", "pp_dp", "pp_tp", "pp_dp_tp"}
    assert all(cfg.n_layers % e.mesh_shape["stage"] == 0 for e in pp)
    assert all("bubble" in e.reason for e in pp)
    assert [e.step_time for e in ranked if e.fits] == sorted(e.step_time for e in ranked if e.fits)


def test_step_time_states_its_efficiency_assumption(capsys):
    dev = plan.get_device("h100")
    est = plan.estimate(GPTConfig.named("tiny"), {"model": 8}, "tp", batch_size=8, device=dev)
    assert est.compute_time == pytest.approx(est.flops / (dev.peak_flops * 0.6))
    assert "60% of h100's peak 989 TFLOP/s" in dev.assumptions()
    assert "75% of its 450 GB/s" in dev.assumptions()
    with pytest.raises(jmp.ConfigError, match=r"matmul_efficiency=1.5 \(use a value in \(0, 1\]\)"):
        plan.Device("x", 1e12, 2**30, 1e9, matmul_efficiency=1.5)
    assert jmp.cli.main(["plan", "--model", "tiny", "--devices", "8", "--top", "1"]) == 0
    assert "assumes 60% of" in " ".join(capsys.readouterr().out.split())


def test_longest_sequence_is_the_edge_of_fitting():
    """The length longest_sequence returns fits, the next length the strategy accepts does not."""
    from dataclasses import replace

    from jmp.plan import longest_sequence

    cfg = GPTConfig.named("7b", dtype="bfloat16")
    for strategy, shape, unit in (
        ("fsdp_tp", {"data": 8, "model": 8}, 1),
        ("fsdp_tp_sp", {"data": 8, "model": 8}, 8),  # the sequence splits over 'model'
        ("fsdp_cp", {"data": 8, "context": 8}, 16),  # 2 x context chunks, load balanced
    ):
        n = longest_sequence(cfg, shape, strategy, batch_size=8, device="h100", remat=True)
        assert n > 0 and n % unit == 0, (strategy, n)

        def at(seq, strategy=strategy, shape=shape):
            return plan.estimate(
                replace(cfg, seq_len=seq), shape, strategy, batch_size=8, seq_len=seq,
                device="h100", remat=True,
            )  # fmt: skip

        assert at(n).fits and not at(n + unit).fits, (strategy, n)
