"""Training throughput (tokens/s) of each strategy on several mesh shapes of 8 simulated devices.

A small GPT is trained a few steps under every (strategy, mesh) pair; the pairs are compiled
first, then timed alternately (round-robin, rotated order) so machine load hits all alike.
A one-device run gives the reference. On 8 CPU devices simulated on a 2-core machine the
devices share the cores, so this measures partitioning overhead (collectives, duplicated work,
small kernels), not parallel speed-up: absolute scaling needs real accelerators.

Run: ``python benchmarks/scaling.py [--quick]``.
"""

from __future__ import annotations

import time

import common  # first: it sets JAX's environment (cache) and sys.path
import numpy as np

from jmp.models.gpt import GPTConfig

BATCH = 16
RUNS = [
    ("dp", "data=1"),
    ("dp", "data=8"),
    ("fsdp", "data=8"),
    ("tp", "model=8"),
    ("dp_tp", "data=4,model=2"),
    ("dp_tp", "data=2,model=4"),
    ("fsdp_tp", "data=4,model=2"),
    ("fsdp_tp", "data=2,model=4"),
]
QUICK_RUNS = [
    ("dp", "data=1"),
    ("dp", "data=8"),
    ("fsdp", "data=8"),
    ("tp", "model=8"),
    ("dp_tp", "data=2,model=4"),
]


def main() -> None:
    started = time.perf_counter()
    args = common.parse_args(__doc__.splitlines()[0])
    devices = common.setup()
    cfg = GPTConfig.named("small")
    runs = QUICK_RUNS if args.quick else RUNS
    steps, compile_s = {}, {}
    for strategy, spec in runs:
        key = f"{strategy} {spec}"
        t0 = time.perf_counter()
        mesh = common.mesh_for(spec, devices)
        _, step, _ = common.build(cfg, strategy, mesh)
        batch = common.random_batch(step.batch_sharding, BATCH, cfg.seq_len, cfg.vocab_size)
        holder = {"state": step.init_state()}

        def run(step=step, batch=batch, holder=holder):
            holder["state"], metrics = step(holder["state"], batch)
            return metrics["loss"]

        common.block(run())  # compiles
        compile_s[key] = time.perf_counter() - t0
        steps[key] = run
    times = common.interleaved(steps, rounds=2 if args.quick else 6, steps=2, warmup=0)
    tokens = BATCH * cfg.seq_len
    results = []
    base = common.median(times[f"{runs[0][0]} {runs[0][1]}"])
    for (strategy, spec), key in zip(runs, steps, strict=True):
        s = common.median(times[key])
        results.append(
            {
                "strategy": strategy,
                "mesh": spec,
                "median_step_s": s,
                "tokens_per_s": tokens / s,
                "vs_one_device": base / s,
                "step_times_s": times[key],
                "first_step_with_compile_s": compile_s[key],
            }
        )
    rows = [
        [
            r["strategy"],
            r["mesh"],
            r["median_step_s"],
            r["tokens_per_s"],
            r["vs_one_device"],
            r["first_step_with_compile_s"],
        ]
        for r in results
    ]
    notes = [
        f"GPT 'small' ({cfg.num_params():,} parameters, L={cfg.n_layers}, d={cfg.d_model}, "
        f"seq {cfg.seq_len}), global batch {BATCH} ({tokens} tokens/step), f32, AdamW",
        "medians of per-step times over rounds that alternate every configuration; "
        "'vs 1 device' = throughput / throughput of dp on data=1",
        "the 8 simulated devices share this machine's 2 cores (and other jobs): a ratio "
        "to one device shows how well each partitioned program keeps the cores busy "
        "(kernel sizes, collectives, duplicated work), not parallel speed-up, which needs "
        "real accelerators",
    ]
    common.print_table(
        "Training throughput per strategy and mesh (8 simulated CPU devices)",
        ["strategy", "mesh", "s/step", "tokens/s", "vs 1 device", "1st step (compile) s"],
        rows,
        notes,
    )
    fig, ax = common.new_figure(1, width=8)
    xs = np.arange(len(results))
    lo = [r["median_step_s"] - np.percentile(r["step_times_s"], 25) for r in results]
    hi = [np.percentile(r["step_times_s"], 75) - r["median_step_s"] for r in results]
    tps = np.array([r["tokens_per_s"] for r in results])
    err = [
        tps - tokens / (np.array([r["median_step_s"] for r in results]) + np.array(hi)),
        tokens / np.maximum(np.array([r["median_step_s"] for r in results]) - np.array(lo), 1e-9)
        - tps,
    ]
    ax.bar(xs, tps, yerr=err, capsize=3)
    ax.set_xticks(
        xs, [f"{r['strategy']}\n" + r["mesh"].replace(",", "\n") for r in results], fontsize=7
    )
    ax.set_ylabel("tokens / s")
    ax.set_title(f"GPT 'small' training throughput, batch {BATCH} x {cfg.seq_len}")
    common.finish(
        "scaling",
        {"quick": args.quick, "config": cfg.to_dict(), "batch": BATCH, "results": results},
        fig,
        started,
    )


if __name__ == "__main__":
    main()
