"""The one registry mechanism (feature_cache/registry.py): names, errors, discovery, plug-ins, CLI choices."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from feature_cache.errors import InvalidArgumentError
from feature_cache.registry import PLUGIN_ENV, Registry, RegistryChoices, scan_package


class Widget:
    """A widget."""


class Gadget:
    """A gadget."""


def test_register_list_get_and_metadata() -> None:
    reg: Registry[type] = Registry("widget")
    reg.register("round", needs_coords=True)(Widget)
    reg.add("square", Gadget)
    assert reg.names() == ["round", "square"] and reg.names("r*") == ["round"] and reg.names("x*") == []
    entry = reg.entry("round")
    assert entry.obj is Widget and entry.summary == "A widget." and entry.metadata["needs_coords"] is True
    with pytest.raises(TypeError):
        entry.metadata["needs_coords"] = False  # type: ignore[index]  # read-only
    assert reg.get("square") is Gadget and "round" in reg and "oval" not in reg
    assert [e.name for e in reg.entries()] == ["round", "square"]


def test_unknown_names_get_one_line_with_close_matches() -> None:
    reg: Registry[type] = Registry("widget")
    reg.add("round", Widget)
    reg.add("rounded", Gadget)
    with pytest.raises(InvalidArgumentError) as info:
        reg.get("roud")
    assert str(info.value) == "unknown widget 'roud'; did you mean 'round', 'rounded'? (registered: round, rounded)"
    with pytest.raises(InvalidArgumentError, match=r"^unknown widget 'zzz' \(registered: round, rounded\)$"):
        reg.entry("zzz")
    with pytest.raises(InvalidArgumentError, match=r"--models: unknown widget 'rond'; did you mean 'round'"):
        reg.check_names(["round", "rond"], "--models")
    assert Registry("widget").unknown_message("x") == "unknown widget 'x' (registered: none)"


def test_duplicates_bad_names_and_checks() -> None:
    def refuse_gadgets(name: str, obj: object, metadata: dict) -> None:
        if obj is Gadget:
            raise InvalidArgumentError(f"widget {name!r}: gadgets are not widgets")

    reg: Registry[type] = Registry("widget", check=refuse_gadgets)
    reg.add("round", Widget)
    reg.add("round", Widget)  # the same object again: a no-op
    with pytest.raises(InvalidArgumentError, match=r"widget 'round' is already registered \(by .*Widget\)"):
        reg.add("round", type("Other", (), {}))
    for bad in ("", "a b", "a,b", "-x", 3):
        with pytest.raises(InvalidArgumentError, match="name must be letters"):
            reg.add(bad, Widget)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="gadgets are not widgets"):
        reg.add("square", Gadget)
    assert reg.names() == ["round"]
    reg.unregister("round")
    reg.unregister("never")  # unknown: ignored
    assert reg.names() == []


def test_the_same_definition_reloaded_replaces_the_entry() -> None:
    reg: Registry[type] = Registry("widget")
    first = type("Reloaded", (), {"__module__": "some.module"})
    second = type("Reloaded", (), {"__module__": "some.module"})  # a module executed again (reload)
    reg.add("r", first)
    reg.add("r", second)
    assert reg.get("r") is second


def test_scoped_undoes_what_was_registered_inside() -> None:
    reg: Registry[type] = Registry("widget")
    reg.add("kept", Widget)
    with reg.scoped():
        reg.add("temp", Gadget)
        reg.unregister("kept")
        assert reg.names() == ["temp"]
    assert reg.names() == ["kept"]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An importable package ``widgets_pkg`` in a temporary folder (removed from sys.modules afterwards)."""
    root = tmp_path / "src"
    (root / "widgets_pkg").mkdir(parents=True)
    (root / "widgets_pkg" / "__init__.py").write_text("")
    (root / "widgets_pkg" / "registry.py").write_text(textwrap.dedent('''
        from feature_cache.registry import Registry

        REGISTRY = Registry("widget", package="widgets_pkg", call="register_widget")


        def register_widget(name, obj=None):
            if obj is None:
                return lambda o: REGISTRY.add(name, o)
            return REGISTRY.add(name, obj)
    '''))
    monkeypatch.syspath_prepend(str(root))
    yield root / "widgets_pkg"
    for name in [m for m in sys.modules if m == "widgets_pkg" or m.startswith("widgets_pkg.")]:
        del sys.modules[name]


def _module(folder: Path, name: str, text: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(text))


def test_builtins_are_discovered_from_the_source_without_importing(package: Path) -> None:
    _module(package, "round", '''
        from widgets_pkg.registry import register_widget

        @register_widget("round")
        class Round:
            """Round."""

        register_widget("oval", Round)
    ''')
    _module(package, "plain", "x = 1  # registers nothing, never imported\n")
    _module(package, "liar", "# mentions register_widget('ghost') in a comment only\n")
    _module(package, "computed", '''
        from widgets_pkg.registry import register_widget

        for n in ("a1", "a2"):
            register_widget(n, type(n, (), {}))
    ''')
    from widgets_pkg.registry import REGISTRY

    found, dynamic = scan_package("widgets_pkg", "register_widget")
    assert found == {"oval": ["widgets_pkg.round"], "round": ["widgets_pkg.round"]}
    assert dynamic == ["widgets_pkg.computed"]
    assert REGISTRY.names() == ["a1", "a2", "oval", "round"]  # a computed name: its module is imported to list
    assert "widgets_pkg.computed" in sys.modules
    assert "widgets_pkg.round" not in sys.modules and "widgets_pkg.plain" not in sys.modules
    assert REGISTRY.get("round").__name__ == "Round" and "widgets_pkg.round" in sys.modules
    _module(package, "square", 'from widgets_pkg.registry import register_widget\nregister_widget("square", int)\n')
    assert "square" not in REGISTRY.names()  # scanned once ...
    REGISTRY.refresh()
    assert "square" in REGISTRY.names()  # ... a new file is found after refresh (or in a new process)


def test_a_builtin_name_cannot_be_taken_before_the_builtin_is_imported(package: Path) -> None:
    _module(package, "round", 'from widgets_pkg.registry import register_widget\nregister_widget("round", str)\n')
    from widgets_pkg.registry import REGISTRY

    with pytest.raises(InvalidArgumentError, match=r"widget 'round' is already registered \(by builtins.str\)"):
        REGISTRY.add("round", bytes)
    assert REGISTRY.get("round") is str


def test_a_builtin_module_that_does_not_register_its_name_is_named(package: Path) -> None:
    _module(package, "broken", '''
        from widgets_pkg.registry import register_widget

        if False:
            register_widget("never", int)
    ''')
    from widgets_pkg.registry import REGISTRY

    assert "never" in REGISTRY.names()
    with pytest.raises(InvalidArgumentError, match=r"widget 'never': module widgets_pkg.broken does not register it"):
        REGISTRY.get("never")


def test_entry_point_plugins_are_listed_without_import(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    _module(plugins, "ep_widget_mod", 'from widgets_pkg.registry import register_widget\nregister_widget("ep", int)\n')
    _module(plugins, "ep_silent_mod", "x = 1\n")
    monkeypatch.syspath_prepend(str(plugins))
    group = "test.widgets"
    points = [importlib.metadata.EntryPoint(n, v, group) for n, v in
              (("ep", "ep_widget_mod"), ("silent", "ep_silent_mod"), ("gone", "ep_missing_mod"))]  # fmt: skip
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: points if kw.get("group") == group else real(**kw))  # fmt: skip
    reg = Registry("widget", plugin_group=group)
    try:
        assert reg.names() == ["ep", "gone", "silent"] and "ep_widget_mod" not in sys.modules
        with pytest.raises(InvalidArgumentError, match=r"widget 'silent': plug-in entry point 'ep_silent_mod'"):
            reg.get("silent")
        with pytest.raises(InvalidArgumentError, match=r"'gone': plug-in entry point 'ep_missing_mod' .*cannot be"):
            reg.get("gone")
    finally:
        for name in ("ep_widget_mod", "ep_silent_mod"):
            sys.modules.pop(name, None)


def test_env_plugins_are_imported_at_first_use(package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    _module(plugins, "env_widget", 'from widgets_pkg.registry import register_widget\nregister_widget("env", int)\n')
    _module(plugins, "env_broken", "import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(plugins))
    from widgets_pkg.registry import REGISTRY

    try:
        assert REGISTRY.names() == []
        monkeypatch.setenv(PLUGIN_ENV, " env_widget , ")
        assert REGISTRY.names() == ["env"] and REGISTRY.get("env") is int  # read again on every use
        monkeypatch.setenv(PLUGIN_ENV, "env_widget,env_missing")
        with pytest.raises(InvalidArgumentError, match=r"^MILCORE_PLUGINS: cannot import plug-in module 'env_missing'"):
            REGISTRY.names()
        monkeypatch.setenv(PLUGIN_ENV, "env_broken")
        with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):  # the plug-in's own error
            REGISTRY.names()
    finally:
        for name in ("env_widget", "env_broken"):
            sys.modules.pop(name, None)


def test_registry_choices_are_lazy_argparse_choices(package: Path) -> None:
    _module(package, "round", 'from widgets_pkg.registry import register_widget\nregister_widget("round", str)\n')
    choices = RegistryChoices("widgets_pkg.registry:REGISTRY")
    assert "widgets_pkg.registry" not in sys.modules  # nothing read until needed
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--widget", type=choices, choices=choices, metavar="NAME", help="one of %(choices)s")
    assert "widgets_pkg.registry" not in sys.modules
    assert parser.parse_args(["--widget", "round"]).widget == "round"
    assert "one of round" in " ".join(parser.format_help().split())
    with pytest.raises(argparse.ArgumentError, match=r"unknown widget 'rond'; did you mean 'round'"):
        parser.parse_args(["--widget", "rond"])
    assert list(choices) == ["round"] and "round" in choices and 3 not in choices
