"""The package's contract: no jax behind ``import jaxalign.data``, every public name documented in docs/data.md."""

import pathlib
import subprocess
import sys

import pytest

import jaxalign.data

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "data.md"


def test_importing_data_imports_no_jax_or_torch():
    code = "import sys, jaxalign.data; print(sorted({'jax', 'flax', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", jaxalign.data.__all__)
def test_every_public_name_is_documented(name):
    assert f"`{name}`" in DOCS.read_text(), f"docs/data.md does not mention {name}"
