"""A click group whose subcommands are imported on first use (click's lazy-loading pattern, kept as a mapping).

Each subcommand is named by ``"module:attribute"``. :attr:`LazyGroup.commands` stays a mapping of name to
command, as in :class:`click.Group` (``cli.commands["evaluate"]`` imports that command's module); the group's
``--help`` lists every command with its short help read from the module's source (the function's docstring,
as click reads it), so it imports none of them.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

import click

__all__ = ["LazyCommands", "LazyGroup", "command_docstring"]


class LazyCommands(MutableMapping[str, click.Command]):
    """Command name -> :class:`click.Command`, imported from its ``"module:attribute"`` when first looked up."""

    def __init__(self, paths: Mapping[str, str]) -> None:
        self.paths = dict(paths)
        self.loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self.loaded:
            module, _, attribute = self.paths[name].partition(":")
            self.loaded[name] = getattr(importlib.import_module(module), attribute)
        return self.loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self.loaded[name] = command
        self.paths.setdefault(name, "")

    def __delitem__(self, name: str) -> None:
        del self.paths[name]
        self.loaded.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def command_docstring(path: str) -> str:
    """The docstring of the function that ``"module:attribute"`` decorates into a command, read without importing.

    Cleaned as :func:`inspect.getdoc` does, which click uses for a command's help.
    """
    module, _, attribute = path.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise click.ClickException(f"no module {module} for the command {attribute}")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == attribute:
            return ast.get_docstring(node) or ""
    raise click.ClickException(f"{module} has no function {attribute}")


class LazyGroup(click.Group):
    """A :class:`click.Group` of the commands named in ``lazy_commands`` (name -> ``"module:attribute"``)."""

    def __init__(self, *args, lazy_commands: Mapping[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands(lazy_commands)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's command list, each short help from the source (:func:`command_docstring`) unless imported."""
        commands: LazyCommands = self.commands  # type: ignore[assignment]
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            command = commands.loaded.get(name) or click.Command(name, help=command_docstring(commands.paths[name]))
            if not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)
