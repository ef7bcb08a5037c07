"""Independent reference implementations used as oracles by the parity tests.

- TRL (the installed, pinned version from the ``test`` extra) is imported normally.
- Loss code that TRL has since removed (the classic PPO trainer of TRL 0.11, the PPO utilities of TRL
  0.29's ``experimental/ppo``) is read from the published wheels, which ``make oracles`` downloads into
  ``.oracles/``. Only the named top-level functions / class methods are compiled from that source, so the
  old package's imports (which no longer resolve against transformers 5) are never executed.
"""

from __future__ import annotations

import ast
import math
import pathlib
import types
import typing
import zipfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORACLE_DIR = ROOT / ".oracles"
LEGACY_TRL_VERSIONS = ("0.11.4", "0.29.1")
# Annotations in the legacy source are evaluated when its functions are defined.
_TYPING_NAMES = {name: getattr(typing, name)
                 for name in ("Optional", "Union", "List", "Dict", "Tuple", "Mapping", "Any")}


def _wheel_source(version: str, member: str) -> str:
    wheel = ORACLE_DIR / f"trl-{version}-py3-none-any.whl"
    if not wheel.exists():
        raise FileNotFoundError(
            f"{wheel} is missing: the PPO parity tests read TRL {version}'s published loss code from it. "
            "Run `make oracles` (pip download --no-deps trl==VERSION -d .oracles)."
        )
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member).decode()


def legacy_trl(version: str, member: str, names: list[str], extra_globals: dict | None = None):
    """Compile the top-level functions/classes ``names`` of ``member`` inside TRL ``version``'s wheel.

    Returns a namespace whose attributes are the compiled objects. ``extra_globals`` supplies the
    free names they use (torch, F, np, ...).
    """
    import torch
    import torch.nn.functional as F

    tree = ast.parse(_wheel_source(version, member))
    wanted = [
        node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names
    ]
    missing = set(names) - {node.name for node in wanted}
    if missing:
        raise LookupError(f"TRL {version} {member} has no top-level {sorted(missing)}")
    module = ast.Module(body=wanted, type_ignores=[])
    namespace = {"torch": torch, "F": F, "np": np, "math": math, **_TYPING_NAMES}
    namespace.update(extra_globals or {})
    exec(compile(module, f"trl-{version}/{member}", "exec"), namespace)
    return types.SimpleNamespace(**{name: namespace[name] for name in names})


def legacy_trl_method(version: str, member: str, class_name: str, method: str, extra_globals: dict | None = None):
    """Compile one method of a class in TRL ``version``'s wheel as a plain function ``f(self, ...)``."""
    import torch
    import torch.nn.functional as F

    tree = ast.parse(_wheel_source(version, member))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    module = ast.Module(body=[item], type_ignores=[])
                    namespace = {"torch": torch, "F": F, "np": np, "math": math, **_TYPING_NAMES}
                    namespace.update(extra_globals or {})
                    exec(compile(module, f"trl-{version}/{member}:{class_name}", "exec"), namespace)
                    return namespace[method]
    raise LookupError(f"TRL {version} {member} has no {class_name}.{method}")
