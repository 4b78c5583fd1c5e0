"""Router registry: names -> router classes. Registering a name twice is an error, never a silent
overwrite; `unregister_router` takes a name back (for a router that only lives as long as a test)."""

from __future__ import annotations

from moeify.errors import ConfigError

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


def unregister_router(name: str) -> type:
    """Remove `name` from the registry and return its class; KeyError when it is not registered."""
    if name not in ROUTERS:
        raise KeyError(f"no router named {name!r} is registered")
    return ROUTERS.pop(name)


def router_class(name: str) -> type:
    """The router class registered as `name`; ConfigError listing the registered names when there is none."""
    if not isinstance(name, str) or name not in ROUTERS:
        raise ConfigError(f"unknown router {name!r}; valid: {', '.join(sorted(ROUTERS))}")
    return ROUTERS[name]
