"""Finding and loading plugins.

Plugins are found by name through the ``libchat`` entry point group, exactly
as third-party ones are; a plugin manager is made per server (or client, or
CLI run), never as an import-time global.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import ChatError

ENTRY_POINT_GROUP = "libchat"
log = logging.getLogger("libchat.plugins")


class UnknownPlugin(ChatError):
    code = "unknown_plugin"


def installed_plugins() -> dict[str, EntryPoint]:
    """Every plugin installed in this environment, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin(name: str) -> Any:
    """Import the plugin registered under ``name``; raise UnknownPlugin,
    naming the installed ones, when there is none."""
    found = installed_plugins()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise UnknownPlugin(f"unknown plugin {name!r}; installed plugins: {known}")
    return found[name].load()


PluginSpec = str | ModuleType | object


def make_plugin_manager(plugins: Iterable[PluginSpec] = ()) -> pluggy.PluginManager:
    """A new plugin manager holding ``plugins``: entry point names, modules or
    plugin objects. Implementations of unknown hooks are refused."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for spec in plugins:
        if isinstance(spec, str):
            name = spec.strip()
            if name and not pm.has_plugin(name):
                pm.register(load_plugin(name), name=name)
        elif not pm.is_registered(spec):
            pm.register(spec)
    pm.check_pending()
    return pm


def plugin_names(pm: pluggy.PluginManager) -> list[str]:
    """Names of the plugins a manager holds, as announced to clients."""
    names = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or ""
        names.append(getattr(plugin, "PLUGIN_NAME", name))
    return sorted(names)


async def call_async(hook: pluggy.HookCaller, **kwargs: Any) -> list[Any]:
    """Call a hook whose implementations may be sync or async; await the
    coroutines among the results and return them all (``None`` dropped)."""
    results = []
    for result in hook(**kwargs):
        if inspect.isawaitable(result):
            result = await result
        if result is not None:
            results.append(result)
    return results


async def call_firstresult(hook: pluggy.HookCaller, **kwargs: Any) -> Any:
    """Call a ``firstresult`` hook whose implementations may be async.

    pluggy stops at the first non-``None`` result, and a coroutine object is
    not ``None``; so the implementations are walked here, awaiting each, until
    one gives an answer.
    """
    for impl in reversed(hook.get_hookimpls()):
        result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        if inspect.isawaitable(result):
            result = await result
        if result is not None:
            return result
    return None


async def call_each(hook: pluggy.HookCaller, **kwargs: Any) -> None:
    """Call every implementation, sync or async; one that raises is logged
    and the others still run (lifecycle hooks)."""
    for impl in reversed(hook.get_hookimpls()):
        try:
            result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("plugin %s failed in %s", impl.plugin_name, hook.name)
