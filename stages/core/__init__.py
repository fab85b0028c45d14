"""The shared core that every stage builds on: I/O, data, networks, losses, metrics, training.

Importing the core also installs a one-shot import hook for MONAI: MONAI imports every network at
start-up, TransCheX among them, and TransCheX imports Hugging Face ``transformers`` (and through it
botocore), which costs 5-15 s in every process. segadapt never uses TransCheX, and a pipeline run
starts ~100 processes, so ``transformers`` is hidden while MONAI itself is imported (TransCheX then
fails lazily, only if someone calls it). PEFT, imported later, gets the real ``transformers``. Set
``SEGADAPT_MONAI_FULL_IMPORT=1`` to import MONAI unchanged.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any


class _MonaiLoader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        hide = "transformers" not in sys.modules
        if hide:
            sys.modules["transformers"] = None  # type: ignore[assignment]  # import raises ImportError
        try:
            self.inner.exec_module(module)
        finally:
            if hide and "transformers" in sys.modules and sys.modules["transformers"] is None:
                del sys.modules["transformers"]


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
