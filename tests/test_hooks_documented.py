"""Every hook in libchat/hookspecs.py has a docstring, is documented in
docs/plugins.md and is used by a test (as datasette's test_docs_plugins.py
does). Adding a hook without docs or a test fails here."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from libchat import hookspecs
from libchat.plugins import make_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
TESTS = Path(__file__).resolve().parent
SPEC_MARK = f"{hookspecs.hookspec.project_name}_spec"  # what @hookspec sets


def _hookspecs() -> list[str]:
    return sorted(
        name
        for name, obj in vars(hookspecs).items()
        if inspect.isfunction(obj) and hasattr(obj, SPEC_MARK)
    )


HOOKS = _hookspecs()


def _uses(text: str, name: str) -> bool:
    # whole name only: libchat_client_frame must not count for libchat_client
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def test_hooks_are_found() -> None:
    # the scan below must see exactly the hooks a plugin manager knows
    known = {name for name in vars(make_plugin_manager().hook) if name.startswith("libchat_")}
    assert HOOKS and set(HOOKS) == known


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_docstring(name: str) -> None:
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec) or ""
    assert len(doc.split()) >= 8, f"{name} in libchat/hookspecs.py needs a docstring"
    if getattr(spec, SPEC_MARK).get("firstresult"):
        assert "first" in doc.lower(), f"{name}'s docstring must say the first result wins"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented(name: str) -> None:
    docs = DOCS.read_text(encoding="utf-8")
    headings = [line for line in docs.splitlines() if line.startswith("#")]
    assert any(_uses(line, name) for line in headings), f"{name} has no heading in docs/plugins.md"


def _code_names(path: Path) -> set[str]:
    """Names a test file implements (``def libchat_x``) or calls
    (``hook.libchat_x``) in code: comments and strings do not count."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    return names


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_tested(name: str) -> None:
    users = [
        path.name
        for path in sorted(TESTS.glob("test_*.py"))
        if path.name != Path(__file__).name and name in _code_names(path)
    ]
    assert users, f"no test in tests/ implements or calls {name}"


def test_documented_hooks_exist() -> None:
    """A heading for a hook that is gone (renamed, removed) is stale."""
    docs = DOCS.read_text(encoding="utf-8")
    headings = [line for line in docs.splitlines() if line.startswith("#")]
    named = {m for line in headings for m in re.findall(r"\blibchat_\w+", line)}
    assert named <= set(HOOKS), f"docs/plugins.md documents unknown hooks: {named - set(HOOKS)}"
