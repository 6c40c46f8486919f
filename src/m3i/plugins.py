"""Plug-ins: Python files or importable modules that register parts (a target:
`m3i.mi.targets.registry.register`) when they are imported. A config file names them in its
`plugins:` list; they are imported before the config's schema is built, so their sections exist."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from m3i.errors import first_line

IMPORTED: set[str] = set()  # every plug-in name imported so far, as it was given


class PluginError(ValueError):
    """A plug-in that cannot be imported; the message is one line."""


def is_path(name: str) -> bool:
    """Whether a plug-in is named by its file (`colour.py`, `dir/colour.py`), not its module."""
    return name.endswith(".py")


def _imported_from(path: Path) -> ModuleType | None:
    """The module already imported from `path` (under any name), if any."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file is not None and Path(file).resolve() == path:
            return module
    return None


def _failed(name: str, err: BaseException) -> PluginError:
    return PluginError(f"plugin {name!r} failed to import: {first_line(err, with_type=True)}")


def import_plugin(name: str) -> ModuleType:
    """Import a plug-in once per process: a `.py` file (an absolute path, or relative to the
    working directory) or a module name. A file already imported under any module name is not
    imported again (its registrations stand)."""
    module = _import(name)
    IMPORTED.add(name)
    return module


def _import(name: str) -> ModuleType:
    if not is_path(name):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name):
                raise PluginError(
                    f"plugin {name!r}: no such module; give an importable module name or a .py file"
                ) from None
            raise PluginError(
                f"plugin {name!r} failed to import: {first_line(err, with_type=True)}"
            ) from err
        except Exception as err:  # the plug-in's own error, on one line
            raise PluginError(
                f"plugin {name!r} failed to import: {first_line(err, with_type=True)}"
            ) from err
    path = Path(name).resolve()
    if not path.is_file():
        raise PluginError(f"plugin {name!r}: no such file; give a .py file or a module name")
    module = _imported_from(path)
    if module is not None:
        return module
    module_name = f"m3i_plugin_{path.stem}_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a .py file always has a loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise PluginError(
            f"plugin {name!r} failed to import: {first_line(err, with_type=True)}"
        ) from err
    return module
