"""The import graph runs one way: models → activations → analyses → results → viz / report / cli.

Every ``import`` and ``from … import`` of every module under mechkit/ (those inside functions
included) is read with ast, and so is ``mechkit.X`` after a bare ``import mechkit`` (a lazy
name of the package root). :data:`RULES` says, per group of modules, either the only mechkit
modules they may import (``allowed``) or the ones they must not (``forbidden``); patterns are
fnmatch patterns over dotted module names. :data:`PENDING` lists the edges known to break a rule
today, each with who removes it; its tests fail once the edge is gone, so the list only shrinks.

Not seen: modules loaded by ``importlib.import_module(name)`` with a computed name (the zoo's
recipes, the architecture tables, the package root's lazy map, which is checked separately).
"""

from __future__ import annotations

import ast
import fnmatch
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

import mechkit

PACKAGE = Path(mechkit.__file__).parent
ROOT = "mechkit"  # the package root itself: __version__, __file__
ANALYSES = ("probing", "sae", "patching", "circuits", "concepts", "moe")


def tree(name: str) -> tuple[str, str]:
    """A module or package and everything under it."""
    return name, f"{name}.*"


LEAVES = ("mechkit.errors", "mechkit.sites", "mechkit.atomic", "mechkit.provenance")
# The layers above models and activations (analyses, results and everything that presents them).
ABOVE_ACTIVATIONS = (*[p for a in ANALYSES for p in tree(f"mechkit.{a}")], "mechkit.results", *tree("mechkit.viz"),
                     *tree("mechkit.report"), "mechkit.cli", "mechkit.demo")
# What an analysis package may use besides itself: the public API of the layers below it.
PUBLIC = (ROOT, *LEAVES, "mechkit.selection", "mechkit.interventions", "mechkit.config", "mechkit.results",
          "mechkit.metrics", "mechkit.models.base", "mechkit.models.load", "mechkit.models.cache",
          "mechkit.models.inputs", "mechkit.activations.store", "mechkit.activations.collect",
          "mechkit.activations.config", *tree("mechkit.tasks"), *tree("mechkit.viz"))


@dataclass(frozen=True)
class Rule:
    name: str
    sources: tuple[str, ...]
    allowed: tuple[str, ...] | None = None  # the only mechkit modules the sources may import
    forbidden: tuple[str, ...] = ()
    future: bool = False  # governs packages that need not exist yet

    def breaks(self, edge: Edge) -> bool:
        if not _matches(edge.importer, self.sources) or _same_package(edge.importer, edge.imported, self.sources):
            return False
        if self.allowed is not None and not _matches(edge.imported, self.allowed):
            return True
        return _matches(edge.imported, self.forbidden)


def _analysis_rule(name: str) -> Rule:
    others = tuple(f"mechkit.{a}" for a in ANALYSES if a != name)  # another analysis's public names only
    return Rule(f"{name} uses the public API of the lower layers only", tree(f"mechkit.{name}"),
                allowed=(*PUBLIC, *others), future=True)


RULES = (
    Rule("leaf modules import only mechkit.errors", LEAVES, allowed=(ROOT, "mechkit.errors")),
    Rule("config imports only mechkit.errors", ("mechkit.config",), allowed=(ROOT, "mechkit.errors")),
    Rule("tasks are self-contained data", tree("mechkit.tasks"), allowed=(ROOT, "mechkit.errors")),
    Rule("interventions and selection sit under models", ("mechkit.interventions", "mechkit.selection"),
         allowed=(ROOT, "mechkit.errors", "mechkit.sites", "mechkit.selection")),
    Rule("models know nothing above them", tree("mechkit.models"),
         forbidden=(*tree("mechkit.activations"), *tree("mechkit.zoo"), *tree("mechkit.tasks"), *ABOVE_ACTIVATIONS)),
    Rule("activations know nothing above them", tree("mechkit.activations"),
         forbidden=(*tree("mechkit.zoo"), *ABOVE_ACTIVATIONS)),
    Rule("the zoo trains models and knows no analysis", tree("mechkit.zoo"), forbidden=ABOVE_ACTIVATIONS),
    *(_analysis_rule(a) for a in ANALYSES),
    Rule("results rest on the leaves and draw through viz", ("mechkit.results",),
         allowed=(ROOT, "mechkit.errors", "mechkit.atomic", "mechkit.provenance", *tree("mechkit.viz"))),
    Rule("viz draws tensors: it knows no models, analyses or results", tree("mechkit.viz"),
         allowed=(ROOT, "mechkit.errors", "mechkit.atomic", *tree("mechkit.viz"))),
)

# (importer, imported) → who removes the edge, and how.
PENDING: dict[tuple[str, str], str] = {}


# -- reading the graph ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    path: str
    line: int
    resolved: bool  # the imported module (or name) exists

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _same_package(importer: str, imported: str, sources: tuple[str, ...]) -> bool:
    """Inside one source package (``mechkit.models.x`` → ``mechkit.models.y``) every import is free."""
    packages = [tree(p[:-2]) for p in sources if p.endswith(".*")]
    return any(_matches(importer, package) and _matches(imported, package) for package in packages)


def _file(module: str) -> Path | None:
    base = PACKAGE.parent / module.replace(".", "/")
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


@functools.cache
def _defined(module: str) -> frozenset[str]:
    """Names bound at the top level of ``module`` (under ``if`` / ``try`` too)."""
    path = _file(module)
    names: set[str] = set()
    body = list(ast.parse(path.read_text()).body) if path else []
    while body:
        node = body.pop()
        if isinstance(node, (ast.If, ast.Try)):
            body += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                     *[s for h in getattr(node, "handlers", []) for s in h.body]]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return frozenset(names)


def _target(base: str, name: str) -> tuple[str, bool]:
    """The module that ``from base import name`` depends on, and whether it exists."""
    if _file(f"{base}.{name}"):
        return f"{base}.{name}", True
    if _file(base) is None:
        return base, False
    if base == ROOT and name in mechkit._LAZY:
        return mechkit._LAZY[name], True
    if name == "*" or name.startswith("__") or name in _defined(base):
        return base, True
    return f"{base}.{name}", False


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _edges_of(path: Path) -> list[Edge]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str, bool]] = []
    aliases = set()  # names bound to the package root by a bare `import mechkit`
    syntax = ast.parse(path.read_text(), str(path))
    for node in ast.walk(syntax):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT:
                    aliases.add(alias.asname or ROOT)
                elif alias.name.startswith(f"{ROOT}."):
                    found.append((node.lineno, alias.name, _file(alias.name) is not None))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base == ROOT or base.startswith(f"{ROOT}."):
                found += [(node.lineno, *_target(base, alias.name)) for alias in node.names]
    for node in ast.walk(syntax):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append((node.lineno, *_target(ROOT, node.attr)))
    rel = str(path.relative_to(PACKAGE.parent))
    return [Edge(module, imported, rel, line, ok) for line, imported, ok in found if imported != module]


EDGES = list(dict.fromkeys(edge for path in sorted(PACKAGE.rglob("*.py")) for edge in _edges_of(path)))
MODULES = sorted({_module_name(p) for p in PACKAGE.rglob("*.py")})


def _report(title: str, edges: list[Edge]) -> str:
    return f"{title}:\n  " + "\n  ".join(map(str, edges))


# -- the checks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_layering(rule):
    broken = [e for e in EDGES if rule.breaks(e) and (e.importer, e.imported) not in PENDING]
    assert not broken, _report(f"imports breaking the rule '{rule.name}'", broken)


@pytest.mark.parametrize("rule", [r for r in RULES if not r.future], ids=lambda r: r.name)
def test_every_rule_governs_modules(rule):
    assert any(_matches(m, rule.sources) for m in MODULES), f"rule '{rule.name}' matches no module: {rule.sources}"


def test_every_mechkit_import_resolves():
    broken = [e for e in EDGES if not e.resolved and (e.importer, e.imported) not in PENDING]
    assert not broken, _report("imports of mechkit modules or names that do not exist", broken)
    lazy = {name: module for name, module in mechkit._LAZY.items() if _file(module) is None}
    assert not lazy, f"mechkit._LAZY names modules that do not exist: {lazy}"


@pytest.mark.parametrize(
    "edge",
    [pytest.param(edge, marks=pytest.mark.xfail(strict=True, reason=why), id=f"{edge[0]}->{edge[1]}")
     for edge, why in PENDING.items()],
)
def test_pending_edge_is_gone(edge):
    """Fails (xfail) while the edge exists; once it is gone this passes strictly: delete it from PENDING."""
    assert edge not in {(e.importer, e.imported) for e in EDGES}, f"{edge[0]} still imports {edge[1]}"


def test_the_reader_sees_function_level_and_package_imports():
    def imported_by(module):
        return {(e.imported, e.resolved) for e in EDGES if e.importer == module}

    assert ("mechkit.viz", True) in imported_by("mechkit.results")  # `from mechkit import viz` inside plot()
    assert ("mechkit.models.projections", True) in imported_by("mechkit.models.taps")  # from mechkit.models import x
    assert _target(ROOT, "load") == (mechkit._LAZY["load"], True)  # a lazy name of the root
    assert _target(ROOT, "__version__") == (ROOT, True)
    assert _target("mechkit.sites", "NoSuchName") == ("mechkit.sites.NoSuchName", False)
    rule = Rule("toy", tree("mechkit.models"), forbidden=tree("mechkit.zoo"))
    assert rule.breaks(Edge("mechkit.models.load", "mechkit.zoo.registry", "x", 1, True))
    assert not rule.breaks(Edge("mechkit.models.load", "mechkit.models.base", "x", 1, True))
