"""Load site policy from YAML strictly: duplicate keys, unknown keys and dangling references are errors."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sekisho.common.i18n import M_
from sekisho.protocol import mynumber
from sekisho.protocol.policy import SitePolicy


class PolicyError(ValueError):
    """A site policy that cannot be applied, with every problem found listed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            # `[]: x` or `{a: 1}: x`: a list or mapping as a key. PyYAML would raise TypeError on the set below.
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _yaml_path(path: str) -> str:
    """Turn a JSON path of mynumber.find_my_numbers ("$.people[2].name") into the loader's "people.2.name"."""
    return path.removeprefix("$").removeprefix(".").replace("[", ".").replace("]", "") or "(document)"


def parse_policy(text: str, source: str = "<policy>") -> SitePolicy:
    """Parse and validate site policy YAML, raising PolicyError with every problem located.

    Any value or key that looks like a My Number is refused first, wherever it is (a person's name, a
    comment field, a door's label…): the policy is signed into the bundles every agent gets. The error
    names the field, never the value.
    """
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        # PyYAML quotes the offending line: never repeat a My Number from it.
        raise PolicyError([f"{source}: YAML error: {mynumber.redact(str(err))}"]) from err
    if not isinstance(doc, dict):
        raise PolicyError([f"{source}: the document must be a mapping"])
    try:
        found = [_yaml_path(path) for path in mynumber.find_my_numbers(doc)]
    except RecursionError as err:  # YAML aliases can make a document contain itself
        raise PolicyError([f"{source}: the document nests too deeply or contains itself"]) from err
    if found:
        raise PolicyError(
            [
                M_(
                    "%(where)s: looks like a My Number (12 digits with a valid check digit); refused, value not shown",
                    where=f"{source}: {where}",
                )
                for where in found
            ]
        )
    try:
        return SitePolicy.model_validate(doc)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e.get("loc", ())) or "(document)"
            problems.append(f"{source}: {where}: {e.get('msg')}")
        raise PolicyError(problems) from err


def load_policy_file(path: Path) -> tuple[SitePolicy, str]:
    """Read and validate a policy file; return the model and the SHA-256 of its bytes."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PolicyError([f"{path}: {err.strerror}"]) from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PolicyError([f"{path}: not UTF-8"]) from err
    return parse_policy(text, str(path)), hashlib.sha256(data).hexdigest()
