"""The error types jmp raises for input a user can fix.

Every error subclasses :class:`JmpError`, itself a ``ValueError``, so research code that already
catches ``ValueError`` keeps working. Messages name the culprit and end with a concrete fix.

Example:
    >>> import jmp
    >>> try:
    ...     jmp.make_mesh("data=3", devices=[])
    ... except jmp.MeshError as err:
    ...     pass
"""

from __future__ import annotations


class JmpError(ValueError):
    """Base class of every error caused by input the user can fix."""


class DeviceError(JmpError):
    """The devices JAX sees do not match what was asked for."""


class MeshError(JmpError):
    """A mesh description is malformed or does not fit the devices."""


class ShardingError(JmpError):
    """Logical axis names could not be resolved into a valid sharding."""


class ConfigError(JmpError):
    """A configuration value is out of range or inconsistent."""
