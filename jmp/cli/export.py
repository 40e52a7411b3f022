"""``jmp export``: write a trained run back as a Hugging Face folder.

Only runs started with ``jmp train --init hf:PATH`` have a Hugging Face architecture: their
latest checkpoint's parameters go through :func:`jmp.hf.save` with the original folder's
``config.json`` (its architecture, token ids...: only the model's shape comes from the run),
in the dtype it records, and its tokenizer files are copied beside them. The result is a folder
``transformers.AutoModelForCausalLM.from_pretrained`` loads.

Nothing is written until every check has passed (a run, with a checkpoint, started from a
folder that is still as it was, and an ``--hf`` that is new or empty), and the folder appears
whole: it is written under a temporary name and renamed at the end.

Example:
    $ jmp export --run runs/latest --hf models/llama-trained
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

from jmp.cli.common import positive_int, start_devices


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add this command to the ``jmp`` command's subparsers."""
    export = sub.add_parser("export", help="write a trained run as a Hugging Face folder")
    export.add_argument("--run", required=True, help="run folder written by jmp train --init")
    export.add_argument("--hf", required=True, metavar="OUT", help="the folder to write")
    export.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="the saved tensors' dtype (default: the one the original folder records)",
    )
    export.add_argument(
        "--devices",
        type=positive_int,
        default=8,
        help="CPU devices to simulate when no accelerator is present",
    )
    return export


def cmd_export(args: argparse.Namespace) -> int:
    import jmp.hf
    from jmp.cli.generate import model_config, restore_model, run_mesh
    from jmp.cli.hf_run import TOKENIZER_FILES, unchanged
    from jmp.hf.config import checkpoint_dtype
    from jmp.hf.writer import SAVE_DTYPES
    from jmp.train.checkpoint import Checkpointer

    run, saved, step = _checked_run(args.run)
    out = _checked_out(args.hf)
    hf_config, tokenizer = unchanged(saved["init"])
    recorded = checkpoint_dtype(hf_config)
    dtype = args.dtype or (recorded if recorded in SAVE_DTYPES else None)
    start_devices(args.devices)
    mesh, rules = run_mesh(saved)
    ckpt = Checkpointer(os.path.join(run, "checkpoints"), create=False)
    model = restore_model(model_config(saved), mesh, rules, ckpt, step)
    partial = f"{out}.partial-{os.getpid()}"
    try:
        jmp.hf.save(model, partial, like=hf_config, tokenizer=tokenizer, dtype=dtype)
        source = saved["init"]["path"]
        for name in TOKENIZER_FILES:  # as they are: chat template, special tokens, generation
            if os.path.exists(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(partial, name))
        if os.path.isdir(out):  # checked empty
            os.rmdir(out)
        os.rename(partial, out)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial)
    print(
        f"jmp export: wrote {out} ({saved['init']['architecture']}, step {step} of {run}, "
        f"{dtype or model.cfg.param_dtype})"
    )
    return 0


def _checked_run(path: str) -> tuple[str, dict[str, Any], int]:
    """The run folder, its config and latest checkpoint step; refused in one line if it is no
    run, a run of jmp's GPT, or has no checkpoint."""
    from jmp.errors import ConfigError
    from jmp.train.run_folder import RunFolder

    folder = RunFolder(path)
    if not os.path.isdir(folder.path):
        raise ConfigError(
            f"--run {folder.path!r} does not exist. Fix: pass the --out of a jmp train --init run."
        )
    saved = folder.read_config()
    if "init" not in saved:
        raise ConfigError(
            f"only runs started with --init hf: can be exported as Hugging Face folders; "
            f"{folder.path!r} trained jmp's GPT (learned positions, no Hugging Face "
            f"architecture). Fix: train with jmp train --init hf:PATH, then export that run."
        )
    steps = folder.checkpoint_steps()
    if not steps:
        raise ConfigError(
            f"--run {folder.path!r} has no checkpoint yet. Fix: let it train until one is "
            f"written (--checkpoint-every; the last step always is), or resume it."
        )
    return folder.path, saved, steps[-1]


def _checked_out(path: str) -> str:
    """``--hf OUT`` as an absolute path: new, or an empty folder, under a writable one."""
    from jmp.errors import ConfigError

    out = os.path.abspath(path)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        what = "a file" if not os.path.isdir(out) else "a folder that is not empty"
        raise ConfigError(
            f"--hf {out!r} is {what}; export never overwrites. Fix: pass a new folder (or "
            f"remove that one)."
        )
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--hf {out!r}: {parent!r} is not a writable folder. Fix: pass an --hf where you "
            f"may write."
        )
    return out
