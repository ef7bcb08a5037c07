"""Sphinx extension: links between the repository's Markdown files that the site includes as pages.

The site shows some files from outside docs/ through a wrapper page (``docs/benchmarks.md`` includes
``benchmarks/README.md``, ``docs/contributing.md`` includes ``CONTRIBUTING.md``). Their links are written for
GitHub, relative to the repository (``[...](benchmarks/README.md)``, or ``../benchmarks/README.md`` from a guide,
which MyST has already turned into a document path outside the site): this turns each such link into a link to
the wrapper page, before MyST would report it as unresolved.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.transforms.post_transforms import SphinxPostTransform

# Repository file -> the page that includes it.
REPO_PAGES = {"benchmarks/README.md": "benchmarks", "CONTRIBUTING.md": "contributing"}


class RepoPageLinks(SphinxPostTransform):
    """Rewrite a Markdown link to an included repository file into a link to its page."""

    default_priority = 5  # before MyST's reference resolver (9)

    def run(self, **kwargs) -> None:
        from sphinx import addnodes

        root = Path(self.app.srcdir).resolve().parent
        for node in self.document.findall(addnodes.pending_xref):
            if node.get("reftype") != "myst" or node.get("reftarget") in REPO_PAGES.values():
                continue
            path, _, anchor = node["reftarget"].partition("#")
            page = REPO_PAGES.get(_repository_path(path, root))
            if page is None:
                continue
            node["refdomain"] = "doc"
            node["reftarget"] = page
            node["reftargetid"] = anchor or None


def _repository_path(target: str, root: Path) -> str:
    """A link's file relative to the repository: as written (``../benchmarks/README.md``), or as MyST has already
    made it a document (``/abs/repo/benchmarks/README``, without the suffix)."""
    if target.startswith("/"):
        path = Path(target)
        if not path.is_relative_to(root):
            return target
        target = path.relative_to(root).as_posix()
        return target if target.endswith(".md") else f"{target}.md"
    return posixpath.normpath(target).removeprefix("../")


def setup(app: Sphinx) -> dict:
    app.add_post_transform(RepoPageLinks)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
