"""main.py's lazily imported commands: the same commands and help as before, each importing only its own module."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from commands.lazy_group import LazyCommands, command_docstring
from main import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_loads_under_its_name_with_the_help_listed() -> None:
    """``--help`` reads the short help from the source; it is what the imported command says."""
    listing = CliRunner().invoke(cli, ["--help"]).output
    assert sorted(cli.commands) == sorted(COMMANDS) and list(cli.list_commands(click.Context(cli))) == sorted(COMMANDS)
    for name in COMMANDS:
        command = cli.commands[name]  # imports the module
        assert isinstance(command, click.Command) and command.name == name
        assert command_docstring(COMMANDS[name]) == inspect.cleandoc(command.help)
        stand_in = click.Command(name, help=command_docstring(COMMANDS[name]))
        assert [stand_in.get_short_help_str(limit) for limit in (30, 45, 200)] == [
            command.get_short_help_str(limit) for limit in (30, 45, 200)]  # fmt: skip
        assert f"  {name}  " in listing and command.get_short_help_str(45)[:30] in listing
    assert CliRunner().invoke(cli, ["--help"]).output == listing  # the same once imported


@pytest.mark.slow
def test_help_and_search_import_no_torch(tmp_path: Path) -> None:
    """In a fresh interpreter: ``--help`` imports no command module, ``search-bit-policy`` (bundled geometry) no torch."""
    script = (
        "import sys\n"
        "from main import cli\n"
        "for args in (['--help'], ['search-bit-policy', '--no-figure', '--output', sys.argv[1]]):\n"
        "    try:\n"
        "        cli(args)\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 0, (args, stop.code)\n"
        "    if args == ['--help']:\n"
        "        assert not [name for name in sys.modules if name.startswith('commands.') and name != 'commands.lazy_group']\n"
        "print(sorted(name for name in ('torch', 'torchvision', 'matplotlib', 'pandas') if name in sys.modules))\n"
    )  # fmt: skip
    output = tmp_path / "policy.json"
    result = subprocess.run([sys.executable, "-c", script, str(output)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]" and output.is_file()


def test_lazy_commands_mapping() -> None:
    commands = LazyCommands({"search-bit-policy": "commands.search:search_bit_policy"})
    assert list(commands) == ["search-bit-policy"] and len(commands) == 1 and not commands.loaded
    assert commands["search-bit-policy"].name == "search-bit-policy" and "search-bit-policy" in commands.loaded
    extra = click.Command("extra")
    commands["extra"] = extra
    assert commands["extra"] is extra and list(commands) == ["search-bit-policy", "extra"]
    del commands["search-bit-policy"]
    assert list(commands) == ["extra"]
    with pytest.raises(KeyError):
        commands["absent"]
    with pytest.raises(click.ClickException, match="commands.search has no function nothing"):
        command_docstring("commands.search:nothing")
