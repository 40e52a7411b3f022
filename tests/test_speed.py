"""Speed you can see: model FLOPs and MFU by hand count, TensorBoard scalars, a profile, and a
loop that dispatches the next step before it reads the last one's metrics."""

import glob
import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jmp
from jmp.models import GPT, GPTConfig
from jmp.train import TrainConfig, make_optimizer, make_step
from jmp.train.observe import read_scalars
from jmp.train.speed import Peak, Speedometer, model_flops
from tests.cli_util import run_jmp

CFG = GPTConfig.named("tiny")
B, S = 8, CFG.seq_len


def _hand_count(cfg: GPTConfig, *, one_hot_embedding: bool) -> float:
    """Forward matmul FLOPs of jmp's GPT, written out, times 3 (forward + backward)."""
    d, f, v, tokens = cfg.d_model, cfg.hidden, cfg.vocab_size, B * S
    per_layer = (
        2 * tokens * d * 3 * d  # fused q, k, v
        + 2 * tokens * S * d  # q k^T over all heads (causal masks, still computes S x S)
        + 2 * tokens * S * d  # attention-weighted values
        + 2 * tokens * d * d  # output projection
        + 2 * 2 * tokens * d * f  # MLP up and down
    )
    head = 2 * tokens * d * v
    embedding = 2 * tokens * v * d if one_hot_embedding else 0  # the vocabulary-split lookup
    return 3.0 * (cfg.n_layers * per_layer + head + embedding)


def _step(mesh, strategy, cfg=CFG):
    rules = jmp.rules.preset(strategy, mesh)
    model = jmp.shard_init(lambda rngs: GPT(cfg, rngs=rngs), mesh, rules)
    return make_step(model, make_optimizer(TrainConfig()), mesh, rules)


def _tokens():
    ids = np.zeros((B, S), np.int32)
    return ids, ids


@pytest.mark.parametrize(
    "strategy, spec, mode, one_hot",
    [
        ("dp", "data=1", "auto", False),  # one device: the embedding is a gather
        ("dp_tp", "data=2,model=4", "auto", True),
        ("tp", "model=8", "manual", True),  # shard_map bodies: local shapes x 8 devices
    ],
)
def test_model_flops_equal_the_hand_count(make_mesh, strategy, spec, mode, one_hot):
    cfg = GPTConfig.named("tiny", mode=mode)
    mesh = make_mesh(spec) if spec != "data=1" else jmp.make_mesh(spec, devices=jax.devices()[:1])
    step = _step(mesh, strategy, cfg)
    assert step.model_flops(_tokens()) == _hand_count(cfg, one_hot_embedding=one_hot)


# a GPT whose second block is a mixture of 8 experts, 2 per token, one shared expert
MOE = GPTConfig.named("tiny", n_experts=8, top_k=2, n_shared_experts=1, moe_every=2)


@pytest.mark.parametrize(
    "strategy, spec, capacity",
    [
        ("dp", "data=1", None),  # dropless: grouped matmuls (ragged_dot) of the routed rows
        ("dp", "data=8", 1.25),  # capacity slots: padded rows, only the routed ones count
        ("ep", "expert=8", None),  # slots sent over 'expert' (all-to-all): the same count
        ("dp_ep", "data=2,expert=4", 2.0),
    ],
)
def test_a_mixture_of_experts_counts_only_its_routed_rows(make_mesh, strategy, spec, capacity):
    cfg = GPTConfig(**{**MOE.to_dict(), "capacity_factor": capacity})
    mesh = make_mesh(spec) if spec != "data=1" else jmp.make_mesh(spec, devices=jax.devices()[:1])
    d, f, tokens = cfg.d_model, cfg.hidden, B * S
    dense_mlp = 2 * 2 * tokens * d * f
    moe = (
        2 * tokens * d * cfg.n_experts  # the router
        + 3 * 2 * tokens * (cfg.top_k + cfg.n_shared_experts) * d * f  # SwiGLU: gate, up, down
        + 2 * tokens * cfg.top_k * d  # the expert outputs weighted into one
    )
    dense = _hand_count(cfg, one_hot_embedding=False)  # no vocabulary split: a gather
    assert _step(mesh, strategy, cfg).model_flops(_tokens()) == dense + 3.0 * (moe - dense_mlp)


def test_scan_bodies_count_once_per_iteration():
    x = np.ones((32, 32), np.float32)

    def forward(w, x):
        return jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=5)[0].sum()

    assert model_flops(forward, x, x) == 3 * 5 * 2 * 32**3


def test_mfu_is_model_flops_per_second_over_the_peak():
    meter = Speedometer(flops_per_step=6e9, tokens_per_step=4096, peak=Peak(1e12, "test"))
    row = meter.measure(3, 0.06)  # 3 steps in 60 ms
    assert row["step_time_s"] == pytest.approx(0.02)
    assert row["tokens_per_s"] == pytest.approx(4096 * 50)
    assert row["flops_per_s"] == pytest.approx(3e11)
    assert row["mfu"] == pytest.approx(0.3)
    assert "mfu" not in Speedometer(6e9, 4096, None).measure(3, 0.06)  # unknown peak: no MFU


class MLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            8,
            32,
            kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
            use_bias=False,
            rngs=rngs,
        )
        self.down = nnx.Linear(
            32,
            1,
            kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
            use_bias=False,
            rngs=rngs,
        )

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def mse(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def batch(k):
    x = np.random.default_rng(k).normal(size=(16, 8)).astype(np.float32)
    return {"x": x, "y": x.sum(-1, keepdims=True)}


def _fit(mesh, out, batches=batch, **kwargs):
    return jmp.fit(
        MLP,
        mse,
        batches,
        mesh=mesh,
        strategy="dp_tp",
        optimizer=optax.adam(1e-2),
        steps=6,
        out_dir=out,
        progress=False,
        tokens_per_batch=16,
        **kwargs,
    )


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tensorboard_scalars_equal_metrics_jsonl(make_mesh, tmp_path):
    out = str(tmp_path / "run")
    _fit(make_mesh("data=2,model=4"), out, tensorboard=True, eval_batches=[batch(99)])
    rows = _rows(out)
    scalars = read_scalars(os.path.join(out, "tensorboard"))
    for name in ("loss", "grad_norm", "val_loss", "step_time_s", "tokens_per_s", "mfu"):
        expected = [(r["step"], r[name]) for r in rows if name in r]
        assert expected, name
        got = scalars[name]
        assert [s for s, _ in got] == [s for s, _ in expected], name
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)
    # from the second step on, every row says how fast (the first includes compilation)
    assert "mfu" not in rows[0] and all(0 < r["mfu"] < 1 for r in rows[1:])


def test_profile_writes_a_trace_of_the_window(make_mesh, tmp_path):
    out = str(tmp_path / "run")
    _fit(make_mesh("data=2,model=4"), out, profile=(2, 3))
    traces = glob.glob(os.path.join(out, "profile", "**", "*.xplane.pb"), recursive=True)
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    with pytest.raises(jmp.ConfigError, match="1 <= START <= END"):
        _fit(make_mesh("data=2,model=4"), str(tmp_path / "bad"), profile=(3, 2))


def test_the_next_step_is_dispatched_before_the_last_metrics_are_read(make_mesh, tmp_path):
    out = str(tmp_path / "run")
    written_when_asked = []

    def watching(k):
        # how many metrics rows exist when batch k is asked for
        path = os.path.join(out, "metrics.jsonl")
        written_when_asked.append(len(_rows(out)) if os.path.exists(path) else 0)
        return batch(k)

    _fit(make_mesh("data=2,model=4"), out, batches=watching, checkpoint_every=4)
    # batch k (k >= 1) is prepared while step k-1 runs: its row is not written yet; step 4
    # checkpoints, so its row (and state) is read at once, before batch 4 is asked for
    assert written_when_asked == [0, 0, 1, 2, 4, 4]
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5, 6]


def test_cli_tensorboard_and_profile(tmp_path):
    out = tmp_path / "r"
    done = run_jmp(
        "train",
        "--model",
        "tiny",
        "--batch",
        "8",
        "--steps",
        "4",
        "--sample",
        "0",
        "--eval-every",
        "100",
        "--out",
        str(out),
        "--tensorboard",
        "--profile",
        "2:3",
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MFU" in done.stdout
    assert read_scalars(str(out / "tensorboard"))["loss"]
    assert glob.glob(str(out / "profile" / "**" / "*.xplane.pb"), recursive=True)
    bad = run_jmp("train", "--profile", "5", "--out", str(tmp_path / "x"), timeout=60)
    assert bad.returncode == 2 and "START:END" in bad.stderr and "Traceback" not in bad.stderr
