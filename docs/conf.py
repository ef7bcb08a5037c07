"""Sphinx configuration: the user guides (Markdown, through MyST) and the API reference (autodoc from the
docstrings, generated per package by docs/_ext/public_api.py). ``make docs`` builds it into docs/_build/html and
runs the doctests of the docstrings and pages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]
# autodoc imports the package, which imports jax: the build needs no accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jaxalign  # noqa: E402

project = "jaxalign"
author = "the jaxalign authors"
copyright = "the jaxalign authors"
release = version = jaxalign.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinxarg.ext",
    "public_api",
    "repo_pages",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
# Option names stay as typed: "--raw", not an en dash.
smartquotes = False
exclude_patterns = ["_build", "_ext", "README.md"]

# The guides are written for GitHub: its tables and heading anchors (`page.md#a-heading`) work here as there.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence", "deflist"]
# A Markdown link names a page, a heading or a Python object, never a command-line option.
myst_ref_domains = ["std", "py"]

# Every reference to a jaxalign object must resolve (public_api.py shows other libraries' objects as code).
nitpicky = True

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

doctest_global_setup = """
import jax
import jax.numpy as jnp
import numpy as np
"""

html_theme = "sphinx_book_theme"
html_title = "jaxalign"
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}

