"""How close a jmp train step gets to this machine: model FLOP/s over the peak matmul FLOP/s.

Both are measured in this one process: the peak is the best float32 ``x @ x`` rate of one CPU
device (:func:`jmp.train.speed.measured_cpu_peak`: XLA:CPU spreads one matmul over all cores, and
the 8 simulated devices share those cores, so this is the whole machine's peak); the step's
model FLOPs are jmp's own count (:meth:`jmp.train.Step.model_flops`: 3x the forward's matmul
FLOPs). Strategies alternate round by round (these 2-core machines are noisy).

Workload: ``GPTConfig.named("medium")`` (4 layers, d_model 256, vocabulary 1024, sequence 128),
global batch 8, f32, AdamW, on 8 simulated devices (tp on 4: the model has 4 heads).

Run: ``python benchmarks/efficiency.py [--quick]``.
"""

from __future__ import annotations

import time

import common  # first: it sets JAX's environment (cache) and sys.path

from jmp.models.gpt import GPTConfig
from jmp.train.speed import measured_cpu_peak

#: strategy -> mesh (the medium model's 4 heads split at most 4 ways: tp on 4 devices)
MESHES = {
    "dp": "data=8",
    "fsdp": "data=8",
    "tp": "model=4",
    "dp_tp": "data=2,model=4",
    "fsdp_tp": "data=2,model=4",
    "dp_tp_sp": "data=2,model=4",
    "dp_cp": "data=2,context=4",
}
STRATEGIES = tuple(MESHES)
BATCH = 8


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    devices = common.setup()
    cfg = GPTConfig.named("medium")
    peak = measured_cpu_peak()
    runners, flops, meshes = {}, {}, {}
    for strategy in STRATEGIES:
        mesh = common.mesh_for(MESHES[strategy], devices)
        _, step, _ = common.build(cfg, strategy, mesh)
        batch = common.random_batch(step.batch_sharding, BATCH, cfg.seq_len, cfg.vocab_size)
        flops[strategy] = step.model_flops(batch)
        meshes[strategy] = MESHES[strategy]
        box = {"state": step.init_state()}

        def run(step=step, batch=batch, box=box):
            box["state"], metrics = step(box["state"], batch)
            return metrics

        runners[strategy] = run
    rounds = 3 if args.quick else 8
    times = common.interleaved(runners, rounds=rounds, steps=3, warmup=2)
    rows, data = [], {"peak_flops_per_s": peak, "strategies": {}}
    for strategy in STRATEGIES:
        step_s = common.median(times[strategy])
        rate = flops[strategy] / step_s
        rows.append([strategy, meshes[strategy], step_s * 1e3, rate / 1e9, rate / peak])
        data["strategies"][strategy] = {
            "mesh": meshes[strategy],
            "step_s": step_s,
            "model_flops": flops[strategy],
            "flops_per_s": rate,
            "efficiency": rate / peak,
        }
    common.print_table(
        f"model FLOP/s over this machine's peak matmul rate ({peak / 1e9:.0f} GFLOP/s, "
        "measured in this run)",
        ["strategy", "mesh", "step ms", "model GFLOP/s", "of peak"],
        rows,
        [f"medium GPT, batch {BATCH}, f32, 8 simulated CPU devices; medians of {rounds} rounds"],
    )
    fig, ax = common.new_figure()
    ax.bar(list(STRATEGIES), [data["strategies"][s]["efficiency"] for s in STRATEGIES])
    ax.set_ylabel("model FLOP/s / peak matmul FLOP/s")
    common.finish("efficiency", data, fig, started)


if __name__ == "__main__":
    main()
