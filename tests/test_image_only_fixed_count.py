"""``Criterion.image_only_fixed_count``: the criteria a serving engine may run per image before the LLM
(the kept set needs only the visual tokens, each image's count follows from the budget)."""
from __future__ import annotations

from vlm_tokenprune.registry import CRITERIA


def test_flagged_criteria():
    flagged = {name for name, crit in CRITERIA.items() if crit.image_only_fixed_count}
    assert flagged == {"visionzip", "vispruner", "divprune", "aim_merge", "uniform", "random"}
    for name in flagged:  # each runs before the language model
        assert {"pre_llm", "vision"} & set(CRITERIA.get(name).sites), name
    assert not CRITERIA.get("fastv").image_only_fixed_count and not CRITERIA.get("dart").image_only_fixed_count
