"""Finding and loading plugins.

Plugins are found by name through the ``libchat`` entry point group, exactly
as third-party ones are; a plugin manager is made per server (or client, or
CLI run), never as an import-time global.

Hooks may be plain functions or coroutines. The host calls them through
:func:`call_async`, :func:`call_firstresult` and :func:`call_each`, which
walk the implementations themselves (pluggy would stop a ``firstresult``
hook at the first coroutine object, since it is not ``None``).
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


class InvalidPlugin(ChatError, ValueError):
    """A plugin that fails to import, implements a hook that does not exist,
    or cannot be registered (a ValueError too, as pluggy's own is)."""

    code = "invalid_plugin"


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
    try:
        return found[name].load()
    except Exception as exc:
        # A broken plugin is a one-line error for the CLI, not a traceback.
        raise InvalidPlugin(f"plugin {name!r} failed to load: {exc!r}") from exc


PluginSpec = str | ModuleType | object


def make_plugin_manager(plugins: Iterable[PluginSpec] = ()) -> pluggy.PluginManager:
    """A new plugin manager holding ``plugins``: entry point names, modules or
    plugin objects. A plugin given twice (even once by name and once as a
    module) is registered once. Implementations of unknown hooks, and hook
    wrappers (the async-aware callers cannot run them), are refused with
    :class:`InvalidPlugin`."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    try:
        for spec in plugins:
            if isinstance(spec, str):
                name = spec.strip()
                if name and not pm.has_plugin(name):
                    plugin = load_plugin(name)
                    if not pm.is_registered(plugin):
                        pm.register(plugin, name=name)
            elif not pm.is_registered(spec):
                pm.register(spec)
        pm.check_pending()
        _refuse_wrappers(pm)
    except InvalidPlugin:
        raise
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise InvalidPlugin(str(exc)) from exc
    return pm


def _refuse_wrappers(pm: pluggy.PluginManager) -> None:
    for plugin in pm.get_plugins():
        for caller in pm.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.hookwrapper or impl.wrapper):
                    raise pluggy.PluginValidationError(
                        plugin,
                        f"plugin {impl.plugin_name!r}: hook wrappers are not supported "
                        f"({caller.name})",
                    )


def plugin_names(pm: pluggy.PluginManager) -> list[str]:
    """Names of the plugins a manager holds, as announced to clients: a
    plugin's ``PLUGIN_NAME`` if it has one, else its entry point or module
    name, else (a plugin object) its class name."""
    names = []
    for plugin in pm.get_plugins():
        name = getattr(plugin, "PLUGIN_NAME", None)
        if not isinstance(name, str) or not name:
            name = pm.get_name(plugin) or ""
            if name == str(id(plugin)):  # pluggy's name for an object without __name__
                name = type(plugin).__name__
        names.append(name)
    return sorted(names)


def _call(impl: pluggy.HookImpl, kwargs: dict[str, Any]) -> Any:
    """Call one implementation with the arguments it asks for."""
    return impl.function(**{arg: kwargs[arg] for arg in impl.argnames})


async def call_async(hook: pluggy.HookCaller, **kwargs: Any) -> list[Any]:
    """Call every implementation of a hook, sync or async, in pluggy's order,
    each awaited before the next one starts (so a message hook sees the
    changes of the hooks before it); return the results (``None`` dropped).
    The first exception stops the call and propagates."""
    results = []
    for impl in reversed(hook.get_hookimpls()):
        result = _call(impl, kwargs)
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
        result = _call(impl, kwargs)
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
            result = _call(impl, kwargs)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("plugin %s failed in %s", impl.plugin_name, hook.name)
