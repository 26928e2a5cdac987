"""A value derived from some tensors, reused until one of them changes.

Modules often derive something from their own parameters or buffers that is costly to recompute on every
call: a number read back from the device (one synchronisation), a precomputed direction, a warm start.  A
:class:`VersionCache` holds one such value together with the identity of the tensors it came from, and hands it
back only while every one of them is still the same storage, unmodified:

- an in-place update (``optimizer.step()``, ``copy_``, ``fill_``, a weight-averaging update) invalidates it;
- replacing the tensor (``module.to(device)``, ``load_state_dict`` of a new tensor, ``tensor.data = ...``, a
  deep copy of the module) invalidates it;
- changes of tensors it was not computed from leave it valid.

Declare it as a class attribute of the owner; each instance gets its own cache on first access, stored in the
instance (not in ``state_dict``, not a parameter or buffer)::

    class Layer(nn.Module):
        _scale_cache = VersionCache()

        def scale(self) -> float:
            return self._scale_cache.get_or_compute((self.weight,), lambda: float(self.weight.norm()))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor


def tensors_key(tensors: Sequence[Tensor]) -> tuple:
    """What identifies the contents of ``tensors``: their storage addresses and version counters.

    ``Tensor._version`` is PyTorch's counter of in-place modifications of a tensor (autograd uses it to detect
    a saved tensor changed in place); every in-place operation, an optimiser's parameter update included, bumps
    it.  It is the only way to notice such an update without reading the data, and this is the only place
    that reads it.  The address tells a tensor replaced by another apart (a new tensor starts again at 0).
    """
    return tuple((t.data_ptr(), t._version) for t in tensors)


class VersionCache:
    """One value computed from some tensors, valid while none of them was modified in place or replaced.

    ``extra`` (any hashable, e.g. a dtype) is part of what the value depends on besides the tensors.
    """

    __slots__ = ("_name", "_key", "_value")

    def __init__(self) -> None:
        self._name: str | None = None
        self._key: tuple | None = None
        self._value: Any = None

    # ---------------------------------------------------------------- declared on a class: one cache per instance
    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: object, owner: type | None = None) -> VersionCache:
        if instance is None:
            return self
        # a non-data descriptor: once stored in the instance, the instance's own cache is found directly
        cache = instance.__dict__[self._name] = VersionCache()
        return cache

    # ---------------------------------------------------------------- the cache
    def get(self, tensors: Sequence[Tensor], extra: Any = None, default: Any = None) -> Any:
        """The stored value if it was computed from ``tensors`` (and ``extra``) as they are now, else ``default``."""
        if self._key is not None and self._key == (tensors_key(tensors), extra):
            return self._value
        return default

    def put(self, tensors: Sequence[Tensor], value: Any, extra: Any = None) -> Any:
        """Store ``value`` as computed from ``tensors`` (and ``extra``) as they are now; returns ``value``."""
        self._key = (tensors_key(tensors), extra)
        self._value = value
        return value

    def get_or_compute(self, tensors: Sequence[Tensor], compute: Callable[[], Any], extra: Any = None) -> Any:
        """The stored value if still valid, else ``compute()`` (which must not modify ``tensors``), stored."""
        key = (tensors_key(tensors), extra)
        if self._key is None or self._key != key:
            self._key, self._value = None, None  # a failing compute() leaves no stale value behind
            self._value = compute()
            self._key = key
        return self._value

    def clear(self) -> None:
        """Forget the value."""
        self._key = self._value = None
