"""Context parallelism: the sequence split over 'context', attention still exact.

The oracle is the unsharded model (no rules active: plain ``jax.nn.dot_product_attention`` over
the whole sequence), never the code under test: under cp, dp_cp, fsdp_cp, tp_cp, dp_tp_cp and
fsdp_tp_cp (context 2, 4, 8), for the ring and the all-gather attention, with and without the
load-balanced layout, GPT's and Llama's loss and every gradient equal it (f32, 1e-5 relative),
also for packed documents and a sliding window; AdamW steps equal one device. The compiled
forward has c-1 collective-permutes of the K/V block per layer (ring) or one all-gather of K
and V per layer (allgather), over 'context' only. Bad inputs are one-line errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jmp
from jmp.inspect import collectives, summary
from jmp.layers import context_parallel as cp
from jmp.models.gpt import GPT, GPTConfig
from jmp.models.llama import Llama, LlamaConfig
from jmp.train import next_token_loss
from tests.plain_model import leaves_by_path

ROWS, SEQ = 4, 32
CONFIGS = {
    "gpt": (GPT, GPTConfig.named("tiny", d_model=32, n_heads=4, seq_len=SEQ)),
    "llama": (Llama, LlamaConfig.named("tiny", d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)),
}


def mesh_of(spec: str):
    """A mesh on the first devices it needs (context=2 uses 2 of the 8)."""
    n = int(np.prod([int(part.split("=")[1]) for part in spec.split(",")]))
    return jmp.make_mesh(spec, devices=jax.devices()[:n])


def tokens(k: int = 0) -> np.ndarray:
    return np.random.default_rng(k).integers(0, 256, (ROWS, SEQ + 1)).astype(np.int32)


def packed_batch() -> dict:
    """Two documents per row (lengths 13+19 and 20+12): segment ids, restarting positions."""
    t = tokens(1)
    segments = np.array([[0] * 13 + [1] * 19, [0] * 20 + [1] * 12] * (ROWS // 2), np.int32)
    starts = np.where(segments == 0, 0, np.argmax(segments, axis=1)[:, None])
    positions = (np.arange(SEQ)[None] - starts).astype(np.int32)
    return {
        "inputs": t[:, :-1],
        "targets": t[:, 1:],
        "segment_ids": segments,
        "positions": positions,
    }


def _model(name, **options):
    make, cfg = CONFIGS[name]
    return make(type(cfg)(**{**cfg.to_dict(), **options}), rngs=nnx.Rngs(0))


def loss_and_grads(model, batch, mesh=None, rules=None):
    graphdef, state = nnx.split(model)

    def f(state, batch):
        if mesh is None:  # the unsharded reference: nothing active
            return jax.value_and_grad(lambda s: next_token_loss(nnx.merge(graphdef, s), batch))(
                state
            )
        with jmp.activate(mesh, rules):
            return jax.value_and_grad(lambda s: next_token_loss(nnx.merge(graphdef, s), batch))(
                state
            )

    if mesh is None:
        return jax.jit(f)(state, batch)
    state = jax.device_put(state, jmp.named_shardings(state, rules, mesh))
    with jmp.activate(mesh, rules):
        return jax.jit(f)(state, batch)


_REFERENCE: dict = {}


def reference(name, window=None, packed=False):
    key = (name, window, packed)
    if key not in _REFERENCE:
        options = {} if window is None else {"sliding_window": window}
        batch = packed_batch() if packed else (tokens()[:, :-1], tokens()[:, 1:])
        _REFERENCE[key] = loss_and_grads(_model(name, **options), batch)
    return _REFERENCE[key]


# (strategy, mesh, cp_impl, load balanced, extra options)
CASES = [
    ("cp", "context=2", "ring", True, {}),
    ("cp", "context=4", "allgather", True, {}),
    ("cp", "context=8", "ring", True, {}),
    ("cp", "context=8", "allgather", False, {}),
    ("dp_cp", "data=2,context=4", "ring", False, {}),
    ("fsdp_cp", "data=2,context=4", "allgather", True, {}),
    ("dp_tp_cp", "data=2,model=2,context=2", "allgather", False, {"mode": "manual"}),
    ("fsdp_tp_cp", "data=2,model=2,context=2", "ring", True, {}),
    ("tp_cp", "model=2,context=4", "ring", True, {"mode": "manual"}),
]


def _check_equal(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    _check_leaves(loss, leaves_by_path(grads), want_loss, leaves_by_path(want_grads))


def _check_leaves(loss, have, want_loss, ref):
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    assert have.keys() == ref.keys()
    for path, w in ref.items():
        scale = float(np.max(np.abs(w)))
        assert scale > 0, path  # every parameter gets a gradient: the comparison is not empty
        np.testing.assert_allclose(have[path], w, rtol=1e-5, atol=1e-5 * scale, err_msg=path)


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize(
    "strategy,spec,impl,balanced,options",
    CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}-{'balanced' if c[3] else 'contiguous'}" for c in CASES],
)
def test_loss_and_gradients_equal_the_unsharded_model(
    name, strategy, spec, impl, balanced, options
):
    mesh = mesh_of(spec)
    rules = jmp.rules.preset(strategy, mesh)
    model = _model(name, cp_impl=impl, cp_load_balance=balanced, **options)
    got = loss_and_grads(model, (tokens()[:, :-1], tokens()[:, 1:]), mesh, rules)
    _check_equal(got, reference(name))


@pytest.mark.parametrize("name,impl", [("gpt", "ring"), ("llama", "allgather")])
def test_packed_documents(name, impl):
    """Segment ids and restarting positions (learned or rotary) under the balanced layout."""
    mesh = mesh_of("data=2,context=4")
    rules = jmp.rules.preset("dp_cp", mesh)
    model = _model(name, cp_impl=impl)
    _check_equal(loss_and_grads(model, packed_batch(), mesh, rules), reference(name, packed=True))


@pytest.mark.parametrize("impl", ["ring", "allgather"])
def test_sliding_window(impl):
    """Mistral's window (5 tokens) crosses the chunk boundaries of context=8 (4-token chunks)."""
    mesh = mesh_of("context=8")
    rules = jmp.rules.preset("cp", mesh)
    model = _model("llama", sliding_window=5, cp_impl=impl, cp_load_balance=False)
    got = loss_and_grads(model, (tokens()[:, :-1], tokens()[:, 1:]), mesh, rules)
    _check_equal(got, reference("llama", window=5))


# (model, strategy, mesh, schedule, cp_impl, load balanced): pipelines with context
# parallelism inside their stages
PIPELINE_CASES = [
    ("gpt", "pp_cp", "stage=2,context=2", "1f1b", "ring", True),
    ("gpt", "pp_dp_cp", "stage=2,data=2,context=2", "gpipe", "allgather", False),
    ("gpt", "pp_tp_cp", "stage=2,model=2,context=2", "1f1b", "ring", True),
    ("llama", "pp_fsdp_cp", "stage=2,data=2,context=2", "gpipe", "ring", True),
]


def _pipelined(name, mesh, rules, **options):
    from jmp.pipeline import PipelinedGPT

    if name == "gpt":
        return PipelinedGPT.from_gpt(_model("gpt", **options), num_stages=2, mesh=mesh, rules=rules)
    cfg = CONFIGS["llama"][1]
    cfg = type(cfg)(**{**cfg.to_dict(), **options})
    return Llama(cfg, rngs=nnx.Rngs(0), num_stages=2, mesh=mesh, rules=rules)


@pytest.mark.parametrize(
    "name,strategy,spec,schedule,impl,balanced",
    PIPELINE_CASES,
    ids=["-".join(map(str, c)) for c in PIPELINE_CASES],
)
def test_a_pipeline_with_context_parallel_stages_equals_the_unsharded_model(
    name, strategy, spec, schedule, impl, balanced
):
    from jmp.pipeline import pipeline_loss_and_grads

    mesh = mesh_of(spec)
    rules = jmp.rules.preset(strategy, mesh)
    model = _pipelined(name, mesh, rules, cp_impl=impl, cp_load_balance=balanced)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, jmp.named_shardings(state, rules, mesh))

    def f(state, batch):
        with jmp.activate(mesh, rules):
            model = nnx.merge(graphdef, state)
            return pipeline_loss_and_grads(
                model, batch, mesh=mesh, num_microbatches=2, schedule=schedule
            )

    with jmp.activate(mesh, rules):
        loss, grads = jax.jit(f)(state, (tokens()[:, :-1], tokens()[:, 1:]))
    want_loss, want_grads = reference(name)
    # the stacked blocks' (stage, layers, ...) leaves against the unsharded (layers, ...) ones
    ref = leaves_by_path(want_grads)
    have = {
        path: np.reshape(g, ref[path].shape)
        for path, g in leaves_by_path(
            jmp.pipeline.model.unstack_params(grads) if name == "gpt" else grads
        ).items()
    }
    _check_leaves(loss, have, want_loss, ref)


def adamw_run(make_model, mesh, strategy):
    """Losses and parameters of 5 AdamW steps of ``jmp.fit`` on the test batches."""
    result = jmp.fit(
        make_model,
        next_token_loss,
        lambda k: (tokens(k)[:, :-1], tokens(k)[:, 1:]),
        mesh=mesh,
        strategy=strategy,
        optimizer=optax.adamw(1e-3),
        steps=5,
        progress=False,
    )
    return [r["loss"] for r in result.history], leaves_by_path(result.state.params)


def check_adamw_equals_one_device(make_model, mesh, strategy):
    want_losses, want = adamw_run(make_model, mesh_of("data=1"), "dp")
    losses, got = adamw_run(make_model, mesh, strategy)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for path, w in want.items():
        np.testing.assert_allclose(got[path], w, rtol=1e-4, atol=1e-5, err_msg=path)


def test_adamw_steps_equal_one_device():
    cfg = CONFIGS["llama"][1]
    check_adamw_equals_one_device(
        lambda r: Llama(cfg, rngs=r), mesh_of("data=2,context=4"), "dp_cp"
    )


# --- the compiled program ----------------------------------------------------------------------


def _compiled_forward(model, mesh, rules, rows=ROWS, seq=SEQ):
    graphdef, state = nnx.split(model)
    shardings = jmp.named_shardings(state, rules, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
    )
    batch = jax.NamedSharding(mesh, jax.P(rules.activations_dict["batch"]))
    ids = jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=batch)

    def forward(state, ids):
        with jmp.activate(mesh, rules):
            return nnx.merge(graphdef, state)(ids)

    with jmp.activate(mesh, rules):
        return jax.jit(forward).lower(abstract, ids).compile()


COUNT_CASES = [
    ("ring", "data=2,context=4"),
    ("ring", "data=4,context=2"),
    ("allgather", "context=8"),
]


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize("impl,spec", COUNT_CASES)
def test_collectives_per_layer(name, impl, spec):
    mesh = mesh_of(spec)
    ways = mesh.shape["context"]
    rules = jmp.rules.preset("dp_cp" if "data" in spec else "cp", mesh)
    model = _model(name, cp_impl=impl)
    found = collectives(_compiled_forward(model, mesh, rules), mesh)
    cfg = model.cfg
    kv_heads = cfg.n_heads if name == "gpt" else cfg.n_kv_heads  # GQA: only kv heads travel
    rows = ROWS // mesh.shape.get("data", 1)
    head = cfg.d_model // cfg.n_heads
    block = rows * (SEQ // ways) * 2 * kv_heads * head * 4  # local K and V, stacked, f32
    half_hidden = rows * (SEQ // ways // 2) * cfg.d_model * 4
    # nothing over 'data' in a forward; everything over 'context' is the attention's or the
    # layout's return to natural order (two permutes of half the local hidden state)
    assert all(c.axes == ("context",) for c in found), summary(found)
    permutes = [c for c in found if c.kind == "collective-permute"]
    layout = [c for c in permutes if c.bytes == half_hidden]
    # c = 2: device 0 holds chunks 0 and 3, device 1 chunks 1 and 2: only one pair swaps
    assert sum(c.count for c in layout) == (1 if ways == 2 else 2), summary(found)
    attention = [c for c in found if c not in layout]
    if impl == "ring":
        assert {c.kind for c in attention} == {"collective-permute"}, summary(found)
        assert {c.bytes for c in attention} == {block}, summary(found)
        assert sum(c.count for c in attention) == (ways - 1) * cfg.n_layers, summary(found)
    else:
        assert {c.kind for c in attention} == {"all-gather"}, summary(found)
        assert {c.bytes for c in attention} == {block * ways}, summary(found)
        assert sum(c.count for c in attention) == cfg.n_layers, summary(found)


def step_temporaries(model, mesh, rules, rows: int, seq: int) -> int:
    """Compiled temporary bytes per device of ``model``'s loss and gradients."""
    graphdef, state = nnx.split(model)
    ids = jnp.zeros((rows, seq), jnp.int32)

    def step(state, ids):
        with jmp.activate(mesh, rules):
            return jax.value_and_grad(
                lambda s: next_token_loss(nnx.merge(graphdef, s), (ids, ids))
            )(state)

    state = jax.device_put(state, jmp.named_shardings(state, rules, mesh))
    with jmp.activate(mesh, rules):
        return jax.jit(step).lower(state, ids).compile().memory_analysis().temp_size_in_bytes


def _step_temporaries(spec: str, impl: str, seq: int) -> int:
    mesh = mesh_of(spec)
    rules = jmp.rules.preset("cp" if "context" in spec else "dp", mesh)
    return step_temporaries(_model("gpt", cp_impl=impl, seq_len=seq), mesh, rules, 2, seq)


@pytest.mark.parametrize("impl", ["ring", "allgather"])
def test_temporaries_per_device_fall_with_the_context_size(impl):
    seq = 256
    temps = [_step_temporaries(spec, impl, seq) for spec in ("data=1", "context=2", "context=4")]
    assert temps[0] > temps[1] > temps[2], temps


def test_allgather_with_a_data_axis_also_gathers_over_it():
    """A known cost, measured so a fix shows: XLA gathers K/V over 'data' before 'context'."""
    mesh = mesh_of("data=2,context=4")
    model = _model("gpt", cp_impl="allgather")
    found = collectives(_compiled_forward(model, mesh, jmp.rules.preset("dp_cp", mesh)), mesh)
    over_context = [c for c in found if c.kind == "all-gather" and c.axes == ("context",)]
    over_data = [c for c in found if c.kind == "all-gather" and c.axes == ("data",)]
    assert sum(c.count for c in over_context) == model.cfg.n_layers, summary(found)
    assert sum(c.count for c in over_data) == model.cfg.n_layers, summary(found)


def test_load_balanced_layout_equalizes_causal_work():
    """Visible (query, key) pairs per device, counted from the layout: equal when balanced."""
    for ways in (2, 4, 8):
        for balanced, spread in ((True, 0), (False, None)):
            index = cp.layout_index(64, ways, balanced=balanced)
            work = [int((q[:, None] >= np.arange(64)[None]).sum()) for q in index]
            assert sum(work) == 64 * 65 // 2
            if spread is None:  # contiguous: the last device does the most
                assert work == sorted(work) and work[-1] > work[0]
            else:
                assert max(work) - min(work) == spread, work


def test_layout_returns_to_natural_order():
    """to_natural moves each device's chunks i and 2c-1-i to the devices of natural order."""
    mesh = mesh_of("context=4")
    index = cp.layout_index(16, 4, balanced=True)
    region = cp.Region("context", 4, 16, True)
    x = jnp.asarray(index.reshape(1, -1).astype(np.float32))  # each token holds its index
    out = jax.jit(
        jax.shard_map(
            lambda h: cp.to_natural(h, region),
            mesh=mesh,
            in_specs=jax.P(None, "context"),
            out_specs=jax.P(None, "context"),
        )
    )(x)
    np.testing.assert_array_equal(np.asarray(out)[0], np.arange(16))


# --- bad inputs ----------------------------------------------------------------------------


def _one_line(err, *words):
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_sequence_must_split_into_the_layout():
    mesh = mesh_of("context=4")
    rules = jmp.rules.preset("cp", mesh)
    for balanced, seq, words in (
        (True, 20, ("2 x context = 8", "multiple of 8")),
        (False, 18, ("multiple of 4",)),
    ):
        model = _model("gpt", cp_load_balance=balanced)
        with pytest.raises(jmp.ConfigError) as err, jmp.activate(mesh, rules):
            jax.eval_shape(model, jnp.zeros((ROWS, seq), jnp.int32))
        _one_line(err, f"sequence of {seq} tokens", *words)


def test_unknown_cp_impl():
    for make in (
        lambda: GPTConfig(cp_impl="ulysses"),
        lambda: LlamaConfig(cp_impl="ulysses"),
        lambda: jmp.layers.ParallelAttention(16, num_heads=2, cp_impl="ulysses", rngs=nnx.Rngs(0)),
    ):
        with pytest.raises(jmp.ConfigError) as err:
            make()
        _one_line(err, "cp_impl='ulysses'", "ring", "allgather")
    with pytest.raises(jmp.ConfigError) as err:
        LlamaConfig(cp_load_balance="yes")
    _one_line(err, "cp_load_balance='yes'")


def test_cp_strategies_are_checked():
    with pytest.raises(jmp.ConfigError) as err:
        jmp.rules.preset("ep_cp", mesh_of("expert=2,context=4"))
    _one_line(err, "ep does not compose with cp")
    with pytest.raises(jmp.ShardingError) as err:  # the mesh lacks the axis
        jmp.rules.preset("dp_cp", mesh_of("data=8"))
    _one_line(err, "context")
