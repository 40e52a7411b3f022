"""Sequence parallelism (``sp``, with ``tp``): between the tensor-parallel regions the residual
stream's sequence is split over 'model'; with ``mode='collective'`` its all-gathers and
reduce-scatters are collective matmuls (ring steps of collective-permutes).

The oracle is the unsharded model (nothing active), never the code under test: GPT's and
Llama's loss and every gradient under tp_sp, dp_tp_sp and fsdp_tp_sp (model 2 and 4, both
modes) equal it (f32, 1e-5 relative), and AdamW steps equal one device. In the compiled program
every activation all-reduce over 'model' of tp is gone: each block has two reduce-scatters and
two all-gathers instead (one more of each for the embedding and the head), moving the same
bytes on a ring; the temporaries per device are fewer. Bad inputs are one-line errors.
"""

import jax
import jax.numpy as jnp
import pytest

import jmp
from jmp.inspect import collectives, summary
from jmp.models.gpt import GPT
from tests.test_context_parallel import (
    CONFIGS,
    ROWS,
    SEQ,
    _check_equal,
    _compiled_forward,
    _model,
    _one_line,
    check_adamw_equals_one_device,
    loss_and_grads,
    mesh_of,
    reference,
    step_temporaries,
    tokens,
)

# (strategy, mesh, mode); the tiny Llama's 2 kv heads split over model=2 at most
CASES = {
    "gpt": [
        ("tp_sp", "model=4", "manual"),
        ("dp_tp_sp", "data=2,model=4", "auto"),
        ("fsdp_tp_sp", "data=4,model=2", "manual"),
        ("dp_tp_sp", "data=2,model=4", "collective"),
        ("tp", "model=4", "collective"),  # without sp, as manual
    ],
    "llama": [
        ("tp_sp", "model=2", "auto"),
        ("fsdp_tp_sp", "data=2,model=2", "manual"),
        ("fsdp_tp_sp", "data=2,model=2", "collective"),
    ],
}


@pytest.mark.parametrize(
    "name,strategy,spec,mode",
    [(name, *case) for name, cases in CASES.items() for case in cases],
    ids=lambda v: str(v),
)
def test_loss_and_gradients_equal_the_unsharded_model(name, strategy, spec, mode):
    mesh = mesh_of(spec)
    rules = jmp.rules.preset(strategy, mesh)
    got = loss_and_grads(_model(name, mode=mode), (tokens()[:, :-1], tokens()[:, 1:]), mesh, rules)
    _check_equal(got, reference(name))


def test_adamw_steps_equal_one_device():
    cfg = CONFIGS["gpt"][1]
    check_adamw_equals_one_device(lambda r: GPT(cfg, rngs=r), mesh_of("data=2,model=4"), "dp_tp_sp")


# --- the compiled program ----------------------------------------------------------------------


def _ring_bytes(c, ways: int) -> float:
    """Bytes a device sends for collective ``c`` on a ring of ``ways`` (``c.bytes`` is the size
    of its result on one device): an all-reduce is a reduce-scatter then an all-gather."""
    share = (ways - 1) / ways
    per_op = {
        "all-reduce": 2 * share * c.bytes,
        "reduce-scatter": (ways - 1) * c.bytes,  # its result is 1/ways of what it reduces
        "all-gather": share * c.bytes,
        "collective-permute": c.bytes,  # one step of a ring: its result is what was sent
    }[c.kind]
    return per_op * c.count


@pytest.mark.parametrize("spec", ["data=2,model=4", "model=2"])
def test_reduce_scatters_and_all_gathers_replace_the_all_reduces(spec):
    mesh = mesh_of(spec)
    ways, rows = mesh.shape["model"], ROWS // mesh.shape.get("data", 1)
    prefix = "dp_" if "data" in spec else ""
    model = _model("gpt")
    cfg = model.cfg
    hidden = rows * SEQ * cfg.d_model * 4  # one residual-stream activation, whole, f32
    found = {
        s: collectives(_compiled_forward(model, mesh, jmp.rules.preset(prefix + s, mesh)), mesh)
        for s in ("tp", "tp_sp")
    }
    tp, sp = ([c for c in found[s] if c.axes == ("model",)] for s in ("tp", "tp_sp"))
    big = [c for c in tp if c.bytes == hidden]
    # tp: the two row-parallel outputs per block and the embedding's, all-reduced whole
    assert {c.kind for c in big} == {"all-reduce"}, summary(tp)
    assert sum(c.count for c in big) == 2 * cfg.n_layers + 1, summary(tp)
    # tp_sp: not one of them; a reduce-scatter to the local sequence (attention and MLP
    # outputs, embedding) and an all-gather back (qkv and MLP inputs, head) in their place
    assert not [c for c in sp if c.kind == "all-reduce" and c.bytes >= hidden // ways]
    scatters = [c for c in sp if c.kind == "reduce-scatter"]
    gathers = [c for c in sp if c.kind == "all-gather"]
    assert {c.bytes for c in scatters} == {hidden // ways}, summary(sp)
    assert {c.bytes for c in gathers} == {hidden}, summary(sp)
    assert sum(c.count for c in scatters) == 2 * cfg.n_layers + 1, summary(sp)
    assert sum(c.count for c in gathers) == 2 * cfg.n_layers + 1, summary(sp)
    # the same bytes on the wire, and nothing else over 'model' changed (the cross-entropy's
    # small all-reduces over the split vocabulary)
    moved = [sum(_ring_bytes(c, ways) for c in group) for group in (big, scatters + gathers)]
    assert moved[0] == pytest.approx(moved[1]), moved
    rest = [c for c in tp if c not in big]
    assert sorted(rest) == sorted(c for c in sp if c.kind == "all-reduce"), summary(sp)
    # and no collective over 'data' appears (the batch stays split through every region)
    assert [c for c in found["tp_sp"] if "data" in c.axes] == [
        c for c in found["tp"] if "data" in c.axes
    ]


@pytest.mark.parametrize("spec", ["data=2,model=4", "model=2"])
def test_collective_matmuls_are_ring_steps(spec):
    """Each of sp's all-gathers before a matmul (qkv, MLP up, head) and reduce-scatters after
    one (attention and MLP outputs) becomes c - 1 collective-permutes of one sequence chunk:
    the same bytes on a ring; the embedding's reduce-scatter (a one-hot lookup) stays."""
    mesh = mesh_of(spec)
    ways, rows = mesh.shape["model"], ROWS // mesh.shape.get("data", 1)
    rules = jmp.rules.preset(("dp_" if "data" in spec else "") + "tp_sp", mesh)
    found = {
        mode: collectives(_compiled_forward(_model("gpt", mode=mode), mesh, rules), mesh)
        for mode in ("manual", "collective")
    }
    cfg = _model("gpt").cfg
    chunk = rows * (SEQ // ways) * cfg.d_model * 4
    plain, ring = ([c for c in found[m] if c.axes == ("model",)] for m in found)
    permutes = [c for c in ring if c.kind == "collective-permute"]
    assert {c.bytes for c in permutes} == {chunk}, summary(ring)
    matmuls = 4 * cfg.n_layers + 1  # 2 gathers and 2 scatters per block, and the head's gather
    assert sum(c.count for c in permutes) == (ways - 1) * matmuls, summary(ring)
    assert not [c for c in ring if c.kind == "all-gather"], summary(ring)
    assert sum(c.count for c in ring if c.kind == "reduce-scatter") == 1, summary(ring)
    sent = {
        m: sum(_ring_bytes(c, ways) for c in group)
        for m, group in (("manual", plain), ("collective", ring))
    }
    assert sent["manual"] == pytest.approx(sent["collective"]), sent
    # nothing else changes: not one collective more over 'data'
    assert [c for c in found["collective"] if "data" in c.axes] == [
        c for c in found["manual"] if "data" in c.axes
    ]


def _temporaries(strategy: str) -> int:
    mesh = mesh_of("model=4")
    rules = jmp.rules.preset(strategy, mesh)
    return step_temporaries(_model("gpt", mode="manual"), mesh, rules, ROWS, SEQ)


def test_sequence_parallel_step_needs_fewer_temporaries():
    assert _temporaries("tp_sp") < _temporaries("tp")


# --- bad input ---------------------------------------------------------------------------------


def test_sequence_must_split_over_the_tensor_axis():
    mesh = mesh_of("model=4")
    rules = jmp.rules.preset("tp_sp", mesh)
    for mode in ("auto", "manual"):
        model = _model("gpt", mode=mode)
        with pytest.raises(jmp.ConfigError) as err, jmp.activate(mesh, rules):
            jax.eval_shape(model, jnp.zeros((ROWS, 30), jnp.int32))
        _one_line(err, "sequence of 30 tokens", "'model' of size 4", "multiple of 4")


def test_sp_strategies_are_checked():
    for name, words in (
        ("sp", "sp needs tp"),
        ("dp_sp", "sp needs tp"),
        ("pp_tp_sp", "sp does not compose with pp"),
        ("tp_sp_cp", "sp does not compose with cp"),
        ("ep_tp_sp", "sp does not compose with ep"),
        ("sp_tp", "write 'tp_sp'"),
    ):
        with pytest.raises(jmp.ConfigError) as err:
            jmp.strategies.parse(name)
        _one_line(err, words)
    # sp adds no mesh axis of its own: tp's 'model' is the one it splits the sequence over
    assert jmp.strategies.parse("dp_tp_sp").axes == ("data", "model")
    with pytest.raises(jmp.ShardingError) as err:
        jmp.rules.preset("tp_sp", mesh_of("data=8"))
    _one_line(err, "model")


def test_a_mixture_of_experts_is_refused():
    mesh = mesh_of("model=2")
    model = _model("gpt", n_experts=4, top_k=2)
    with pytest.raises(jmp.ConfigError) as err, jmp.activate(mesh, jmp.rules.preset("tp_sp", mesh)):
        jax.eval_shape(model, jnp.zeros((ROWS, SEQ), jnp.int32))
    _one_line(err, "sequence parallelism (sp)", "without sp")
