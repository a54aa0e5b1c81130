"""The library's wiring, read from its source with ``ast`` (nothing is imported):

- no import cycle among ``vlm_tokenprune`` modules, counting imports inside functions too (only
  ``if TYPE_CHECKING:`` blocks are left out; a package's ``__init__`` importing its own children is an
  edge like any other, a child's implicit import of its parent package is not);
- the core imports the library at module level only (the application layers ``cli``, ``commands/``, ``eval/``,
  ``search/``, ``train/``, ``integrations/`` may defer imports to keep ``vlm-tokenprune --help`` fast);
- no private name (``_x``) is imported from another module, and no module but ``handle.py`` reads or
  writes a handle's private attribute;
- methods never import ``adapters`` or ``eval`` (they get seams / the mask format from the engine and
  shipped files from ``assets``); the core never imports ``eval``;
- ``compat.py`` is the only module touching transformers' private attributes.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

PKG = "vlm_tokenprune"
ROOT = Path(__file__).resolve().parent.parent / PKG
APPS = ("cli", "commands", "__main__", "eval", "search", "train", "integrations")
TRANSFORMERS_PRIVATE = ("_global_mapping", "_attn_implementation", "_attn_implementation_internal")


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            skip |= {id(c) for c in ast.walk(n)}
    return skip


@functools.lru_cache(maxsize=None)
def _tree(name: str) -> ast.AST:
    return ast.parse(MODULES[name].read_text(), str(MODULES[name]))


@functools.lru_cache(maxsize=None)
def _imports(name: str) -> list:
    """``(target module, imported names, inside a function, node)`` for every library import of module ``name``."""
    return list(_iter_imports(name))


def _iter_imports(name: str):
    path = MODULES[name]
    tree = _tree(name)
    skip = _type_checking_nodes(tree)
    in_fn = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_fn |= {id(c) for c in ast.walk(n) if c is not n}
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.ImportFrom):
            if n.level:
                mod = ".".join(base[: len(base) - n.level + 1] + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            if mod == PKG or mod.startswith(PKG + "."):
                yield mod, [a.name for a in n.names], id(n) in in_fn, n
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    yield a.name, [], id(n) in in_fn, n


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for mod, names, _, _ in _imports(m):
            subs = [f"{mod}.{x}" for x in names if f"{mod}.{x}" in MODULES]
            edges[m] |= set(subs) if subs and len(subs) == len(names) else {mod} | set(subs)
            edges[m] &= set(MODULES)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _is_app(name: str) -> bool:
    return name.split(".")[1] in APPS if name.count(".") else False


def test_the_checker_finds_a_cycle_and_a_private_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    edges = _edges()
    assert "vlm_tokenprune.sites.llm" in edges["vlm_tokenprune.sites"]  # children of a package count
    assert "vlm_tokenprune.engine" in edges["vlm_tokenprune.sites.llm"]


def test_no_import_cycle_among_library_modules():
    assert _cycles(_edges()) == []


def test_core_imports_the_library_at_module_level():
    late = [f"{m}:{n.lineno} imports {mod}" for m in MODULES if not _is_app(m)
            for mod, _, in_fn, n in _imports(m) if in_fn]
    assert late == []


def test_no_private_name_imported_across_modules():
    bad = []
    for m in MODULES:
        for mod, names, _, n in _imports(m):
            for x in names:
                if x.startswith("_") and not x.startswith("__") and f"{mod}.{x}" not in MODULES:
                    bad.append(f"{m}:{n.lineno} imports {x} from {mod}")
    assert bad == []


def test_only_handle_touches_a_handles_private_attributes():
    bad = []
    for m, path in MODULES.items():
        if m == f"{PKG}.handle":
            continue
        for n in ast.walk(_tree(m)):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ("handle", "h") \
                    and n.attr.startswith("_") and not n.attr.startswith("__"):
                bad.append(f"{m}:{n.lineno} {n.value.id}.{n.attr}")
    assert bad == []


def test_methods_get_seams_from_the_engine_and_the_core_never_imports_eval():
    bad = []
    for m in MODULES:
        for mod, _, _, n in _imports(m):
            if m.startswith(f"{PKG}.methods") and mod.startswith((f"{PKG}.adapters", f"{PKG}.eval")):
                bad.append(f"{m}:{n.lineno} imports {mod}")
            if not _is_app(m) and mod.startswith(f"{PKG}.eval"):
                bad.append(f"{m}:{n.lineno} imports {mod}")
    assert bad == []


def test_one_module_owns_private_transformers_attributes():
    bad = []
    for m, path in MODULES.items():
        if m == f"{PKG}.compat":
            continue
        for n in ast.walk(_tree(m)):
            if isinstance(n, ast.Attribute) and n.attr in TRANSFORMERS_PRIVATE:
                bad.append(f"{m}:{n.lineno} .{n.attr}")
            if isinstance(n, ast.Constant) and n.value in TRANSFORMERS_PRIVATE:
                bad.append(f"{m}:{n.lineno} {n.value!r}")
    assert bad == []
