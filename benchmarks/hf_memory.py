"""Peak host memory of a sharded ``jmp.hf.load``, against the model and its largest tensor.

A random Llama of about 400 MB of float32 weights is built locally with ``transformers``
(hidden 1024, 6 layers, vocabulary 16000, untied; saved in ~100 MB shards with an index), in
a child process so that torch's memory is not counted. Then each measurement runs in a fresh
child process:

* ``jmp.hf.load`` under several strategies: the peak growth of the process's anonymous
  resident memory (``RssAnon``, sampled every millisecond) during the load. On CPU it also
  holds the device buffers (simulated devices live in host memory), so the host memory the
  load needs is that growth minus the bytes the devices hold at the end. (``ru_maxrss``
  would also count the pages of the memory-mapped files; ``tracemalloc`` cannot tell a host
  block from a device buffer XLA:CPU made of it.)
* the naive reading, ``safetensors.numpy.load_file`` of every file: the whole model in host
  memory, what a load without sliced reads costs at least.

Run: ``python benchmarks/hf_memory.py [--quick]`` (``--quick``: 2 layers, ~170 MB).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import common  # first: it sets JAX's environment (cache) and sys.path

HERE = os.path.abspath(__file__)
STRATEGIES = [("fsdp", "data=8"), ("fsdp_tp", "data=2,model=4"), ("tp", "model=8")]


def build(folder: str, layers: int) -> None:
    """The random model, saved with transformers (runs in its own process)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=16000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder, max_shard_size="100MB")


def sizes(folder: str) -> dict[str, int]:
    """Bytes of the whole model and of its largest tensor, from the files' headers."""
    from jmp.hf.files import Checkpoint

    ckpt = Checkpoint.open(folder)
    nbytes = {n: 4 * math.prod(ckpt.shape(n)) for n in ckpt.names()}
    return {"model_bytes": sum(nbytes.values()), "largest_tensor_bytes": max(nbytes.values())}


def _anon() -> int:
    """Anonymous resident memory now: heap and device buffers, not the files safetensors maps
    (``ru_maxrss`` counts those mapped pages too: every byte of the model is read once)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


class AnonPeak:
    """The peak of :func:`_anon` while the block runs, sampled every millisecond."""

    def __enter__(self) -> AnonPeak:
        import threading

        self.start = self.peak = _anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _anon())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def measure(folder: str, strategy: str, spec: str) -> dict[str, float]:
    """One sharded load, in this (fresh) process."""
    import jax
    from flax import nnx

    import jmp
    import jmp.hf
    from jmp.hf.loader import abstract_model, stages_of

    common.setup()
    mesh = jmp.make_mesh(spec)
    rules = jmp.rules.preset(strategy, mesh)
    # imports and the abstract model's tracing happen before the measurement: they are the
    # same for any model size and are not host copies of weights
    abstract_model(jmp.hf.config_of(folder), mesh, rules, num_stages=stages_of(mesh, rules))
    start = time.perf_counter()
    with AnonPeak() as anon:
        loaded = jmp.hf.load(folder, mesh, rules)
    seconds = time.perf_counter() - start
    params = jax.tree.leaves(nnx.state(loaded.model, nnx.Param))
    device = sum(s.data.nbytes for p in params for s in p.addressable_shards)
    return {
        "anon_peak_growth_bytes": anon.growth,
        "device_bytes": device,
        "host_overhead_bytes": anon.growth - device,
        "largest_device_block_bytes": max(
            s.data.nbytes for p in params for s in p.addressable_shards
        ),
        "seconds": seconds,
    }


def measure_naive(folder: str) -> dict[str, float]:
    """``safetensors.numpy.load_file`` of every file: the whole model on the host."""
    from safetensors.numpy import load_file

    tensors = {}
    with AnonPeak() as anon:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(folder, name)))
    return {"host_overhead_bytes": anon.growth}


def _child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, HERE, *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    layers = 2 if args.quick else 6
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, HERE, "--build", folder, str(layers)], check=True, capture_output=True
        )
        data: dict = {"layers": layers, **sizes(folder), "loads": {}}
        for strategy, spec in STRATEGIES:
            data["loads"][f"{strategy} {spec}"] = _child("--measure", folder, strategy, spec)
        data["naive"] = _child("--naive", folder)
    mib = common.mib
    largest = data["largest_tensor_bytes"]
    rows = [
        [
            name,
            f"{mib(r['host_overhead_bytes']):.1f}",
            f"{r['host_overhead_bytes'] / largest:.2f}",
            f"{r['host_overhead_bytes'] / data['model_bytes']:.3f}",
            f"{mib(r['largest_device_block_bytes']):.1f}",
            f"{mib(r['device_bytes']):.0f}",
            f"{r['seconds']:.1f}",
        ]
        for name, r in data["loads"].items()
    ]
    naive = data["naive"]["host_overhead_bytes"]
    rows.append(["naive load_file", f"{mib(naive):.1f}", f"{naive / largest:.2f}",
                 f"{naive / data['model_bytes']:.3f}", "", "", ""])  # fmt: skip
    common.print_table(
        f"jmp.hf.load of a {mib(data['model_bytes']):.0f} MiB model (largest tensor "
        f"{mib(largest):.1f} MiB): host memory beyond what the devices hold",
        ["load", "host MiB", "/ largest tensor", "/ model", "device block MiB",
         "devices MiB", "s"],
        rows,
        notes=["host = peak growth of anonymous RSS during the load - bytes the devices hold "
               "(simulated CPU devices live in host memory)"],
    )  # fmt: skip
    fig, ax = common.new_figure(width=7)
    labels = [*data["loads"], "naive"]
    values = [mib(r["host_overhead_bytes"]) for r in data["loads"].values()] + [mib(naive)]
    ax.bar(labels, values)
    ax.axhline(mib(largest), color="k", ls="--", label="largest tensor")
    ax.axhline(mib(data["model_bytes"]), color="r", ls=":", label="whole model")
    ax.set_ylabel("host memory beyond the devices' (MiB)")
    ax.set_title("jmp.hf.load: peak host memory of a sharded load")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    common.finish("hf_memory", data, fig, started)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        build(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(*sys.argv[2:5])))
    elif sys.argv[1:2] == ["--naive"]:
        print(json.dumps(measure_naive(sys.argv[2])))
    else:
        main()
