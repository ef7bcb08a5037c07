"""Every YAML block of docs/*.md that says it lists "every field with its default" does, so it cannot go stale.

Such a block marks the key that holds the list with a comment that names the dataclass first
(``loss:   # PPOConfig (...); every field with its default``). The mapping under that key must have exactly the
dataclass's fields, in their order, each with its default, and load through the dataclass's own ``from_dict``
(the loader ``jaxalign train`` uses) to the default instance.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```ya?ml[^\n]*\n(.*?)^```\s*$", re.S | re.M)
MARKED_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[\w.-]+):\s*#\s*(?P<cls>[A-Z]\w*)\b.*every field with its default")
KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[\w.-]+):")
# Where the documented dataclasses live; the first module that has the name wins.
MODULES = ("jaxalign.methods.specs", "jaxalign.train", "jaxalign.rollout", "jaxalign.data", "jaxalign.methods.recipe")


@dataclasses.dataclass(frozen=True)
class Listing:
    page: str
    line: int  # of the marked key, in the page
    path: tuple[str, ...]  # the keys down to the marked one
    class_name: str
    block: str

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}:{self.class_name}"


def listings() -> list[Listing]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            first = text[:match.start(1)].count("\n") + 1
            parents: list[tuple[int, str]] = []  # (indent, key) of the keys above the current line
            for offset, line in enumerate(match.group(1).splitlines()):
                key = KEY.match(line)
                if key is None:
                    continue
                indent = len(key["indent"])
                while parents and parents[-1][0] >= indent:
                    parents.pop()
                parents.append((indent, key["key"]))
                marked = MARKED_KEY.match(line)
                if marked:
                    found.append(Listing(str(page.relative_to(ROOT)), first + offset,
                                         tuple(k for _, k in parents), marked["cls"], match.group(1)))
    return found


LISTINGS = listings()


def documented_class(name: str) -> type:
    for module in MODULES:
        cls = getattr(importlib.import_module(module), name, None)
        if cls is not None and dataclasses.is_dataclass(cls):
            return cls
    raise LookupError(f"no dataclass {name} in {MODULES}")


def defaults(cls: type) -> dict[str, Any]:
    out = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            out[field.name] = field.default_factory()
        else:
            out[field.name] = dataclasses.MISSING  # required: a listing cannot give "its default"
    return out


def differences(listed: dict[str, Any], cls: type) -> list[str]:
    """What a listing gets wrong about ``cls``'s fields and defaults (empty: nothing)."""
    expected = defaults(cls)
    problems = [f"missing field {name} (default {value!r})" for name, value in expected.items() if name not in listed]
    problems += [f"{name} is not a field of {cls.__name__}" for name in listed if name not in expected]
    problems += [f"{name}: listed {listed[name]!r}, default {value!r}" for name, value in expected.items()
                 if name in listed and (listed[name] != value or type(listed[name]) is not type(value)
                                        and not (isinstance(value, float) and isinstance(listed[name], int)))]
    if not problems and list(listed) != list(expected):
        problems.append(f"fields out of order: {list(listed)} against {list(expected)}")
    return problems


def listed_mapping(listing: Listing) -> dict[str, Any]:
    node = yaml.safe_load(listing.block)
    for key in listing.path:
        node = node[key]
    assert isinstance(node, dict), f"{listing.name}: {'.'.join(listing.path)} is not a mapping"
    return node


def test_the_listings_are_found():
    assert {(item.page, item.class_name) for item in LISTINGS} >= {("docs/online-rl.md", "PPOConfig"),
                                                                   ("docs/online-rl.md", "GRPOConfig")}


@pytest.mark.parametrize("listing", LISTINGS, ids=[item.name for item in LISTINGS])
def test_listing_has_every_field_with_its_default(listing: Listing):
    cls = documented_class(listing.class_name)
    listed = listed_mapping(listing)
    assert differences(listed, cls) == [], f"{listing.name}: the block is not {cls.__name__}'s fields and defaults"
    if hasattr(cls, "from_dict"):  # as `jaxalign train` reads the section
        assert cls.from_dict(listed) == cls()


def test_a_missing_or_wrong_field_is_reported():
    from jaxalign.methods.specs import GRPOConfig

    listed = dict(defaults(GRPOConfig))
    assert differences(listed, GRPOConfig) == []
    del listed["minibatch_groups"]
    assert differences(listed, GRPOConfig) == ["missing field minibatch_groups (default False)"]
    assert differences({**defaults(GRPOConfig), "eps": 1e-3}, GRPOConfig) == ["eps: listed 0.001, default 0.0001"]
    assert differences({**defaults(GRPOConfig), "beta": 0.0}, GRPOConfig) == ["beta is not a field of GRPOConfig"]
