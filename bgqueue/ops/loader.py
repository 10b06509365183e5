"""Finding a user's BackgroundApp from a `MODULE:ATTR` (or `path/to/file.py:ATTR`) spec."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from bgqueue.app import BackgroundApp
from bgqueue.errors import ParameterError


def load_app(spec: str) -> BackgroundApp:
    """Import the module and return its BackgroundApp attribute."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ParameterError(f"--app must look like MODULE:ATTR or path/file.py:ATTR, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            name = f"bgqueue_app_{path.stem}"
            loaded = importlib.util.spec_from_file_location(name, path)
            if loaded is None or loaded.loader is None or not path.exists():
                raise ParameterError(f"no Python file at {module_name}")
            module = importlib.util.module_from_spec(loaded)
            sys.modules[name] = module
            loaded.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # as `celery -A` does: modules in the working directory
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ParameterError(f"cannot import {module_name!r}: {exc}") from None
    app = getattr(module, attr, None)
    if not isinstance(app, BackgroundApp):
        raise ParameterError(f"{spec!r} is not a bgqueue.BackgroundApp")
    return app
