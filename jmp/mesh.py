"""Meshes: a named grid of devices built from ``"data=2,model=4"``, a dict, or with one ``-1``.

Example:
    >>> import jmp
    >>> mesh = jmp.make_mesh("data=2,model=4")      # 8 devices
    >>> dict(mesh.shape)
    {'data': 2, 'model': 4}
    >>> jmp.make_mesh("data=-1,model=2").shape["data"]
    4
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from jmp.errors import MeshError

MeshSpec = str | Mapping[str, int]

_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_mesh_spec(spec: MeshSpec, /) -> dict[str, int]:
    """Parse ``"data=2,model=4"`` (or a dict) into an ordered ``{axis: size}``; sizes may be -1."""
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, str):
        items = [_parse_item(part, spec) for part in spec.split(",") if part.strip()]
    else:
        raise MeshError(
            f"Mesh spec must be a string like 'data=2,model=4' or a dict, "
            f"got {type(spec).__name__}."
        )
    if not items:
        raise MeshError(f"Mesh spec {spec!r} names no axes. Example: 'data=2,model=4'.")
    axes: dict[str, int] = {}
    for name, size in items:
        if not _AXIS_NAME.match(name):
            raise MeshError(f"Mesh axis name {name!r} in {spec!r} is not an identifier.")
        if name in axes:
            raise MeshError(f"Mesh axis {name!r} appears twice in {spec!r}; name each axis once.")
        if not isinstance(size, int) or isinstance(size, bool) or size == 0 or size < -1:
            raise MeshError(
                f"Mesh axis {name!r} has size {size!r} in {spec!r}: sizes are positive integers, "
                f"or -1 once to fill the remaining devices."
            )
        axes[name] = size
    if list(axes.values()).count(-1) > 1:
        raise MeshError(f"Mesh spec {spec!r} has more than one -1; only one axis can be inferred.")
    return axes


def _parse_item(part: str, spec: str) -> tuple[str, int]:
    name, eq, size = part.partition("=")
    if not eq:
        raise MeshError(
            f"Malformed mesh spec {spec!r}: {part.strip()!r} is not 'axis=size'. "
            f"Example: 'data=2,model=4'."
        )
    try:
        return name.strip(), int(size.strip())
    except ValueError:
        raise MeshError(
            f"Malformed mesh spec {spec!r}: size {size.strip()!r} of axis "
            f"{name.strip()!r} is not an integer."
        ) from None


def fitting_shapes(names: Sequence[str], n_devices: int, /) -> list[dict[str, int]]:
    """Every assignment of sizes to ``names`` whose product is ``n_devices``."""
    if not names:
        return [{}] if n_devices == 1 else []
    out = []
    for d in range(1, n_devices + 1):
        if n_devices % d == 0:
            out += [{names[0]: d, **rest} for rest in fitting_shapes(names[1:], n_devices // d)]
    return out


def format_mesh_shape(shape: Mapping[str, int], /) -> str:
    """``{'data': 2, 'model': 4}`` -> ``'data=2,model=4'``."""
    return ",".join(f"{k}={v}" for k, v in shape.items())


def resolve_mesh_shape(spec: MeshSpec, n_devices: int, /) -> dict[str, int]:
    """Parse ``spec`` and fill a ``-1`` so that the sizes multiply to ``n_devices``."""
    axes = parse_mesh_spec(spec)
    known = math.prod(v for v in axes.values() if v != -1)
    if -1 in axes.values():
        if n_devices % known:
            raise MeshError(
                f"Mesh {spec!r}: cannot fill -1, the other axes multiply to {known}, which does "
                f"not divide the {n_devices} devices.{_suggest(list(axes), n_devices)}"
            )
        axes = {k: (n_devices // known if v == -1 else v) for k, v in axes.items()}
    elif known != n_devices:
        raise MeshError(
            f"Mesh {spec!r} needs {known} devices but {n_devices} are available."
            f"{_suggest(list(axes), n_devices)}".rstrip()
        )
    return axes


def _suggest(names: list[str], n_devices: int) -> str:
    shapes = [format_mesh_shape(s) for s in fitting_shapes(names, n_devices)]
    return " Shapes that fit: " + "; ".join(shapes) + "." if shapes else ""


def make_mesh(
    spec: MeshSpec,
    /,
    *,
    # jax.Device aliases a compiled jaxlib class with no stubs: pyright sees a plain variable
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
    axis_types: AxisType = AxisType.Auto,
) -> Mesh:
    """Build a named device mesh.

    Args:
        spec: ``"data=2,model=4"``, ``{"data": 2, "model": 4}``, or with one ``-1`` that takes
            the remaining devices (``"data=-1,model=2"``).
        devices: the devices to use; default all of ``jax.devices()``.
        axis_types: ``AxisType.Auto`` (the compiler propagates shardings; what jmp's layers
            expect) or ``AxisType.Explicit`` for every axis.

    Raises:
        MeshError: malformed text, non-positive sizes, duplicate axes, more than one -1, a
            product that differs from the device count (the message lists shapes that fit),
            or ``devices`` that is empty or names a device twice.

    Example:
        >>> mesh = make_mesh("data=2,model=4")
    """
    devices = list(jax.devices() if devices is None else _check_devices(devices))
    shape = resolve_mesh_shape(spec, len(devices))
    types = (axis_types,) * len(shape)
    return jax.make_mesh(tuple(shape.values()), tuple(shape), types, devices=devices)


def _check_devices(devices: Iterable, /) -> list:
    """``devices`` as a list if they are distinct jax devices, at least one; else a MeshError."""
    if isinstance(devices, str) or not isinstance(devices, Iterable):
        raise MeshError(
            f"devices must be a list of jax devices, got {type(devices).__name__} "
            f"{devices!r}. Fix: pass e.g. devices=jax.devices()[:4], or leave it out for all."
        )
    devices = list(devices)
    if not devices:
        raise MeshError(
            "devices=[] is empty: a mesh needs at least one device. Fix: pass some "
            "(e.g. devices=jax.devices()[:4]) or leave devices out to use all of jax.devices()."
        )
    seen: dict[tuple[str, int], int] = {}
    for i, d in enumerate(devices):
        if not hasattr(d, "platform") or not hasattr(d, "id"):
            raise MeshError(
                f"devices[{i}] = {d!r} is not a jax device. Fix: take devices from jax.devices()."
            )
        key = (d.platform, d.id)  # ids are unique over all processes of a job
        if key in seen:
            raise MeshError(
                f"Device {d!r} appears twice in devices (positions {seen[key]} and {i}): a mesh "
                f"holds each device once. Fix: pass distinct devices, e.g. "
                f"jax.devices()[:{len(devices)}]."
            )
        seen[key] = i
    return devices
