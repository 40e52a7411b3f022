"""Per-device parameter + optimizer-state bytes per strategy, against total / shard factor.

For each strategy the GPT train state (parameters, AdamW moments, counters) is built by jmp and
measured two ways: from the live arrays (bytes of each device's addressable shards) and from the
compiled step (``jmp.inspect.memory``: argument bytes minus the token batch). The ideal is the
whole state divided by the number of ways the strategy splits it: dp 1, fsdp 8 (data),
tp 8 (model), dp_tp 4 (model; data holds replicas), fsdp_tp 8 (data x model).

Run: ``python benchmarks/memory.py [--quick]``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import common  # first: it sets JAX's environment (cache) and sys.path
import jax
import numpy as np
from flax import nnx

from jmp.models.gpt import GPTConfig

BATCH = 16
SHARD_AXES = {
    "dp": (),
    "fsdp": ("data",),
    "tp": ("model",),
    "dp_tp": ("model",),
    "fsdp_tp": ("data", "model"),
}


def per_device_bytes(tree) -> dict:
    """Bytes of the tree's shards on each device."""
    out: dict = defaultdict(int)
    for a in jax.tree.leaves(tree):
        for shard in a.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return out


def split_ways(a: jax.Array) -> int:
    return math.prod(
        a.sharding.mesh.shape[ax]
        for entry in a.sharding.spec
        if entry is not None
        for ax in ((entry,) if isinstance(entry, str) else entry)
    )


def measure(strategy: str, spec: str, cfg: GPTConfig, devices) -> dict:
    mesh = common.mesh_for(spec, devices)
    model, step, _ = common.build(cfg, strategy, mesh)
    state = step.init_state()
    factor = math.prod(mesh.shape[a] for a in SHARD_AXES[strategy])
    total = sum(a.nbytes for a in jax.tree.leaves(state))
    live = per_device_bytes(state)
    batch = common.random_batch(step.batch_sharding, BATCH, cfg.seq_len, cfg.vocab_size)
    compiled = step.lower(state, batch).compile()
    mem = common.jinspect.memory(compiled)
    batch_bytes = max(per_device_bytes(batch).values())
    # what stays (partly) whole: parameters split fewer ways than the strategy's factor
    under: dict[str, dict[str, int]] = {}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        if split_ways(a) < factor:
            keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
            name = "/".join(
                "*" if keys[0] == "blocks" and i == 1 else k for i, k in enumerate(keys)
            )
            entry = under.setdefault(name, {"count": 0, "per_device": 0, "full": 0})
            entry["count"] += 1
            entry["per_device"] += a.nbytes // split_ways(a)
            entry["full"] += a.nbytes
    ideal = total / factor
    return {
        "strategy": strategy,
        "mesh": spec,
        "shard_factor": factor,
        "total_bytes": total,
        "ideal_per_device": ideal,
        "live_max_per_device": max(live.values()),
        "live_min_per_device": min(live.values()),
        "compiled_state_per_device": mem.arguments - batch_bytes,
        "compiled": mem._asdict(),
        "batch_bytes_per_device": batch_bytes,
        "live_ratio": max(live.values()) / ideal,
        "compiled_ratio": (mem.arguments - batch_bytes) / ideal,
        "params_split_fewer_ways": under,
    }


def plot(results: list[dict]):
    fig, ax = common.new_figure(1, width=8)
    xs = np.arange(len(results))
    series = [
        ("ideal: total / factor", "ideal_per_device"),
        ("live shards (max device)", "live_max_per_device"),
        ("compiled: arguments - batch", "compiled_state_per_device"),
    ]
    for i, (label, key) in enumerate(series):
        ax.bar(xs + (i - 1) * 0.27, [common.mib(r[key]) for r in results], 0.27, label=label)
    ax.set_xticks(xs, [f"{r['strategy']}\n{r['mesh']}" for r in results])
    for x, r in zip(xs, results, strict=True):
        ax.annotate(
            f"x{r['live_ratio']:.3f}",
            (x, common.mib(r["live_max_per_device"])),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 8),
            textcoords="offset points",
        )
    ax.set_ylabel("MiB per device")
    ax.legend(fontsize=8)
    ax.set_title("Parameters + AdamW state per device vs the ideal split")
    return fig


def main() -> None:
    started = time.perf_counter()
    args = common.parse_args(__doc__.splitlines()[0])
    devices = common.setup()
    cfg = GPTConfig.named("tiny" if args.quick else "small")
    # the strategies whose parameter split SHARD_AXES states (a dense GPT: no cp or ep)
    meshes = {s: m for s, m in common.STRATEGY_MESHES.items() if s in SHARD_AXES}
    results = [measure(s, spec, cfg, devices) for s, spec in meshes.items()]
    rows = [
        [
            r["strategy"],
            r["mesh"],
            r["shard_factor"],
            common.mib(r["total_bytes"]),
            common.mib(r["ideal_per_device"]),
            common.mib(r["live_max_per_device"]),
            common.mib(r["compiled_state_per_device"]),
            r["live_ratio"],
            r["compiled_ratio"],
            common.mib(r["compiled"]["temporaries"]),
        ]
        for r in results
    ]
    notes = [
        "state = parameters + AdamW mu and nu + step and optimizer counters (f32); "
        "ratio = per-device bytes / (total / shard factor), target 1.00; 'compiled' = "
        "jmp.inspect.memory arguments minus the token batch; 'temp' = its temporaries "
        "(activations, gradients, workspace) for a batch of "
        f"{BATCH}, for information (XLA:CPU's peak figure leaves them out)"
    ]
    for r in results:
        under = r["params_split_fewer_ways"]
        if not under:
            continue
        held = 3 * sum(u["per_device"] for u in under.values())  # parameter, mu, nu
        split = 3 * sum(u["full"] for u in under.values()) / r["shard_factor"]
        without = (r["live_max_per_device"] - held + split) / r["ideal_per_device"]
        names = sorted(under, key=lambda n: -under[n]["per_device"])  # largest first
        notes.append(
            f"{r['strategy']}: parameters split fewer than {r['shard_factor']} ways "
            f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) hold "
            f"{common.mib(held):.3f} MiB per device with their moments, "
            f"{common.mib(split):.3f} if split {r['shard_factor']} ways: ratio "
            f"{without:.3f} without them"
        )
    name = "tiny" if args.quick else "small"
    common.print_table(
        f"Parameter + optimizer bytes per device, GPT '{name}' ({cfg.num_params():,} parameters)",
        [
            "strategy",
            "mesh",
            "factor",
            "total MiB",
            "ideal MiB",
            "live MiB",
            "compiled MiB",
            "live ratio",
            "compiled ratio",
            "temp MiB",
        ],
        rows,
        notes,
    )
    common.finish(
        "memory",
        {"quick": args.quick, "config": cfg.to_dict(), "batch": BATCH, "results": results},
        plot(results),
        started,
    )


if __name__ == "__main__":
    main()
