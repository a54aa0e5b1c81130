"""The shared test kit: tiny models, attention backends, batch / row helpers, budget rules, patched runs.

Test files import from here (``from kit import tiny_llava, BACKENDS, row_alone``); ``conftest.py``
holds fixtures only. Oracles (``tests/reference/``) never import the kit, which uses the library.
"""
from .backends import BACKENDS, FLASH
from .batches import cache_kwargs, left_padding, n_image_tokens, n_visual, new_tokens, row_alone
from .budget import assert_clear_cut, kept_count
from .compare import (assert_batch_equals_patched_rows_alone, assert_batch_matches_rows_alone,
                      assert_generate_matches_rows_alone)
from .families import (assert_explain_equals_trace, assert_keep_all_exact, assert_pre_llm_merge_matches_oracle, assert_unpatch_restores, k_of, n_hooks,
                       no_hook_left, positions_of)
from .models import fresh_llava, fresh_qwen, tiny_llava, tiny_qwen
from .refusals import assert_budgets_honoured, assert_patch_refused, assert_policy_refused
from .runs import generate_rows, patched_prefill

__all__ = [
    "BACKENDS", "FLASH", "assert_batch_equals_patched_rows_alone", "assert_batch_matches_rows_alone", "assert_budgets_honoured", "assert_clear_cut",
    "assert_explain_equals_trace", "assert_generate_matches_rows_alone", "assert_keep_all_exact", "assert_patch_refused", "assert_policy_refused",
    "assert_pre_llm_merge_matches_oracle", "assert_unpatch_restores",
    "cache_kwargs", "fresh_llava", "fresh_qwen", "generate_rows", "k_of", "kept_count", "left_padding", "n_hooks",
    "n_image_tokens", "n_visual", "new_tokens", "no_hook_left", "patched_prefill", "positions_of", "row_alone",
    "tiny_llava", "tiny_qwen",
]
