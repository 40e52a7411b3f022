"""Bad input ends with one line on stderr naming the value and the fix, exit code 2, no traceback.

Most cases fail while the command line is parsed or before JAX compiles anything, so they run
in this process (``jmp.cli.main`` with capsys); a missing CUDA backend needs a fresh process.
One tiny training run (module fixture) serves the ``jmp generate`` tests.
"""

import argparse
import contextlib
import glob
import io
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jmp
import jmp.cli
from jmp.cli import common, out_of_memory_line, requested_bytes
from jmp.errors import ConfigError, JmpError, MeshError, ShardingError
from jmp.models.generate import prompt_bytes
from tests.cli_util import run_jmp


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``jmp ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        code = jmp.cli.main(list(argv))
    except SystemExit as done:  # argparse exits (bad argument, --help)
        code = done.code if isinstance(done.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *names: str) -> str:
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1, err
    for name in names:
        assert name in err, (name, err)
    return lines[0]


# --- 1-4, 8: values refused while the command line is parsed ---------------------------------


@pytest.mark.parametrize(
    "argv, names",
    [
        # 1. an empty mesh was silently replaced by the strategy's default
        (["train", "--mesh", ""], ["--mesh", "''", "empty mesh", "data=2,model=4"]),
        (["inspect", "--mesh", ""], ["--mesh", "''", "empty mesh"]),
        (["inspect", "--mesh", "  "], ["--mesh", "'  '", "empty mesh"]),
        (["inspect", "--mesh", "data=2,,x"], ["--mesh", "'x' is not 'axis=size'"]),
        # 2. --seq 0 silently meant the model's default; plan's --batch 0 / --seq 0 too
        (["train", "--seq", "0"], ["--seq", "0 is not a positive integer", ">= 1"]),
        (["inspect", "--seq", "-64"], ["--seq", "-64 is not a positive integer"]),
        (["plan", "--batch", "0"], ["--batch", "0 is not a positive integer"]),
        (["plan", "--seq", "0"], ["--seq", "0 is not a positive integer"]),
        (["plan", "--top", "0"], ["--top", "0 is not a positive integer"]),
        (["plan", "--microbatches", "0"], ["--microbatches", "0 is not a positive integer"]),
        (["plan", "--devices", "-8"], ["--devices", "-8 is not a positive integer"]),
        (["plan", "--mem-fraction", "1.5"], ["--mem-fraction", "1.5 is not in (0, 1]"]),
        (["plan", "--mem-fraction", "nan"], ["--mem-fraction", "'nan' is not a finite number"]),
        # 3. tracebacks before (ZeroDivisionError, negative shape)
        (["inspect", "--microbatches", "0"], ["--microbatches", "0 is not a positive integer"]),
        (["inspect", "--batch", "-16"], ["--batch", "-16 is not a positive integer"]),
        (["inspect", "--batch", "x"], ["--batch", "'x' is not an integer"]),
        # 4. nan printed NUL bytes; negative temperature and tokens
        (
            ["generate", "--run", "r", "--temperature", "nan"],
            ["--temperature", "'nan' is not a finite number"],
        ),
        (
            ["generate", "--run", "r", "--temperature", "inf"],
            ["--temperature", "'inf' is not a finite number"],
        ),
        (
            ["generate", "--run", "r", "--temperature", "-0.5"],
            ["--temperature", "-0.5 is negative", ">= 0"],
        ),
        (["generate", "--run", "r", "--tokens", "-1"], ["--tokens", "-1 is negative", ">= 0"]),
        (["generate", "--run", "r", "--devices", "0"], ["--devices", "0 is not a positive"]),
        # train's numbers: refused before anything starts (--checkpoint-every -1 was refused
        # after the run folder was made, --sample -1 after training, --seed -1 was a traceback)
        (["train", "--lr", "inf"], ["--lr", "'inf' is not a finite number"]),
        (["train", "--lr", "nan"], ["--lr", "'nan' is not a finite number"]),
        (["train", "--lr", "-0.1"], ["--lr", "-0.1 is not > 0"]),
        (["train", "--steps", "0"], ["--steps", "0 is not a positive integer"]),
        (["train", "--batch", "-4"], ["--batch", "-4 is not a positive integer"]),
        (["train", "--microbatches", "0"], ["--microbatches", "0 is not a positive integer"]),
        (["train", "--eval-every", "0"], ["--eval-every", "0 is not a positive integer"]),
        (["train", "--checkpoint-every", "-1"], ["--checkpoint-every", "-1 is negative"]),
        (["train", "--sample", "-1"], ["--sample", "-1 is negative"]),
        (["train", "--seed", "-1"], ["--seed", "-1 is not a seed in [0, 2**32)"]),
        (["train", "--seed", str(2**32)], ["--seed", "is not a seed in [0, 2**32)"]),
        (["generate", "--run", "r", "--seed", "-3"], ["--seed", "-3 is not a seed"]),
        # argparse's own errors are one line too (no usage block)
        (["train", "--no-such-option"], ["unrecognized arguments: --no-such-option"]),
        ([], ["command"]),
    ],
)
def test_bad_argument_is_one_line_exit_2(capsys, argv, names):
    code, _, err = run_main(capsys, *argv)
    line = assert_one_line_error(code, err, *names)
    assert "--help" in line  # says where the valid values are described


def test_plan_refuses_microbatches_that_do_not_divide_the_batch(capsys):
    # every candidate used to be dropped, and plan said "No strategy fits in memory" (exit 1)
    code, _, err = run_main(
        capsys, "plan", "--model", "tiny", "--batch", "10", "--microbatches", "3"
    )
    assert_one_line_error(code, err, "--microbatches 3", "batch of 10", "multiple of 3")


def test_setup_refuses_an_empty_mesh_given_through_the_api():
    args = argparse.Namespace(strategy="dp_tp", mesh="")
    with pytest.raises(MeshError, match=r"--mesh '' is empty.*\(e.g. 'data=2,model=-1'\)"):
        common.mesh_spec(args)


def test_check_batch_refuses_zero_negative_and_indivisible_counts():
    mesh = jmp.make_mesh("data=8")
    rules = jmp.rules.preset("dp", mesh)
    with pytest.raises(ConfigError, match=r"microbatches=0 must be a positive int"):
        jmp.train.check_batch(16, 0, mesh, rules)
    with pytest.raises(ConfigError, match=r"batch_size=-16 must be a positive int"):
        jmp.train.check_batch(-16, 1, mesh, rules)
    with pytest.raises(ConfigError, match=r"microbatches=3 does not divide the batch of 16"):
        jmp.train.check_batch(16, 3, mesh, rules)
    assert jmp.train.check_batch(16, 2, mesh, rules) == (("data",), 1)


@pytest.mark.parametrize(
    "kind, text, message",
    [
        (common.positive_int, "0", "0 is not a positive integer"),
        (common.positive_int, "-3", "-3 is not a positive integer"),
        (common.positive_int, "1.5", "'1.5' is not an integer"),
        (common.nonnegative_int, "-1", "-1 is negative"),
        (common.finite_float, "nan", "'nan' is not a finite number"),
        (common.finite_float, "-inf", "'-inf' is not a finite number"),
        (common.finite_float, "fast", "'fast' is not a number"),
        (common.positive_float, "0", "0 is not > 0"),
        (common.positive_float, "inf", "'inf' is not a finite number"),
        (common.nonnegative_float, "-1e-3", "-0.001 is negative"),
        (common.fraction, "0", "0 is not in (0, 1]"),
        (common.mesh_text, "", "'' is an empty mesh"),
        (common.mesh_text, "data=0", "size 0"),
    ],
)
def test_argument_types_name_the_value(kind, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        kind(text)
    assert message in str(err.value)


def test_argument_types_pass_good_values():
    assert common.positive_int("3") == 3
    assert common.nonnegative_int("0") == 0
    assert common.finite_float("-2.5") == -2.5
    assert common.positive_float("3e-3") == 3e-3
    assert common.nonnegative_float("0") == 0.0
    assert common.fraction("1") == 1.0
    assert common.mesh_text("data=-1,model=2") == "data=-1,model=2"


# --- 4: prompts that are not UTF-8 ------------------------------------------------------------


def test_command_line_bytes_that_are_not_utf8_become_those_bytes_again():
    # what the shell's $'\xff' reaches Python as: a lone surrogate, byte 0xff + 0xdc00
    done = subprocess.run(
        [sys.executable, "-c", "import sys; print(ascii(sys.argv[1]))", os.fsdecode(b"a\xff")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout.strip() == "'a\\udcff'"
    assert prompt_bytes("a\udcff") == b"a\xff"
    assert prompt_bytes("é") == "é".encode()
    assert prompt_bytes(b"\x00\xff") == b"\x00\xff"
    with pytest.raises(ConfigError, match=r"'\\ud800' at position 1"):
        prompt_bytes("a\ud800")  # a surrogate that stands for no byte


# --- 5: a backend that cannot start -----------------------------------------------------------


@pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")), reason="an NVIDIA GPU is present")
def test_jax_platforms_cuda_without_a_gpu_is_one_line(tmp_path):
    done = run_jmp("inspect", "--model", "tiny", env={"JAX_PLATFORMS": "cuda"}, timeout=120)
    assert_one_line_error(
        done.returncode,
        done.stderr,
        "JAX_PLATFORMS='cuda'",
        "no CUDA device or jaxlib CUDA plugin found",
        "unset JAX_PLATFORMS",
        "jax[cuda12]",
    )


def test_backend_error_messages():
    err = common.backend_error("cuda", AssertionError())
    assert isinstance(err, jmp.DeviceError)
    assert str(err).startswith("JAX_PLATFORMS='cuda': no CUDA device or jaxlib CUDA plugin found.")
    failed = RuntimeError("Unable to initialize backend 'tpu': not found\n(set JAX_PLATFORMS='')")
    text = str(common.backend_error("tpu", failed))
    assert "\n" not in text and "JAX_PLATFORMS='tpu'" in text and "Unable to initialize" in text


# --- 6: out of memory -------------------------------------------------------------------------

GPU_OOM = (
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes.\n"
    "BufferAssignment OOM Debugging.\nBufferAssignment stats:\n  parameter allocation: 1.2GiB"
)


@pytest.mark.parametrize(
    "message, asked",
    [
        (GPU_OOM, 123456789),
        ("RESOURCE_EXHAUSTED: Out of memory allocating 1125899906842624 bytes.", 2**50),
        (
            "RESOURCE_EXHAUSTED: Failed to allocate request for 1.50GiB (1610612736B) on device",
            1610612736,
        ),
        ("RESOURCE_EXHAUSTED: XLA:GPU ran out of memory when allocating 12.0 GiB", 12 * 2**30),
        ("RESOURCE_EXHAUSTED: ran out of memory", None),
    ],
)
def test_out_of_memory_line_says_how_much_and_the_fix(message, asked):
    line = out_of_memory_line(jax.errors.JaxRuntimeError(message))
    assert line is not None and "\n" not in line
    assert line.startswith("out of device memory")
    assert "jmp plan" in line and "--remat" in line and "smaller --batch" in line
    if asked is not None:
        assert requested_bytes(message) == asked
        assert f"({asked:,} bytes)" in line


def test_out_of_memory_line_leaves_other_errors_alone():
    assert out_of_memory_line(jax.errors.JaxRuntimeError("INTERNAL: something broke")) is None
    assert out_of_memory_line(RuntimeError("RESOURCE_EXHAUSTED: not from XLA")) is None
    host = out_of_memory_line(MemoryError("Unable to allocate 4.00 TiB for an array"))
    assert host is not None and host.startswith("out of host memory (Unable to allocate 4.00 TiB")


def _refuses_huge_allocations() -> bool:
    """Linux with heuristic or strict overcommit: a 1 PiB allocation fails at once."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() != "1"
    except OSError:
        return False


@pytest.mark.skipif(
    not _refuses_huge_allocations(), reason="needs an OS that refuses a 1 PiB allocation at once"
)
def test_a_real_xla_out_of_memory_error_is_one_line(capsys, monkeypatch):
    # A huge --batch cannot be made to fail cheaply on CPU (the host builds the batch first and
    # exhausts RAM slowly); a 1 PiB buffer gives XLA's genuine RESOURCE_EXHAUSTED at once.
    def too_big(args):
        jnp.zeros((2**50,), jnp.uint8).block_until_ready()
        return 0

    monkeypatch.setitem(jmp.cli.COMMANDS, "plan", too_big)
    code, _, err = run_main(capsys, "plan")
    assert_one_line_error(
        code, err, "jmp plan: error: out of device memory", "(1,125,899,906,842,624 bytes)"
    )
    assert "RESOURCE_EXHAUSTED" in err and "--remat" in err and "smaller --batch" in err


# --- 7: --help shows every option's help and default ------------------------------------------


def _help_entry(text: str, invocation: str) -> str | None:
    """The help text printed after ``invocation`` in argparse's --help output (None if absent)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        head = "  " + invocation
        if line.startswith(head) and line[len(head) : len(head) + 1] in ("", " "):
            parts = [line[len(head) :]]
            for more in lines[i + 1 :]:
                if more.startswith("  -") or not more.startswith("   "):
                    break
                parts.append(more)
            return " ".join(" ".join(parts).split())
    return None


@pytest.mark.parametrize(
    "command", ["train", "generate", "inspect", "plan", "launch", "export", "data prepare"]
)
def test_help_shows_each_option_with_help_and_default(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run_main(capsys, *command.split(), "--help")
    assert code == 0
    command_parser = jmp.cli._parser()
    for word in command.split():  # `data prepare`: a command of a command
        sub = next(a for a in command_parser._actions if isinstance(a, argparse._SubParsersAction))
        command_parser = sub.choices[word]
    formatter = command_parser._get_formatter()
    missing_help = set()
    for action in command_parser._actions:
        if not action.option_strings or action.default == argparse.SUPPRESS:  # --help
            continue
        name = action.option_strings[-1]
        text = _help_entry(out, formatter._format_action_invocation(action))
        assert text is not None, (name, out)
        if not re.sub(r"\((default: [^)]*|required)\)", "", text).strip():
            missing_help.add(name)
        shown = re.search(r"\(default: ([^)]*)\)", text)
        if shown and action.default is not None:
            value = action.default
            assert shown.group(1) in (
                str(value),
                f"{value:g}" if isinstance(value, float) else "",
            ), (
                name,
                text,
            )
        elif not shown:  # required, or a None default whose help says what it means
            assert "(required)" in text or (action.default is None and "default" in text.lower()), (
                f"{command} {name}: no default shown in {text!r}"
            )
    assert not missing_help, f"{command}: options without help: {sorted(missing_help)}"


# --- 9-11: the Python API ---------------------------------------------------------------------


def test_make_mesh_refuses_an_empty_device_list():
    for spec in ("data=1", "data=-1"):  # "data=-1" was an IndexError
        with pytest.raises(MeshError, match=r"devices=\[\] is empty.*leave devices out"):
            jmp.make_mesh(spec, devices=[])


def test_make_mesh_refuses_a_device_listed_twice():
    d0 = jax.devices()[0]
    with pytest.raises(MeshError, match=r"appears twice in devices \(positions 0 and 1\)") as err:
        jmp.make_mesh("data=2", devices=[d0, d0])  # built a mesh before, silently
    assert repr(d0) in str(err.value)
    with pytest.raises(MeshError, match=r"devices\[1\] = 'cpu:1' is not a jax device"):
        jmp.make_mesh("data=2", devices=[d0, "cpu:1"])
    with pytest.raises(MeshError, match=r"devices must be a list of jax devices, got str"):
        jmp.make_mesh("data=2", devices="cpu")


@pytest.mark.parametrize(
    "table, message",
    [
        (None, r"Rules params must be a dict .* got NoneType None"),
        ("dp", r"got str 'dp'.*jmp.rules.preset\('dp_tp', mesh\)"),
        (5, r"got int 5"),
        (["embed"], r"'embed' is not a \(logical name, mesh axes\) pair"),
    ],
)
def test_rules_refuse_what_is_not_a_table(table, message):
    with pytest.raises(ShardingError, match=message):
        jmp.Rules(table)


def test_rules_refuse_a_bad_activation_table():
    with pytest.raises(ShardingError, match=r"Rules activations must be a dict .* got str 'x'"):
        jmp.Rules({"embed": None}, activations="x")


def test_preset_refuses_a_string_for_the_mesh():
    with pytest.raises(MeshError, match=r"needs a Mesh, got the string 'data=8'.*make_mesh"):
        jmp.rules.preset("dp", "data=8")
    mesh = jmp.make_mesh("data=8")
    with pytest.raises(ConfigError, match=r"strategy first.*preset\('dp', mesh\)"):
        jmp.rules.preset(mesh, "dp")
    with pytest.raises(MeshError, match=r"needs a Mesh, got dict"):
        jmp.rules.preset("dp", {"data": 8})


def test_activate_refuses_a_dict_for_the_rules():
    mesh = jmp.make_mesh("data=8")
    with pytest.raises(ConfigError, match=r"activate\(\) needs jmp.Rules, got dict") as err:
        jmp.activate(mesh, {"batch": "data"})  # refused on the call, before `with`
    assert "{'batch': 'data'}" in str(err.value) and "jmp.Rules(" in str(err.value)
    with pytest.raises(MeshError, match=r"got str 'data=8'. Fix: pass jmp.make_mesh\('data=8'\)"):
        jmp.activate("data=8", jmp.rules.preset("dp", mesh))
    assert issubclass(ConfigError, JmpError) and issubclass(MeshError, JmpError)


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", math.inf),
        ("lr", -1e-3),
        ("clip_norm", math.nan),
        ("clip_norm", 0.0),
        ("warmup_steps", -1),
    ],
)
def test_train_config_names_a_bad_value(field, value):
    from jmp.train import TrainConfig

    with pytest.raises(ConfigError, match=rf"{field}={value!r}"):
        TrainConfig(**{field: value})


def test_token_ids_outside_the_vocabulary_are_refused():
    import numpy as np

    from jmp.train.data.text import TextData

    data = TextData.from_tokens(np.arange(1000, dtype=np.int32) % 300)  # ids up to 299
    data.check(16, vocab_size=300)  # fits
    with pytest.raises(ConfigError, match=r"holds token id 299, outside the model's vocabulary"):
        data.check(16, vocab_size=256)  # the loss would be NaN


# --- 12: jmp generate reads the parameters alone ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bad_input") / "run")
    argv = ["train", "--model", "tiny", "--steps", "2", "--batch", "8", "--sample", "0"]
    argv += ["--eval-every", "100", "--out", out]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = jmp.cli.main(argv)
    assert code == 0, printed.getvalue()[-2000:]
    return out


def test_generate_restores_parameters_only(tiny_run, capsys, monkeypatch):
    import optax

    import jmp.train.loop
    import jmp.train.step
    from jmp.train.checkpoint import Checkpointer

    def refuse(*args, **kwargs):
        raise AssertionError("jmp generate must not build an optimizer or a train step")

    for module in (jmp.train.step, jmp.train, jmp.train.loop):
        for name in ("make_optimizer", "make_step"):
            monkeypatch.setattr(module, name, refuse, raising=False)
    monkeypatch.setattr(optax, "adamw", refuse)
    monkeypatch.setattr(Checkpointer, "restore", refuse)  # the full state (optimizer too)
    calls = []
    restore_params = Checkpointer.restore_params

    def spy(self, step, *, target):
        calls.append(step)
        return restore_params(self, step, target=target)

    monkeypatch.setattr(Checkpointer, "restore_params", spy)
    code, out, err = run_main(capsys, "generate", "--run", tiny_run, "--prompt", "import ")
    assert code == 0, err
    assert out.startswith("import ") and calls == [2]


def test_restored_parameters_equal_the_checkpoint(tiny_run):
    import json

    from flax import nnx

    from jmp.cli.generate import restore_model
    from jmp.models import GPTConfig
    from jmp.train import TrainConfig, make_optimizer, make_step
    from jmp.train.checkpoint import Checkpointer
    from jmp.train.loop import build_model

    with open(os.path.join(tiny_run, "config.json")) as f:
        saved = json.load(f)
    cfg = GPTConfig(**saved["model"])
    mesh = jmp.make_mesh(saved["mesh"])
    rules = jmp.rules.preset(saved["strategy"], mesh)
    folder = os.path.join(tiny_run, "checkpoints")
    model = restore_model(cfg, mesh, rules, Checkpointer(folder, create=False), 2)
    step = make_step(
        build_model(cfg, mesh, rules, seed=0),
        make_optimizer(TrainConfig(**saved["train"])),
        mesh,
        rules,
    )
    # a second Checkpointer: orbax keeps the restore kind ('state' as a PyTree) per manager
    ckpt = Checkpointer(folder, create=False)
    full = ckpt.restore(2, target=step.abstract_state()).params
    mine = nnx.state(model, nnx.Param)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(full), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        assert bool(jnp.array_equal(a, b))
    ckpt.close()


def test_generate_passes_non_utf8_prompt_bytes_through(tiny_run, capsys):
    # $'\xff' on the command line: the model continues the byte 0xff (printed as U+FFFD)
    code, out, err = run_main(
        capsys, "generate", "--run", tiny_run, "--prompt", "a\udcff", "--tokens", "3"
    )
    assert code == 0, err
    assert out.startswith("a\ufffd")


def test_generate_api_refuses_bad_sampling_options(tiny_run):
    from flax import nnx

    from jmp.cli.generate import restore_model
    from jmp.models import GPT, GPTConfig
    from jmp.models.generate import generate
    from jmp.train.checkpoint import Checkpointer

    cfg = GPTConfig.named("tiny")
    mesh = jmp.make_mesh("data=2,model=4")
    rules = jmp.rules.preset("dp_tp", mesh)
    model = restore_model(
        cfg, mesh, rules, Checkpointer(os.path.join(tiny_run, "checkpoints"), create=False), 2
    )
    for kwargs, message in [
        ({"temperature": math.nan}, r"temperature=nan must be a finite number >= 0"),
        ({"temperature": -1.0}, r"temperature=-1.0 must be a finite number >= 0"),
        ({"max_new_tokens": -1}, r"max_new_tokens=-1 must be an int >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            generate(model, "def ", mesh=mesh, rules=rules, **kwargs)
    # a model whose vocabulary holds no byte >= 128 (refused before anything runs: shapes do)
    small = nnx.eval_shape(lambda: GPT(GPTConfig.named("tiny", vocab_size=128), rngs=nnx.Rngs(0)))
    with pytest.raises(ConfigError, match=r"byte 255, outside the model's vocabulary of 128"):
        generate(small, b"\xff", mesh=mesh, rules=rules, max_new_tokens=1)
