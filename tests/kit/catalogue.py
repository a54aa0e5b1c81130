"""docs/bad-inputs.md, the catalogue of refusals: its rows, and the tests each row's last cell names."""
from __future__ import annotations

import ast
import functools
import pathlib
import re
from collections.abc import Iterable

TESTS = pathlib.Path(__file__).resolve().parent.parent


@functools.cache
def catalogue_rows() -> dict[int, str]:
    """Row number -> the row's markdown line."""
    doc = (TESTS.parent / "docs" / "bad-inputs.md").read_text(encoding="utf-8")
    return {int(m.group(1)): line for line in doc.splitlines() if (m := re.match(r"\| (\d+) \|", line))}


@functools.cache
def _test_names(file: str) -> frozenset:
    path = TESTS / f"{file}.py"
    if not path.exists():
        path = TESTS / "vllm" / f"{file}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef))


def assert_rows_name_existing_tests(numbers: Iterable[int]) -> None:
    """Each row in ``numbers`` exists and its last cell names at least one test, every one of which exists
    (``file::test``; ``::test`` = the file named before it; files in tests/ or tests/vllm/)."""
    rows = catalogue_rows()
    for n in numbers:
        assert n in rows, f"docs/bad-inputs.md has no row {n}"
        cell, file = rows[n].rstrip(" |").rsplit("|", 1)[-1], None
        for ref in re.findall(r"(test_\w+)?::(test_\w+)", cell):
            file = ref[0] or file
            assert file is not None and ref[1] in _test_names(file), (n, file, ref[1])
        assert file is not None, f"row {n} names no test"
