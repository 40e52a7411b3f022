"""Tokens/s and MFU of jmp's Llama train step on one NVIDIA GPU: sizes x remat policies, with
jmp's GPU XLA flags on and off.

Sizes: Llama 3.2 1B's shape (d 2048, 16 layers, 32 heads over 8 kv heads, SwiGLU 8192,
vocabulary 128256, tied embeddings; 1.24B parameters) and Llama 3 8B (``LlamaConfig.named(
"llama3-8b")``), bf16 compute. The 1B keeps float32 parameters and AdamW state; the 8B keeps
them in bfloat16 (float32 would need 8e9 x 16 B = 128 GB before any activation). Each size runs
under several remat policies (:mod:`jmp.layers.remat`). The flags (``jmp.devices.
GPU_XLA_FLAGS``: latency-hiding scheduler, combined and pipelined collectives) are fixed when
XLA starts, so each setting runs in its own process: this script runs itself with ``--child
on`` and ``--child off``. One GPU has no collectives to overlap, so the flags are expected to
matter little here; the script is the measurement.

Model FLOPs are jmp's own (3x the forward's matmul FLOPs counted in its jaxpr,
``Step.model_flops``); MFU divides their rate by the GPU's dense bf16 peak (H100/H200 989
TFLOP/s, A100 312; from ``device_kind``, or ``--peak-flops``). A configuration that runs out of
memory is a result; configurations are skipped once a setting's share of ``--budget-s`` is
spent. Without a GPU it exits 0 (``--cpu-smoke`` runs a tiny Llama on CPU to test the script).

Run: ``python benchmarks/gpu.py [--quick] [--budget-s 300] [--peak-flops 989e12]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import common  # first: it sets JAX's environment (cache) and sys.path
import jax
import numpy as np
import optax

import jmp
from jmp.devices import with_gpu_flags
from jmp.models import Llama, LlamaConfig
from jmp.train import make_step

PEAK_BF16 = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
)
LLAMA_1B = dict(
    vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
    tie_embeddings=True, rope_theta=5e5, seq_len=2048,
)  # fmt: skip
# name, config fields, global batch, remat policies (cheapest memory last)
SIZES = [
    ("1b", LLAMA_1B, 8, ("none", "dots_no_batch", "full")),
    ("8b", {**LlamaConfig.named("llama3-8b").to_dict(), "seq_len": 2048, "param_dtype":
            "bfloat16"}, 2, ("dots_no_batch", "full")),
]  # fmt: skip
QUICK = {"1b": ("dots_no_batch", "full"), "8b": ("full",)}
CPU_SMOKE = [
    ("smoke", dict(LlamaConfig.named("tiny").to_dict(), seq_len=64), 4, ("none", "full")),
]
RESULT = "RESULT "  # a child's result lines on stdout


def peak_flops(device_kind: str, override: float | None) -> float | None:
    if override:
        return override
    kind = device_kind.upper()
    return next((peak for name, peak in PEAK_BF16 if name in kind), None)


def is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".upper()
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "OUT OF MEMORY", "OOM"))


def run_one(fields: dict, batch: int, remat: str, device: jax.Device, steps: int) -> dict:
    """One configuration: compile, warm up, time ``steps`` steps."""
    cfg = LlamaConfig(**{**fields, "dtype": "bfloat16", "remat": remat})
    mesh = jmp.make_mesh("data=1", devices=[device])
    rules = jmp.rules.preset("dp", mesh)
    t0 = time.perf_counter()
    model = jmp.shard_init(lambda rngs: Llama(cfg, rngs=rngs), mesh, rules)
    step = make_step(model, optax.adamw(1e-4), mesh, rules)
    del model
    state = step.init_state()
    data = common.random_batch(step.batch_sharding, batch, cfg.seq_len, cfg.vocab_size)
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    mem = common.jinspect.memory(compiled)
    del compiled
    for _ in range(2):  # warm up: the first call also loads the executable
        state, metrics = step(state, data)
    common.block(metrics)
    t1 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, data)
    loss = float(metrics["loss"])  # waits for the last step
    step_s = (time.perf_counter() - t1) / steps
    flops = step.model_flops(data)
    return {
        "params": cfg.num_params(),
        "tokens_per_s": batch * cfg.seq_len / step_s,
        "step_s": step_s,
        "compile_s": compile_s,
        "model_flops_per_s": flops / step_s,
        "peak_gib": (mem.peak or mem.arguments + mem.temporaries) / 2**30,
        "loss": loss,
        "status": "ok",
    }


def child(args) -> None:
    """One flag setting: every (size, policy) within this setting's budget, as RESULT lines."""
    started, last_s = time.perf_counter(), 0.0
    device = jax.devices()[0]
    gpu = device.platform == "gpu"
    print(RESULT + json.dumps({"device": device.device_kind, "platform": device.platform}))
    if not gpu and not args.cpu_smoke:
        return
    sizes = SIZES if gpu else CPU_SMOKE
    for name, fields, batch, policies in sizes:
        for remat in QUICK.get(name, policies) if args.quick and gpu else policies:
            row = {"flags": args.child, "size": name, "remat": remat, "batch": batch}
            if time.perf_counter() - started + 1.5 * last_s > args.budget_s:
                row["status"] = f"skipped (budget {args.budget_s:.0f} s)"
            else:
                t = time.perf_counter()
                try:
                    row.update(run_one(fields, batch, remat, device, args.steps))
                except Exception as err:  # noqa: BLE001 - an OOM is a result; others too
                    row["status"] = "out of memory" if is_oom(err) else f"failed: {err!r}"[:300]
                last_s = time.perf_counter() - t
                gc.collect()
                jax.clear_caches()
            print(RESULT + json.dumps(row), flush=True)


def parent(args) -> None:
    """Runs the two flag settings in child processes (the parent never starts JAX's backend:
    on a GPU it would take the memory the children need)."""
    started = time.perf_counter()
    results, device = [], {}
    for setting in ("on", "off"):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["JMP_GPU_XLA_FLAGS"] = "0"  # the child sets them itself (or not), CUDA plugin or none
        if setting == "on":
            env["XLA_FLAGS"] = with_gpu_flags("")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", setting]
        cmd += ["--budget-s", str(args.budget_s / 2), "--steps", str(args.steps)]
        cmd += (["--quick"] if args.quick else []) + (["--cpu-smoke"] if args.cpu_smoke else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [json.loads(x[len(RESULT) :]) for x in done.stdout.splitlines() if RESULT in x]
        if done.returncode != 0 or not lines:
            print(f"flags {setting}: exit {done.returncode}: {done.stderr[-1500:]}", flush=True)
            return
        device = lines[0]
        if device["platform"] != "gpu" and not args.cpu_smoke:
            print(
                f"gpu.py: no GPU here (JAX's first device is {device['platform']!r}): nothing "
                f"to measure. Run it on a machine with an NVIDIA GPU and jax[cuda]."
            )
            return
        results += lines[1:]
        print(f"  flags {setting}: {len(lines) - 1} rows ({time.perf_counter() - started:.0f} s)")
    peak = peak_flops(device["device"], args.peak_flops)
    for r in results:
        if r.get("status") == "ok":
            r["mfu"] = r["model_flops_per_s"] / peak if peak else float("nan")
    report(results, device, peak, started, args)


def report(results: list[dict], device: dict, peak: float | None, started, args) -> None:
    rows = [
        [r["size"], r["remat"], r["flags"], r["batch"]]
        + (
            [r["tokens_per_s"], r["model_flops_per_s"] / 1e12, r["mfu"], r["compile_s"]]
            + [r["peak_gib"], "ok"]
            if r.get("status") == "ok"
            else ["", "", "", "", "", r.get("status", "?")]
        )
        for r in results
    ]
    common.print_table(
        "jmp Llama training on one GPU (bf16 compute)",
        ["size", "remat", "flags", "batch", "tok/s", "TFLOP/s", "MFU", "compile s", "GiB", ""],
        rows,
        [
            f"device: {device['device']}; peak "
            + (f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "unknown (--peak-flops)"),
            "1b: f32 parameters and AdamW; 8b: bf16 parameters and AdamW; seq 2048",
            "flags on = jmp.devices.GPU_XLA_FLAGS; model FLOPs = jmp's (3x forward matmuls)",
        ],
    )
    fig, ax = common.new_figure(1, width=8)
    ok = [r for r in results if r.get("status") == "ok"]
    if ok:
        xs = np.arange(len(ok))
        ax.bar(xs, [r["mfu"] if peak else r["model_flops_per_s"] / 1e12 for r in ok])
        ax.set_xticks(xs, [f"{r['size']} {r['remat']}\nflags {r['flags']}" for r in ok])
        ax.set_ylabel("MFU" if peak else "model TFLOP/s")
    ax.set_title(f"jmp Llama training, {device['device']}, bf16")
    name = "gpu" if device["platform"] == "gpu" else "gpu_cpu_smoke"
    data = {"quick": args.quick, "device_kind": device["device"], "peak_flops": peak}
    common.finish(name, {**data, "results": results}, fig, started)


def main() -> None:
    def extra(parser):
        parser.add_argument("--peak-flops", type=float, default=None, help="dense bf16 FLOP/s")
        parser.add_argument(
            "--budget-s", type=float, default=300.0, help="seconds for all configurations"
        )
        parser.add_argument("--steps", type=int, default=10, help="timed steps per config")
        parser.add_argument("--cpu-smoke", action="store_true", help="(testing) tiny, on CPU")
        # internal: one flag setting, run by the parent in its own process
        parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)

    args = common.parse_args(__doc__.splitlines()[0], extra)
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
