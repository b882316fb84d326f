"""The module paths of LoRA Studio 0.1, kept importable for one release after the sub-package move.

Scripts written against 0.1 import ``trainer.loop``, ``trainer.formats``, ``trainer.dataset`` and
so on. Each old path now resolves to the module that holds its code (the *same* module object,
so ``trainer.loop.train is trainer.train.loop.train``) with a ``DeprecationWarning`` naming the new
path. Old paths that are packages now (``trainer.config``, ``trainer.models``, ``trainer.lora``,
``trainer.generate``, ``trainer.tools``, ``trainer.cli``) answer their old names through
``lazy_names``. Nothing here runs unless an old path is imported. To be removed in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

MOVED_MODULES: dict[str, str] = {  # 0.1 path -> where its code lives now
    "trainer.errors": "trainer.core.errors",
    "trainer.atomic": "trainer.core.atomic",
    "trainer.presets": "trainer.config.presets",
    "trainer.dataset": "trainer.data.scan",
    "trainer.images": "trainer.data.images",
    "trainer.captions": "trainer.data.captions",
    "trainer.buckets": "trainer.data.buckets",
    "trainer.lint": "trainer.data.lint",
    "trainer.caching": "trainer.data.caches",
    "trainer.model_family": "trainer.models.family",
    "trainer.ldm": "trainer.models.single_file",
    "trainer.demo_model": "trainer.models.demo",
    "trainer.text": "trainer.models.text",
    "trainer.kohya_names": "trainer.lora.names",
    "trainer.formats": "trainer.lora.writing",
    "trainer.lora_files": "trainer.lora.reading",
    "trainer.sizing": "trainer.lora.sizing",
    "trainer.session": "trainer.train.session",
    "trainer.loop": "trainer.train.loop",
    "trainer.losses": "trainer.train.losses",
    "trainer.optim": "trainer.train.optim",
    "trainer.checkpoints": "trainer.train.checkpoints",
    "trainer.transfers": "trainer.train.transfers",
    "trainer.sampling": "trainer.train.sampling",
    "trainer.events": "trainer.train.events",
    "trainer.export": "trainer.train.export",
    "trainer.estimate": "trainer.train.estimate",
    "trainer.packed_lora": "trainer.generate.packed",
    "trainer.schedulers": "trainer.generate.schedulers",
    "trainer.infotext": "trainer.generate.infotext",
    "trainer.tools_bake": "trainer.tools.bake",
    "trainer.tools_extract": "trainer.tools.extract",
    "trainer.tools_inspect": "trainer.tools.inspect",
    "trainer.tools_resize": "trainer.tools.resize",
    "trainer.tools_svd": "trainer.tools.svd",
    "trainer.cli_tools": "trainer.cli.tools",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new} in LoRA Studio 0.2; the old name goes away in 0.3.",
                  DeprecationWarning, stacklevel=3)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(spec.name, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the module is the already-imported new one


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers only the 0.1 paths in ``MOVED_MODULES``; every other import passes it by."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install_moved_module_finder() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())


def lazy_names(package: str, names: Mapping[str, str], *, moved: bool = False) -> Callable[[str], Any]:
    """A package ``__getattr__`` answering ``names`` (name -> module that defines it), imported on first use.

    A package's public API this way costs nothing until used (``trainer.generate.Generator``
    does not load the pipeline code for ``trainer.generate.infotext``). ``moved``: these are 0.1
    names that will go away, so each use warns.
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if moved:
            _warn(f"{package}.{name}", f"{module}.{name}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
