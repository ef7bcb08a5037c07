"""Every command README.md shows is one its program accepts, exactly as written.

The commands are those of README's ```bash blocks (a line continued by ``\\`` is one command; ``#`` starts a
comment) and its inline code that starts with ``python`` or ``make``. Each is handed, unchanged, to the program
that would run it: ``jaxalign`` commands to ``jaxalign.cli.main`` (``train`` resolves its preset and overrides
through ``--print-config``; the others stop after parsing, before any model is loaded), ``python -m MODULE`` and
``python SCRIPT`` to the module's or script's own argument parser, ``make TARGET`` to ``make -n``. What the
commands then do is the business of their own tests (tests/test_cli*.py, tests/methods/, tests/serve/, CI's
``make demo-smoke``); this file keeps README from naming an option, preset, override or target that does not exist.
"""

from __future__ import annotations

import argparse
import json
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The two set-up commands, byte for byte: CI (.ci/run) and every guide assume them.
SETUP = (
    "make demo   # installs jaxalign + the embedded default (SmolLM2-135M GGUF, VADER judge) into .venv, runs the "
    "main job (8–16 min on 2 cores)\n"
    "make test   # installs jaxalign[test] (JAX CPU, torch 2.13.0 CPU, TRL and rlax as oracles) into .venv, runs "
    "ruff and the test suite\n"
)
MAX_LINES = 200
BASH = re.compile(r"^```bash\n(.*?)^```\s*$", re.S | re.M)
INLINE = re.compile(r"`((?:python|make) [^`]+)`")


def commands(text: str) -> list[str]:
    found = []
    for block in BASH.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                found.append(shlex.join(words))
    found += [" ".join(shlex.split(span)) for span in INLINE.findall(text)]
    return list(dict.fromkeys(found))


COMMANDS = commands(README.read_text(encoding="utf-8"))


class Parsed(BaseException):  # noqa: N818 (a signal past the command's own error handling, not an error)
    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


def test_readme_is_short_and_starts_with_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES
    assert f"```bash\n{SETUP}```" in text
    assert text.index(SETUP) < text.index("## ")  # before the first section


def test_every_kind_of_command_is_checked():
    programs = {c.split()[0] if not c.startswith("python -m") else c.split()[2].split(".")[0] for c in COMMANDS}
    assert programs <= {"jaxalign", "make", "python", "experiments"}, programs
    assert len([c for c in COMMANDS if c.startswith("jaxalign ")]) >= 10


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")], ids=str)
def test_make_target_exists(command):
    if shutil.which("make") is None:
        pytest.skip("no make")
    result = subprocess.run([*shlex.split(command), "-n"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr


def _stub_runs(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser ``jaxalign`` builds, each subcommand's ``run`` replaced by one that raises ``Parsed``."""

    def stop(args):
        raise Parsed(args)

    for action in parser._subparsers._group_actions:  # noqa: SLF001 (argparse keeps subcommands there)
        for subparser in action.choices.values():
            subparser.set_defaults(run=stop)
    return parser


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("jaxalign ")], ids=str)
def test_jaxalign_command_is_accepted(command, monkeypatch, tmp_path, capsys):
    from jaxalign import cli

    monkeypatch.chdir(tmp_path)  # as a user runs it: relative paths, from a directory of their own
    argv = shlex.split(command)[1:]
    if argv[0] == "train":
        assert cli.main([*argv, "--print-config"]) == 0
        config = json.loads(capsys.readouterr().out)
        assert config["method"] == argv[1]
        for override in (a for a in argv if "=" in a and not a.startswith("-")):
            key, value = override.split("=", 1)
            if key == "output_dir":
                assert config["output_dir"] == value
        return
    real = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _stub_runs(real()))
    with pytest.raises(Parsed) as parsed:
        cli.main(argv)
    assert parsed.value.namespace.command == argv[0]


def _python_target(words: list[str]) -> tuple[str, str]:
    if words[1] == "-m":
        return "module", words[2]
    return "script", str(ROOT / words[1])


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python ")], ids=str)
def test_python_command_is_accepted(command, monkeypatch):
    words = shlex.split(command)
    kind, target = _python_target(words)
    rest = words[3:] if kind == "module" else words[2:]

    def stop(parse):
        def parsed(self, args=None, namespace=None):
            raise Parsed(parse(self, args, namespace))
        return parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop(argparse.ArgumentParser.parse_args))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args",
                        stop(argparse.ArgumentParser.parse_intermixed_args))
    monkeypatch.setenv("JAXALIGN_HUGEPAGES", "0")  # the scripts re-execute themselves otherwise (jaxalign.hostmem)
    monkeypatch.setattr(sys, "argv", [target, *rest])
    monkeypatch.chdir(ROOT)  # the experiments and benchmarks run from the repository root
    monkeypatch.syspath_prepend(str(ROOT))
    if kind == "script":  # as python does for a script: its own directory first
        monkeypatch.syspath_prepend(str(Path(target).parent))
    with pytest.raises(Parsed):
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")


def test_commands_are_found():
    text = "```bash\njaxalign a --b 'c d' \\\n    e=f   # note\n```\nrun `python -m x y` and `make z`\n"
    assert commands(text) == ["jaxalign a --b 'c d' e=f", "python -m x y", "make z"]
