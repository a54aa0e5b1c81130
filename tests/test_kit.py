"""The test kit's own guarantees: oracles are independent of the library, conftest holds fixtures only,
the shared tiny models are shared and guarded, and the kit's rules say what the docs say."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kit import assert_clear_cut, fresh_llava, kept_count, row_alone, tiny_llava, tiny_qwen
from kit.models import changed_shared_models
from vlm_tokenprune.eval.tiny_models import make_batch, make_qwen_batch

TESTS = Path(__file__).parent
ORACLES = sorted((TESTS / "reference").glob("*.py")) + [TESTS / "llava_original" / "llava_oracle.py"]
# what an oracle may import: the standard library, torch, transformers and its sibling oracles
ALLOWED_ROOTS = {"__future__", "collections", "copy", "fractions", "functools", "itertools", "math", "typing",
                 "torch", "transformers"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, function-level ones included; relative ones as '.name'."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "." * node.level + (node.module or "")))
    return out


def test_oracles_import_nothing_from_the_library():
    """tests/reference/*.py (and the original-LLaVA oracle) are independent readings of the papers: no
    import of vlm_tokenprune, nor of the kit / helpers (which use it), only torch, transformers, the
    standard library and sibling oracles."""
    assert len(ORACLES) > 10
    bad = []
    for path in ORACLES:
        for line, mod in imported_modules(path):
            if mod.startswith("."):
                if not (mod == "." or (path.parent / f"{mod.lstrip('.').split('.')[0]}.py").exists()):
                    bad.append(f"{path.name}:{line} {mod}")
            elif mod.split(".")[0] not in ALLOWED_ROOTS:
                bad.append(f"{path.name}:{line} {mod}")
    assert not bad, "oracles must not import these: " + ", ".join(bad)


def test_the_import_check_can_fail(tmp_path):
    p = tmp_path / "x_oracle.py"
    p.write_text("import torch\n\ndef f():\n    from vlm_tokenprune.methods.baselines import split_budget\n")
    assert (4, "vlm_tokenprune.methods.baselines") in imported_modules(p)


def test_no_test_file_imports_conftest():
    """conftest.py holds fixtures only; shared code lives in the kit."""
    bad = [f"{p.relative_to(TESTS)}:{line}" for p in sorted(TESTS.rglob("*.py")) for line, mod in imported_modules(p)
           if mod.split(".")[0] == "conftest"]
    assert not bad, "import from kit instead of conftest: " + ", ".join(bad)


def test_shared_models_are_shared_and_fresh_copies_are_private():
    a = tiny_llava("eager")
    assert tiny_llava("eager") is a and tiny_llava("sdpa") is not a and tiny_llava("eager", layers=2) is not a
    assert tiny_qwen("eager", "2.5") is tiny_qwen("eager", "2.5")
    b = fresh_llava("eager")
    assert b is not a and all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with torch.no_grad():
        next(b.parameters()).mul_(2)  # a private copy: not a change to the shared model
    assert changed_shared_models() == []


def test_a_changed_shared_model_is_reported_and_rebuilt():
    model = tiny_llava("eager", layers=1)
    w = model.model.language_model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        w.mul_(2)
    changed = changed_shared_models()
    assert len(changed) == 1 and "q_proj" in changed[0]
    assert tiny_llava("eager", layers=1) is not model  # later tests get a new one
    with pytest.raises(ValueError, match="tweaks"):
        tiny_llava("eager", tweaks=("nope",))


def test_kept_count_is_the_documented_rule():
    assert [kept_count("keep=0.25", n) for n in (0, 1, 2, 6, 36)] == [0, 1, 1, 2, 9]  # max(1, floor(x n + 1/2))
    assert kept_count(("tokens", 5), 36) == 5 and kept_count("keep=0.125", 36) == 5  # 4.5 rounds up
    with pytest.raises(ValueError, match="budget"):
        kept_count("ratio=0.5", 36)


def test_clear_cut_fails_on_a_tie():
    assert_clear_cut([3.0, 2.0, 1.0], 2, 0.5)
    assert_clear_cut([1.0, 1.0], 2)  # no cut: everything kept
    with pytest.raises(AssertionError, match="ill-conditioned"):
        assert_clear_cut([3.0, 2.0, 2.0], 2, 1e-7)


def test_row_alone_takes_the_rows_own_images_and_videos():
    llava = tiny_llava("sdpa")
    rows = [[5, "img", 7], [2, "img", 3, "img", 4]]
    inputs = make_batch(llava, rows, seed=2)
    one = row_alone(inputs, rows, 1)
    assert torch.equal(one["pixel_values"], inputs["pixel_values"][1:3])
    assert one["input_ids"].shape[1] == int(inputs["attention_mask"][1].sum()) and bool(one["attention_mask"].all())
    zero = row_alone(inputs, rows, 0)
    assert torch.equal(zero["input_ids"][0], inputs["input_ids"][0][inputs["attention_mask"][0].bool()])
    qwen = tiny_qwen("sdpa", "2")
    rows = [[3, "img", 2, "vid", 4], [2, "img", 1]]
    q = make_qwen_batch(qwen, rows, image_grids=[(2, 3), (1, 2)], video_grids=[(2, 2, 2)])
    one = row_alone(q, rows, 1)
    assert torch.equal(one["image_grid_thw"], q["image_grid_thw"][1:]) and "video_grid_thw" not in one
    assert torch.equal(one["pixel_values"], q["pixel_values"][6 * 4:])  # after image 0's 1 x 4 x 6 patches
    with torch.no_grad():  # a row alone runs through the model as its own batch
        qwen(**row_alone(q, rows, 0))
