"""Pipeline parallelism: stage splits, schedules, and the pipelined GPT against the plain GPT.

Every pipelined run is compared with the same model unpipelined on one device (same seed, same
batch): loss and gradients in float32 to 1e-5 relative. Compiled programs are cached per
(mesh, schedule, M) and reused by the HLO and memory checks, so each compiles once.
"""

import functools
import math
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import jmp
from jmp.inspect import collectives, memory
from jmp.losses import cross_entropy
from jmp.models import GPT, GPTConfig
from jmp.pipeline import (
    PipelinedGPT,
    check_pipeline,
    make_loss_fn,
    make_schedule,
    pipeline_loss_and_grads,
    split_stages,
    stack_params,
    unstack_params,
)
from jmp.train import TrainConfig, make_optimizer, make_step
from jmp.train.data import TextData

CFG = GPTConfig.named("tiny", n_layers=4, d_model=32, n_heads=4, seq_len=16)
BATCH = 16  # every run sees the same batch; M microbatches of BATCH / M rows
TOKENS = np.random.default_rng(0).integers(
    0, CFG.vocab_size, (BATCH, CFG.seq_len + 1), dtype=np.int32
)
INPUTS, TARGETS = TOKENS[:, :-1], TOKENS[:, 1:]

# (mesh, strategy, num_microbatches): S in {2, 4}, M in {S, 2S}, then data and tensor axes.
CASES = [
    ("stage=2,data=1", "dp", 2),
    ("stage=2,data=1", "dp", 4),
    ("stage=4,data=1", "dp", 4),
    ("stage=4,data=1", "dp", 8),
    ("stage=2,data=2,model=2", "dp_tp", 4),
    ("stage=4,data=2", "dp", 4),
]


def rules_for(strategy, mesh):
    """The pipeline preset ('pp_dp', 'pp_dp_tp') once jmp.rules has it, else the plain one
    (which today maps 'stage' -> 'stage' and lets a 'stage' axis through)."""
    name = f"pp_{strategy}"
    return jmp.rules.preset(name if name in jmp.rules.STRATEGIES else strategy, mesh)


def mesh_of(spec):
    n = math.prod(int(part.split("=")[1]) for part in spec.split(","))
    return jmp.make_mesh(spec, devices=jax.devices()[:n])


def make(cls, **kwargs):
    """(graphdef, state) of a model initialised by one jitted call (eager init is slow)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: cls(CFG, rngs=nnx.Rngs(0), **kwargs)))
    return graphdef, jax.jit(lambda: nnx.state(cls(CFG, rngs=nnx.Rngs(0), **kwargs)))()


@functools.cache
def reference():
    """(graphdef, params, loss, grads) of the plain GPT on one device."""
    graphdef, params = make(GPT)
    loss, grads = jax.jit(
        jax.value_and_grad(lambda p: cross_entropy(nnx.merge(graphdef, p)(INPUTS), TARGETS))
    )(params)
    return graphdef, params, float(loss), grads


@functools.cache
def pipelined(spec, strategy, schedule, M):
    """(mesh, compiled program, loss, grads) of one pipelined run of the batch."""
    mesh = mesh_of(spec)
    rules = rules_for(strategy, mesh)
    S = mesh.shape["stage"]
    graphdef = nnx.graphdef(
        nnx.eval_shape(lambda: PipelinedGPT(CFG, num_stages=S, rngs=nnx.Rngs(0)))
    )
    params = stack_params(reference()[1], S)  # the reference's own parameters, stacked
    params = jax.device_put(params, jmp.named_shardings(params, rules, mesh))
    rows = NamedSharding(mesh, rules.activation_spec(("batch", None), mesh=mesh))
    batch = (jax.device_put(INPUTS, rows), jax.device_put(TARGETS, rows))

    def run(params, batch):
        with jmp.activate(mesh, rules):
            return pipeline_loss_and_grads(
                nnx.merge(graphdef, params), batch, mesh=mesh, num_microbatches=M, schedule=schedule
            )

    with jmp.activate(mesh, rules):
        compiled = jax.jit(run).lower(params, batch).compile()
    loss, grads = compiled(params, batch)
    return mesh, compiled, float(loss), grads


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --- the model and its layout ----------------------------------------------------------------


def test_same_seed_same_model_and_round_trip():
    gpt_def, gpt_state = reference()[:2]
    graphdef, state = make(PipelinedGPT, num_stages=2)
    piped = nnx.merge(graphdef, state)
    assert piped.blocks.attn.qkv.shape[:2] == (2, 2)
    assert piped.blocks.attn.qkv.get_metadata()["out_sharding"][:2] == ("stage", "layers")

    def same(a, b):
        return all(
            np.array_equal(x, y)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)  # noqa: E731
        )

    assert same(state, stack_params(gpt_state, 2))
    assert same(unstack_params(state), gpt_state)
    gpt = nnx.merge(gpt_def, gpt_state)
    logits = jax.jit(lambda m: (m(INPUTS), PipelinedGPT.from_gpt(m, num_stages=4)(INPUTS)))
    want, got = logits(gpt)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda m: m(INPUTS))(piped), want, rtol=1e-5, atol=1e-6)
    assert same(nnx.state(piped.to_gpt()), gpt_state)


def test_stage_split_report():
    uniform = split_stages(CFG, 2)
    assert uniform.blocks == (2, 2) and uniform.uniform
    big = GPTConfig.named("1b")  # vocab 32000 x 2048: the embedding weighs ~1.3 blocks
    by_params = split_stages(big, 4, balance="params")
    assert sum(by_params.blocks) == 24 and not by_params.uniform
    assert by_params.blocks[0] < by_params.blocks[1] and by_params.blocks[-1] < by_params.blocks[1]
    assert by_params.imbalance("params") < split_stages(big, 4).imbalance("params")
    assert sum(by_params.params) == big.num_params()
    by_flops = split_stages(big, 4, balance="flops")
    assert by_flops.blocks[-1] < by_flops.blocks[1]  # the head's matmul is on the last stage
    assert by_flops.imbalance("flops") <= split_stages(big, 4).imbalance("flops")
    text = by_params.table()
    assert "stage split (params)" in text and "total" in text
    assert len(text.splitlines()) == 4 + 3  # title, header, 4 stages, total


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S,M", [(1, 3), (2, 2), (2, 4), (4, 4), (4, 8), (4, 2), (3, 7)])
def test_schedule_is_valid_and_has_the_theoretical_bubble(name, S, M):
    plan = make_schedule(name, S, M)
    fwd, bwd = plan.forward, plan.backward
    tick_f = {(m, s): t for t, s in zip(*np.nonzero(fwd >= 0), strict=True) for m in [fwd[t, s]]}
    tick_b = {(m, s): t for t, s in zip(*np.nonzero(bwd >= 0), strict=True) for m in [bwd[t, s]]}
    assert sorted(tick_f) == sorted(tick_b) == [(m, s) for m in range(M) for s in range(S)]
    assert (fwd >= 0).sum() == (bwd >= 0).sum() == S * M  # each exactly once
    for m in range(M):
        for s in range(S):
            assert tick_b[m, s] >= tick_f[m, s]
            if s:
                assert tick_f[m, s] > tick_f[m, s - 1]  # activation arrives a tick later
            if s < S - 1:
                assert tick_b[m, s] > tick_b[m, s + 1]  # cotangent arrives a tick later
    np.testing.assert_allclose(plan.idle_fraction(), (S - 1) / (M + S - 1))
    np.testing.assert_allclose(plan.idle_fraction(1.0, 1.0), (S - 1) / (M + S - 1))
    if name == "gpipe":
        assert list(plan.in_flight()) == [M] * S
    else:
        assert list(plan.in_flight()) == [min(M, 2 * (S - 1 - s) + 1) for s in range(S)]


# --- numbers: the pipelined run equals the plain GPT -----------------------------------------


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("spec,strategy,M", CASES)
def test_loss_and_grads_match_unpipelined(spec, strategy, M, schedule):
    mesh, _, loss, grads = pipelined(spec, strategy, schedule, M)
    _, _, ref_loss, ref_grads = reference()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    want = dict(jax.tree_util.tree_leaves_with_path(stack_params(ref_grads, mesh.shape["stage"])))
    got = jax.tree_util.tree_leaves_with_path(grads)
    assert len(got) == len(want)
    for path, g in got:
        assert g.shape == want[path].shape, jax.tree_util.keystr(path)
        assert rel_err(g, want[path]) < 1e-5, jax.tree_util.keystr(path)


def _permute_pairs(compiled):
    """The (source, target) device pairs of every collective-permute in the HLO."""
    pairs = []
    for line in compiled.as_text().splitlines():
        if re.search(r"collective-permute(-start)?\(", line):
            found = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
            assert found, line
            pairs.append(
                [(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", found.group(1))]
            )
    return pairs


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("spec,strategy,M", [CASES[3], CASES[4], CASES[5]])
def test_collective_permutes_only_between_neighbouring_stages(spec, strategy, M, schedule):
    mesh, compiled, _, _ = pipelined(spec, strategy, schedule, M)
    permutes = [c for c in collectives(compiled, mesh) if c.kind == "collective-permute"]
    assert permutes and all(c.axes == ("stage",) for c in permutes)
    stage_dim = list(mesh.shape).index("stage")
    groups = _permute_pairs(compiled)
    assert len(groups) == len(permutes)
    for pairs in groups:
        for src, dst in pairs:
            a = np.unravel_index(src, mesh.devices.shape)
            b = np.unravel_index(dst, mesh.devices.shape)
            step = int(b[stage_dim]) - int(a[stage_dim])
            assert abs(step) == 1, (src, dst)  # no wrap-around: last -> first never happens
            assert all(a[d] == b[d] for d in range(len(a)) if d != stage_dim)


def test_1f1b_temporary_memory_is_at_most_gpipes_and_the_ratio_drops_with_m():
    """Same batch, more microbatches: GPipe keeps (M + S - 1) / M batches' worth of activations
    (falling towards one batch), 1F1B at most 2S - 1 stage inputs of ever smaller microbatches
    (falling like 1 / M). Measured: ratios 0.51, 0.37, 0.26 for M = 2, 4, 8."""
    spec, ms = "stage=2,data=1", (2, 4, 8)
    temps = {
        (s, m): memory(pipelined(spec, "dp", s, m)[1]).temporaries
        for s in ("gpipe", "1f1b")
        for m in ms
    }
    ratios = [temps["1f1b", m] / temps["gpipe", m] for m in ms]
    assert all(r <= 1.0 for r in ratios), temps
    assert all(a > b for a, b in zip(ratios, ratios[1:], strict=False)), (ratios, temps)


# --- errors -------------------------------------------------------------------------------


def test_stage_axis_that_does_not_divide_the_layers_is_rejected(make_mesh):
    mesh = make_mesh("stage=4,data=2")
    cfg = GPTConfig.named("tiny", n_layers=6, d_model=32, n_heads=4, seq_len=16)
    with pytest.raises(jmp.JmpError) as err:
        PipelinedGPT(cfg, num_stages=mesh.shape["stage"], rngs=nnx.Rngs(0))
    assert isinstance(err.value, ValueError)
    text = str(err.value)
    assert "n_layers=6" in text and "4 stages" in text and "Fix" in text and "[1, 2, 3, 6]" in text
    with pytest.raises(jmp.ConfigError, match="exceed n_layers=4"):
        split_stages(CFG, 8)
    model = nnx.eval_shape(lambda: PipelinedGPT(CFG, num_stages=2, rngs=nnx.Rngs(0)))
    with pytest.raises(jmp.ConfigError, match=r"2 stages but the mesh's 'stage' axis has size 4"):
        check_pipeline(model, mesh, num_microbatches=4)
    with pytest.raises(jmp.ConfigError, match="no 'stage' axis"):
        check_pipeline(model, make_mesh("data=8"), num_microbatches=4)


# --- training ------------------------------------------------------------------------------


def test_pipelined_training_converges_like_data_parallel(make_mesh):
    """20 AdamW steps: 1F1B on stage=4,data=2 follows the dp run on data=8 step by step.

    Same initial parameters (same seed), same batches, same optimizer: the runs differ only in
    how float32 sums are grouped (per microbatch, per stage), ~1e-7 relative per step (measured
    <= 3e-7 after 20 steps). rtol=1e-4 leaves room for that drift and still fails loudly on a
    real schedule bug (a microbatch dropped or counted twice moves the loss by ~1e-2).
    """
    cfg = GPTConfig.named("tiny", n_layers=4, d_model=32, n_heads=4, seq_len=32)
    train = TrainConfig(steps=20, batch_size=16, lr=3e-3, warmup_steps=2)
    data = TextData.from_paths(None, max_bytes=200_000)

    def run(spec, make, **kwargs):
        mesh = make_mesh(spec)
        rules = rules_for("dp", mesh) if "stage" in spec else jmp.rules.preset("dp", mesh)
        model = jmp.shard_init(make, mesh, rules, seed=0)
        loss_fn = kwargs.get("loss_fn")
        step = make_step(
            model,
            make_optimizer(train),
            mesh,
            rules,
            **({"loss_fn": loss_fn(mesh)} if loss_fn else {}),
        )
        state, losses = step.init_state(), []
        for k in range(train.steps):
            batch = data.batch(
                k, batch_size=train.batch_size, seq_len=cfg.seq_len, mesh=mesh, rules=rules
            )
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        return np.array(losses), state

    ref, _ = run("data=8", lambda rngs: GPT(cfg, rngs=rngs))
    piped, state = run(
        "stage=4,data=2",
        lambda rngs: PipelinedGPT(cfg, num_stages=4, rngs=rngs),
        loss_fn=lambda mesh: make_loss_fn(mesh=mesh, num_microbatches=4, schedule="1f1b"),
    )
    np.testing.assert_allclose(piped, ref, rtol=1e-4)
    assert piped[-3:].mean() < piped[0] - 0.8  # it learns: ~5.6 -> ~4.4 nats/byte
    qkv = state.params["blocks"]["attn"]["qkv"][...]
    assert qkv.sharding.spec[0] == "stage"  # block parameters stay split over stages
    assert optax.tree.norm(state.params) > 0
    # every copy of a replicated parameter (the head, over stage and data) is identical
    for shard in state.params["head"]["kernel"][...].addressable_shards:
        np.testing.assert_array_equal(
            np.asarray(shard.data), np.asarray(state.params["head"]["kernel"][...])
        )


def test_batch_that_does_not_split_is_rejected(make_mesh):
    mesh = make_mesh("stage=4,data=2")
    rules = rules_for("dp", mesh)
    model = nnx.eval_shape(lambda: PipelinedGPT(CFG, num_stages=4, rngs=nnx.Rngs(0)))
    with jmp.activate(mesh, rules), pytest.raises(jmp.ConfigError, match="multiple of 8"):
        check_pipeline(model, mesh, num_microbatches=4, batch_size=12)
