"""Tokens/s and MFU of jmp's GPT train step on one NVIDIA GPU, at several model sizes.

Each size trains with ``dtype="bfloat16"`` compute (float32 parameters and AdamW state) under
``dp_tp`` on a one-device mesh (data=1,model=1). Model FLOPs per step are
``6 * N * tokens`` (N = parameters that multiply: everything but the token and position tables,
the output head included) plus attention, ``6 * L * seq * d_model`` per token (QK^T and AV,
forward and backward, causal counted at half); MFU divides their rate by the GPU's dense bf16
peak (H100/H200 989 TFLOP/s, A100 312; from ``device_kind``, or ``--peak-flops``).

A size that runs out of memory is reported and skipped; sizes are skipped once the time budget
(``--budget-s``, default 210 s, compile included) is spent. Without a GPU it exits 0.

Run: ``python benchmarks/gpu.py [--quick] [--peak-flops 989e12]``.
"""

from __future__ import annotations

import gc
import sys
import time

import common  # first: it sets JAX's environment (cache) and sys.path
import jax
import numpy as np

import jmp
from jmp.models.gpt import GPTConfig

PEAK_BF16 = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
)
# name, model shape, global batch; tokens per step grow with the model so the GPU stays busy
SIZES = [
    ("125m", dict(d_model=768, n_layers=12, n_heads=12, vocab_size=32768, seq_len=1024), 16),
    ("350m", dict(d_model=1024, n_layers=24, n_heads=16, vocab_size=32768, seq_len=1024), 16),
    ("760m", dict(d_model=1536, n_layers=24, n_heads=16, vocab_size=32768, seq_len=1024), 16),
    ("1.3b", dict(d_model=2048, n_layers=24, n_heads=16, vocab_size=32768, seq_len=2048), 8),
]
QUICK_SIZES = ["125m", "350m"]
CPU_SMOKE = [("smoke", dict(d_model=64, n_layers=2, n_heads=4, vocab_size=256, seq_len=64), 4)]


def model_flops_per_step(cfg: GPTConfig, batch: int) -> float:
    n_matmul = cfg.num_params() - cfg.vocab_size * cfg.d_model - cfg.seq_len * cfg.d_model
    tokens = batch * cfg.seq_len
    attention = 6 * cfg.n_layers * cfg.seq_len * cfg.d_model  # 12 L s d, causal half
    return tokens * (6 * n_matmul + attention)


def peak_flops(device: jax.Device, override: float | None) -> float | None:
    if override:
        return override
    kind = device.device_kind.upper()
    return next((peak for name, peak in PEAK_BF16 if name in kind), None)


def footprint(mem: dict) -> int:
    """Peak bytes on the device as XLA plans them (its own peak figure when it gives one)."""
    return mem["peak"] or mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]


def is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".upper()
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "OUT OF MEMORY", "OOM"))


def run_size(name: str, shape: dict, batch: int, device: jax.Device, steps: int) -> dict:
    cfg = GPTConfig(**shape, dtype="bfloat16")
    mesh = jmp.make_mesh("data=1,model=1", devices=[device])
    t0 = time.perf_counter()
    _, step, _ = common.build(cfg, "dp_tp", mesh)
    state = step.init_state()
    data = common.random_batch(step.batch_sharding, batch, cfg.seq_len, cfg.vocab_size)
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    mem = common.jinspect.memory(compiled)
    xla_flops = common.jinspect.flops(compiled)
    del compiled
    for _ in range(2):  # warm up: the first call also loads the executable
        state, metrics = step(state, data)
    common.block(metrics)
    t1 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, data)
    loss = float(metrics["loss"])  # waits for the last step
    step_s = (time.perf_counter() - t1) / steps
    flops = model_flops_per_step(cfg, batch)
    return {
        "size": name,
        "config": cfg.to_dict(),
        "params": cfg.num_params(),
        "batch": batch,
        "tokens_per_step": batch * cfg.seq_len,
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_per_s": batch * cfg.seq_len / step_s,
        "model_flops_per_step": flops,
        "model_flops_per_s": flops / step_s,
        "xla_flops_per_step": xla_flops,
        "loss": loss,
        "memory": mem._asdict(),
        "status": "ok",
    }


def main() -> None:
    started = time.perf_counter()

    def extra(parser):
        parser.add_argument(
            "--peak-flops",
            type=float,
            default=None,
            help="dense bf16 peak of the GPU in FLOP/s (default: from its name)",
        )
        parser.add_argument(
            "--budget-s",
            type=float,
            default=210.0,
            help="skip the remaining sizes once this many seconds have passed",
        )
        parser.add_argument("--steps", type=int, default=10, help="timed steps per size")
        parser.add_argument(
            "--cpu-smoke",
            action="store_true",
            help="(testing) run a tiny size on CPU instead of exiting",
        )

    args = common.parse_args(__doc__.splitlines()[0], extra)
    device = jax.devices()[0]
    if device.platform != "gpu" and not args.cpu_smoke:
        print(
            f"gpu.py: no GPU here (JAX's first device is {device.platform!r}): nothing to "
            f"measure. Run it on a machine with an NVIDIA GPU and jax[cuda]."
        )
        return
    sizes = (
        CPU_SMOKE
        if device.platform != "gpu"
        else ([s for s in SIZES if s[0] in QUICK_SIZES] if args.quick else SIZES)
    )
    peak = peak_flops(device, args.peak_flops)
    results = []
    last_s = 0.0
    for name, shape, batch in sizes:
        # the next size costs more than the last one: skip it if it would not fit the budget
        if time.perf_counter() - started + 1.5 * last_s > args.budget_s:
            results.append({"size": name, "status": f"skipped (time budget {args.budget_s:.0f} s)"})
            continue
        size_started = time.perf_counter()
        try:
            row = run_size(name, shape, batch, device, args.steps)
            row["mfu"] = row["model_flops_per_s"] / peak if peak else float("nan")
        except Exception as err:  # noqa: BLE001 - an OOM is a result; other errors are too
            status = "out of memory" if is_oom(err) else f"failed: {type(err).__name__}"
            print(f"{name}: {status}: {str(err).splitlines()[0][:200]}", file=sys.stderr)
            row = {"size": name, "status": status, "error": str(err)[:2000]}
        results.append(row)
        last_s = time.perf_counter() - size_started
        gc.collect()
        jax.clear_caches()
        print(
            f"  {name}: {row.get('status')} ({time.perf_counter() - started:.0f} s so far)",
            flush=True,
        )

    ok = [r for r in results if r.get("status") == "ok"]
    rows = [
        [
            r["size"],
            f"{r['params'] / 1e6:,.0f}M",
            r["batch"],
            r["config"]["seq_len"],
            r["step_s"],
            r["tokens_per_s"],
            r["model_flops_per_s"] / 1e12,
            r["mfu"],
            r["compile_s"],
            common.mib(footprint(r["memory"])) / 1024,
        ]
        if r.get("status") == "ok"
        else [r["size"], *[""] * 8, r["status"]]
        for r in results
    ]
    notes = [
        f"device: {device.device_kind}; peak {peak / 1e12:.0f} TFLOP/s dense bf16"
        if peak
        else f"device: {device.device_kind}; peak unknown (pass --peak-flops)",
        "model FLOPs = 6*N*tokens + 6*L*seq*d*tokens (attention, causal half); N excludes "
        "the token and position tables; bf16 compute, f32 parameters and AdamW, no remat",
        "dp_tp on a one-device mesh (data=1,model=1): no collectives",
    ]
    common.print_table(
        "jmp GPT training on one GPU",
        [
            "size",
            "params",
            "batch",
            "seq",
            "s/step",
            "tokens/s",
            "TFLOP/s",
            "MFU",
            "compile s",
            "peak GiB",
        ],
        rows,
        notes,
    )
    fig, ax = common.new_figure(1, width=7)
    if ok:
        xs = np.arange(len(ok))
        ax.bar(xs, [r["mfu"] if peak else r["model_flops_per_s"] / 1e12 for r in ok])
        ax.set_xticks(xs, [f"{r['size']}\n{r['tokens_per_s']:,.0f} tok/s" for r in ok])
        ax.set_ylabel("MFU" if peak else "model TFLOP/s")
    ax.set_title(f"jmp GPT training, {device.device_kind}, bf16")
    name = "gpu" if device.platform == "gpu" else "gpu_cpu_smoke"
    common.finish(
        name,
        {
            "quick": args.quick,
            "device_kind": device.device_kind,
            "peak_flops": peak,
            "results": results,
        },
        fig,
        started,
    )


if __name__ == "__main__":
    main()
