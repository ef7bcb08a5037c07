"""Every ``jaxalign`` and ``python`` command in the guides' ```bash blocks (docs/*.md, CONTRIBUTING.md,
benchmarks/README.md) is one its program accepts, exactly as written, as tests/test_readme.py checks README's:
``train`` resolves its preset and overrides through ``--print-config``, the others stop after parsing. The pages
whose commands run end to end have tests of their own (tests/test_docs_pipelines.py, tests/test_docs_hub.py,
tests/test_cli_export.py, ...); this file keeps every page from naming an option, preset or override that does
not exist, and from naming a make target that does not."""

from __future__ import annotations

import re

import pytest

from tests.test_readme import (
    BASH,
    ROOT,
    commands,
    test_jaxalign_command_is_accepted,
    test_make_target_exists,
    test_python_command_is_accepted,
)

PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md"]


def user_config(command: str) -> bool:
    """A ``--config`` naming a YAML file of the user's own (the page shows what it holds), which
    ``--print-config`` would have to read: its keys are checked by the tests of the page's feature."""
    words = command.split()
    return "--config" in words and words[words.index("--config") + 1].endswith((".yaml", ".yml"))


def page_commands(prefix: str) -> list[tuple[str, str]]:
    """``(page, command)`` of every ```bash block line starting with ``prefix`` (inline code in prose may hold
    placeholders, as ``--config <preset>``)."""
    found = []
    for page in PAGES:
        blocks = "".join(f"```bash\n{block}```\n" for block in BASH.findall(page.read_text(encoding="utf-8")))
        for command in commands(blocks):
            if command.startswith(prefix) and not user_config(command):
                found.append((page.relative_to(ROOT).as_posix(), command))
    return found


@pytest.mark.parametrize(("page", "command"), page_commands("jaxalign "), ids=lambda value: value)
def test_a_pages_jaxalign_command_is_accepted(page, command, monkeypatch, tmp_path, capsys):
    test_jaxalign_command_is_accepted(command, monkeypatch, tmp_path, capsys)


@pytest.mark.parametrize(("page", "command"), page_commands("python "), ids=lambda value: value)
def test_a_pages_python_command_is_accepted(page, command, monkeypatch):
    test_python_command_is_accepted(command, monkeypatch)


def page_make_targets() -> list[tuple[str, str]]:
    """``(page, "make TARGET")`` for every target a page names as code: inline (`` `make llmdoctor-smoke` ``) or a
    ```bash block's line."""
    found = set()
    for page in PAGES:
        for target in re.findall(r"(?:`|^)make ([a-z][a-z-]*)\b", page.read_text(encoding="utf-8"), re.M):
            found.add((page.relative_to(ROOT).as_posix(), f"make {target}"))
    return sorted(found)


@pytest.mark.parametrize(("page", "command"), page_make_targets(), ids=lambda value: value)
def test_a_pages_make_target_exists(page, command):
    test_make_target_exists(command)
