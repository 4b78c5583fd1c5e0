"""Router registry: names -> router classes. Registering a name twice is an error, never a silent
overwrite."""

from __future__ import annotations

ROUTERS: dict[str, type] = {}


def register_router(name: str):
    """Class decorator: `@register_router("topk")`."""

    def add(cls: type) -> type:
        if name in ROUTERS and ROUTERS[name] is not cls:
            raise ValueError(f"router name {name!r} is already registered by {ROUTERS[name].__qualname__}")
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return add
