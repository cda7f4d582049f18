"""A package whose public names load on first use (PEP 562), so that importing it costs nothing until then."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_names(package: str, module_of: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: a name of `module_of` is imported from its module, any other
    name as a submodule (`import locas; locas.model` works as with eager imports), both once."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> object:
        if name in module_of:
            value = getattr(importlib.import_module(module_of[name]), name)
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as error:
                if error.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *module_of})

    return __getattr__, __dir__
