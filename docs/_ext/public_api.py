"""Sphinx extension: the API reference generated from each package's public names, with the checks that keep it
whole.

- ``.. public-api:: jaxalign.losses`` documents the package: its docstring, then one section per module (its
  docstring, which also makes it a ``:mod:`` target) with the public names that module defines, each through
  autodoc under the path a user imports it from (``jaxalign.losses.dpo_loss``). The list comes from
  :mod:`docstring_coverage`, so a name added to an ``__all__`` appears without editing a page.
- A public name or a public class member without a docstring is a warning (``jaxalign.docstring``): autodoc
  would leave it out silently.
- A reference to a jaxalign object by the module that defines it (``jaxalign.losses.dpo.dpo_loss``,
  ``jaxalign.train.trainer.Trainer.run``) or by a name its docstring's module imports (``:class:`Sampler```)
  resolves to where the reference documents it. One to a jaxalign object the reference does not document (a
  private helper a docstring explains itself by, a type only used in a signature) is shown as code without a
  link, as is one to another library's object (``jax.Array``, ``nnx.Module``, ``int``: the build runs offline,
  with no other project's inventory to link to). One that names nothing at all, a renamed or misspelt name,
  stays a warning (``nitpicky``).
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import inspect
import sys
import warnings
from collections import defaultdict
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docstring_coverage import (  # noqa: E402
    API,
    PublicName,
    assignments,
    constant_doc,
    missing_docstrings,
    public_members,
    public_names,
    submodules,
)

logger = logging.getLogger(__name__)
_MISSING = object()
_VALUE_WIDTH = 100  # a constant's value is shown when its repr is at most this long


def _entry(public: PublicName) -> list[str]:
    """The rST that documents one public name."""
    if public.kind in ("class", "exception"):
        return [f".. auto{public.kind}:: {public.path}", "   :members:", "   :show-inheritance:", ""]
    if public.kind == "function":
        return [f".. autofunction:: {public.path}", ""]
    # Named within its package: inside an automodule the directive would otherwise prefix the current module
    # (``jaxalign.losses.dpo.jaxalign.losses.DPO_LOSS_TYPES``), and no reference would find the constant.
    package, _, name = public.path.rpartition(".")
    lines = [f".. py:data:: {name}", f"   :module: {package}"]
    value = repr(public.obj)
    if len(value) <= _VALUE_WIDTH and "\n" not in value:
        lines.append(f"   :value: {value}")
    doc = constant_doc(public.module, public.name) or ""
    lines.append("")
    lines += [f"   {line}" if line else "" for line in doc.splitlines()]
    return [*lines, ""]


def _source_line(public: PublicName) -> int:
    """Where the name is defined in its module: the reference lists a module's names in the order it does."""
    if public.kind == "data":
        node = assignments(sys.modules[public.module]).get(public.name)
        return node.lineno if node is not None else 0
    try:
        return inspect.getsourcelines(inspect.unwrap(public.obj))[1]
    except (OSError, TypeError):
        return 0


def _entries(names: list[PublicName]) -> list[str]:
    return [line for public in sorted(names, key=_source_line) for line in _entry(public)]


class PublicAPIDirective(SphinxDirective):
    """``.. public-api:: PACKAGE``: the package's reference (see the module docstring)."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        package = self.arguments[0]
        by_module: dict[str, list[PublicName]] = defaultdict(list)
        documented = public_names(package)
        for public in documented:
            by_module[public.module].append(public)
        names = {public.path for public in documented}
        out = self._parse([f".. automodule:: {package}", "", *_entries(by_module.pop(package, []))], package)
        # Every module of the package, then any other module a public name comes from.
        modules = submodules(package)
        for module in [*modules, *sorted(set(by_module) - set(modules) - {package})]:
            # A section node, not an rST title: the page around the directive may be Markdown.
            section = nodes.section(ids=[nodes.make_id(f"module-section-{module}")])
            section += nodes.title(module, "", nodes.literal(module, module))
            # A module named like a public function (jaxalign.data.tokenize) is shown, and the function indexed.
            automodule = [f".. automodule:: {module}", *(["   :no-index:"] if module in names else []), ""]
            section += self._parse([*automodule, *_entries(by_module.pop(module, []))], module)
            out.append(section)
        self.env.note_dependency(__file__)
        return out

    def _parse(self, lines: list[str], name: str) -> list[nodes.Node]:
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"<public-api {name}>"), self.content_offset, container)
        return container.children


def _documented(app: Sphinx) -> dict:
    """Where the reference documents each public object (and its members): ``id(obj)`` or, for constants,
    ``"defining.module.NAME"`` -> the documented path."""
    cached = getattr(app.env, "jaxalign_documented", None)
    if cached is not None:
        return cached
    documented = {}
    for package in API:
        for public in public_names(package):
            if public.kind == "data":
                documented[f"{public.module}.{public.name}"] = public.path
                continue
            documented[id(public.obj)] = public.path
            if inspect.isclass(public.obj):
                for name, value in public_members(public.obj):
                    documented[id(getattr(value, "fget", value))] = f"{public.path}.{name}"
    app.env.jaxalign_documented = documented
    return documented


def _walk(obj: object, attributes: list[str]) -> object:
    with warnings.catch_warnings():  # numpy warns on some names it reserves (np.str)
        warnings.simplefilter("ignore")
        for attribute in attributes:
            obj = getattr(obj, attribute, _MISSING)
            if obj is _MISSING:
                break
    return obj


def _lookup(target: str, context: str | None) -> tuple[object, str | None]:
    """The object ``target`` names and the absolute path it was found at: an absolute path, or a name in the
    namespace of ``context`` (the module the reference was written in) or of any jaxalign module (a type
    annotation names what its module imported); ``(_MISSING, None)`` when it names nothing."""
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:split]))
        except Exception:  # noqa: BLE001 (not a module: try a shorter prefix)
            continue
        obj = _walk(module, parts[split:])
        return (obj, target) if obj is not _MISSING else (_MISSING, None)
    namespaces = [sys.modules[context]] if context in sys.modules else []
    namespaces += [module for name, module in sorted(sys.modules.items())
                   if name.split(".")[0] == "jaxalign" and module is not None]
    # What jaxtyping's annotations print by bare name (``Float[ndarray, 'B T']``).
    namespaces += [importlib.import_module(name) for name in ("numpy", "jax")]
    for namespace in namespaces:
        obj = _walk(namespace, parts)
        if obj is not _MISSING:
            return obj, None
    if hasattr(builtins, parts[0]):
        return _walk(builtins, parts), None
    return _MISSING, None


def _ours(obj: object, path: str | None) -> bool:
    """Whether jaxalign defines ``obj`` (so the reference must document it)."""
    if inspect.ismodule(obj):
        return obj.__name__.split(".")[0] == "jaxalign"
    if path is not None and path.split(".")[0] == "jaxalign":
        return True
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "jaxalign"


def resolve_reference(app: Sphinx, env, node, contnode):
    """``missing-reference``: a jaxalign object by another of its names, or another library's object as code."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    if not target.replace(".", "").replace("_", "").isalnum():
        return contnode  # not a name: a shape string of a jaxtyping annotation ('B T'), a literal
    obj, path = _lookup(target, node.get("py:module"))
    if obj is _MISSING:
        top = target.split(".")[0]
        if top != "jaxalign" and "." in target and importlib.util.find_spec(top) is not None:
            return contnode  # another library's private path (jax.jaxlib._jax.Array)
        return None  # names nothing: the build reports it
    if not _ours(obj, path):
        return contnode
    documented = _documented(app)
    alias = None
    if not isinstance(obj, (int, float, str, tuple, dict, frozenset)):
        alias = documented.get(id(obj))
    if alias is None and path is not None:
        alias = documented.get(path)
    if alias is None:
        return contnode  # a jaxalign object the reference does not document: shown as code, not linked
    domain = env.get_domain("py")
    for role in ("obj", "class", "func", "meth", "attr", "data", "exc", "mod"):
        resolved = domain.resolve_xref(env, node["refdoc"], app.builder, role, alias, node, contnode)
        if resolved is not None:
            return resolved
    return None


# Runtime paths of public types, as annotations print them -> the path users write.
_TYPE_SPELLINGS = {"jaxlib._jax.Array": "jax.Array", "jaxlib.xla_client.Array": "jax.Array"}


def public_type_spellings(app, what, name, obj, options, signature, return_annotation):
    """``autodoc-process-signature``: ``jax.Array``, not the runtime class ``jaxlib._jax.Array``."""
    def spell(text):
        if text:
            for runtime, public in _TYPE_SPELLINGS.items():
                text = text.replace(runtime, public)
        return text
    return spell(signature), spell(return_annotation)


def check_docstrings(app: Sphinx) -> None:
    """Warn about every public name (or public class member) without a docstring."""
    if app.builder.name == "doctest":  # runs after the html build, on its environment: warned there
        return
    for line in missing_docstrings():
        path, _, where = line.partition(" ")
        logger.warning(f"public name {path} {where} has no docstring", type="jaxalign", subtype="docstring")


def setup(app: Sphinx) -> dict:
    app.add_directive("public-api", PublicAPIDirective)
    app.connect("builder-inited", check_docstrings)
    app.connect("missing-reference", resolve_reference)
    app.connect("autodoc-process-signature", public_type_spellings)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
