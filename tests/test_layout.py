"""The layout's rules (DESIGN.md "Code layout"), checked by reading the source with ``ast``.

Every rule here is one a newcomer could break without noticing: an import that points the
wrong way, a page or sweep that vanishes because its module was renamed, a cycle, a
capability reaching into another's tables.  Imports are read at module level *and* inside
functions (a deferred import is still a dependency), except for the cycle check, which is
about what Python executes at import time.
"""

from __future__ import annotations

import ast
import re
import types
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("appliance", "dicom_node", "workflows")
BANNED_NAMES = {"utils", "helpers", "manager", "misc"}

# -- reading the tree ----------------------------------------------------------------------------


@cache
def modules() -> dict[str, Path]:
    """Every module of the three packages by dotted name (packages by their ``__init__``)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if "static" in rel.parts:  # the OHIF viewer's tree, not Python of ours
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(), filename=str(modules()[name]))


def _package_of(name: str) -> str:
    return name if modules()[name].name == "__init__.py" else name.rpartition(".")[0]


def _import_targets(name: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """Dotted names an import statement reaches (``from a import b`` may name module a.b)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        parts = _package_of(name).split(".")
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    for alias in node.names:
        yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules() else base


def _own_module(target: str) -> str | None:
    """The module of ours a dotted import name lands in (None for stdlib / third party)."""
    while target:
        if target in modules():
            return target
        target = target.rpartition(".")[0]
    return None


def _top_level_nodes(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Nodes executed at import time: everything except the insides of functions."""
    stack: list[ast.AST] = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


@cache
def imports(name: str, top_level_only: bool = False) -> frozenset[str]:
    """Our modules that ``name`` imports (at import time only, or anywhere in it)."""
    nodes = _top_level_nodes(tree(name).body) if top_level_only else ast.walk(tree(name))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _import_targets(name, node):
                own = _own_module(target)
                if own and own != name:
                    out.add(own)
    return frozenset(out)


def importers_of(target: str) -> set[str]:
    return {m for m in modules() if target in imports(m)}


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def blueprint_modules() -> set[str]:
    """Modules that define a Flask Blueprint (a call to ``Blueprint(...)`` anywhere)."""
    def calls_blueprint(node: ast.AST) -> bool:
        if not isinstance(node, ast.Call):
            return False
        f = node.func
        return (isinstance(f, ast.Name) and f.id == "Blueprint") or (
            isinstance(f, ast.Attribute) and f.attr == "Blueprint")

    return {m for m in modules() if _in(m, "appliance")
            and any(calls_blueprint(n) for n in ast.walk(tree(m)))}


def capability_cli_modules() -> set[str]:
    """``appliance/<capability>/cli.py`` (the top-level ``appliance/cli.py`` is the parser)."""
    return {m for m in modules() if re.fullmatch(r"appliance\.\w+\.cli", m)}


def sweep_modules() -> set[str]:
    """Modules with a top-level ``def sweep(cfg, ...)``."""
    out = set()
    for m in modules():
        for node in tree(m).body:
            if (isinstance(node, ast.FunctionDef) and node.name == "sweep" and node.args.args
                    and node.args.args[0].arg == "cfg"):
                out.add(m)
    return out


# -- imports point one way -------------------------------------------------------------------------


def test_core_imports_only_core() -> None:
    def wrong(i: str) -> bool:
        # schema/ is SQL text, imported by the migrator (core/db.py) alone: see below.
        return _in(i, "appliance") and not (_in(i, "appliance.core") or _in(i, "appliance.schema"))

    found = {m: sorted(filter(wrong, imports(m))) for m in modules() if _in(m, "appliance.core")}
    assert {m: i for m, i in found.items() if i} == {}, \
        "core/ is the plumbing under every capability: it imports only core/ (and dicom_node, workflows)"


def test_dicom_node_and_workflows_never_import_appliance() -> None:
    wrong = {m: sorted(i for i in imports(m) if _in(i, "appliance"))
             for m in modules() if _in(m, "dicom_node") or _in(m, "workflows")}
    assert {m: i for m, i in wrong.items() if i} == {}


def test_schema_is_imported_only_by_the_migrator() -> None:
    users = {m for m in modules() if not _in(m, "appliance.schema")
             and any(_in(i, "appliance.schema") for i in imports(m))}
    assert users == {"appliance.core.db"}


# What a schema module may hold: SQL text, names of other SQL text, the MIGRATIONS list.
_SQL_VALUE_NODES = (ast.Constant, ast.Name, ast.Attribute, ast.BinOp, ast.Add, ast.Load,
                    ast.List, ast.Tuple, ast.JoinedStr, ast.FormattedValue)


def test_schema_holds_sql_text_only() -> None:
    for m in (m for m in modules() if _in(m, "appliance.schema")):
        for node in tree(m).body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # docstring
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                # Other schema modules, and the DICOM index's own SQL (dicom_node owns it).
                targets = [_own_module(t) for t in _import_targets(m, node)]
                assert all(t and (_in(t, "appliance.schema") or t == "dicom_node.index")
                           for t in targets), f"{m}:{node.lineno} imports {targets}"
                continue
            assert isinstance(node, ast.Assign | ast.AnnAssign), \
                f"{m}:{node.lineno}: only SQL text and MIGRATIONS belong in schema/"
            for part in ast.walk(node.value):
                assert isinstance(part, _SQL_VALUE_NODES), \
                    f"{m}:{node.lineno}: {type(part).__name__} is not SQL text"
                if isinstance(part, ast.Constant):
                    assert isinstance(part.value, str | int), f"{m}:{node.lineno}"
            if isinstance(node, ast.Assign) and not any(
                    isinstance(t, ast.Name) and t.id == "MIGRATIONS" for t in node.targets):
                assert not isinstance(node.value, ast.List | ast.Tuple), \
                    f"{m}:{node.lineno}: a list in schema/ other than MIGRATIONS"


# A blueprint module imported by something other than the registries. Each entry names why it
# is still here and where its fix lands; the test fails when an entry is no longer true.
KNOWN_BLUEPRINT_IMPORTS: dict[tuple[str, str], str] = {}


def test_blueprints_and_capability_clis_are_imported_only_by_their_registries() -> None:
    found = {(importer, m) for m in blueprint_modules() | capability_cli_modules()
             for importer in importers_of(m)}
    assert found == set(KNOWN_BLUEPRINT_IMPORTS), \
        "app.py / cli.py load these by name; nothing else imports a web.py or cli.py"


# -- registries: nothing vanishes without a word ------------------------------------------------------


def test_every_blueprint_module_is_registered() -> None:
    from appliance import app

    assert blueprint_modules() == set(app.BLUEPRINT_MODULES)


def test_every_capability_cli_is_registered() -> None:
    from appliance import cli

    assert capability_cli_modules() == set(cli.EXTENSION_MODULES)


def test_every_sweep_is_registered() -> None:
    from appliance.runtime import tasks

    assert sweep_modules() == set(tasks.SWEEP_MODULES)


def _stub_cfg(tmp_path: Path) -> types.SimpleNamespace:
    """Enough of a Config for the registries to run before they touch the site."""
    return types.SimpleNamespace(db_path=tmp_path / "appliance.db",
                                 queue_path=tmp_path / "queue.db")


def test_a_missing_blueprint_module_fails_create_app(monkeypatch, tmp_path: Path) -> None:
    from appliance import app

    monkeypatch.setattr(app, "BLUEPRINT_MODULES", ("appliance.no_such_web", *app.BLUEPRINT_MODULES))
    with pytest.raises(ModuleNotFoundError, match="no_such_web"):
        app.create_app(_stub_cfg(tmp_path))


def test_a_missing_cli_module_fails_the_cli(monkeypatch) -> None:
    from appliance import cli

    monkeypatch.setattr(cli, "_EXTENSIONS", [])
    monkeypatch.setattr(cli, "EXTENSION_MODULES", (*cli.EXTENSION_MODULES, "appliance.no_such.cli"))
    with pytest.raises(ModuleNotFoundError, match="no_such"):
        cli.main(["status", "--help"])


def test_a_missing_sweep_fails_the_worker(monkeypatch, tmp_path: Path) -> None:
    from appliance.runtime import tasks

    monkeypatch.setattr(tasks, "SWEEP_MODULES", (*tasks.SWEEP_MODULES, "appliance.no_such_sweep"))
    with pytest.raises(ModuleNotFoundError, match="no_such_sweep"):
        tasks.Tasks(_stub_cfg(tmp_path), immediate=True)
    # A module that exists but has lost its sweep fails too.
    monkeypatch.setattr(tasks, "SWEEP_MODULES", ("appliance.core.logs",))
    with pytest.raises(AttributeError, match="sweep"):
        tasks.sweep_steps()


# -- no cycles, honest names --------------------------------------------------------------------------


def strongly_connected(graph: dict[str, frozenset[str]]) -> list[set[str]]:
    """Tarjan's components of more than one module (iterative: the tree is deep enough)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                scc = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    scc.add(w)
                    if w == v:
                        break
                if len(scc) > 1:
                    out.append(scc)
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}),
             "d": frozenset({"a"})}
    assert strongly_connected(graph) == [{"a", "b", "c"}]


def test_no_import_cycles_at_module_level() -> None:
    graph = {m: imports(m, top_level_only=True) for m in modules() if _in(m, "appliance")}
    assert strongly_connected(graph) == []


def test_modules_are_named_for_what_they_hold() -> None:
    wrong = []
    for name, path in modules().items():
        stem = name.rpartition(".")[2]
        folder = path.parent.name if path.name != "__init__.py" else path.parent.parent.name
        if stem in BANNED_NAMES or stem.startswith(folder + "_"):
            wrong.append(name)
    assert wrong == []


# -- tables: a capability reads another's only through the owner's functions -------------------------

SQL_TABLE = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+(\w+)", re.IGNORECASE)
SQL_WRITE = re.compile(r"\b(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM|REPLACE\s+INTO)"
                       r"\s+(\w+)", re.IGNORECASE)
CREATE_TABLE = re.compile(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)")


def _string_constants(name: str) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


@cache
def table_owners() -> dict[str, str]:
    """Table → owner, from the CREATE TABLEs in schema/<owner>.py and dicom_node's index."""
    owners = {}
    sources = [(m.rpartition(".")[2], m) for m in modules()
               if _in(m, "appliance.schema") and m != "appliance.schema"]
    for owner, m in [*sources, ("dicom_node", "dicom_node.index")]:
        for _, text in _string_constants(m):
            for table in CREATE_TABLE.findall(text):
                if not re.search(r"_v\d+$", table):  # a rebuild's temporary name
                    owners[table] = owner
    return owners


def capability(name: str) -> str:
    """appliance.<capability>.module → capability (core, runtime, setup, web included)."""
    return name.split(".")[1] if name.count(".") >= 2 else "appliance"


def table_references() -> set[tuple[str, str]]:
    """(module, table) for each SQL reference in appliance to a table another part owns."""
    owners = table_owners()
    found = set()
    for m in modules():
        if not _in(m, "appliance") or _in(m, "appliance.schema"):
            continue
        for _, text in _string_constants(m):
            for table in SQL_TABLE.findall(text):
                if table in owners and owners[table] != capability(m):
                    found.add((m, table))
    return found


# The DICOM index (studies, series, instances) is the catalogue of what this box holds; dicom_node
# writes it. Reading it by SQL is allowed only for these modules, each for its reason.
INDEX_READERS = {
    "appliance.dicomweb.query": "QIDO is SQL over the index by design (match keys, fuzzy names,"
                                " includefield, paging)",
    "appliance.dicomweb.metadata": "WADO metadata is kept per instance row; its sweep finds the"
                                   " instances not yet cached",
    "appliance.dicomweb.viewer_preload": "the viewer's head start reads the study's series and"
                                         " instances to send in its first response",
    "appliance.reading.read_queue": "study completion joins the index to make read items",
    "appliance.reading.worklist": "the worklist sorts and filters read items by study fields"
                                  " (one query, not one per row)",
    "appliance.reading.web": "worklist rows show the series' body parts",
    "appliance.reports.model": "a report carries its study's identifiers",
    "appliance.reports.critical_findings": "the site's findings page shows whose study it is",
    "appliance.reports.delivery": "the SR names the study's instances as evidence",
    "appliance.reports.web": "the report list joins the study for patient and accession",
    "appliance.consults.rooms": "a consult opened from a study checks it is here and titles it",
    "appliance.accounts.admin": "the break-glass review shows whose study was opened",
    "appliance.health.series": "instances received per minute",
    "appliance.health.status_page": "studies and instances stored (/metrics)",
    "appliance.health.status_report": "modalities received today (unexpected-modality alert)",
    "appliance.patients.studies": "orders meet studies: a study's accession, UID and patient"
                                  " fields against its order; the desk lists flagged studies",
    "appliance.accounts.permissions": "the one access decision reads each study's institution"
                                      " (site: scoping) in the same query as its pool",
}
INDEX_OWNER = "dicom_node"
# core/ is not a capability: its tables (heartbeats, settings, the audit trail) are the shared
# plumbing every capability reads; only core.audit writes the audit chain (test below).
CORE_OWNER = "core"

# Reads of a capability's table that no owner's function serves yet, each with its reason.
OTHER_KNOWN_READS = {
    ("appliance.accounts.permissions", "read_items"):
        "the one access decision needs a study's pool and claim; reading imports permissions, so"
        " reading cannot be imported back: the pool should be handed in by the caller (left open)",
    ("appliance.core.notifications", "users"):
        "notify resolves user names and pools below the capabilities (core may not import"
        " accounts); pool resolution belongs in accounts, handed to notify by the caller",
    ("appliance.health.readiness", "read_items"):
        "studies_waiting counts open read items; readiness.py is being edited on the sync"
        " branch (sync lag), so it moves to a read_queue function after that lands",
}

# Sync's reads of other capabilities' tables (and theirs of sync's): none left since sync was
# split and reads through the owners' functions. Kept so a temporary exception has one place.
KNOWN_SYNC_EXCEPTIONS: set[tuple[str, str]] = set()


def test_table_owners_come_from_the_schema() -> None:
    owners = table_owners()
    assert owners["read_items"] == "reading" and owners["users"] == "accounts"
    assert owners["studies"] == owners["instances"] == INDEX_OWNER
    assert {t for t, o in owners.items() if o == CORE_OWNER} >= {"audit", "components", "settings"}


def test_a_capability_reads_another_capabilitys_tables_only_through_its_functions() -> None:
    owners = table_owners()
    refs = {(m, t) for m, t in table_references() if owners[t] != CORE_OWNER}
    index_reads = {(m, t) for m, t in refs if owners[t] == INDEX_OWNER}
    assert {m for m, _ in index_reads} - set(INDEX_READERS) == set(), \
        "a new reader of the DICOM index: use an owner's function, or add it here with its reason"
    others = refs - index_reads
    allowed = set(OTHER_KNOWN_READS) | KNOWN_SYNC_EXCEPTIONS
    assert others - allowed == set(), "read it through a function the owning capability exports"
    assert allowed - others == set(), "an exception that no longer happens: remove it from the list"
    assert set(INDEX_READERS) - {m for m, _ in index_reads} == set(), "a reader no longer reads"


def test_only_the_owner_writes_the_audit_chain_and_the_index() -> None:
    owners = table_owners()
    writers = set()
    for m in modules():
        if not _in(m, "appliance") or _in(m, "appliance.schema"):
            continue
        for line, text in _string_constants(m):
            for table in SQL_WRITE.findall(text):
                if table == "audit" and m != "appliance.core.audit":
                    writers.add((m, line, table))
                if owners.get(table) == INDEX_OWNER:
                    writers.add((m, line, table))
    assert writers == set()


def test_the_table_scan_sees_sql() -> None:
    """The scan is only as good as its pattern: it must catch the forms our SQL takes."""
    text = "SELECT r.id FROM reports r LEFT JOIN studies s ON 1 WHERE x IN (SELECT 1 FROM users)"
    assert SQL_TABLE.findall(text) == ["reports", "studies", "users"]
    assert SQL_WRITE.findall("INSERT OR IGNORE INTO audit (a) VALUES (1)") == ["audit"]
    assert ("appliance.core.db", "schema_migrations") not in table_references()
