"""Pipeline bubble and memory: GPipe vs 1F1B against the theory, side by side in one run.

Three measurements:

1. **Counted bubble**: the idle share of stage-time in the schedule the pipeline executes (the
   same ``(tick, stage) -> microbatch`` tables its scans run, forward 1 and backward 2 time
   units), for S in {2, 4, 8} and M from 1 to 32, against ``(S - 1) / (M + S - 1)``.
2. **Timed bubble**: the compiled 1F1B and GPipe train computations (loss and gradients) timed
   for M = 1, 2, 4, 8 microbatches of a fixed size. Every tick costs the same in lockstep
   (idle stages compute masked work), so ``time(M) = a * (M + idle ticks)``: a line fit gives
   the idle ticks (theory: S - 1) and the idle fraction at each M. On simulated CPU devices
   all stages share the host's cores, so this measures the schedule's total work, which is
   what lockstep makes the bubble cost; absolute times mean nothing here.
3. **Memory**: per-device temporary bytes of the compiled programs of both schedules per M.

Writes ``benchmarks/results/pipeline.json`` and ``pipeline.png``. About 2-3 minutes on 2 cores
(less with a warm compilation cache).

Usage:
    python benchmarks/pipeline.py            # everything
    python benchmarks/pipeline.py --quick    # S=4 only, M up to 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, _ROOT)

import jmp  # noqa: E402

jmp.simulate_cpu_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jmp.inspect import memory  # noqa: E402
from jmp.models import GPTConfig  # noqa: E402
from jmp.pipeline import PipelinedGPT, make_schedule, pipeline_loss_and_grads  # noqa: E402

CFG = GPTConfig.named("tiny", n_layers=8, d_model=64, n_heads=4, seq_len=64)
ROWS = 4  # rows per microbatch: M microbatches make a batch of ROWS * M


def theory(S: int, M: int) -> float:
    return (S - 1) / (M + S - 1)


def counted(stages: list[int], ms: list[int]) -> list[dict]:
    rows = []
    for S in stages:
        for M in ms:
            for name in ("gpipe", "1f1b"):
                plan = make_schedule(name, S, M)
                rows.append(
                    dict(
                        schedule=name,
                        S=S,
                        M=M,
                        ticks=plan.ticks,
                        idle=plan.idle_fraction(),
                        theory=theory(S, M),
                        in_flight=int(plan.in_flight().max()),
                    )
                )
    return rows


def compile_run(S: int, M: int, schedule: str) -> tuple:
    mesh = jmp.make_mesh(f"stage={S},data=1", devices=jax.devices()[:S])
    rules = jmp.rules.preset("pp" if "pp" in jmp.rules.STRATEGIES else "dp", mesh)
    model = jmp.shard_init(
        lambda rngs: PipelinedGPT(CFG, num_stages=S, rngs=rngs), mesh, rules, seed=0
    )
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(
        np.random.default_rng(M).integers(0, 256, (ROWS * M, CFG.seq_len)), jnp.int32
    )

    def run(params, batch):
        with jmp.activate(mesh, rules):
            return pipeline_loss_and_grads(
                nnx.merge(graphdef, params), batch, mesh=mesh, num_microbatches=M, schedule=schedule
            )

    with jmp.activate(mesh, rules):
        compiled = jax.jit(run).lower(params, (tokens, tokens)).compile()
    return compiled, params, (tokens, tokens)


def timed(stages: list[int], ms: list[int], mem_ms: list[int], rounds: int) -> tuple:
    """Step times per (schedule, S, M), and temporary bytes per (schedule, M) at max(stages).

    All programs of one S are compiled first, then timed round-robin ``rounds`` times, keeping
    each one's fastest run: load from other processes only ever adds time, and interleaving
    spreads what is left evenly over the M values being compared.
    """
    times: dict = {}
    temps: dict = {}
    for S in stages:
        programs = {}
        for M in sorted(set(ms) | (set(mem_ms) if S == max(stages) else set())):
            for name in ("gpipe", "1f1b"):
                compiled, params, batch = compile_run(S, M, name)
                if S == max(stages) and M in mem_ms:
                    temps[name, M] = memory(compiled).temporaries
                if M in ms:
                    jax.block_until_ready(compiled(params, batch))  # warm up
                    programs[name, S, M] = (compiled, params, batch)
        for _ in range(rounds):
            for key, (compiled, params, batch) in programs.items():
                start = time.perf_counter()
                jax.block_until_ready(compiled(params, batch))
                took = time.perf_counter() - start
                times[key] = min(times.get(key, took), took)
        for name, S_, M in programs:
            print(f"  S={S_} M={M:>2} {name:>5}: {times[name, S_, M] * 1e3:7.1f} ms", flush=True)
    return times, temps


def fit(times: dict, name: str, S: int, ms: list[int]) -> dict:
    """time = a * M + c  ->  idle ticks c / a, and the idle fraction at each M."""
    t = np.array([times[name, S, M] for M in ms])
    a, c = np.polyfit(np.array(ms, float), t, 1)
    return dict(
        schedule=name,
        S=S,
        idle_ticks=float(c / a),
        theory_ticks=S - 1,
        measured={M: float(1 - a * M / tm) for M, tm in zip(ms, t, strict=True)},
        times_ms={M: float(tm * 1e3) for M, tm in zip(ms, t, strict=True)},
    )


def plot(counts: list[dict], fits: list[dict], temps: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    stages = sorted({r["S"] for r in counts})
    for S, color in zip(stages, ("C0", "C1", "C2", "C3"), strict=False):
        ms = sorted({r["M"] for r in counts if r["S"] == S})
        grid = np.linspace(min(ms), max(ms), 200)
        ax1.plot(grid, (S - 1) / (grid + S - 1), color=color, lw=1, label=f"theory S={S}")
        for marker, name in (("o", "gpipe"), ("x", "1f1b")):
            pts = [(r["M"], r["idle"]) for r in counts if r["S"] == S and r["schedule"] == name]
            ax1.plot(
                *zip(*pts, strict=True),
                marker,
                color=color,
                ms=5,
                fillstyle="none",
                label=f"counted {name} S={S}" if S == stages[0] else None,
            )
        for f in fits:
            if f["S"] == S:
                pts = sorted(f["measured"].items())
                ax1.plot(
                    *zip(*pts, strict=True),
                    "s" if f["schedule"] == "gpipe" else "^",
                    color=color,
                    ms=6,
                    alpha=0.6,
                    label=f"timed {f['schedule']} S={S}",
                )
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("microbatches M")
    ax1.set_ylabel("idle (bubble) fraction")
    ax1.set_title("bubble: (S-1)/(M+S-1)")
    ax1.legend(fontsize=7, ncol=2)
    ms = sorted({m for _, m in temps})
    for name, marker in (("gpipe", "o-"), ("1f1b", "x-")):
        ax2.plot(ms, [temps[name, m] / 2**20 for m in ms], marker, label=name)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel(f"microbatches M ({ROWS} rows each)")
    ax2.set_ylabel("temporary MiB per device")
    ax2.set_title(f"memory, S={max(f['S'] for f in fits) if fits else '?'}")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="S=4 only, M up to 8")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    stages = [4] if args.quick else [2, 4]
    ms = [1, 2, 4, 8]
    mem_ms = [1, 2, 4, 8] if args.quick else [1, 2, 4, 8, 16]

    counts = counted([2, 4, 8], [1, 2, 4, 8, 16, 32])
    print("counted idle fraction (forward 1, backward 2 time units per microbatch and stage)")
    print(f"{'S':>3} {'M':>3} {'theory':>7} {'gpipe':>7} {'1f1b':>7} {'1f1b live':>9}")
    for r in counts:
        if r["schedule"] == "gpipe":
            o = next(
                x
                for x in counts
                if x["schedule"] == "1f1b" and x["S"] == r["S"] and x["M"] == r["M"]
            )
            print(
                f"{r['S']:>3} {r['M']:>3} {r['theory']:7.3f} {r['idle']:7.3f} "
                f"{o['idle']:7.3f} {o['in_flight']:>9}"
            )

    print(
        f"\ntiming and memory ({CFG.n_layers} blocks, d_model {CFG.d_model}, {ROWS} rows x "
        f"{CFG.seq_len} tokens per microbatch, stage=S on S simulated CPU devices)"
    )
    start = time.time()
    times, temps = timed(stages, ms, mem_ms, args.rounds)
    fits = [fit(times, name, S, ms) for S in stages for name in ("gpipe", "1f1b")]
    print(f"\ntimed idle fraction: time(M) = a (M + idle ticks), fitted over M = {ms}")
    print(
        f"{'sched':>6} {'S':>3} {'idle ticks':>10} {'theory':>6}   "
        + "  ".join(f"M={M}: meas/theory" for M in ms)
    )
    for f in fits:
        cells = "  ".join(f"{f['measured'][M]:6.3f}/{theory(f['S'], M):.3f}   " for M in ms)
        print(
            f"{f['schedule']:>6} {f['S']:>3} {f['idle_ticks']:10.2f} {f['theory_ticks']:>6}   "
            f"{cells}"
        )
    print(f"\ntemporary memory per device, S={max(stages)}")
    print(f"{'M':>3} {'gpipe MiB':>10} {'1f1b MiB':>9} {'ratio':>6}")
    for M in mem_ms:
        g, o = temps["gpipe", M], temps["1f1b", M]
        print(f"{M:>3} {g / 2**20:10.3f} {o / 2**20:9.3f} {o / g:6.3f}")

    os.makedirs(args.out, exist_ok=True)
    result = dict(
        model=CFG.to_dict(),
        rows_per_microbatch=ROWS,
        counted=counts,
        timed=fits,
        temporaries={f"{n}/M={m}": b for (n, m), b in temps.items()},
        memory_stages=max(stages),
        seconds=time.time() - start,
    )
    with open(os.path.join(args.out, "pipeline.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(counts, fits, temps, os.path.join(args.out, "pipeline.png"))
    print(f"\nwrote {args.out}/pipeline.json and pipeline.png")


if __name__ == "__main__":
    main()
