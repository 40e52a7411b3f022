"""Run folders: one run per folder, never two mixed, nothing changed before every check passed.

A run folder holds ``config.json`` (what defines the run: model, training settings, a
fingerprint of the data, strategy and mesh), ``metrics.jsonl``, ``loss.png`` and
``checkpoints/``. The rules, which :func:`jmp.fit` and ``jmp train`` both follow:

- a new run refuses a folder that already holds a run (:func:`check_new_run`); ``overwrite``
  moves the old run aside (:func:`move_aside`), it never deletes it;
- a resumed run must define the same run (:func:`check_resume`, :func:`run_changes`): the
  same model, start (``init``: the Hugging Face folder of ``jmp train --init hf:PATH``),
  training settings, data and pipeline layout; only the mesh and strategy may change
  (checkpoints restore onto any mesh), and ``--steps`` only with an explicit ``--extend``;
- ``config.json`` is written atomically (:func:`write_config`), after all of that.

Example:
    >>> folder = RunFolder("/tmp/jmp-doctest-run-folder-does-not-exist")
    >>> folder.holds_run()
    False
    >>> run_changes({"train": {"seed": 0}}, {"train": {"seed": 1}})
    ['train.seed: 0 in the run, 1 now']
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from jmp.errors import ConfigError

#: What marks a folder as holding a run.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints")
#: Settings that may differ on resume: they do not change what is trained.
MAY_CHANGE = ("strategy", "mesh", "train.steps", "train.eval_every", "data.paths")


class RunFolderError(ConfigError):
    """A run folder that cannot be used as asked (exists, is a file, not writable, differs)."""


def fingerprint(*arrays: Any) -> str:
    """sha256 of the bytes of ``arrays``: what identifies the training data of a run."""
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


class RunFolder:
    """A run folder's path and what is in it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, "config.json")

    def holds_run(self, files: tuple[str, ...] = RUN_FILES) -> bool:
        return any(os.path.exists(os.path.join(self.path, f)) for f in files)

    def checkpoint_steps(self) -> list[int]:
        """The steps of the committed checkpoints on disk, oldest first (read, not restored:
        orbax's own temporary folders have no plain number as their name)."""
        ckpt = os.path.join(self.path, "checkpoints")
        if not os.path.isdir(ckpt):
            return []
        return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())

    def describe(self) -> str:
        """What the folder holds, in a few words (for error messages)."""
        found = [f for f in RUN_FILES if os.path.exists(os.path.join(self.path, f))]
        steps = self.checkpoint_steps()
        if steps:
            found[found.index("checkpoints")] = f"checkpoints up to step {steps[-1]}"
        return ", ".join(found)

    def read_config(self) -> dict[str, Any]:
        if not os.path.exists(self.config_path):
            raise RunFolderError(
                f"{self.path!r} holds no config.json, so it is not a jmp train run. Fix: pass "
                f"the --out of an earlier jmp train run."
            )
        with open(self.config_path) as f:
            return json.load(f)

    def check_writable(self) -> None:
        """One clear line if the folder cannot be created or written (nothing is written)."""
        path = self.path
        if os.path.exists(path) and not os.path.isdir(path):
            raise RunFolderError(
                f"--out {path!r} is a file, not a folder. Fix: pass a folder path for the run."
            )
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise RunFolderError(
                f"--out {path!r} is under {parent!r}, which is a file. Fix: pass a folder "
                f"path that is not under a file."
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunFolderError(
                f"--out {path!r}: the folder {parent!r} is not writable. Fix: pass an --out "
                f"where you may write, or change that folder's permissions."
            )


def check_new_run(
    folder: RunFolder, *, overwrite: bool, files: tuple[str, ...] = RUN_FILES
) -> None:
    """Refuse to start a new run in a folder that holds one (unless it will be moved aside).

    ``files`` are what counts as a run (:func:`jmp.fit` writes no config.json of its own).
    """
    folder.check_writable()
    if folder.holds_run(files) and not overwrite:
        raise RunFolderError(
            f"{folder.path!r} already holds a run ({folder.describe()}). Fix: --resume "
            f"(resume=True) to continue it, --overwrite (overwrite=True) to move it aside "
            f"first, or another --out."
        )


def move_aside(folder: RunFolder) -> str | None:
    """Rename a folder holding a run to ``<path>.replaced-<time>``; returns the new path."""
    if not folder.holds_run():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = f"{folder.path}.replaced-{stamp}", 1
    while os.path.exists(target):
        n += 1
        target = f"{folder.path}.replaced-{stamp}-{n}"
    os.rename(folder.path, target)
    return target


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_changes(
    saved: dict[str, Any], requested: dict[str, Any], /, *, allowed: tuple[str, ...] = MAY_CHANGE
) -> list[str]:
    """Each setting that differs between a run's config and a new invocation, in words."""
    old, new = _flatten(saved), _flatten(requested)
    return [
        f"{k}: {old.get(k)} in the run, {new.get(k)} now"
        for k in sorted(set(old) | set(new))
        if k not in allowed and old.get(k) != new.get(k)
    ]


def write_config(folder: RunFolder, config: dict[str, Any]) -> None:
    """Write ``config.json`` atomically (a reader never sees half a file)."""
    os.makedirs(folder.path, exist_ok=True)
    tmp = folder.config_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, folder.config_path)


def stages_of_run(config: dict[str, Any], /) -> int:
    """The pipeline stage count of a run (1 without a pipeline): its parameters' layout.

    Example:
        >>> stages_of_run({"strategy": "pp_dp", "mesh": "stage=2,data=4"})
        2
    """
    from jmp.mesh import parse_mesh_spec

    if not str(config["strategy"]).startswith("pp"):
        return 1
    return parse_mesh_spec(config["mesh"]).get("stage", 1)


def check_resume(
    folder: RunFolder, config: dict[str, Any], /, *, extend: bool = False
) -> list[str]:
    """Refuse a resume that would train another run than the one in ``folder``.

    Args:
        folder: the run's folder.
        config: the ``config.json`` the resuming command would write.
        extend: a ``steps`` other than the run's is accepted (``--extend``).

    Returns:
        What is allowed to change and does (a new mesh or strategy, extended steps), in words,
        to print. Raises :class:`RunFolderError` naming every setting that may not change.
    """
    if not os.path.isdir(folder.path):
        raise RunFolderError(
            f"--resume: run folder {folder.path!r} does not exist. Fix: pass the --out of an "
            f"earlier run."
        )
    saved = folder.read_config()
    if "data" not in saved:  # a run written before data fingerprints: its data is unknown
        saved = {**saved, "data": config["data"]}
    _check_same_start(folder, saved.get("init"), config.get("init"))
    changes = run_changes(saved, config)
    if changes:
        raise RunFolderError(
            f"--resume: these settings differ from the run in {folder.path!r}: "
            f"{'; '.join(changes)}. Fix: pass the run's own settings (see its config.json), "
            f"or start a new run with another --out."
        )
    return [*_check_layout(folder, saved, config), *_check_steps(folder, saved, config, extend)]


def _check_same_start(folder: RunFolder, old: Any, new: Any) -> None:
    """The run's start: jmp's seeded GPT (no ``init``) or one Hugging Face folder, unchanged."""
    if old == new:
        return
    where = f"--resume: the run in {folder.path!r}"
    if old is None:
        raise RunFolderError(
            f"{where} trained jmp's GPT from a seeded start, not a Hugging Face folder. Fix: "
            f"resume it without --init (with its own --model), or start a new run."
        )
    if new is None:
        raise RunFolderError(
            f"{where} was started with --init hf:{old['path']}. Fix: pass --init "
            f"hf:{old['path']} again (not --model)."
        )
    if old["path"] != new["path"]:
        raise RunFolderError(
            f"{where} was started from hf:{old['path']}, not hf:{new['path']}. Fix: --init "
            f"hf:{old['path']}, or start a new run with another --out."
        )
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise RunFolderError(
        f"{where} was started from hf:{old['path']}, which has changed since (its "
        f"{' and '.join(changed)} {'differs' if len(changed) == 1 else 'differ'}). Fix: restore "
        f"the folder as it was, or start a new run with another --out."
    )


def _check_layout(folder: RunFolder, saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The pipeline layout must stay (checkpoints hold it); the mesh and strategy may change."""
    before, now = stages_of_run(saved), stages_of_run(config)
    if before != now:
        raise RunFolderError(
            f"--resume: the run in {folder.path!r} was trained with {saved['strategy']} on "
            f"{saved['mesh']} ({before} pipeline stage(s)), and its checkpoints hold the "
            f"blocks in that layout; {config['strategy']} on {config['mesh']} needs {now}. "
            f"Fix: resume with a strategy and mesh of {before} stage(s) (any data/model "
            f"split), or start a new run."
        )
    if (saved["strategy"], saved["mesh"]) == (config["strategy"], config["mesh"]):
        return []
    return [
        f"resharding the run from {saved['strategy']} on {saved['mesh']} onto "
        f"{config['strategy']} on {config['mesh']}"
    ]


def _check_steps(
    folder: RunFolder, saved: dict[str, Any], config: dict[str, Any], extend: bool
) -> list[str]:
    """``steps`` may grow only with ``extend`` (the schedule depends on it), never shrink."""
    done = max(folder.checkpoint_steps(), default=None)
    old_steps, new_steps = saved["train"]["steps"], config["train"]["steps"]
    if done is not None and new_steps < done:
        raise RunFolderError(
            f"--resume: --steps {new_steps} is behind the run, whose latest checkpoint is at "
            f"step {done}. Fix: --steps {old_steps} (the run's own), or more with --extend."
        )
    if new_steps == old_steps:
        return []
    if not extend:
        raise RunFolderError(
            f"--resume: --steps {new_steps} differs from the run's {old_steps}, and the "
            f"learning-rate schedule (warmup, then cosine decay over --steps) depends on "
            f"it. Fix: --steps {old_steps}, or add --extend to continue with the new "
            f"schedule."
        )
    return [
        f"--extend: training to {new_steps} steps instead of {old_steps}; the "
        f"learning-rate schedule is recomputed for {new_steps} steps, so from step "
        f"{(done or 0) + 1} on the run differs from one planned for {old_steps} (and from "
        f"one planned for {new_steps} from the start)"
    ]
