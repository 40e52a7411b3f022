"""Llama's layers equal independent NumPy formulas: RoPE, grouped-query attention, SwiGLU, RMSNorm.

The references below are written from the papers' and Hugging Face's definitions, not from
jmp's code: rotary embedding as a complex rotation of the pairs ``(x[j], x[j + D/2])``, Llama 3's
frequency scaling as its three-band rule, attention as explicit loops over heads with kv head
``h // (H / K)``, a causal, windowed and per-document mask. Sharded runs (several meshes, both
collective modes) equal the unsharded layer in outputs and gradients, with the collectives
counted in the compiled programs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmp
from jmp.inspect import collectives, count, summary
from jmp.layers import (
    GatedMLP,
    GroupedQueryAttention,
    RMSNorm,
    RopeScaling,
    apply_rope,
    inverse_frequencies,
    kv_heads_name,
    rope_cos_sin,
)
from tests.helpers import batch_sharded, forward_and_grads, rules_for, value

B, T, D_MODEL, HEADS = 8, 12, 32, 8


def _random(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


# --- RoPE ------------------------------------------------------------------------------------


def np_inverse_frequencies(head_dim, theta):
    return np.array([theta ** (-2 * j / head_dim) for j in range(head_dim // 2)])


def np_llama3(freqs, factor, low, high, original):
    """Llama 3.1's rule, band by band (Meta's reference `apply_scaling`)."""
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(f)
        elif wavelen > original / low:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def np_rope(x, positions, freqs):
    """Rotate the pairs (x[j], x[j + D/2]) as the complex numbers x[j] + i x[j + D/2]."""
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    z = z * np.exp(1j * positions[..., None, None] * freqs)  # (batch, seq, heads, D/2)
    return np.concatenate([z.real, z.imag], axis=-1)


LLAMA31 = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


@pytest.mark.parametrize(
    "head_dim,theta,scaling",
    [(8, 10000.0, None), (128, 500000.0, None), (128, 500000.0, LLAMA31), (16, 1e4, "short")],
)
def test_rope_matches_complex_rotation(head_dim, theta, scaling):
    if scaling == "short":  # an original context of 16: every band is hit at these sizes
        scaling = RopeScaling(4.0, 1.0, 4.0, 16)
    freqs = np_inverse_frequencies(head_dim, theta)
    if scaling is not None:
        s = scaling
        freqs = np_llama3(
            freqs,
            s.factor,
            s.low_freq_factor,
            s.high_freq_factor,
            s.original_max_position_embeddings,
        )
    np.testing.assert_allclose(
        inverse_frequencies(head_dim, theta=theta, scaling=scaling), freqs, rtol=1e-6
    )
    x = _random(0, (2, 7, 3, head_dim))
    positions = np.array([[0, 1, 2, 3, 4, 5, 6], [9, 3, 0, 1, 2, 40, 7]])
    cos, sin = rope_cos_sin(jnp.asarray(positions), head_dim, theta=theta, scaling=scaling)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    np.testing.assert_allclose(got, np_rope(x, positions, freqs), rtol=1e-5, atol=2e-5)


def test_rope_scores_depend_only_on_relative_position():
    q, k = _random(1, (1, 1, 1, 16)), _random(2, (1, 1, 1, 16))

    def score(m, n):
        rot = []
        for x, p in ((q, m), (k, n)):
            cos, sin = rope_cos_sin(jnp.array([[p]]), 16, theta=10000.0)
            rot.append(np.asarray(apply_rope(jnp.asarray(x), cos, sin)).ravel())
        return float(rot[0] @ rot[1])

    assert score(5, 2) == pytest.approx(score(33, 30), rel=1e-4)
    assert abs(score(5, 2) - score(9, 2)) > 1e-2  # and it does depend on it


def test_llama3_scaling_bands_on_the_published_config():
    plain = inverse_frequencies(128, theta=500000.0)
    scaled = inverse_frequencies(128, theta=500000.0, scaling=LLAMA31)
    wavelen = 2 * np.pi / plain
    high = wavelen < 8192 / 4  # short wavelengths: kept
    low = wavelen > 8192 / 1  # long ones: slowed down 8x
    np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], plain[low] / 8, rtol=1e-6)
    mid = ~high & ~low
    assert mid.any() and np.all((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8))


@pytest.mark.parametrize(
    "kwargs,text",
    [
        (dict(factor=0.0), "factor=0.0 must be a finite number > 0"),
        (dict(high_freq_factor=1.0), "high_freq_factor=1.0 must exceed low_freq_factor=1.0"),
        (dict(original_max_position_embeddings=0), "original_max_position_embeddings=0"),
    ],
)
def test_bad_rope_scaling_is_refused(kwargs, text):
    good = dict(LLAMA31.__dict__)
    with pytest.raises(jmp.ConfigError, match="Invalid RopeScaling") as err:
        RopeScaling(**{**good, **kwargs})
    assert text in str(err.value)
    with pytest.raises(jmp.ConfigError, match="head_dim=7 must be even"):
        inverse_frequencies(7, theta=1e4)


def _unsharded_grads(layer, x, probe):
    """Gradients of sum(layer(x) * probe) w.r.t. (state, x), run outside any mesh context."""
    graphdef, state = nnx.split(layer)
    state = jax.tree.map(np.asarray, state)  # gathered: one device, no sharding
    return jax.grad(lambda st, x: (nnx.merge(graphdef, st)(x) * probe).sum(), argnums=(0, 1))(
        state, x
    )


# --- RMSNorm and SwiGLU ----------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_rmsnorm_matches_formula(eps):
    norm = RMSNorm(D_MODEL, eps=eps)
    norm.scale[...] = jnp.asarray(_random(3, (D_MODEL,)))
    x = _random(4, (B, T, D_MODEL), scale=0.3)  # small: a large eps then matters
    want = (
        x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * value(norm.scale)
    )
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=2e-6, atol=2e-6)


def np_swiglu(x, gate, up, down):
    g = x @ gate
    return (g / (1 + np.exp(-g)) * (x @ up)) @ down


@pytest.mark.parametrize("spec", ["model=8", "data=2,model=4", "data=8,model=1"])
@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_gated_mlp_matches_swiglu_with_megatron_collectives(make_mesh, spec, mode):
    mesh = make_mesh(spec)
    rules = rules_for(mesh)
    mlp = jmp.shard_init(lambda r: GatedMLP(D_MODEL, 64, mode=mode, rngs=r), mesh, rules)
    x = batch_sharded(mesh, _random(5, (B, T, D_MODEL)))
    probe = _random(6, (B, T, D_MODEL))
    y, grads, x_grad, fwd, grad = forward_and_grads(mlp, mesh, rules, x, probe)
    w = {n: value(getattr(mlp, n).kernel).astype(np.float64) for n in ("gate", "up", "down")}
    want = np_swiglu(np.asarray(x, np.float64), w["gate"], w["up"], w["down"])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    ref = _unsharded_grads(mlp, np.asarray(x), probe)
    for n in ("gate", "up", "down"):
        np.testing.assert_allclose(
            value(grads[n]["kernel"]), value(ref[0][n]["kernel"]), rtol=1e-4, atol=1e-5
        )
    np.testing.assert_allclose(value(x_grad), ref[1], rtol=1e-4, atol=1e-5)
    m = mesh.shape["model"]
    assert count(collectives(fwd, mesh), "all-reduce", ("model",)) == (1 if m > 1 else 0)
    # backward: + the fused gate/up's input gradient (one, not one per projection)
    assert count(collectives(grad, mesh), "all-reduce", ("model",)) == (2 if m > 1 else 0)


# --- grouped-query attention -----------------------------------------------------------------


def np_attention(x, p, *, kv_heads, positions, segments, window, theta=10000.0):
    """Dense GQA in float64 with explicit loops: query head h reads kv head h // (H / K)."""
    x = x.astype(np.float64)
    q = np.einsum("btd,dhk->bthk", x, p["q"]) + p.get("bq", 0)
    k = np.einsum("btd,dhk->bthk", x, p["k"]) + p.get("bk", 0)
    v = np.einsum("btd,dhk->bthk", x, p["v"]) + p.get("bv", 0)
    freqs = np_inverse_frequencies(q.shape[-1], theta)
    q, k = np_rope(q, positions, freqs), np_rope(k, positions, freqs)
    batch, seq, heads, dim = q.shape
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    out = np.zeros_like(q)
    for b in range(batch):
        allowed = (j <= i) & (segments[b][:, None] == segments[b][None, :])
        if window is not None:
            allowed &= i - j < window
        for h in range(heads):
            g = h // (heads // kv_heads)
            s = np.where(allowed, q[b, :, h] @ k[b, :, g].T / np.sqrt(dim), -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (w / w.sum(-1, keepdims=True)) @ v[b, :, g]
    return np.einsum("bthk,hkd->btd", out, p["o"])


def _params(attn):
    p = {n: value(getattr(attn, n).kernel).astype(np.float64) for n in "qkvo"}
    for n in "qkv":
        if getattr(attn, n).bias is not None:
            p["b" + n] = value(getattr(attn, n).bias).astype(np.float64)
    return p


def _with_random_biases(attn, seed):
    for i, n in enumerate("qkv"):
        bias = getattr(attn, n).bias
        bias[...] = jnp.asarray(_random(seed + i, bias.shape, 0.5))


@pytest.mark.parametrize(
    "kv_heads,window,packed,bias",
    [(2, None, False, False), (8, None, False, False), (1, 5, False, True), (4, None, True, True)],
)
def test_gqa_matches_dense_attention(kv_heads, window, packed, bias):
    attn = GroupedQueryAttention(
        D_MODEL,
        num_heads=HEADS,
        num_kv_heads=kv_heads,
        qkv_bias=bias,
        sliding_window=window,
        rngs=nnx.Rngs(0),
    )
    if bias:
        _with_random_biases(attn, 10)
    x = _random(1, (B, T, D_MODEL))
    positions = np.broadcast_to(np.arange(T), (B, T))
    segments = np.zeros((B, T), np.int32)
    if packed:  # documents of 5 and 7 tokens, positions restarting at each
        segments = np.broadcast_to((np.arange(T) >= 5).astype(np.int32), (B, T))
        positions = np.broadcast_to(np.r_[np.arange(5), np.arange(T - 5)], (B, T))
    got = attn(
        jnp.asarray(x),
        segment_ids=jnp.asarray(segments) if packed else None,
        positions=jnp.asarray(positions) if packed else None,
    )
    want = np_attention(
        x, _params(attn), kv_heads=kv_heads, positions=positions, segments=segments, window=window
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


ATTN_CASES = [  # (mesh, kv heads): split (the axis divides them) or replicated
    ("model=8", 2),
    ("data=2,model=4", 2),
    ("data=2,model=4", 4),
    ("data=4,model=2", 2),
]


@pytest.mark.parametrize("spec,kv_heads", ATTN_CASES)
@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_sharded_gqa_equals_unsharded_with_megatron_collectives(make_mesh, spec, kv_heads, mode):
    mesh = make_mesh(spec)
    rules = rules_for(mesh)
    split = kv_heads_name(kv_heads, mesh=mesh, rules=rules) is not None
    attn = jmp.shard_init(
        lambda r: GroupedQueryAttention(
            D_MODEL,
            num_heads=HEADS,
            num_kv_heads=kv_heads,
            qkv_bias=True,
            sliding_window=6,
            split_kv_heads=split,
            mode=mode,
            rngs=r,
        ),
        mesh,
        rules,
    )
    _with_random_biases(attn, 20)
    m = mesh.shape["model"]
    assert split == (kv_heads % m == 0)
    assert tuple(attn.k.kernel[...].sharding.spec)[1:2] == (("model",) if split else ())
    x = batch_sharded(mesh, _random(1, (B, T, D_MODEL)))
    probe = _random(2, (B, T, D_MODEL))
    y, grads, x_grad, fwd, grad = forward_and_grads(attn, mesh, rules, x, probe)
    positions = np.broadcast_to(np.arange(T), (B, T))
    want = np_attention(
        np.asarray(x),
        _params(attn),
        kv_heads=kv_heads,
        positions=positions,
        segments=np.zeros((B, T)),
        window=6,
    )
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
    ref = _unsharded_grads(attn, np.asarray(x), probe)
    for n in "qkvo":
        np.testing.assert_allclose(
            value(grads[n]["kernel"]), value(ref[0][n]["kernel"]), rtol=1e-4, atol=1e-5, err_msg=n
        )
    np.testing.assert_allclose(value(x_grad), ref[1], rtol=1e-4, atol=1e-5)
    # forward: only the row-parallel o; backward adds one input gradient for the fused q/k/v
    activation_bytes = B // mesh.shape.get("data", 1) * T * D_MODEL * 4
    found = collectives(grad, mesh)
    big = [c for c in found if c.axes == ("model",) and c.bytes == activation_bytes]
    assert count(collectives(fwd, mesh), "all-reduce", ("model",)) == 1
    assert [c.kind for c in big] == ["all-reduce"] * 2, summary(found)
    if split:
        assert count(found, axes=("model",)) == 2, summary(found)
    else:  # replicated k/v also sum their weights' gradients over the copies (weight-sized)
        assert count(found, axes=("model",)) > 2, summary(found)


def test_auto_and_manual_gqa_compile_the_same_collectives(make_mesh):
    mesh = make_mesh("data=2,model=4")
    rules = rules_for(mesh)
    x = batch_sharded(mesh, _random(1, (B, T, D_MODEL)))
    probe = _random(2, (B, T, D_MODEL))
    found = {}
    for mode in ("auto", "manual"):
        attn = jmp.shard_init(
            lambda r, m=mode: GroupedQueryAttention(
                D_MODEL, num_heads=HEADS, num_kv_heads=2, split_kv_heads=False, mode=m, rngs=r
            ),
            mesh,
            rules,
        )
        *_, fwd, grad = forward_and_grads(attn, mesh, rules, x, probe)
        found[mode] = (summary(collectives(fwd, mesh)), summary(collectives(grad, mesh)))
    assert found["auto"] == found["manual"]


def test_kv_heads_name_follows_the_mesh(make_mesh):
    for spec, strategy, kv, want in [
        ("data=2,model=4", "dp_tp", 2, None),
        ("data=2,model=4", "dp_tp", 4, "kv_heads"),
        ("data=4,model=2", "fsdp_tp", 2, "kv_heads"),
        ("data=8", "fsdp", 1, "kv_heads"),
    ]:
        mesh = make_mesh(spec)
        rules = jmp.rules.preset(strategy, mesh)
        assert kv_heads_name(kv, mesh=mesh, rules=rules) == want, (spec, kv)
        with jmp.activate(mesh, rules):
            assert kv_heads_name(kv) == want
    assert kv_heads_name(2) == "kv_heads"  # nothing active
    with pytest.raises(jmp.ConfigError, match="both mesh= and rules="):
        kv_heads_name(2, mesh=make_mesh("data=8"))


@pytest.mark.parametrize(
    "kwargs,text",
    [
        (dict(num_kv_heads=3), "num_kv_heads=3 must divide num_heads=8"),
        (dict(head_dim=5), "head_dim=5 must be even"),
        (dict(sliding_window=0), "sliding_window=0 must be >= 1"),
        (dict(mode="magic"), "mode must be one of ('auto', 'manual', 'collective')"),
    ],
)
def test_bad_attention_arguments_are_refused(kwargs, text):
    args = dict(num_heads=HEADS, num_kv_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(jmp.ConfigError) as err:
        GroupedQueryAttention(D_MODEL, **{**args, **kwargs})
    assert text in str(err.value)
