"""The jmp command end to end: train, generate, and one clear line + exit 2 for bad input."""

import json
import os

import pytest

from tests.cli_util import run_jmp

TINY = ["--model", "tiny", "--batch", "8", "--eval-every", "5", "--sample", "20"]


def test_train_then_generate(tmp_path):
    out = str(tmp_path / "run")
    done = run_jmp("train", *TINY, "--steps", "10", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "strategy=dp_tp mesh=data=2,model=4" in done.stdout
    assert "validation loss" in done.stdout and "tokens/s" in done.stdout
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert "val_loss" in rows[4] and "val_loss" in rows[9]
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    gen = run_jmp("generate", "--run", out, "--prompt", "import ", "--tokens", "16")
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("import ") and len(gen.stdout.rstrip("\n")) >= len("import ")


@pytest.mark.parametrize(
    "args,culprit",
    [
        (["--mesh", "data=3,model=4"], "needs 12 devices but 8"),
        (["--mesh", "data2"], "Malformed mesh spec"),
        (["--strategy", "zero3"], "Unknown strategy 'zero3'"),
        (["--batch", "7"], "multiple of 2"),
        (["--model", "huge"], "Unknown model size 'huge'"),
        (["--steps", "0"], "--steps: 0 is not a positive integer"),
        (["--data", "/nonexistent/*.txt"], "matches no file"),
        (
            [
                "--strategy",
                "tp",
                "--mesh",
                "model=8",
                "--model",
                "tiny",
                "--seq",
                "64",
                "--mode",
                "auto",
                "--dtype",
                "float8",
            ],
            "dtype='float8'",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, culprit):
    done = run_jmp("train", *TINY, "--steps", "2", "--out", str(tmp_path / "r"), *args, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert culprit in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_indivisible_dimension_names_the_parameter(tmp_path):
    done = run_jmp(
        "train",
        *TINY,
        "--steps",
        "2",
        "--strategy",
        "tp",
        "--mesh",
        "model=8",
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "r"),
        timeout=120,
        env={},
    )
    assert done.returncode == 0, done.stderr[-2000:]  # tiny (8 heads) fits model=8
    bad = run_jmp(
        "train",
        "--model",
        "medium",
        "--strategy",
        "tp",
        "--mesh",
        "model=8",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "m"),
        timeout=120,
    )
    assert bad.returncode == 2
    assert "heads" in bad.stderr and "size 4" in bad.stderr and "size 8" in bad.stderr


def test_generate_on_missing_run_is_a_clear_error(tmp_path):
    done = run_jmp("generate", "--run", str(tmp_path / "nothing"), timeout=60)
    assert done.returncode == 2 and "not a run folder" in done.stderr


def test_inspect_prints_collectives_and_memory_without_training():
    done = run_jmp(
        "inspect",
        "--model",
        "tiny",
        "--strategy",
        "dp_tp",
        "--mesh",
        "data=2,model=4",
        "--batch",
        "8",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "collectives" in out and "all-reduce" in out and "model" in out
    assert "temporaries" in out and "FLOPs / step" in out


def test_plan_ranks_candidates_for_a_7b_model_on_64_h100():
    done = run_jmp(
        "plan", "--model", "7b", "--devices", "64", "--device", "h100", "--remat", timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MFU" in done.stdout and " 1. " in done.stdout and "fits" in done.stdout
    bad = run_jmp("plan", "--model", "7b", "--device", "tpu9", timeout=60)
    assert bad.returncode == 2 and "tpu9" in bad.stderr


def test_pipeline_strategy_trains_and_generates(tmp_path):
    out = str(tmp_path / "pp")
    done = run_jmp(
        "train",
        "--model",
        "small",
        "--seq",
        "32",
        "--strategy",
        "pp_dp",
        "--mesh",
        "stage=4,data=2",
        "--microbatches",
        "4",
        "--schedule",
        "gpipe",
        "--batch",
        "8",
        "--steps",
        "3",
        "--eval-every",
        "3",
        "--sample",
        "8",
        "--out",
        out,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "strategy=pp_dp mesh=stage=4,data=2" in done.stdout
    gen = run_jmp("generate", "--run", out, "--prompt", "if ", "--tokens", "4")
    assert gen.returncode == 0 and gen.stdout.startswith("if "), gen.stderr[-2000:]
    bad = run_jmp(
        "train",
        "--model",
        "tiny",
        "--strategy",
        "pp",
        "--mesh",
        "stage=8",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "bad"),
        timeout=120,
    )
    assert bad.returncode == 2 and "stages exceed n_layers=2" in bad.stderr


def test_sequence_split_runs_equal_the_data_parallel_one(tmp_path):
    # the same GPT, batches and seed under dp_cp (sequence over 'context'), dp_tp_sp (the
    # residual's sequence over 'model') and dp: the loss curve is the same up to float
    # rounding (attention is exact over the whole sequence)
    args = ["--model", "tiny", "--batch", "8", "--steps", "3", "--sample", "0", "--eval-every", "3"]
    runs = {}
    for name, extra in {
        "cp": ["--strategy", "dp_cp", "--mesh", "data=2,context=4", "--cp-impl", "allgather"],
        "sp": ["--strategy", "dp_tp_sp", "--mesh", "data=2,model=4"],
        "dp": ["--strategy", "dp", "--mesh", "data=8"],
    }.items():
        out = str(tmp_path / name)
        done = run_jmp("train", *args, *extra, "--out", out)
        assert done.returncode == 0, done.stderr[-3000:]
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs[name] = [json.loads(line)["loss"] for line in f]
    assert runs["cp"] == pytest.approx(runs["dp"], rel=1e-5)
    assert runs["sp"] == pytest.approx(runs["dp"], rel=1e-5)
    for strategy, mesh, text in (
        ("cp", "context=8", "does not split into 2 x context = 16 chunks"),
        ("tp_sp", "model=8", "does not split over 'model' of size 8 (sequence parallelism"),
    ):
        bad = run_jmp("train", *args, "--strategy", strategy, "--mesh", mesh, "--seq", "60",
                      "--out", str(tmp_path / "bad"))  # fmt: skip
        assert bad.returncode == 2 and text in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
        assert not os.path.exists(tmp_path / "bad")
