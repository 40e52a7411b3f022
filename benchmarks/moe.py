"""A mixture-of-experts GPT under expert parallelism against data parallelism, side by side.

The real jmp train step (AdamW) of a small GPT whose every second block is a mixture of 8
SwiGLU experts, 2 per token (``GPTConfig.named("small", n_experts=8, top_k=2, moe_every=2)``),
global batch 16, on 8 simulated CPU devices: ``dp`` (every device holds every expert; dropless
grouped matmuls, ``jax.lax.ragged_dot``) against ``ep`` (expert=8) and ``dp_ep``
(data=2,expert=4), where tokens travel to their experts' devices by all-to-all. Per variant:
tokens/s (medians of interleaved steps, the ratio to dp paired by round), the all-to-alls of
the compiled step over 'expert' (count and bytes per device, from ``jmp.inspect``), and the
parameter bytes per device. On 2 shared cores this ranks partitioning overheads; it is not a
parallel speed-up.

    .venv/bin/python benchmarks/moe.py [--quick]
"""

from __future__ import annotations

import time

import common  # first: it sets JAX's environment (cache) and sys.path
import optax

import jmp
from jmp.models import GPT, GPTConfig
from jmp.train import make_step

BATCH = 16
RUNS = [("dp", "data=8"), ("ep", "expert=8"), ("dp_ep", "data=2,expert=4")]


def main() -> None:
    started = time.perf_counter()
    args = common.parse_args(__doc__.splitlines()[0])
    devices = common.setup()
    cfg = GPTConfig.named("small", n_experts=8, top_k=2, moe_every=2)
    runners, rows, data = {}, [], {"config": cfg.to_dict(), "batch": BATCH, "runs": {}}
    for strategy, spec in RUNS:
        mesh = common.mesh_for(spec, devices)
        rules = jmp.rules.preset(strategy, mesh)
        model = jmp.shard_init(lambda rngs: GPT(cfg, rngs=rngs), mesh, rules)
        step = make_step(model, optax.adamw(1e-3), mesh, rules)
        batch = common.random_batch(step.batch_sharding, BATCH, cfg.seq_len, cfg.vocab_size)
        state = step.init_state()
        compiled = step.lower(state, batch).compile()
        found, _ = common.collectives(compiled, mesh)
        a2a = [c for c in found if c.kind == "all-to-all" and "expert" in c.axes]
        ops = sum(c.count for c in a2a)  # executions per step (loops applied)
        params = jmp.param_table(state.params)

        def run(step=step, box=[state], batch=batch):  # noqa: B006 (the state moves on)
            box[0], metrics = step(box[0], batch)
            return metrics["loss"]

        runners[f"{strategy} {spec}"] = run
        data["runs"][f"{strategy} {spec}"] = {
            "all_to_all_ops": ops,
            "all_to_all_bytes_per_device": sum(c.total_bytes for c in a2a),
            "param_bytes_per_device": params.bytes_per_device,
        }
    times = common.interleaved(runners, rounds=2 if args.quick else 6, steps=2)
    base = times[f"{RUNS[0][0]} {RUNS[0][1]}"]
    for key, run in data["runs"].items():
        run["median_step_s"] = common.median(times[key])
        run["tokens_per_s"] = BATCH * cfg.seq_len / run["median_step_s"]
        run["speed_vs_dp"] = 1 / common.paired_ratio(times[key], base, group=2)
        rows.append(
            [
                key,
                run["tokens_per_s"],
                run["speed_vs_dp"],
                run["all_to_all_ops"],
                common.mib(run["all_to_all_bytes_per_device"]),
                common.mib(run["param_bytes_per_device"]),
            ]
        )
    common.print_table(
        f"MoE GPT ({cfg.num_params():,} parameters, {cfg.num_active_params():,} active per token;"
        f" batch {BATCH} x {cfg.seq_len}), 8 simulated CPU devices",
        ["strategy", "tokens/s", "x dp", "all-to-alls", "a2a MiB/device", "params MiB/device"],
        rows,
        [
            "all-to-alls over 'expert' per step (jmp.inspect; per MoE layer: the forward's "
            "dispatch and combine, the backward's two); MiB = their results per device",
        ],
    )
    fig, ax = common.new_figure()
    ax.bar(list(data["runs"]), [r["tokens_per_s"] for r in data["runs"].values()])
    ax.set_ylabel("tokens/s (8 simulated CPU devices)")
    common.finish("moe", data, fig, started)


if __name__ == "__main__":
    main()
