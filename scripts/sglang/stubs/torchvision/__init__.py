"""A stand-in for torchvision on the CPU-only engine install.

PyPI's torchvision wheels are built against CUDA torch (``torchvision::nms`` fails to load
next to the CPU build), and only multimodal code in SGLang and transformers uses it. This
package imports cleanly, every ``torchvision.<module>`` and every attribute of it is the
same placeholder class, and calling anything raises: a text model never does.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

__version__ = "0.29.0"  # any parseable version; nothing checks it against torch


class _Placeholder(type):
    """Any attribute is the class itself; using it as a value fails loudly."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return cls

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torchvision is a stand-in on this CPU-only engine install")

    def __getitem__(cls, item: Any) -> Any:  # used in type annotations
        return cls

    def __or__(cls, other: Any) -> Any:
        return cls

    __ror__ = __or__


class Unavailable(metaclass=_Placeholder):
    pass


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return Unavailable


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers every ``import torchvision.x.y`` with a module full of placeholders."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__getattr__ = __getattr__  # type: ignore[method-assign]
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


sys.meta_path.insert(0, _Submodules())
