"""Registries by decorator under a string name (CTranslate2's ``register_loader`` pattern).

An unknown name raises an error that lists the known ones.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_FAMILIES: dict[str, Any] = {}
_BACKENDS: dict[str, Any] = {}
# Modules that register on import; imported lazily so `import edgeseq` stays light.
_FAMILY_MODULES = ("edgeseq.families.mamba", "edgeseq.families.mamba2", "edgeseq.families.s4d",
                   "edgeseq.families.lmu",
                   "edgeseq.families.t5", "edgeseq.families.bart", "edgeseq.families.whisper")
_BACKEND_MODULES = ("edgeseq.runtime.backends.reference", "edgeseq.runtime.backends.onnxruntime",
                    "edgeseq.runtime.backends.executorch")


class UnknownNameError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_family(name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        _FAMILIES[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls
    return deco


def register_backend(name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        _BACKENDS[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls
    return deco


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
    _load(_BACKEND_MODULES)
    return dict(_BACKENDS)


def get_family(name: str) -> Any:
    fams = families()
    if name not in fams:
        raise UnknownNameError(f"unknown family {name!r}; known: {', '.join(sorted(fams))}")
    return fams[name]()


BACKEND_ALIASES = {"onnx": "ort", "onnxruntime": "ort", "pte": "executorch", "et": "executorch",
                   "reference": "torch", "pytorch": "torch"}


def get_backend(name: str) -> Any:
    bks = backends()
    name = BACKEND_ALIASES.get(name, name)
    if name not in bks:
        raise UnknownNameError(f"unknown backend {name!r}; known: {', '.join(sorted(bks))}")
    return bks[name]()
