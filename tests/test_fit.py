"""jmp.fit on a model written with plain Flax NNX (tests/plain_model.py), with dict batches.

Every strategy (dp, fsdp, tp, fsdp_tp and a pipeline) equals the same training on one device:
losses rtol 1e-4 in float32 and the parameters after the steps; a run killed with SIGKILL and
resumed equals an uninterrupted one bitwise.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import jmp
from tests import plain_model
from tests.plain_model import PatchClassifier, leaves_by_path, loss_fn, unstack

STEPS = 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fit(mesh, strategy, *, stages=None, **kwargs):
    make = (lambda r: PatchClassifier(r, num_stages=stages)) if stages else PatchClassifier
    loss = (
        jmp.pipeline.make_loss_fn(mesh=mesh, num_microbatches=2, schedule="1f1b")
        if stages
        else loss_fn
    )
    return jmp.fit(
        make,
        loss,
        kwargs.pop("batches", plain_model.batch),
        mesh=mesh,
        strategy=strategy,
        optimizer=optax.adam(1e-2),
        steps=kwargs.pop("steps", STEPS),
        progress=False,
        **kwargs,
    )


_REFERENCE = {}


def reference():
    """(losses, params) of the run on one device, computed once."""
    if not _REFERENCE:
        mesh = jmp.make_mesh("data=1", devices=jax.devices()[:1])
        result = _fit(mesh, "dp")
        _REFERENCE["run"] = (
            [r["loss"] for r in result.history],
            leaves_by_path(result.state.params),
        )
    return _REFERENCE["run"]


@pytest.mark.parametrize(
    "strategy,spec,stages",
    [
        ("dp", "data=8", None),
        ("fsdp", "data=8", None),
        ("tp", "model=8", None),
        ("fsdp_tp", "data=4,model=2", None),
        ("pp_dp", "stage=2,data=4", 2),
    ],
)
def test_every_strategy_equals_one_device(make_mesh, strategy, spec, stages):
    mesh = make_mesh(spec)
    result = _fit(mesh, strategy, stages=stages)
    want_losses, want_params = reference()
    losses = [r["loss"] for r in result.history]
    assert [r["step"] for r in result.history] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4)
    assert losses[-1] < losses[0]  # it learns
    params = result.state.params
    got = leaves_by_path(unstack(params) if stages else params)
    assert got.keys() == want_params.keys()
    for path, want in want_params.items():
        np.testing.assert_allclose(got[path], want, rtol=1e-4, atol=1e-6, err_msg=path)
    # the parameters really are split as the strategy says
    up = params["blocks"]["up"]["kernel"] if stages else params["blocks"][0]["up"]["kernel"]
    spec_of = tuple(up.get_value().sharding.spec)
    expected = {
        "dp": (),
        "fsdp": ("data",),
        "tp": (None, "model"),
        "fsdp_tp": ("data", "model"),
        "pp_dp": ("stage",),
    }[strategy]
    assert spec_of[: len(expected)] == expected or (not expected and not any(spec_of))


def test_iterable_batches_equal_a_function_of_the_step(make_mesh, tmp_path):
    """A list of batches trains the same as step -> batch; out_dir gets metrics and a plot."""
    mesh = make_mesh("data=8")
    out = str(tmp_path / "run")
    from_list = _fit(mesh, "dp", batches=[plain_model.batch(k) for k in range(STEPS)], out_dir=out)
    from_fn = _fit(mesh, "dp")
    assert [r["loss"] for r in from_list.history] == [r["loss"] for r in from_fn.history]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, STEPS + 1))
    assert os.path.getsize(os.path.join(out, "loss.png")) > 0
    with pytest.raises(jmp.ConfigError, match="batches ran out at step 3"):
        _fit(mesh, "dp", batches=[plain_model.batch(k) for k in range(2)])


def test_a_batch_that_is_not_one_leading_dim_is_refused(make_mesh):
    mesh = make_mesh("data=8")

    def bad(k):
        b = plain_model.batch(k)
        return {**b, "label": b["label"][:8]}

    with pytest.raises(jmp.ConfigError, match="leading \\(batch\\) dim"):
        _fit(mesh, "dp", batches=bad)
    with pytest.raises(jmp.ConfigError, match="exactly one of strategy"):
        jmp.fit(
            PatchClassifier,
            loss_fn,
            plain_model.batch,
            mesh=mesh,
            optimizer=optax.sgd(0.1),
            steps=1,
            progress=False,
        )


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import jmp
    jmp.simulate_cpu_devices(8)
    import numpy as np, optax
    from tests import plain_model
    out, kill_at = sys.argv[1], int(sys.argv[2])

    def batches(k):
        if k == kill_at:  # the step after a checkpoint's save began: it may be mid-write
            os.kill(os.getpid(), signal.SIGKILL)
        return plain_model.batch(k)

    mesh = jmp.make_mesh("data=4,model=2")
    result = jmp.fit(plain_model.PatchClassifier, plain_model.loss_fn, batches, mesh=mesh,
                     strategy="fsdp_tp", optimizer=optax.adam(1e-2), steps=8, out_dir=out,
                     checkpoint_every=2, resume=os.path.exists(out), progress=False)
    np.savez(os.path.join(out, "final.npz"), **plain_model.leaves_by_path(result.state.params))
    """
)


def _run_script(out, kill_at):
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, out, str(kill_at)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sigkill_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    done = _run_script(whole, -1)
    assert done.returncode == 0, done.stderr[-3000:]
    first = _run_script(killed, 5)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert not os.path.exists(os.path.join(killed, "final.npz"))
    resumed = _run_script(killed, -1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = np.load(os.path.join(whole, "final.npz")), np.load(os.path.join(killed, "final.npz"))
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)

    def losses(out):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line)["loss"] for line in f]

    assert losses(killed) == losses(whole)  # the curve continues identically, bitwise
    assert len(losses(whole)) == 8
