"""The public API the reference documents, and which of its names have no docstring.

Sphinx's autodoc leaves out an undocumented member without a word, so a public name without a docstring would
simply be missing from the reference. This module lists the public names (each package's ``__all__``; a module
without one, like :mod:`jaxalign.methods.specs`, contributes what it defines without a leading underscore) and
the public methods and properties of the public classes, and reports those without documentation. It imports
no Sphinx: ``tests/test_docs_build.py`` runs it in the test suite, and ``public_api.py`` at build time.

A constant is documented by a ``#:`` comment on the lines above its assignment (or at its end), or a string
literal on the line after it, as autodoc reads them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import pkgutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

# Package -> modules whose own public names are documented beside the package's ``__all__``.
API: dict[str, tuple[str, ...]] = {
    "jaxalign.losses": (),
    "jaxalign.models": (),
    "jaxalign.data": (),
    "jaxalign.rollout": (),
    "jaxalign.train": (),
    "jaxalign.eval": (),
    "jaxalign.methods": ("jaxalign.methods.specs",),
}


@dataclasses.dataclass(frozen=True)
class PublicName:
    """One documented name: where a user reaches it (``path``) and the module that defines it."""

    path: str  # e.g. "jaxalign.losses.dpo_loss"
    module: str  # e.g. "jaxalign.losses.dpo"
    obj: object

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[1]

    @property
    def kind(self) -> str:
        """``class``, ``exception``, ``function`` or ``data``."""
        if inspect.isclass(self.obj):
            return "exception" if issubclass(self.obj, BaseException) else "class"
        if inspect.isroutine(self.obj) or hasattr(self.obj, "__wrapped__"):  # a function, or jax.jit's wrapper
            return "function"
        return "data"


def submodules(package: str) -> list[str]:
    """Every module under ``package`` (recursively), in name order, imported."""
    root = importlib.import_module(package)
    names = []
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        names.append(info.name)
    for name in names:
        importlib.import_module(name)
    return sorted(names)


def _own_names(module: types.ModuleType) -> list[str]:
    """What a module without ``__all__`` makes public: what it defines (not imports), no leading underscore."""
    assigned = set(assignments(module))
    out = []
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        defined = inspect.isclass(value) or inspect.isfunction(value)
        if defined and getattr(value, "__module__", None) == module.__name__:
            out.append(name)
        elif name in assigned:
            out.append(name)
    return sorted(out)


@functools.cache
def assignments(module: types.ModuleType) -> dict[str, ast.stmt]:
    """Top-level assignments of a module's source: name -> statement."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return {}
    found = {}
    for node in ast.parse(source).body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, (ast.AnnAssign,)) and isinstance(node.target, ast.Name):
            targets = [node.target]
        for target in targets:
            found[target.id] = node
    return found


def defining_module(package: str, name: str, obj: object, candidates: list[str]) -> str:
    """The module that defines ``obj`` (a class's or function's ``__module__``; for a constant, the module under
    ``package`` whose source assigns it)."""
    module = getattr(obj, "__module__", None)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and (module or "").split(".")[0] == package.split(".")[0]:
        return module
    for candidate in candidates:
        if name in assignments(sys.modules[candidate]) and getattr(sys.modules[candidate], name, None) is obj:
            return candidate
    return package


def public_names(package: str) -> list[PublicName]:
    """The documented names of ``package`` (see :data:`API`), in the order the reference lists them."""
    root = importlib.import_module(package)
    modules = submodules(package)
    out = []
    for name in sorted(root.__all__):
        obj = getattr(root, name)
        out.append(PublicName(f"{package}.{name}", defining_module(package, name, obj, [package, *modules]), obj))
    for extra in API.get(package, ()):
        module = importlib.import_module(extra)
        for name in getattr(module, "__all__", None) or _own_names(module):
            out.append(PublicName(f"{extra}.{name}", extra, getattr(module, name)))
    return out


def constant_doc(module: str, name: str) -> str | None:
    """The documentation of a module-level constant, as autodoc reads it: ``#:`` comment lines just above the
    assignment (or one at its end), or a string literal right after it."""
    mod = sys.modules.get(module) or importlib.import_module(module)
    node = assignments(mod).get(name)
    if node is None:
        return None
    lines = inspect.getsource(mod).splitlines()
    comment = []
    index = node.lineno - 2
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        comment.insert(0, lines[index].lstrip()[2:].strip())
        index -= 1
    if not comment:
        tail = lines[node.end_lineno - 1]
        if "#:" in tail:
            comment = [tail.split("#:", 1)[1].strip()]
    if comment:
        return "\n".join(comment)
    body = ast.parse(inspect.getsource(mod)).body
    for statement, following in zip(body, body[1:]):
        if statement.lineno == node.lineno and isinstance(following, ast.Expr) and isinstance(
                getattr(following, "value", None), ast.Constant) and isinstance(following.value.value, str):
            return inspect.cleandoc(following.value.value)
    return None


def _generated_dataclass_doc(cls: type, doc: str) -> bool:
    """``dataclasses`` gives an undocumented class its signature as ``__doc__``: that is no documentation."""
    return dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}(") and "\n" not in doc.strip()


def class_doc(cls: type) -> str | None:
    """The class's own docstring (not a base class's, not the one dataclasses generates)."""
    doc = cls.__dict__.get("__doc__")
    if not doc or not doc.strip() or _generated_dataclass_doc(cls, doc):
        return None
    return doc


def public_members(cls: type) -> Iterator[tuple[str, object]]:
    """The public methods and properties a class defines itself (inherited ones are documented where defined)."""
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, (property, functools.cached_property)) or inspect.isfunction(value):
            yield name, value


def _member_doc(cls: type, name: str, value: object) -> str | None:
    """A member's docstring, or the one it overrides (autodoc shows the base's for an override)."""
    if isinstance(value, functools.cached_property):
        value = value.func
    doc = getattr(value, "__doc__", None)
    if doc and doc.strip():
        return doc
    for base in cls.__mro__[1:]:
        inherited = base.__dict__.get(name)
        if inherited is not None and getattr(inherited, "__doc__", None):
            return inherited.__doc__
    return None


def missing_docstrings(packages: list[str] | None = None) -> list[str]:
    """The public names (and public members of public classes) of ``packages`` (default: :data:`API`) that have
    no docstring, as ``"path (defined in module)"`` lines, sorted."""
    missing = set()
    for package in packages or list(API):
        for public in public_names(package):
            obj, where = public.obj, f" (defined in {public.module})"
            if public.kind in ("class", "exception"):
                if class_doc(obj) is None:
                    missing.add(public.path + where)
                for member, value in public_members(obj):
                    if _member_doc(obj, member, value) is None:
                        missing.add(f"{public.path}.{member}{where}")
            elif public.kind == "function":
                if not (getattr(obj, "__doc__", None) or "").strip():
                    missing.add(public.path + where)
            elif constant_doc(public.module, public.name) is None:
                missing.add(public.path + where)
    return sorted(missing)


def main() -> int:
    """``python docs/_ext/docstring_coverage.py``: print the public names without a docstring."""
    missing = missing_docstrings()
    for line in missing:
        print(line)
    print(f"{len(missing)} public names without a docstring", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
