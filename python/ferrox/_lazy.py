"""Names of a package imported from its modules on first use (PEP 562), so
importing the package costs nothing (no torch) until a name is asked for."""

import importlib


def exports(package: str, where: dict):
    """``(__getattr__, __dir__)`` for ``package`` whose public names live in
    the submodules ``where[name]``."""
    mod_globals = importlib.import_module(package).__dict__

    def __getattr__(name):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        mod_globals[name] = value
        return value

    def __dir__():
        return sorted(set(mod_globals) | set(where))

    return __getattr__, __dir__
