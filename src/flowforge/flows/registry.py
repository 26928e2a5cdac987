"""The registry of flow families: what each model config builds and what it can do.

A family is one module and one config file.  The module defines the factory (the ``_target_`` of
``conf/model/<name>.yaml``) and, next to it, declares the family::

    register_family(
        RealNVP,
        "realnvp",                                   # the config name: conf/model/realnvp.yaml
        title="RealNVP (Dinh et al., 2017)",
        min_dim=2,
        test=("model.num_steps=2", "model.hidden=[16]", "model.channels=8"),
        smoke={"num_steps": 2, "hidden": [16], "channels": 8, "num_scales": 2},
    )

The declaration (:class:`Family`) states the family's capabilities (the data it models, an exact or estimated
log-det, pathwise sampling, per-step Lipschitz maintenance, conditioning), its shape limits, the Hydra overrides
that make it small enough for the test suite (``test``; ``exact_test`` for the exact-reference tests of an
estimated log-det) and the constructor arguments of a smoke run (``smoke``, :mod:`flowforge.smoke`).  The test
suite (``tests/conftest.py``), smoke runs, error messages that list families and the README's families table
(:func:`families_table`) read the registry; nothing else lists families by name.

Adding a family: write its module under ``src/flowforge/flows/`` with the factory and its
:func:`register_family` call, and ``conf/model/<name>.yaml`` with ``_target_`` naming the factory.  The generic
suites (tests/test_models.py, tests/test_combinations.py) then build it, compare its log-det with a brute-force
Jacobian, invert it and train it.

A family outside flowforge needs the same two files anywhere: a module importable from ``sys.path`` (e.g. on
``PYTHONPATH``) and ``<dir>/model/<name>.yaml``.  Hydra finds the config through its search path and imports the
module through ``_target_``; importing the module registers the family::

    PYTHONPATH=/path/to/modules python train.py hydra.searchpath=[file:///path/to/dir] model=<name>

The test suite reads extra config directories from ``FLOWFORGE_CONFIG_PATH`` (``os.pathsep``-separated)::

    FLOWFORGE_CONFIG_PATH=/path/to/dir PYTHONPATH=/path/to/modules python -m pytest tests/test_models.py -k <name>

:func:`model_configs` pairs every config of the given directories with its family (importing the module of
its ``_target_``); a config without a registered family, or a registered family without a config, is a
:class:`~flowforge.errors.ConfigError` that names the file and the fix.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowforge.errors import ConfigError

LOG_DETS = ("exact", "estimated")
EUCLIDEAN = ("vector", "image")

#: what :meth:`Family.shape_limit` reports: the dataset lies on another manifold (or on none), image data for a
#: vector-only family, fewer dimensions than ``min_dim``, more than the model option ``max_dim_option`` allows
LIMITS = ("manifold", "image", "min_dim", "max_dim")


@dataclass(frozen=True)
class Family:
    """A flow family's declaration.

    ``name`` is its config name (``conf/model/<name>.yaml``) and ``factory`` the callable that config's
    ``_target_`` names.  ``data`` lists the data it models: ``"vector"`` (shape ``[D]``), ``"image"``
    (``[C, H, W]``), or the name of a manifold (``dataset.manifold``, e.g. ``"sphere"``).  ``log_det`` is
    ``"exact"`` (closed form) or ``"estimated"`` (a stochastic estimator chosen by the ``estimator`` group).
    ``pathwise`` says whether samples ``x = f^{-1}(z)`` are differentiable in the parameters (reverse KL):
    ``True``, ``False``, or the override that makes them so (e.g. ``"model.direction=sampling"``).
    ``maintenance`` marks families whose Lipschitz constraints need power iteration after every optimizer step.
    ``min_dim`` and ``max_dim_option`` (a model option capping ``D``) are shape limits.  ``test``: Hydra
    overrides giving a model small enough for the test suite; ``exact_test``: overrides added for tests against
    a brute-force Jacobian (an exact log-det, tight solves); ``smoke``: constructor arguments of a smoke run
    (only those the composed model config has are set).
    """

    name: str
    factory: Callable[..., Any]
    title: str
    data: tuple[str, ...] = EUCLIDEAN
    log_det: str = "exact"
    pathwise: bool | str = True
    maintenance: bool = False
    conditional: bool = False
    min_dim: int = 1
    max_dim_option: str | None = None
    test: tuple[str, ...] = ()
    exact_test: tuple[str, ...] = ()
    smoke: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"family '{self.name}' ({self.target})"
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.name):
            raise ConfigError(f"{where}: the name must be a config file stem (letters, digits, _)")
        if self.log_det not in LOG_DETS:
            raise ConfigError(f"{where}: log_det must be one of {LOG_DETS}, got {self.log_det!r}")
        if not self.data or isinstance(self.data, str):
            raise ConfigError(f"{where}: data must be a tuple such as ('vector', 'image') or ('sphere',)")
        if len([d for d in self.data if d not in EUCLIDEAN]) > 1 or (self.manifold and len(self.data) > 1):
            raise ConfigError(f"{where}: a manifold family models data on exactly one manifold, got {self.data}")
        if self.log_det == "estimated" and not self.exact_test:
            raise ConfigError(
                f"{where} estimates its log-det: declare exact_test, the overrides that make it exact for the "
                "brute-force Jacobian tests (e.g. exact_test=('estimator=exact',))"
            )

    @property
    def target(self) -> str:
        """The ``_target_`` that names the factory: ``module.qualname``."""
        return f"{self.factory.__module__}.{self.factory.__qualname__}"

    @property
    def manifold(self) -> str | None:
        """The manifold the family models data on (``dataset.manifold``), or None for Euclidean data."""
        other = [d for d in self.data if d not in EUCLIDEAN]
        return other[0] if other else None

    @property
    def images(self) -> bool:
        return "image" in self.data

    def shape_limit(self, shape: Iterable[int], manifold: str | None = None, options: Mapping | None = None):
        """The first limit (one of :data:`LIMITS`) that data of ``shape`` on ``manifold`` break with model options
        ``options``, or None when the family models them."""
        shape = tuple(int(s) for s in shape)
        dim = 1
        for s in shape:
            dim *= s
        if self.manifold is not None and manifold != self.manifold:
            return "manifold"
        if not self.images and len(shape) == 3:
            return "image"
        if dim < self.min_dim:
            return "min_dim"
        if self.max_dim_option is not None and dim > int((options or {})[self.max_dim_option]):
            return "max_dim"
        return None


_FAMILIES: dict[str, Family] = {}
_BUILTINS_LOADED = False


def register_family(factory: Callable[..., Any], name: str, **declaration: Any) -> Family:
    """Declare the family ``name`` built by ``factory`` (see :class:`Family` for ``declaration``); returns it.

    Registering a name again with the same factory (a module imported twice) replaces the declaration; another
    factory under a registered name is an error.
    """
    family = Family(name=name, factory=factory, **declaration)
    old = _FAMILIES.get(name)
    if old is not None and old.target != family.target:
        raise ConfigError(
            f"two flow families are named '{name}': {old.target} and {family.target}; rename one of them "
            "(the name is its config file, conf/model/<name>.yaml)"
        )
    _FAMILIES[name] = family
    return family


def _load_builtins() -> None:
    """Import every module of :mod:`flowforge.flows`, so their declarations are registered."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    import flowforge.flows

    for info in pkgutil.iter_modules(flowforge.flows.__path__):
        importlib.import_module(f"flowforge.flows.{info.name}")
    _BUILTINS_LOADED = True


def families() -> dict[str, Family]:
    """Every registered family, by name (sorted): flowforge's own and those of modules imported so far."""
    _load_builtins()
    return dict(sorted(_FAMILIES.items()))


def family(name: str) -> Family:
    """The family registered as ``name``."""
    found = families().get(name)
    if found is None:
        raise ConfigError(f"no flow family is registered as '{name}'; registered: {', '.join(families())}")
    return found


def family_names(predicate: Callable[[Family], bool] = lambda f: True) -> str:
    """``"a, b, c"``: the names of the registered families for which ``predicate`` holds."""
    return ", ".join(name for name, f in families().items() if predicate(f))


def _resolve(target: str) -> Any:
    module, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return None


def family_of(target: str) -> Family | None:
    """The family whose factory ``target`` (a ``_target_`` string) names, importing its module; None if none."""
    _load_builtins()
    obj = _resolve(target)
    if obj is None:
        return None
    for f in _FAMILIES.values():
        if f.factory is obj:
            return f
    return None


def _config_target(path: Path, by_name: Mapping[str, Path]) -> str | None:
    """The ``_target_`` of a model config, following ``defaults`` to the configs it extends."""
    import yaml

    seen = set()
    while path is not None and path not in seen:
        seen.add(path)
        node = yaml.safe_load(path.read_text()) or {}
        if node.get("_target_"):
            return str(node["_target_"])
        parents = [d for d in node.get("defaults") or [] if isinstance(d, str) and d != "_self_"]
        path = by_name.get(parents[0]) if parents else None
    return None


def model_configs(*conf_dirs: str | Path) -> dict[str, Family]:
    """Every model config of ``conf_dirs`` (``<dir>/model/<name>.yaml``; the first directory wins a name) paired
    with its family, by config name (sorted).

    The module of each config's ``_target_`` is imported, so a family declared outside flowforge registers
    itself.  A config without a registered family, a config whose ``_target_`` is not its family's factory, and
    a registered family without a config are ConfigErrors.
    """
    paths: dict[str, Path] = {}
    for d in conf_dirs:
        for p in sorted(Path(d, "model").glob("*.yaml")):
            paths.setdefault(p.stem, p)
    _load_builtins()
    for path in paths.values():
        target = _config_target(path, paths)
        if target is not None:
            _resolve(target)  # importing the factory's module registers its family
    paired = {}
    for name, path in sorted(paths.items()):
        f = _FAMILIES.get(name)
        target = _config_target(path, paths)
        if f is not None and (target is None or _resolve(target) is not f.factory):
            raise ConfigError(
                f"{path} builds {target} but the flow family '{name}' is built by {f.target}: set _target_: "
                f"{f.target} (a variant of a family is a config in conf/experiment, not in conf/model)"
            )
        if f is None:
            target = target or "<its _target_>"
            raise ConfigError(
                f"{path} has no registered flow family '{name}': declare it next to its factory {target}, e.g. "
                f"register_family({target.rsplit('.', 1)[-1]}, '{name}', title=..., test=(...), smoke={{...}}) "
                "with register_family from flowforge.flows.registry (a module outside flowforge must be "
                "importable, e.g. on PYTHONPATH, so that the config's _target_ imports it)"
            )
        paired[name] = f
    missing = [f for name, f in _FAMILIES.items() if name not in paths]
    if missing:
        f = missing[0]
        searched = ", ".join(str(Path(d, "model")) for d in conf_dirs)
        raise ConfigError(
            f"flow family '{f.name}' ({f.target}) has no config in {searched}: "
            f"add model/{f.name}.yaml with _target_: {f.target} (in conf/, or in a directory on hydra.searchpath "
            "and FLOWFORGE_CONFIG_PATH for a family outside flowforge)"
        )
    return paired


def _yes(value: bool | str) -> str:
    if isinstance(value, str):
        return f"with `{value}`"
    return "yes" if value else "no"


def families_table() -> str:
    """The README's families table (Markdown): one row per registered family with its capabilities."""
    rows = [
        "| `model=` | family | data | log-det | pathwise sampling | per-step Lipschitz maintenance | conditional |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in families().items():
        cells = (
            f"`{name}`",
            f.title,
            ", ".join(f.data),
            f.log_det,
            _yes(f.pathwise),
            _yes(f.maintenance),
            _yes(f.conditional),
        )
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
