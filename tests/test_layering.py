"""Import rules between the layers (docs/architecture.md, "Import rules"), read from the source with ``ast``.

Every ``import`` and ``from … import`` counts, at module level, under ``if TYPE_CHECKING:`` or inside a
function: a lazy import is still a dependency. Each layer may import only the layers its rule names;
``sekisho/*.py`` (the entry points), ``sekisho.lab`` (demo and test harness) and ``sekisho.bench``
(benchmarks) put the layers together and have no rule of their own, but no layer may import them.
Run: ``.venv/bin/pytest tests/test_layering.py``.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The top-level folders, each reached as sekisho.<folder> through the symlink sekisho/<folder>.
LAYER_FOLDERS = ("protocol", "drivers", "agents", "controller", "deploy", "firmware_stubs")
# Our packages' short names: a bare `import agents` would load a second copy under another name.
BARE_NAMES = frozenset({*LAYER_FOLDERS, "common", "lab", "bench"})


@dataclass(frozen=True)
class Rule:
    """The only layers a layer may import, and why."""

    may_import: frozenset[str]
    why: str


def _rule(why: str, *layers: str) -> Rule:
    return Rule(frozenset(f"sekisho.{name}" for name in layers), why)


RULES = {
    "sekisho.common": _rule("helpers shared by every layer import no other layer", "common"),
    "sekisho.protocol": _rule("the wire contract shared by agents and the controller, no I/O", "protocol", "common"),
    "sekisho.drivers": _rule("device access knows no agent or controller", "drivers", "protocol", "common"),
    "sekisho.firmware_stubs": _rule(
        "they stand in for device firmware: sharing the drivers' code would hide the bugs they are there to find",
        "firmware_stubs",
        "common",
    ),
    "sekisho.agents": _rule(
        "agents run on endpoints apart from the controller; deploy is the installers' tooling; lab, bench and "
        "the firmware stubs are not shipped",
        "agents",
        "drivers",
        "protocol",
        "common",
    ),
    "sekisho.controller": _rule(
        "the controller shares only the wire contract with agents, and is installed without lab, bench or stubs",
        "controller",
        "protocol",
        "common",
    ),
    "sekisho.deploy": _rule(
        "installation tools (PKI, broker, PAM) work without the agents and the controller",
        "deploy",
        "protocol",
        "common",
    ),
}


@dataclass(frozen=True)
class Allowed:
    """An import a rule would refuse, allowed for the files under ``path`` (relative to the checkout)."""

    path: str
    target: str
    inside_functions_only: bool
    why: str


EXCEPTIONS = (
    Allowed(
        path="agents/sim/",
        target="sekisho.firmware_stubs",
        inside_functions_only=True,
        why="the demo's simulated door box runs the firmware stubs behind the real drivers; the stubs are not "
        "shipped (pyproject), so only inside the demo's functions, which run from a checkout",
    ),
)


@dataclass(frozen=True)
class Import:
    """One imported module as written in one file."""

    line: int
    module: str
    absolute: bool
    in_function: bool


class _Collector(ast.NodeVisitor):
    """Every import of one module, with relative imports resolved against its package."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.depth = 0
        self.found: list[Import] = []

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_Import(self, node: ast.Import) -> None:
        """Record ``import a.b``."""
        for alias in node.names:
            self.found.append(Import(node.lineno, alias.name, True, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        """Record ``from a.b import c`` (``from sekisho import agents`` imports sekisho.agents)."""
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        names = [f"{module}.{alias.name}" for alias in node.names] if module == "sekisho" else [module]
        for name in names:
            self.found.append(Import(node.lineno, name, node.level == 0, self.depth > 0))


def module_name(path: Path, root: Path) -> str:
    """Return the dotted name a source file is imported as (protocol/x.py is sekisho.protocol.x)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] != "sekisho":
        parts.insert(0, "sekisho")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> list[Import]:
    """Return every import in a source file."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    collector = _Collector(package)
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return collector.found


def layer_of(module: str) -> str:
    """Return the layer of a module of ours: its first two name parts (sekisho.agents.doors → sekisho.agents)."""
    return ".".join(module.split(".")[:2])


def _allowed(relative: str, imported: Import, target: str) -> bool:
    return any(
        relative.startswith(ok.path) and target == ok.target and (imported.in_function or not ok.inside_functions_only)
        for ok in EXCEPTIONS
    )


def violations(files: Iterable[Path], root: Path) -> Iterator[str]:
    """Yield ``file:line imports X (rule)`` for every import a rule refuses."""
    for path in sorted(files):
        relative = path.relative_to(root).as_posix()
        rule_layer = layer_of(module_name(path, root))
        rule = RULES.get(rule_layer)
        for imported in imports(path, root):
            head = imported.module.split(".")[0]
            if imported.absolute and head in BARE_NAMES:
                yield f"{relative}:{imported.line} imports {imported.module} (ours: import it as sekisho.{head}…)"
                continue
            if rule is None or head != "sekisho":
                continue
            target = layer_of(imported.module)
            if target in rule.may_import or _allowed(relative, imported, target):
                continue
            because = f"{rule_layer} imports only {', '.join(sorted(rule.may_import))}: {rule.why}"
            yield f"{relative}:{imported.line} imports {imported.module} ({because})"


def product_files(root: Path = ROOT) -> list[Path]:
    """Return every .py file of the product once: the top-level folders, then sekisho/ without its symlinks."""
    files: list[Path] = []
    for folder in LAYER_FOLDERS:
        files += (root / folder).rglob("*.py")
    for directory, subdirectories, names in os.walk(root / "sekisho"):
        # sekisho/<folder> are the symlinks to the folders walked above.
        subdirectories[:] = [d for d in subdirectories if not (Path(directory) / d).is_symlink()]
        files += [Path(directory) / name for name in names if name.endswith(".py")]
    return files


def test_the_layer_folders_are_what_sekisho_links_to() -> None:
    links = {p.name: p.resolve() for p in (ROOT / "sekisho").iterdir() if p.is_symlink()}
    assert links == {folder: ROOT / folder for folder in LAYER_FOLDERS}


def test_every_file_is_walked_once_with_its_imports() -> None:
    files = product_files()
    assert len(files) == len(set(files)) == len({f.resolve() for f in files})
    assert {module_name(f, ROOT).split(".")[1] for f in files if module_name(f, ROOT) != "sekisho"} >= {
        *LAYER_FOLDERS,
        "common",
        "lab",
        "bench",
        "cli",
        "entry",
    }
    agent_imports = [i.module for i in imports(ROOT / "agents" / "doors" / "service.py", ROOT)]
    assert "sekisho.protocol.door_commands" in agent_imports


def test_import_rules() -> None:
    found = list(violations(product_files(), ROOT))
    if found:
        pytest.fail("imports against the layer rules (docs/architecture.md):\n" + "\n".join(found), pytrace=False)


def test_the_rules_catch_what_they_should(tmp_path: Path) -> None:
    sources = {
        "controller/doors/cli.py": "def hash_pin() -> None:\n    from sekisho.agents.doors import pin\n",
        "protocol/pin.py": "from ..controller import store\n",
        "drivers/relay/board.py": "from sekisho import agents, protocol\n",
        "deploy/pki.py": "import agents.doors\n",
        "agents/sim/doors.py": "import sekisho.firmware_stubs.osdp_reader\n"
        "def box() -> None:\n    from sekisho.firmware_stubs import locker_board\n",
        "agents/doors/attach.py": "def f() -> None:\n    from sekisho.firmware_stubs import locker_board\n",
        "sekisho/common/files.py": "from sekisho.protocol import canonical\n",
        "sekisho/lab/demo.py": "from sekisho.controller import service\nfrom sekisho.agents import sim\n",
        "agents/runtime/agent.py": "from . import outbox\nfrom ..doors import keys\nfrom sekisho.common import files\n",
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    found = [line.split(" (")[0] for line in violations(tmp_path.rglob("*.py"), tmp_path)]
    assert found == [
        "agents/doors/attach.py:2 imports sekisho.firmware_stubs",
        "agents/sim/doors.py:1 imports sekisho.firmware_stubs.osdp_reader",
        "controller/doors/cli.py:2 imports sekisho.agents.doors",
        "deploy/pki.py:1 imports agents.doors",
        "drivers/relay/board.py:1 imports sekisho.agents",
        "protocol/pin.py:1 imports sekisho.controller",
        "sekisho/common/files.py:1 imports sekisho.protocol",
    ]
