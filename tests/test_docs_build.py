"""The documentation's own checks that need no Sphinx (``make docs`` runs the full build): the list of public
names without a docstring (docs/_ext/docstring_coverage.py) finds what autodoc would silently leave out, and every
package of the API reference has its page."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import docstring_coverage  # noqa: E402


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package with documented and undocumented public names of every kind."""
    root = tmp_path / "coverage_pkg"
    root.mkdir()
    (root / "__init__.py").write_text(textwrap.dedent('''
        """A package."""
        from coverage_pkg.things import (LIMIT, NAMES, TABLE, Config, Plain, Typed, documented, undocumented,
                                         wrapped)
        __all__ = ["LIMIT", "NAMES", "TABLE", "Config", "Plain", "Typed", "documented", "undocumented", "wrapped"]
    '''))
    (root / "things.py").write_text(textwrap.dedent('''
        """Things."""
        import dataclasses
        import functools

        #: The largest size.
        LIMIT = 7
        NAMES = ("a", "b")
        TABLE = {"a": 1}
        """What each name weighs."""

        @dataclasses.dataclass(frozen=True)
        class Config:
            size: int = 1

            @property
            def double(self) -> int:
                return 2 * self.size

        class Plain:
            """Documented."""

            def run(self):
                """Runs."""

            def stop(self):
                pass

            def _private(self):
                pass

        @dataclasses.dataclass
        class Typed:
            """A documented dataclass."""

            x: int = 0

        def documented():
            """Does it."""

        def undocumented():
            pass

        @functools.wraps(documented)
        def wrapped():
            pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "coverage_pkg"
    for name in [name for name in sys.modules if name.startswith("coverage_pkg")]:
        del sys.modules[name]


def test_every_kind_of_undocumented_public_name_is_found(package):
    missing = docstring_coverage.missing_docstrings([package])
    assert [line.split(" ")[0] for line in missing] == [
        "coverage_pkg.Config",  # a dataclass's generated signature is no documentation
        "coverage_pkg.Config.double",
        "coverage_pkg.NAMES",
        "coverage_pkg.Plain.stop",
        "coverage_pkg.undocumented",
    ]
    assert missing[0].endswith("(defined in coverage_pkg.things)")


def test_constants_are_documented_as_autodoc_reads_them(package):
    importlib.import_module(package)
    assert docstring_coverage.constant_doc("coverage_pkg.things", "LIMIT") == "The largest size."
    assert docstring_coverage.constant_doc("coverage_pkg.things", "TABLE") == "What each name weighs."
    assert docstring_coverage.constant_doc("coverage_pkg.things", "NAMES") is None


def test_every_public_name_has_a_docstring():
    """``make docs`` runs with -W: a public name without a docstring would fail it (the reference would leave
    it out); this names them sooner."""
    missing = docstring_coverage.missing_docstrings()
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)


def test_every_api_package_has_its_reference_page():
    index = (ROOT / "docs" / "api" / "index.md").read_text()
    for package in docstring_coverage.API:
        page = ROOT / "docs" / "api" / f"{package.split('.')[-1]}.md"
        assert page.is_file(), page
        assert f".. public-api:: {package}" in page.read_text(), page
        assert f"\n{page.stem}\n" in index, f"{page} is not in the toctree of docs/api/index.md"


def test_the_losses_docstring_examples_run():
    """The ``>>>`` examples of jaxalign.losses (``make docs`` runs them too, through Sphinx's doctest builder)."""
    import doctest

    import jaxalign.losses

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    modules = [importlib.import_module(name) for name in docstring_coverage.submodules("jaxalign.losses")]
    for module in [jaxalign.losses, *modules]:
        for test in doctest.DocTestFinder().find(module):
            runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0
    assert attempted >= 20  # dpo_loss, sft_loss, grpo_loss and ppo_policy_loss at least


def test_a_reference_to_an_undocumented_object_shows_as_code_and_one_to_nothing_warns():
    pytest.importorskip("sphinx")
    from types import SimpleNamespace

    import public_api

    app = SimpleNamespace(env=SimpleNamespace(jaxalign_documented={}))
    contnode = object()

    def resolve(target, module="jaxalign.train.optimizer"):
        node = {"refdomain": "py", "reftarget": target, "py:module": module, "refdoc": "api/train"}
        return public_api.resolve_reference(app, app.env, node, contnode)

    assert resolve("ClippedOptimizer") is contnode  # a class of the module the docstring is in, not exported
    assert resolve("jaxalign.train.optimizer.weight_decay_mask") is contnode
    assert resolve("jax.Array") is contnode  # another library's
    assert resolve("ClippedOptimiser") is None  # misspelt: names nothing, so the build warns
    assert resolve("jaxalign.train.optimizer.no_such_function") is None


def test_links_to_included_repository_files_are_found_however_myst_left_them():
    pytest.importorskip("sphinx")
    import repo_pages

    page = repo_pages._repository_path  # noqa: SLF001
    assert page("../benchmarks/README.md", ROOT) == "benchmarks/README.md"
    assert page(str(ROOT / "benchmarks" / "README"), ROOT) == "benchmarks/README.md"
    assert page(str(ROOT / "CONTRIBUTING.md"), ROOT) == "CONTRIBUTING.md"
    assert page("/elsewhere/README", ROOT) == "/elsewhere/README"
