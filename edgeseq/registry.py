"""Registries by decorator under a string name (CTranslate2's ``register_loader`` pattern).

An unknown name raises an error that lists the known ones.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_FAMILIES: dict[str, Any] = {}
_BACKENDS: dict[str, Any] = {}
_TASKS: dict[str, Any] = {}
# Modules that register on import; imported lazily so `import edgeseq` stays light.
_FAMILY_MODULES = ("edgeseq.families.mamba", "edgeseq.families.mamba2", "edgeseq.families.s4d",
                   "edgeseq.families.lmu",
                   "edgeseq.families.t5", "edgeseq.families.bart", "edgeseq.families.whisper")
# One line per backend folder (runtime/backends/<name>/), in the order their formats are listed
# and lowered (the deployable ones first)
_BACKEND_MODULES = ("edgeseq.runtime.backends.onnxruntime", "edgeseq.runtime.backends.executorch",
                    "edgeseq.runtime.backends.openvino", "edgeseq.runtime.backends.reference",
                    "edgeseq.runtime.backends.qnn")
# one plug-in file per task (``edgeseq/tasks/``), in the order error messages list them
_TASK_MODULES = ("edgeseq.tasks.causal_lm", "edgeseq.tasks.seq2seq",
                 "edgeseq.tasks.speech_seq2seq", "edgeseq.tasks.classification")


class UnknownNameError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _register(table: dict[str, Any], name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        table[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls
    return deco


def register_family(name: str) -> Callable[[T], T]:
    return _register(_FAMILIES, name)


def register_backend(name: str) -> Callable[[T], T]:
    return _register(_BACKENDS, name)


def register_task(name: str) -> Callable[[T], T]:
    """Register a ``edgeseq.tasks.Task`` subclass; ``get_task`` returns an instance of it."""
    return _register(_TASKS, name)


def _load(modules: tuple[str, ...]) -> None:
    for m in modules:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != m:  # a real import error inside the module must surface
                raise


def families() -> dict[str, Any]:
    _load(_FAMILY_MODULES)
    return dict(_FAMILIES)


def backends() -> dict[str, Any]:
    """The registered backends: those of ``_BACKEND_MODULES`` in its order (the lowering
    order), then any registered from elsewhere (the tests' example backend) as they came."""
    _load(_BACKEND_MODULES)
    rank = {m: i for i, m in enumerate(_BACKEND_MODULES)}
    return dict(sorted(_BACKENDS.items(), key=lambda kv: rank.get(kv[1].__module__, len(rank))))


def tasks() -> dict[str, Any]:
    """Every registered task, ``{name: Task}``, in ``_TASK_MODULES`` order."""
    _load(_TASK_MODULES)
    return {name: cls() for name, cls in _TASKS.items()}


def get_task(name: str) -> Any:
    """The task a manifest or family names (``Manifest.task``, ``Family.task``)."""
    _load(_TASK_MODULES)
    if name not in _TASKS:
        raise UnknownNameError(f"unknown task {name!r}; known: {', '.join(_TASKS)}")
    return _TASKS[name]()


def get_family(name: str) -> Any:
    fams = families()
    if name not in fams:
        raise UnknownNameError(f"unknown family {name!r}; known: {', '.join(sorted(fams))}")
    return fams[name]()


def backend_name(name: str) -> str:
    """A backend's registered name from its name, its format (``onnx``: the first backend
    registered for it) or an alias (``onnxruntime``): each backend class declares its ``format`` and ``aliases``, the one
    place the backend <-> format map is written."""
    bks = backends()
    if name in bks:
        return name
    for key, cls in bks.items():
        if name == cls.format or name in cls.aliases:
            return key
    raise UnknownNameError(f"unknown backend {name!r}; known: {', '.join(sorted(bks))}")


def get_backend(name: str) -> Any:
    return backends()[backend_name(name)]()


def formats() -> dict[str, str]:
    """Every bundle format and the backend that lowers and runs it, in lowering order:
    ``{"onnx": "ort", "pte": "executorch", "pt2": "torch"}``. A backend registered later for a
    format that exists (another runtime for the same files) runs it; the first one lowers it."""
    out: dict[str, str] = {}
    for name, cls in backends().items():
        out.setdefault(cls.format, name)
    return out


def format_of(backend: str) -> str:
    """The bundle format a backend (by name, format or alias) runs."""
    return backends()[backend_name(backend)].format


def runtime_memory(backend: str) -> Any:
    """A backend's ``RuntimeMemory`` (``runtime/backends/base.py``, declared in its folder): the one set of constants
    for what its runtime holds besides weights, state and activations."""
    return backends()[backend_name(backend)].memory
