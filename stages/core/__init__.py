"""The shared core that every stage builds on: I/O, data, networks, losses, metrics, training.

Importing the core also installs a one-shot import hook for MONAI: MONAI imports every network at
start-up, TransCheX among them, and TransCheX imports Hugging Face ``transformers`` (and through it
botocore), which costs 5-15 s in every process; its Jupyter helpers import matplotlib's pyplot
(~1 s). segadapt uses neither, and a pipeline run starts ~100 processes, so those modules are hidden
while MONAI itself is imported (the MONAI parts that need them then fail lazily, only if called).
PEFT and the plots stage, imported later, get the real modules. Set ``SEGADAPT_MONAI_FULL_IMPORT=1``
to import MONAI unchanged.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

_HIDDEN = ("transformers", "matplotlib.pyplot")


class _MonaiLoader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        hidden = [name for name in _HIDDEN if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # importing it raises ImportError
        try:
            self.inner.exec_module(module)
        finally:
            for name in hidden:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]


class _MonaiFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "monai":
            return None
        sys.meta_path.remove(self)  # one shot: the real finders locate MONAI
        spec = importlib.util.find_spec("monai")
        if spec is not None and spec.loader is not None:
            spec.loader = _MonaiLoader(spec.loader)
        return spec


if "monai" not in sys.modules and os.environ.get("SEGADAPT_MONAI_FULL_IMPORT") != "1":
    sys.meta_path.insert(0, _MonaiFinder())
