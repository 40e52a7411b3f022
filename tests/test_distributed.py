"""Several processes: 2 x 4 devices train like 1 x 8; checkpoints cross; failures are named.

The multi-process runs are subprocesses started by :func:`jmp.runtime.launch.launch` (through
``python -m jmp.runtime.launch --script``), each under ``timeout`` and on a free port. This file is
also their program: ``python tests/test_distributed.py train OUT REF`` is one process's work.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import jmp
import jmp.runtime.distributed as dist
from jmp.models import GPTConfig
from jmp.runtime.launch import free_port, process_env
from jmp.train import TrainConfig
from jmp.train.data import TextData

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
MESH = "data=2,model=4"
CFG = GPTConfig.named("tiny", n_layers=2)
TRAIN = TrainConfig(steps=5, batch_size=8, lr=1e-3, warmup_steps=1, eval_every=5, eval_batches=1)
DATA = TextData.from_tokens(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8))


# --- the processes' side --------------------------------------------------------------------


def _train_and_restore(out: str, ref: str) -> None:
    """Train 5 steps on the 2-process mesh; then restore ``ref`` (saved by 1 process) on it."""
    import jax

    from jmp.train.checkpoint import Checkpointer
    from jmp.train.loop import run_training

    cluster = dist.initialize(expected_devices=MESH)
    mesh = jmp.make_mesh(MESH)
    rules = jmp.rules.preset("dp_tp", mesh)
    result = run_training(CFG, TRAIN, mesh, rules, DATA, out_dir=out)
    _emit(
        "RESULT",
        {
            "process": cluster.process_id,
            "devices": jax.device_count(),
            "local": jax.local_device_count(),
            "losses": [r["loss"] for r in result.history],
        },
    )
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), result.state
    )
    restored = Checkpointer(os.path.join(ref, "checkpoints"), create=False).restore(
        5, target=target
    )
    _emit("RESTORED", _checksums(restored.params, mesh))


def _checksums(params, mesh) -> dict[str, list[float]]:
    """(sum, sum of squares) of every parameter, computed on the mesh, read as replicated."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sums = jax.jit(
        lambda t: jax.tree.map(lambda a: jnp.stack([a.sum(), (a * a).sum()]), t),
        out_shardings=NamedSharding(mesh, P()),
    )(params)
    return {
        jax.tree_util.keystr(path): np.asarray(v.addressable_data(0)).tolist()
        for path, v in jax.tree_util.tree_leaves_with_path(sums)
    }


def _tick(fail_at: int) -> None:
    """All-reduce every 0.2 s until killed; process 1 raises at tick ``fail_at`` if >= 0."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    cluster = dist.initialize(expected_devices=8)
    mesh = jax.make_mesh((8,), ("d",))
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
    print(f"ready pid={os.getpid()}", flush=True)
    for i in range(600):
        x = jax.make_array_from_process_local_data(
            NamedSharding(mesh, P("d")), np.ones(4, np.float32), (8,)
        )
        print(f"tick {i} {float(total(x))}", flush=True)
        if i == fail_at and cluster.process_id == 1:
            raise RuntimeError(f"boom at tick {i}")
        time.sleep(0.2)


def _emit(tag: str, payload: dict) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


def _worker(argv: list[str]) -> int:
    try:
        if argv[0] == "train":
            _train_and_restore(argv[1], argv[2])
        elif argv[0] == "tick":
            _tick(int(argv[1]))
        elif argv[0] == "init":
            print("cluster", dist.initialize(expected_devices=MESH), flush=True)
    except jmp.JmpError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


# --- the tests' side ------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JMP_") and k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _launch_cmd(limit: int, n: int, local: int, timeout_s: float, *argv: str) -> list[str]:
    return [
        "timeout",
        "-k",
        "5",
        str(limit),
        sys.executable,
        "-m",
        "jmp.runtime.launch",
        "-n",
        str(n),
        "--local-devices",
        str(local),
        "--timeout",
        str(timeout_s),
        "--script",
        HERE,
        "--",
        *argv,
    ]


def _run(cmd: list[str], limit: float, **env: str) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(
        cmd, env=_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=limit + 10
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _tagged(output: str, tag: str) -> dict[int, dict]:
    found = {}
    for m in re.finditer(rf"^\[p(\d)\] {tag} (.*)$", output, re.M):
        found[int(m.group(1))] = json.loads(m.group(2))
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process with 8 devices: losses, final parameters, and its run folder."""
    import jax

    from jmp.train.loop import run_training

    out = str(tmp_path_factory.mktemp("one_process"))
    mesh = jmp.make_mesh(MESH)
    result = run_training(CFG, TRAIN, mesh, jmp.rules.preset("dp_tp", mesh), DATA, out_dir=out)
    params = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(result.state.params)
    }
    return {"losses": [r["loss"] for r in result.history], "params": params, "out": out}


@pytest.fixture(scope="module")
def two_processes(reference, tmp_path_factory):
    """2 processes x 4 devices: train 5 steps, save; restore the 1-process checkpoint."""
    out = str(tmp_path_factory.mktemp("two_processes"))
    code, output, seconds = _run(_launch_cmd(170, 2, 4, 60, "train", out, reference["out"]), 170)
    assert code == 0, output[-4000:]
    return {
        "out": out,
        "output": output,
        "seconds": seconds,
        "result": _tagged(output, "RESULT"),
        "restored": _tagged(output, "RESTORED"),
    }


def test_two_processes_train_like_one(reference, two_processes):
    results = two_processes["result"]
    assert sorted(results) == [0, 1]
    for pid, r in results.items():
        assert (r["devices"], r["local"]) == (8, 4)
        np.testing.assert_allclose(
            r["losses"], reference["losses"], rtol=2e-6, err_msg=f"process {pid}"
        )
    print(
        "\nlosses, 1 process x 8 devices:",
        reference["losses"],
        "\nlosses, 2 processes x 4 devices:",
        results[0]["losses"],
        f"\n(2-process run: {two_processes['seconds']:.1f} s)",
    )


def test_only_process_0_writes_metrics(two_processes):
    with open(os.path.join(two_processes["out"], "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4, 5]  # once, not once per process


def test_checkpoint_of_two_processes_restores_in_one(reference, two_processes):
    import jax

    from jmp.models import GPT
    from jmp.train import make_optimizer, make_step
    from jmp.train.checkpoint import Checkpointer, abstract_like

    mesh = jmp.make_mesh("data=4,model=2")  # another mesh, too
    rules = jmp.rules.preset("dp_tp", mesh)
    model = jmp.shard_init(lambda rngs: GPT(CFG, rngs=rngs), mesh, rules)
    step = make_step(model, make_optimizer(TRAIN), mesh, rules)
    target = abstract_like(jax.eval_shape(step.init_state), step.state_shardings)
    ckpt = Checkpointer(os.path.join(two_processes["out"], "checkpoints"), create=False)
    assert ckpt.latest_step() == 5
    state = ckpt.restore(5, target=target)
    assert int(state.step) == 5
    got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(state.params)}
    assert got.keys() == reference["params"].keys()
    for path, want in reference["params"].items():
        np.testing.assert_allclose(np.asarray(got[path]), want, rtol=1e-4, atol=1e-5, err_msg=path)


def test_checkpoint_of_one_process_restores_in_two(reference, two_processes):
    restored = two_processes["restored"]
    assert sorted(restored) == [0, 1] and restored[0] == restored[1]
    assert restored[0].keys() == reference["params"].keys()
    for path, (total, squares) in restored[0].items():
        want = reference["params"][path].astype(np.float64)
        np.testing.assert_allclose(
            [total, squares], [want.sum(), (want * want).sum()], rtol=1e-5, atol=1e-5, err_msg=path
        )


@pytest.mark.parametrize("victim,how", [(1, "kill"), (0, "kill"), (1, "raise")])
def test_a_lost_process_stops_the_job_with_its_name(victim, how):
    timeout_s = 20
    cmd = _launch_cmd(90, 2, 4, timeout_s, "tick", "3" if how == "raise" else "-1")
    proc = subprocess.Popen(
        cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, pid, killed_at = [], None, None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if m := re.match(rf"\[p{victim}\] ready pid=(\d+)", line):
            pid = int(m.group(1))
        if how == "kill" and pid and killed_at is None and line.startswith(f"[p{victim}] tick 2"):
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
        if how == "raise" and killed_at is None and "boom" in line:
            killed_at = time.monotonic()
    code = proc.wait(timeout=30)
    output = "".join(lines)
    assert killed_at is not None, output[-3000:]
    assert time.monotonic() - killed_at < timeout_s, output[-3000:]
    survivor = 1 - victim
    cause = "was killed by SIGKILL" if how == "kill" else "exited with code 1"
    assert code != 0
    assert f"jmp launch: process {victim} (p{victim}) failed: it {cause}" in output, output
    reason = "disconnected without finishing" if how == "kill" else "failed: RuntimeError: boom"
    assert re.search(rf"\[p{survivor}\] jmp: error: process {victim} \(\S+\) {reason}", output), (
        output[-3000:]
    )


def test_processes_times_devices_must_fit_the_mesh():
    with pytest.raises(dist.DistributedError, match=r"needs 8 devices but 6.*--local-devices 4"):
        dist.initialize(
            coordinator_address="127.0.0.1:1",
            num_processes=2,
            process_id=0,
            local_device_count=3,
            expected_devices=MESH,
        )
    with pytest.raises(dist.DistributedError, match="8 devices were asked for, but 3 processes"):
        dist.initialize(
            coordinator_address="127.0.0.1:1",
            num_processes=3,
            process_id=0,
            local_device_count=4,
            expected_devices=8,
        )
    # launched: every process says so, before any network, and the launcher names one
    code, output, seconds = _run(_launch_cmd(60, 2, 3, 30, "init"), 60)
    assert code == 2, output
    assert output.count("needs 8 devices but 6 are available") == 2, output
    assert "jmp launch: process" in output and "exited with code 2" in output


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(coordinator_address="nohost", num_processes=2, process_id=0), "not 'host:port'"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"process_id=2 must be"),
        (dict(num_processes=2, process_id=1), "coordinator_address not given"),
        (
            dict(coordinator_address="h:1", num_processes=2, process_id=0, local_device_count=0),
            "local_device_count=0",
        ),
    ],
)
def test_invalid_settings_are_named(kwargs, match):
    with pytest.raises(dist.DistributedError, match=match):
        dist.initialize(**kwargs)


def test_started_backend_is_refused():
    import jax

    jax.devices()
    with pytest.raises(dist.DistributedError, match="already started"):
        dist.initialize(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0)


def _alone(process_id: int, timeout_s: float) -> subprocess.Popen:
    env = process_env(
        process_id,
        num_processes=2,
        local_devices=4,
        coordinator=f"127.0.0.1:{free_port()}",
        timeout_s=timeout_s,
        base=_env(),
    )
    return subprocess.Popen(
        ["timeout", "-k", "5", "60", sys.executable, HERE, "init"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_missing_process_and_unreachable_coordinator_are_named_in_bounded_time():
    start = time.monotonic()
    lonely_coordinator, lonely_peer = _alone(0, 3), _alone(1, 3)
    out0, _ = lonely_coordinator.communicate(timeout=60)
    out1, _ = lonely_peer.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert lonely_coordinator.returncode == 2, out0
    assert "waiting for process(es) 1 of 2 to reach the coordinator" in out0, out0
    assert lonely_peer.returncode == 2, out1
    assert "could not reach the coordinator (process 0)" in out1, out1
    assert "connection refused" in out1, out1


def test_launch_needs_a_command():
    from jmp.runtime.launch import cmd_launch

    args = type(
        "Args",
        (),
        {"argv": ["--"], "script": None, "num_processes": 2, "local_devices": 4, "timeout": 10.0},
    )()
    with pytest.raises(jmp.ConfigError, match="No command given"):
        cmd_launch(args)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
