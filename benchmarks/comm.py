"""Collective bytes of jmp's compiled GPT train step against the textbook optimum, per strategy.

For each strategy (dp and fsdp on data=8, tp and tp_sp on model=8, dp_tp, fsdp_tp, dp_tp_sp and
fsdp_tp_sp on data=2,model=4)
the real train step is compiled (``jmp.train.make_step``, AdamW with global-norm clipping) and
``jmp.inspect.collectives`` reads its collectives from the partitioned HLO.

Everything is compared in bytes one device sends per step with a ring algorithm:
all-reduce ``2(n-1)/n * S``, all-gather / reduce-scatter / all-to-all ``(n-1)/n * S``, S the
full (unsharded over the group) size. ``Collective.bytes`` is the op's RESULT size per device:
S for all-reduce and all-gather, S/n for reduce-scatter.

The optimum, per device and step (d = data axis size, m = model axis size, b = B/d rows):

* gradients over ``data``: a parameter replicated over ``data`` costs one all-reduce of its
  (per-model-shard) gradient, ``2(d-1)/d * P``; a parameter split over ``data`` (FSDP/ZeRO-3)
  costs an all-gather forward, another backward, and a reduce-scatter of its gradient,
  ``3(d-1)/d * P``: 1.5x DP.
* activations over ``model`` (Megatron): per layer 2 all-reduces of b*s*h forward (attention
  output, MLP output) and 2 backward (the inputs' gradients of qkv and the MLP up-projection);
  plus 1 forward for the vocabulary-parallel embedding and 1 backward for the vocabulary-
  parallel head's input gradient: ``(4L + 2) * 2(m-1)/m * b*s*h``; plus the vocabulary-parallel
  cross-entropy's 3 all-reduces of b*s float32 values (max, sum of exponentials, target logit).
* one-element all-reduces (the loss mean, gradient-norm partial sums) are counted separately.

Run: ``python benchmarks/comm.py [--quick]``.
"""

from __future__ import annotations

import math
import time

import common  # first: it sets JAX's environment (cache) and sys.path
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jmp.strategies
from jmp.models.gpt import GPTConfig

BATCH = 16
#: The kinds the textbook optimum below covers (sequence parallelism's reduce-scatter plus
#: all-gather moves what tensor parallelism's all-reduce moves); cp and ep have none here.
TEXTBOOK_KINDS = {"dp", "fsdp", "tp", "sp"}


def optimum(model, cfg: GPTConfig, mesh, batch_size: int) -> dict[str, float]:
    """Textbook ring bytes per device and step: gradient sync over data, activations over model."""
    d, m = mesh.shape.get("data", 1), mesh.shape.get("model", 1)
    grads = {"dp": 0.0, "fsdp": 0.0}
    largest = 0.0
    for a in jax.tree.leaves(nnx.state(model, nnx.Param)):
        axes = {
            ax
            for entry in a.sharding.spec
            if entry is not None
            for ax in ((entry,) if isinstance(entry, str) else entry)
        }
        per_model_shard = a.nbytes / math.prod(mesh.shape[ax] for ax in axes if ax != "data")
        largest = max(largest, per_model_shard)
        if d > 1 and "data" in axes:
            grads["fsdp"] += 3 * (d - 1) / d * per_model_shard
        elif d > 1:
            grads["dp"] += 2 * (d - 1) / d * per_model_shard
    rows = batch_size // d
    act = rows * cfg.seq_len * cfg.d_model * jnp.dtype(cfg.dtype).itemsize
    ar = 2 * (m - 1) / m
    return {
        "grads_dp": grads["dp"],
        "grads_fsdp": grads["fsdp"],
        "megatron": (4 * cfg.n_layers + 2) * ar * act if m > 1 else 0.0,
        "loss": 3 * ar * rows * cfg.seq_len * 4 if m > 1 else 0.0,
        "megatron_count": 4 * cfg.n_layers + 2 if m > 1 else 0,
        "activation_bytes": act,
        "largest_param_bytes": largest,
    }


def measure(strategy: str, spec: str, cfg: GPTConfig, devices) -> dict:
    mesh = common.mesh_for(spec, devices)
    t0 = time.perf_counter()
    model, step, _ = common.build(cfg, strategy, mesh)
    batch = common.random_batch(step.batch_sharding, BATCH, cfg.seq_len, cfg.vocab_size)
    compiled = step.lower(step.init_state(), batch).compile()
    compile_s = time.perf_counter() - t0
    found, unread = common.collectives(compiled, mesh)
    best = optimum(model, cfg, mesh, BATCH)

    by: dict[str, float] = {}
    kinds: dict[str, float] = {}
    scalars = {"count": 0, "ring_bytes": 0.0, "by_axes": {}}
    megatron = 0
    for c in found:
        moved = common.ring_bytes(c, mesh)
        axes = ",".join(c.axes) or "-"
        if common.is_scalar(c):
            scalars["count"] += c.count
            scalars["ring_bytes"] += moved
            scalars["by_axes"][axes] = scalars["by_axes"].get(axes, 0) + c.count
            continue
        by[axes] = by.get(axes, 0.0) + moved
        kinds[f"{c.kind} over {axes}"] = kinds.get(f"{c.kind} over {axes}", 0.0) + moved
        if c.kind == "all-reduce" and c.axes == ("model",) and c.bytes == best["activation_bytes"]:
            megatron += c.count
    total = sum(by.values())
    want_data = best["grads_dp"] + best["grads_fsdp"]
    want_model = best["megatron"] + best["loss"]
    return {
        "strategy": strategy,
        "mesh": spec,
        "mode": cfg.mode,
        "compile_s": compile_s,
        "measured_ring_bytes": total,
        "optimum_ring_bytes": want_data + want_model,
        "ratio": total / (want_data + want_model),
        "data_ratio": by.get("data", 0.0) / want_data if want_data else math.nan,
        "model_ratio": by.get("model", 0.0) / want_model if want_model else math.nan,
        "by_axes": by,
        "by_kind": kinds,
        "optimum": best,
        "scalars": scalars,
        "megatron_all_reduces": megatron,
        "unread_replica_groups": unread,
        "collectives": [c._asdict() for c in found],
    }


def notes_for(results: list[dict], cfg: GPTConfig) -> list[str]:
    notes = [
        "bytes = what one device sends per step with ring algorithms (all-reduce 2(n-1)/n*S, "
        "all-gather/reduce-scatter/all-to-all (n-1)/n*S); ratio = measured / optimum, "
        "target 1.00; one-element all-reduces are left out of both and listed as 'scalars'",
        f"optimum: DP one gradient all-reduce; FSDP all-gather fwd + all-gather bwd + "
        f"reduce-scatter (1.5x DP); TP (4L+2) all-reduces of b*s*h (L={cfg.n_layers}: 2 fwd + "
        f"2 bwd per layer, embedding fwd, head bwd) + 3 loss all-reduces of b*s f32",
    ]
    by_name = {(r["strategy"], r["mode"]): r for r in results}
    for r in results:
        if r["mode"] != "auto":
            continue
        k = r["by_kind"]
        if r["strategy"] in ("fsdp", "fsdp_tp"):
            ag = k.get("all-gather over data", 0.0)
            ar = k.get("all-reduce over data", 0.0)
            rs = k.get("reduce-scatter over data", 0.0)
            a2a = k.get("all-to-all over data", 0.0)
            fs = r["optimum"]["grads_fsdp"]
            text = (
                f"{r['strategy']}: all-gathers moved {common.mib(ag):.2f} MiB vs "
                f"{common.mib(2 * fs / 3):.2f} for gathers fwd+bwd (XLA keeps the forward's "
                f"gathered weights for the backward, no remat: it gathers once); gradients "
                f"went by all-reduce ({common.mib(ar):.2f} MiB) and reduce-scatter "
                f"({common.mib(rs):.2f}) vs {common.mib(fs / 3):.2f} for reduce-scatter "
                f"alone (XLA's CPU partitioner all-reduces, then each device keeps its "
                f"slice). One gather + one all-reduce = 3(n-1)/n*P, the textbook's bytes: "
                f"the two deviations cancel"
            )
            if a2a:
                text += (
                    f"; the token embedding is never gathered: its lookup moves "
                    f"{common.mib(a2a):.2f} MiB of activations by all-to-all instead, "
                    f"hence a ratio below 1"
                )
            notes.append(text)
        if r["strategy"] in ("tp", "dp_tp", "fsdp_tp"):
            notes.append(
                f"{r['strategy']}: {r['megatron_all_reduces']} all-reduces of b*s*h "
                f"over 'model' (Megatron count {r['optimum']['megatron_count']})"
            )
        if r["strategy"] == "fsdp_tp" and r["by_axes"].get("data,model"):
            notes.append(
                f"fsdp_tp: {common.mib(r['by_axes']['data,model']):.2f} MiB of "
                f"all-reduces over both axes at once"
            )
    for r in results:
        auto = by_name.get((r["strategy"], "auto"))
        if r["mode"] != "manual" or not auto or abs(r["ratio"] - auto["ratio"]) < 0.005:
            continue
        k, big = r["by_kind"], r["optimum"]["largest_param_bytes"]
        gathered = [
            c
            for c in r["collectives"]
            if c["kind"] == "all-gather" and tuple(c["axes"]) == ("data",) and c["bytes"] > big
        ]
        text = (
            f"{r['strategy']} manual moves {r['ratio'] / auto['ratio']:.2f}x the bytes of "
            f"auto: all-gathers over data "
            f"{common.mib(k.get('all-gather over data', 0)):.2f} MiB (auto "
            f"{common.mib(auto['by_kind'].get('all-gather over data', 0)):.2f}; shard_map's "
            f"backward gathers the weights again, as the textbook counts), all-to-all over "
            f"data {common.mib(k.get('all-to-all over data', 0)):.2f} MiB"
        )
        if gathered:
            sizes = ", ".join(f"{common.mib(c['bytes']):.2f} MiB" for c in gathered)
            text += (
                f"; all-gathers larger than any parameter: {sizes}, activations: the "
                f"one-hot (global batch x seq x vocab/m) of the manual vocabulary-parallel "
                f"embedding, gathered over data instead of the small table shard"
            )
        notes.append(text)
    scal = "; ".join(
        f"{r['strategy']}{' manual' if r['mode'] == 'manual' else ''} "
        + ", ".join(f"{n} over {a}" for a, n in r["scalars"]["by_axes"].items())
        for r in results
    )
    notes.append(
        f"one-element all-reduces per step, XLA combines them into few ops: the loss "
        f"mean over data, and the gradient norm's partial sums, one per split parameter "
        f"(one norm per step, shared by the clipping, the non-finite guard and the metric): "
        f"{scal}"
    )
    dp, fsdp = by_name.get(("dp", "auto")), by_name.get(("fsdp", "auto"))
    if dp and fsdp:
        notes.append(
            f"fsdp/dp measured bytes: "
            f"{fsdp['measured_ring_bytes'] / dp['measured_ring_bytes']:.3f} (textbook "
            f"{fsdp['optimum_ring_bytes'] / dp['optimum_ring_bytes']:.3f})"
        )
    unread = sum(r["unread_replica_groups"] for r in results)
    if unread:
        notes.append(
            f"{unread} collective executions have replica groups jmp.inspect could not "
            f"read (taken as all devices): their axes and ring factors may be wrong"
        )
    return notes


def plot(results: list[dict]):
    fig, (ax_bytes, ax_ratio) = common.new_figure(2, width=6)
    labels = [
        f"{r['strategy']}\n{r['mesh']}" + ("\nmanual" if r["mode"] == "manual" else "")
        for r in results
    ]
    xs = np.arange(len(results))
    bottom = np.zeros(len(results))
    for axes in ("data", "model", "data,model"):
        vals = np.array([common.mib(r["by_axes"].get(axes, 0.0)) for r in results])
        if vals.any():
            ax_bytes.bar(xs - 0.2, vals, 0.4, bottom=bottom, label=f"measured over {axes}")
            bottom += vals
    opt = [r["optimum"] for r in results]
    ax_bytes.bar(
        xs + 0.2,
        [common.mib(o["grads_dp"] + o["grads_fsdp"]) for o in opt],
        0.4,
        label="optimum: gradients",
        color="lightgray",
        edgecolor="k",
    )
    ax_bytes.bar(
        xs + 0.2,
        [common.mib(o["megatron"] + o["loss"]) for o in opt],
        0.4,
        bottom=[common.mib(o["grads_dp"] + o["grads_fsdp"]) for o in opt],
        label="optimum: activations",
        color="white",
        edgecolor="k",
        hatch="//",
    )
    ax_bytes.set_ylabel("MiB sent per device per step (ring)")
    ax_bytes.set_xticks(xs, labels, fontsize=7)
    ax_bytes.legend(fontsize=7)
    ax_ratio.bar(xs, [r["ratio"] for r in results])
    ax_ratio.axhline(1.0, color="k", ls="--", lw=1)
    ax_ratio.set_ylabel("measured / optimum")
    ax_ratio.set_xticks(xs, labels, fontsize=7)
    fig.suptitle("Collective bytes of the GPT train step vs the textbook optimum")
    return fig


def main() -> None:
    started = time.perf_counter()
    args = common.parse_args(__doc__.splitlines()[0])
    devices = common.setup()
    cfg = GPTConfig.named("tiny")
    meshes = {
        s: m
        for s, m in common.STRATEGY_MESHES.items()
        if {k.name for k in jmp.strategies.parse(s).kinds} <= TEXTBOOK_KINDS
    }
    runs = [(s, spec, "auto") for s, spec in meshes.items()]
    if not args.quick:  # manual mode only changes the tensor-parallel layers
        runs += [(s, spec, "manual") for s, spec in meshes.items() if "model" in spec]
    results = [
        measure(s, spec, GPTConfig(**{**cfg.to_dict(), "mode": mode}), devices)
        for s, spec, mode in runs
    ]
    rows = [
        [
            r["strategy"],
            r["mesh"],
            r["mode"],
            common.mib(r["measured_ring_bytes"]),
            common.mib(r["optimum_ring_bytes"]),
            r["ratio"],
            r["data_ratio"],
            r["model_ratio"],
            f"{r['megatron_all_reduces']}/{r['optimum']['megatron_count']}",
            r["scalars"]["count"],
        ]
        for r in results
    ]
    common.print_table(
        f"Collective bytes per device per step, GPT 'tiny' (L={cfg.n_layers}, d={cfg.d_model}, "
        f"vocab {cfg.vocab_size}, seq {cfg.seq_len}), batch {BATCH}, f32",
        [
            "strategy",
            "mesh",
            "mode",
            "MiB",
            "optimum MiB",
            "ratio",
            "data ratio",
            "model ratio",
            "b*s*h ARs",
            "scalar ARs",
        ],
        rows,
        notes_for(results, cfg),
    )
    common.finish(
        "comm",
        {"quick": args.quick, "config": cfg.to_dict(), "batch": BATCH, "results": results},
        plot(results),
        started,
    )


if __name__ == "__main__":
    main()
