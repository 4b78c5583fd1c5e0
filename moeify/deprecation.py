"""Old import paths of names that moved: they keep working for one release, with a DeprecationWarning that
names the new place.

    __getattr__ = moved(__name__, {"routing_stats": "moeify.last_forward:routing_stats"})

at the bottom of the old module answers `from old.module import routing_stats` (PEP 562's module
`__getattr__` runs only for names the module does not define). The new module is imported when an old name is
first used, not when the old module is: so an old module may point at a module that imports it.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def moved(module: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` serving `names` ({old name: "new.module:new_name"}) with a warning."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new_module, _, new_name = names[name].partition(":")
        warnings.warn(f"{module}.{name} moved to {new_module}.{new_name}; import it from there (the old name "
                      "goes away in the next release)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new_module), new_name)

    return __getattr__
