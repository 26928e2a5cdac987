"""Trust boundaries: checkpoints, stored configurations and dataset files are untrusted input.

- :func:`load_torch_file` reads a checkpoint with ``torch.load(weights_only=True)``: tensors and plain data
  only, so an object whose ``__reduce__`` would run code is refused instead of run.
- :func:`check_stored_targets` vets the ``_target_`` entries of a configuration read from a checkpoint (its
  dataset, model, optimizer and objective) before anything is instantiated: only flowforge's own classes (the
  objectives of :mod:`flowforge.training.objectives` among them) and flow families, ``torch.nn`` modules and
  ``torch.optim`` optimizers; anything else (``numpy.savetxt``, ``os.system``, ...) is refused by name.
- :func:`safe_unpickle` parses a pickle-format dataset file with an unpickler that resolves only the globals
  the format needs (numpy array reconstruction, a few builtins), so a crafted file cannot run a payload.
"""

from __future__ import annotations

import importlib
import inspect
import io
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flowforge.errors import ConfigError, DataError

# flowforge packages whose callables a stored config may name (flow families are functions); other flowforge
# modules (fake-data writers, checkpoint I/O, reports) contribute classes only
_FLOWFORGE_CALLABLE_PACKAGES = ("flowforge.flows.",)
_REFUSED_FLOWFORGE_MODULES = ("flowforge.data.fake", "flowforge.training.checkpoint_io", "flowforge.report")

# what numpy arrays and Python containers need to be rebuilt from a pickle (numpy 1.x and 2.x module names)
NUMPY_ARRAY_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
    }
)

# what a pandas DataFrame of floats needs on top (MAF's ethylene_CO.pickle); old pandas module names included
PANDAS_FRAME_GLOBALS = NUMPY_ARRAY_GLOBALS | frozenset(
    {
        ("pandas.core.frame", "DataFrame"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas.core.internals", "BlockManager"),
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas.core.internals.blocks", "new_block"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.range", "RangeIndex"),
        ("pandas.core.indexes.numeric", "Int64Index"),
        ("pandas.core.indexes.numeric", "Float64Index"),
        ("pandas.indexes.base", "_new_Index"),
        ("pandas.indexes.base", "Index"),
        ("pandas.indexes.range", "RangeIndex"),
        ("builtins", "slice"),
        ("builtins", "object"),
        ("copyreg", "_reconstructor"),
    }
)


# ----------------------------------------------------------------------------------------------- checkpoints
def load_torch_file(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: a refused global becomes a :class:`ConfigError` that names it, any
    other unpickling failure one that calls the file unreadable."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused is None:
            raise ConfigError(f"ckpt_path={path} is not a readable checkpoint ({_detail(str(e))})") from None
        raise ConfigError(
            f"refused to load ckpt_path={path}: it holds a Python object that would run code when loaded "
            f"({refused}), and flowforge checkpoints hold only tensors and plain data. "
            "Load only checkpoints written by train.py from a source you trust"
        ) from None


def _refused_global(text: str) -> str | None:
    """The line of torch's weights-only error that names a refused global, or None for other failures."""
    for line in text.splitlines():
        if "GLOBAL" in line or "Unsupported global" in line:
            return line.strip()[:300]
    return None


def _detail(text: str) -> str:
    """The specific part of torch's weights-only error (its generic preamble left out)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    specific = [
        ln
        for ln in lines
        if not ln.startswith(("Weights only load failed", "Please file an issue", "Check the documentation"))
    ]
    return (specific or lines or [text])[0][:300]


# ---------------------------------------------------------------------------------------- stored configs
def iter_targets(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted key, target)`` for every ``_target_`` in a nested dict / list configuration."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                yield here, str(value)
            else:
                yield from iter_targets(value, here)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from iter_targets(value, f"{where}[{i}]")


def check_stored_targets(
    config: Any, source: str, sections: Iterable[str] = ("dataset", "model", "optim", "objective")
) -> None:
    """Refuse a configuration read from ``source`` (a checkpoint) whose ``sections`` name a ``_target_`` outside
    flowforge, ``torch.nn`` modules and ``torch.optim`` optimizers, before anything is instantiated."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=False)
    for section in sections:
        for key, target in iter_targets(config.get(section), section):
            problem = _target_problem(target)
            if problem:
                raise ConfigError(
                    f"{source} stores {key}={target!r}, which {problem}; a stored configuration may only name "
                    "flowforge classes and flow families, torch.nn modules and torch.optim optimizers. "
                    "Use a checkpoint written by train.py from a source you trust"
                )


def _target_problem(target: str) -> str | None:
    """Why ``target`` may not be instantiated from a stored config (None when it may)."""
    module_name, _, name = target.rpartition(".")
    if not module_name or not name.isidentifier():
        return "is not a dotted name of a class"
    top = module_name.split(".")[0]
    if top not in ("flowforge", "torch"):
        return "lies outside flowforge and torch"
    if module_name.startswith(_REFUSED_FLOWFORGE_MODULES):
        return "is a flowforge tool that writes files, not a model, data or optimizer class"
    obj = _resolve(module_name, name)
    if obj is None:
        return "does not exist"
    if top == "torch":
        if inspect.isclass(obj) and (issubclass(obj, torch.optim.Optimizer) or issubclass(obj, torch.nn.Module)):
            return None
        return "is not a torch.optim optimizer or a torch.nn module"
    if inspect.isclass(obj) or (
        inspect.isfunction(obj)
        and module_name.startswith(_FLOWFORGE_CALLABLE_PACKAGES)
        and getattr(obj, "__module__", "").startswith("flowforge.")
    ):
        return None
    return "is a flowforge function, not a class or flow family"


def _resolve(module_name: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return None


# ----------------------------------------------------------------------------------------- pickled data
class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the ``allowed`` ``(module, name)`` globals."""

    def __init__(self, file: io.BufferedIOBase, allowed: frozenset, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def safe_unpickle(
    path: Path, dataset: str, fix: str, allowed: frozenset = NUMPY_ARRAY_GLOBALS, encoding: str = "latin1"
) -> Any:
    """Unpickle the data file ``path`` resolving only ``allowed`` globals; a file that names any other global
    (code to run) is refused with a :class:`DataError` that names it and ``fix``."""
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, allowed, encoding=encoding).load()
        except pickle.UnpicklingError as err:
            if str(err).startswith("forbidden global"):
                name = str(err)[len("forbidden global ") :]
                raise DataError(
                    f"dataset '{dataset}': refused to read {path}: it asks to load {name}, "
                    f"which is not part of the data format (a crafted file could run code this way). {fix}"
                ) from None
            raise
