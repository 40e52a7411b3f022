"""The command line for Hugging Face models, against transformers (tiny models built locally).

- ``jmp train --init hf:PATH`` trains 3 steps under fsdp_tp (data=2,model=4; a Llama with GQA
  and a BPE tokenizer.json) and pp_dp (stage=2,data=4, 1F1B; a Qwen2 with biases and tied
  embeddings, read as bytes): the loss of step 1 equals the cross-entropy transformers computes
  on the first batch, rebuilt here from the documented rule (the tokenizer's ids, 95% train,
  windows at ``default_rng([seed, 0, 0])`` starts). config.json records the start.
- A run stopped after a checkpoint and resumed continues bitwise equal to the uninterrupted run.
- ``jmp export``: transformers loads the folder, its logits equal jmp's restored run's (and
  differ from the untrained folder's), the tokenizer comes along.
- ``jmp generate --hf``: greedy text equals transformers' greedy ``generate``; the API's
  greedy ids and temperature draws equal the same rule applied to transformers' logits;
  ``generate --run`` of a trained run equals transformers' greedy output of its export.
- Each refusal is one line, exit 2, and writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmp
import jmp.cli
import jmp.hf
from tests import hf_models

TOL = 1e-4
SEQ, BATCH, SEED, STEPS = 32, 8, 3, 3
TOKENIZER_VOCAB = 300  # the BPE's ids; the Llama's vocabulary (320) is padded past them


def _main(*argv: str) -> tuple[int, str, str]:
    """``jmp ARGV`` in this process (its compiled programs are shared): (code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = jmp.cli.main(list(argv))
        except SystemExit as done:  # argparse exits (a bad argument)
            code = done.code if isinstance(done.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _one_line_error(result: tuple[int, str, str], *words: str) -> None:
    code, _, err = result
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err and len(err.rstrip("\n").split("\n")) == 1, err
    for word in words:
        assert word in err, (word, err)


def _train_args(folder: str, out: str, data: str, strategy: str, mesh: str, *extra: str):
    return ["train", "--init", f"hf:{folder}", "--strategy", strategy, "--mesh", mesh,
            "--seq", str(SEQ), "--batch", str(BATCH), "--steps", str(STEPS), "--seed", str(SEED),
            "--lr", "0.05", "--checkpoint-every", "2", "--eval-every", "3", "--data", data,
            "--out", out, *extra]  # fmt: skip


def _rows(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Two HF folders, their transformers models, a text file and one 3-step run of each."""
    root = tmp_path_factory.mktemp("cli_hf")
    data = str(root / "text.py")
    shutil.copyfile(hf_models.__file__, data)  # a few KB of text that is always here
    llama = str(root / "llama")
    os.makedirs(llama)
    # eos_token_id: the BPE's </s> (id 0), so transformers stops where jmp does
    hf_models.build("llama_gqa", llama, vocab_size=320, eos_token_id=0)
    hf_models.train_tokenizer(llama, vocab_size=TOKENIZER_VOCAB)
    qwen = str(root / "qwen")
    os.makedirs(qwen)
    hf_models.build("qwen2_bias", qwen, vocab_size=256)  # no tokenizer.json: bytes
    runs = {
        "llama": (llama, str(root / "run_llama"), "fsdp_tp", "data=2,model=4", ["--sample", "0"]),
        # --sample: a pipelined Llama samples at the end; --microbatches: the 1F1B's M
        "qwen": (qwen, str(root / "run_qwen"), "pp_dp", "stage=2,data=4",
                 ["--sample", "4", "--microbatches", "2", "--schedule", "1f1b"]),
    }  # fmt: skip
    for folder, out, strategy, mesh, extra in runs.values():
        code, printed, err = _main(*_train_args(folder, out, data, strategy, mesh, *extra))
        assert code == 0, (printed[-2000:], err[-3000:])
    return {"root": root, "data": data, "runs": runs, "llama": llama, "qwen": qwen}


def _first_batch(folder: str, data: str) -> tuple[np.ndarray, np.ndarray]:
    """Batch 0 by the documented rule, the ids from transformers' own tokenizer (or bytes)."""
    import transformers

    raw = open(data, "rb").read() + b"\n"  # each file, then a newline (as the byte path)
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        oracle = transformers.AutoTokenizer.from_pretrained(folder)
        ids = np.asarray(oracle.encode(raw.decode(), add_special_tokens=False), np.int64)
    else:
        ids = np.frombuffer(raw, np.uint8).astype(np.int64)
    train = ids[: int(len(ids) * 0.95)]
    starts = np.random.default_rng([SEED, 0, 0]).integers(0, len(train) - SEQ - 1, size=BATCH)
    windows = train[starts[:, None] + np.arange(SEQ + 1)]
    return windows[:, :-1], windows[:, 1:]


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, targets[..., None], -1).mean())


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_first_loss_equals_transformers_cross_entropy(hf, name):
    folder, out, strategy, mesh, _ = hf["runs"][name]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    inputs, targets = _first_batch(folder, hf["data"])
    want = _cross_entropy(hf_models.logits(hf_models.load(folder), inputs), targets)
    print(f"{name} {strategy} {mesh}: step-1 loss {rows[0]['loss']:.6f}, transformers {want:.6f}")
    assert abs(rows[0]["loss"] - want) < TOL, (rows[0]["loss"], want)
    assert rows[-1]["loss"] != rows[0]["loss"] and "val_loss" in rows[-1]
    config = json.load(open(os.path.join(out, "config.json")))
    init = config["init"]
    assert init["path"] == folder and config["strategy"] == strategy and config["mesh"] == mesh
    assert init["architecture"] == json.load(open(f"{folder}/config.json"))["architectures"][0]
    assert len(init["config_sha256"]) == 64
    kind = "tokenizer.json" if name == "llama" else "bytes"
    assert init["tokenizer"]["kind"] == kind
    assert ("tokens" if name == "llama" else "bytes") in config["data"]
    assert config["model"]["seq_len"] == SEQ and config["model"]["param_dtype"] == "float32"
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["2", "3"]


def _restored(run: str):
    """The run's latest parameters as jmp restores them, with its mesh and rules."""
    from jmp.cli.generate import model_config, restore_model, run_mesh
    from jmp.train.checkpoint import Checkpointer

    saved = json.load(open(os.path.join(run, "config.json")))
    mesh, rules = run_mesh(saved)
    ckpt = Checkpointer(os.path.join(run, "checkpoints"), create=False)
    model = restore_model(model_config(saved), mesh, rules, ckpt, ckpt.latest_step())
    ckpt.close()
    return model, mesh, rules


def _jmp_logits(model, mesh, rules, tokens):
    from flax import nnx

    graphdef, state = nnx.split(model)

    def forward(state, tokens):
        with jmp.activate(mesh, rules):
            return nnx.merge(graphdef, state)(tokens)

    with jax.set_mesh(mesh):
        return np.asarray(jax.jit(forward)(state, tokens))


def test_resume_after_a_stop_continues_bitwise(hf):
    folder, whole, strategy, mesh, extra = hf["runs"]["llama"]
    stopped = str(hf["root"] / "stopped")
    shutil.copytree(whole, stopped)
    # what a run killed after step 3's metrics but before its last checkpoint leaves
    shutil.rmtree(os.path.join(stopped, "checkpoints", "3"))
    config = open(os.path.join(stopped, "config.json")).read()
    code, printed, err = _main(
        *_train_args(folder, stopped, hf["data"], strategy, mesh, *extra), "--resume"
    )
    assert code == 0, err[-3000:]
    keys = ("step", "loss", "grad_norm", "lr", "val_loss")
    assert [[r.get(k) for k in keys] for r in _rows(stopped)] == [
        [r.get(k) for k in keys] for r in _rows(whole)
    ]
    assert open(os.path.join(stopped, "config.json")).read() == config
    a, b = _restored(whole)[0], _restored(stopped)[0]
    from flax import nnx

    pairs = zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_export_loads_in_transformers_with_jmps_logits(hf, name):
    import transformers

    folder, run, *_ = hf["runs"][name]
    out = str(hf["root"] / f"export_{name}")
    code, printed, err = _main("export", "--run", run, "--hf", out)
    assert code == 0, err[-3000:]
    assert "wrote" in printed and "step 3" in printed
    assert not [f for f in os.listdir(hf["root"]) if ".partial-" in f]
    exported = hf_models.load(out)
    source = json.load(open(os.path.join(folder, "config.json")))
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["architectures"] == source["architectures"]
    assert written["dtype"] == "float32" and written["eos_token_id"] == source["eos_token_id"]
    tokens = hf_models.tokens(BATCH, seq=SEQ, seed=1)
    model, mesh, rules = _restored(run)
    got, want = hf_models.logits(exported, tokens), _jmp_logits(model, mesh, rules, tokens)
    print(f"export {name}: max |transformers - jmp| {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() < TOL
    before = hf_models.logits(hf_models.load(folder), tokens)
    assert np.abs(got - before).max() > 100 * TOL  # the trained weights were written
    if name == "llama":  # the tokenizer came along, as it was
        text = open(hf["data"]).read()[:500]
        again = transformers.AutoTokenizer.from_pretrained(out)
        original = transformers.AutoTokenizer.from_pretrained(folder)
        assert again.encode(text) == original.encode(text) and again.eos_token == "</s>"
    else:
        assert "tokenizer.json" not in os.listdir(out)


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy generate, never an id past the tokenizer's (as jmp samples)."""
    import torch

    suppress = list(range(TOKENIZER_VOCAB, model.config.vocab_size)) or None
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             suppress_tokens=suppress)  # fmt: skip
    return out[0].tolist()


def test_generate_hf_greedy_equals_transformers(hf):
    folder = hf["llama"]
    tok = jmp.hf.load_tokenizer(folder)
    prompt = "def build_model(name"
    code, printed, err = _main("generate", "--hf", folder, "--prompt", prompt, "--tokens", "6")
    assert code == 0, err[-3000:]
    want = _greedy(hf_models.load(folder), tok.encode(prompt), 6)
    assert len(want) > len(tok.encode(prompt))
    assert printed == tok.decode(want) + "\n"


def test_generate_api_greedy_and_temperature_equal_transformers_logits(hf, make_mesh):
    import torch

    from jmp.models.generate import generate_ids

    folder = hf["llama"]
    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("fsdp_tp", mesh)
    model = jmp.hf.load(folder, mesh, rules, seq_len=16).model
    oracle = hf_models.load(folder)
    prompt = [40, 41, 42, 100]
    kwargs = dict(mesh=mesh, rules=rules, max_new_tokens=5, vocab_limit=TOKENIZER_VOCAB)
    assert generate_ids(model, prompt, **kwargs) == _greedy(oracle, prompt, 5)
    # temperature: the documented draw (a key split from the seed per token) on transformers'
    # logits of each prefix, restricted to the tokenizer's ids
    got = generate_ids(model, prompt, temperature=0.8, seed=7, **kwargs)
    ids, key = list(prompt), jax.random.key(7)
    for _ in range(5):
        with torch.no_grad():
            logits = oracle(torch.tensor([ids])).logits[0, -1, :TOKENIZER_VOCAB].numpy()
        key, sub = jax.random.split(key)
        ids.append(int(jax.random.categorical(sub, jnp.asarray(logits) / 0.8)))
    assert got == ids
    assert got != generate_ids(model, prompt, temperature=0.8, seed=8, **kwargs)


def test_generate_run_equals_transformers_on_its_export(hf):
    _, run, *_ = hf["runs"]["llama"]
    out = str(hf["root"] / "export_for_generate")
    assert _main("export", "--run", run, "--hf", out)[0] == 0
    tok = jmp.hf.load_tokenizer(out)
    code, printed, err = _main("generate", "--run", run, "--prompt", "import ", "--tokens", "5")
    assert code == 0, err[-3000:]
    assert printed == tok.decode(_greedy(hf_models.load(out), tok.encode("import "), 5)) + "\n"


# --- refusals: one line, exit 2, nothing written -----------------------------------------------


def test_train_refusals(hf, tmp_path):
    folder, run, strategy, mesh, extra = hf["runs"]["llama"]
    new = str(tmp_path / "new")
    _one_line_error(
        _main("train", "--model", "tiny", "--init", f"hf:{folder}", "--out", new),
        "--model tiny and --init", "give one",
    )  # fmt: skip
    _one_line_error(_main("train", "--init", folder, "--out", new), "is not hf:PATH")
    _one_line_error(
        _main("train", "--init", f"hf:{tmp_path}/nothing", "--out", new), "does not exist"
    )
    small = str(tmp_path / "small_vocab")  # 128 ids and no tokenizer.json: bytes do not fit
    hf_models.build("llama_gqa", small)
    _one_line_error(
        _main("train", "--init", f"hf:{small}", "--out", new), "no tokenizer.json", "vocab_size=128"
    )
    # a mesh the model cannot take: 4 pipeline stages for 2 layers (the weights are not read)
    bad_mesh = _train_args(folder, new, hf["data"], "pp_dp", "stage=4,data=2")
    _one_line_error(_main(*bad_mesh), "4 stages exceed n_layers=2")
    assert not os.path.exists(new)
    before = {f: open(os.path.join(run, f), "rb").read() for f in ("config.json", "metrics.jsonl")}
    other = str(tmp_path / "same_weights_elsewhere")
    shutil.copytree(folder, other)
    args = _train_args(other, run, hf["data"], strategy, mesh, *extra)
    _one_line_error(_main(*args, "--resume"), f"started from hf:{folder}, not hf:{other}")
    gpt = [a for a in args if a not in ("--init", f"hf:{other}")] + ["--model", "tiny"]
    _one_line_error(_main(*gpt, "--resume"), f"started with --init hf:{folder}")
    after = {f: open(os.path.join(run, f), "rb").read() for f in before}
    assert after == before and sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2", "3"]
    # the same folder, changed since the run started (its recorded fingerprint no longer holds)
    changed = str(tmp_path / "changed_run")
    shutil.copytree(run, changed)
    saved = json.load(open(os.path.join(run, "config.json")))
    tokenizer = {**saved["init"]["tokenizer"], "sha256": "0" * 64}
    json.dump({**saved, "init": {**saved["init"], "tokenizer": tokenizer}},
              open(os.path.join(changed, "config.json"), "w"))  # fmt: skip
    resume = _train_args(folder, changed, hf["data"], strategy, mesh, *extra)
    _one_line_error(_main(*resume, "--resume"), "has changed since (its tokenizer differs)")


def test_export_refusals(hf, tmp_path):
    _, run, *_ = hf["runs"]["llama"]
    out = str(tmp_path / "out")
    _one_line_error(
        _main("export", "--run", str(tmp_path / "nothing"), "--hf", out), "does not exist"
    )
    gpt = tmp_path / "gpt_run"  # what jmp train --model writes: no "init"
    gpt.mkdir()
    saved = json.load(open(os.path.join(run, "config.json")))
    json.dump({k: v for k, v in saved.items() if k != "init"}, open(gpt / "config.json", "w"))
    _one_line_error(_main("export", "--run", str(gpt), "--hf", out),
                    "only runs started with --init hf: can be exported")  # fmt: skip
    fresh = tmp_path / "no_checkpoint"
    fresh.mkdir()
    shutil.copyfile(os.path.join(run, "config.json"), fresh / "config.json")
    _one_line_error(_main("export", "--run", str(fresh), "--hf", out), "no checkpoint")
    changed = str(tmp_path / "changed")
    shutil.copytree(run, changed)
    json.dump({**saved, "init": {**saved["init"], "config_sha256": "0" * 64}},
              open(os.path.join(changed, "config.json"), "w"))  # fmt: skip
    _one_line_error(_main("export", "--run", changed, "--hf", out), "config_sha256 changed")
    assert not os.path.exists(out)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    _one_line_error(_main("export", "--run", run, "--hf", str(full)), "not empty")
    assert os.listdir(full) == ["keep.txt"]
    assert not [f for f in os.listdir(tmp_path) if ".partial-" in f]


def test_generate_refusals(hf):
    _one_line_error(
        _main("generate", "--run", hf["runs"]["llama"][1], "--hf", hf["llama"]), "not allowed"
    )
    _one_line_error(
        _main("generate", "--run", hf["runs"]["llama"][1], "--mesh", "model=8"), "are for --hf"
    )
