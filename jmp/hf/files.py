"""A Hugging Face model folder on disk: ``config.json`` and its safetensors files.

:class:`Checkpoint` opens the folder's weights, one ``model.safetensors`` or the shards named by
``model.safetensors.index.json``, and reads every file's header (names, shapes, dtypes) without
reading any data: a truncated file, an index naming a missing file or a tensor its file lacks
is refused here, before anything is placed on devices. :meth:`Checkpoint.read` then reads one
slice of one tensor (safetensors memory-maps the file and copies only that slice).

Example:
    >>> import tempfile, os, json
    >>> from safetensors.numpy import save_file
    >>> folder = tempfile.mkdtemp()
    >>> save_file({"w": np.arange(12.0, dtype=np.float32).reshape(3, 4)},
    ...           os.path.join(folder, "model.safetensors"))
    >>> ckpt = Checkpoint.open(folder)
    >>> ckpt.shape("w"), ckpt.dtype("w")
    ((3, 4), 'F32')
    >>> ckpt.read("w", (slice(1, 2), slice(0, 2)))
    array([[4., 5.]], dtype=float32)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' BF16 slices need it)
import numpy as np
from safetensors import SafetensorError, safe_open

from jmp.errors import ConfigError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _fix_folder(path: str) -> str:
    return (
        f"Fix: pass a Hugging Face model folder (what save_pretrained or jmp.hf.save writes); "
        f"{path!r} holds {sorted(os.listdir(path))[:8] if os.path.isdir(path) else 'nothing'}."
    )


def read_json(path: str, /, *, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{what} {path!r} does not exist. {_fix_folder(os.path.dirname(path))}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"{what} {path!r} is not valid JSON ({err}). Fix: restore the file."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path!r} is not a JSON object. Fix: restore the file.")
    return data


def read_config(folder: str | os.PathLike, /) -> dict[str, Any]:
    """The folder's ``config.json``."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ConfigError(
            f"Hugging Face folder {folder!r} does not exist. Fix: pass a local folder holding "
            f"config.json and model.safetensors (nothing is downloaded)."
        )
    return read_json(os.path.join(folder, CONFIG), what="The model config")


def _weight_map(folder: str) -> dict[str, str]:
    """Tensor name -> file name, from the index or the single file's header."""
    index_path = os.path.join(folder, INDEX)
    if os.path.exists(index_path):
        weight_map = read_json(index_path, what="The safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(
                f"{index_path!r} has no 'weight_map' of tensor names to files. Fix: restore it."
            )
        return {str(k): str(v) for k, v in weight_map.items()}
    if os.path.exists(os.path.join(folder, SINGLE)):
        return {name: SINGLE for name in _open(os.path.join(folder, SINGLE)).keys()}
    others = sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth")))
    hint = f" (found {', '.join(others)}: PyTorch pickles are not read)" if others else ""
    raise ConfigError(
        f"No {SINGLE} or {INDEX} in {folder!r}{hint}. Fix: save the model with "
        f"safetensors (save_pretrained(..., safe_serialization=True))."
    )


def _open(path: str) -> Any:
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as err:
        size = os.path.getsize(path)
        raise ConfigError(
            f"Safetensors file {path!r} ({size} bytes) is truncated or corrupt ({err}). "
            f"Fix: copy or save it again."
        ) from None


class Checkpoint:
    """The tensors of a folder's safetensors files: names, shapes, dtypes, sliced reads."""

    def __init__(self, folder: str, files: Mapping[str, Any], where: Mapping[str, str]) -> None:
        self.folder, self._files, self._where = folder, dict(files), dict(where)

    @classmethod
    def open(cls, folder: str | os.PathLike, /) -> Checkpoint:
        """Open every file the folder's index (or single file) names; check all headers."""
        folder = os.fspath(folder)
        weight_map = _weight_map(folder)
        files: dict[str, Any] = {}
        for name in sorted(set(weight_map.values())):
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                count = sum(v == name for v in weight_map.values())
                raise ConfigError(
                    f"The index {INDEX} of {folder!r} names file {name!r} ({count} tensors), "
                    f"which does not exist. Fix: copy the missing file into the folder."
                )
            files[name] = _open(path)
        for tensor, name in weight_map.items():
            if tensor not in files[name].keys():
                raise ConfigError(
                    f"The index {INDEX} of {folder!r} puts tensor {tensor!r} in {name!r}, "
                    f"which does not hold it. Fix: restore the index or that file."
                )
        return cls(folder, files, weight_map)

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def _slice(self, name: str) -> Any:
        return self._files[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code (``'F32'``, ``'BF16'``...)."""
        return str(self._slice(name).get_dtype())

    def file_of(self, name: str) -> str:
        return os.path.join(self.folder, self._where[name])

    def read(self, name: str, index: tuple[slice, ...], /) -> np.ndarray:
        """The slice ``index`` of tensor ``name``: only those bytes are copied from the file."""
        return self._slice(name)[index]
