"""The public surface of jaxalign.losses keeps the conventions users rely on (docs/architecture.md)."""

import ast
import inspect
import pathlib
import sys

import pytest

import jaxalign.losses as losses

PUBLIC_FUNCTIONS = [
    (name, obj)
    for name, obj in sorted(vars(losses).items())
    if name in losses.__all__ and inspect.isfunction(obj)
]


def test_everything_public_is_exported():
    assert len(PUBLIC_FUNCTIONS) >= 20, [name for name, _ in PUBLIC_FUNCTIONS]
    for name in losses.__all__:
        assert hasattr(losses, name), name


@pytest.mark.parametrize("name,function", PUBLIC_FUNCTIONS)
def test_hyperparameters_are_keyword_only(name, function):
    for parameter in inspect.signature(function).parameters.values():
        optional = parameter.default is not inspect.Parameter.empty
        if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and optional:
            # Only optional *arrays* (default None) may be positional.
            assert parameter.default is None, f"{name}({parameter.name}={parameter.default!r}) must be keyword-only"


@pytest.mark.parametrize("name,function", PUBLIC_FUNCTIONS)
def test_docstrings_document_shapes_and_sources(name, function):
    doc = inspect.getdoc(function) or ""
    summary = doc.splitlines()[0] if doc else ""
    assert summary.endswith(".") and len(summary) <= 120, f"{name}: one-line summary missing"
    assert "Args:" in doc and "Returns:" in doc, f"{name}: Args/Returns missing"
    if name.endswith("_loss"):
        assert "References:" in doc, f"{name}: References missing"


def test_losses_import_nothing_but_jax():
    # The standard library, JAX and its typing/testing helpers; never numpy logic, torch, flax, optax or models.
    allowed = set(sys.stdlib_module_names) | {"jax", "chex", "jaxtyping", "jaxalign"}
    for path in pathlib.Path(losses.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
            if "jaxalign" in roots and isinstance(node, ast.ImportFrom):
                assert node.module.startswith("jaxalign.losses"), f"{path.name} imports {node.module}"


@pytest.mark.parametrize("name,function", PUBLIC_FUNCTIONS)
def test_every_public_function_is_documented_in_docs_losses(name, function):
    page = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "losses.md").read_text()
    assert f"`{name}(" in page or f"`{name}`" in page, f"docs/losses.md has no section for {name}"
