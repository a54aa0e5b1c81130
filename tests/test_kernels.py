"""Triton kernels == their PyTorch references (``reference_ops``), run on CPU by the Triton interpreter.

The kernels are imported with ``TRITON_INTERPRET=1`` (triton decides interpreter vs compiler
when a kernel is decorated, i.e. at its module's import; torch has usually imported triton
itself long before, which is why the kernels avoid triton's own ``@jit`` library functions,
see ``kernels/_reduce.py``); the variable is restored right after, and the kernel modules
are dropped from ``sys.modules`` when this module's tests end, so nothing here changes how
other test modules run. The interpreter is ~1000x slower than
torch: every shape is tiny and odd (N not a power of two, several streaming blocks).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import ops, reference_ops as ref
from vlm_tokenprune.attention import attention_rows
from vlm_tokenprune.eval.tiny_models import make_batch

from kit import FLASH, tiny_llava

torch.set_num_threads(1)

_KERNEL_MODULES = [f"vlm_tokenprune.kernels.{n}" for n in ("_reduce", "scores", "topk", "gather")]
_before = {m: sys.modules.get(m) for m in _KERNEL_MODULES}
_env = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    from vlm_tokenprune.kernels import HAS_TRITON

    # (re)build the kernel modules now, _reduce first: their @triton.jit functions become interpreted ones
    K = {m.rsplit(".", 1)[1]: importlib.reload(sys.modules[m]) if m in sys.modules else importlib.import_module(m)
         for m in _KERNEL_MODULES} if HAS_TRITON else {}
finally:
    if _env is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _env


needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not importable (pip install -e '.[test]' installs triton==3.9.0 on Linux)")


@pytest.fixture(scope="module", autouse=True)
def _interpreted_kernels_stay_here():
    """While these tests run the interpreted kernel modules are the live ones; afterwards, the previous state."""
    yield
    pkg = sys.modules["vlm_tokenprune.kernels"]
    for m, mod in _before.items() if HAS_TRITON else ():
        name = m.rsplit(".", 1)[1]
        if mod is None:
            sys.modules.pop(m, None)
            pkg.__dict__.pop(name, None)
        else:  # imported before us (compiled mode): rebuild it the way it was
            sys.modules[m] = importlib.reload(mod)


@needs_triton
def test_setup_does_not_leak():
    assert os.environ.get("TRITON_INTERPRET") == _env
    assert ops.kernels_interpreted()


# ------------------------------------------------------------------------------------------------
# attention-row scores
# ------------------------------------------------------------------------------------------------
def _scores_case(B, H, H_kv, R, N, d, dtype, seed=0):
    """Keys = the whole sequence (L = N); queries at the last positions; padding, a dropped slot,
    an all-masked query row, a padded subset and a padded query row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, R, d, generator=g).to(dtype)
    k = torch.randn(B, H_kv, N, d, generator=g).to(dtype)
    cos = torch.randn(1, N, d, generator=g).to(dtype)
    sin = torch.randn(1, N, d, generator=g).to(dtype)
    k_valid = torch.ones(B, N, dtype=torch.bool)
    k_valid[0, :3] = False  # left padding of row 0
    k_valid[-1, N // 2] = False  # a dropped slot
    q_idx = torch.stack([torch.arange(N - R, N)] * B)
    if R > 1:
        q_idx[0, 0] = 1  # sees only padded keys: an all-masked row
    S = (N + 1) // 2
    subset = torch.stack([torch.randperm(N, generator=g)[:S].sort().values for _ in range(B)])
    subset_ok = torch.ones(B, S, dtype=torch.bool)
    subset_ok[-1, -2:] = False
    row_ok = torch.ones(B, R, dtype=torch.bool)
    row_ok[-1, -1] = R == 1  # a padded query row (R > 1)
    return q, k, q_idx, k_valid, cos, sin, subset, subset_ok, row_ok


SCORE_CASES = [  # (B, H, H_kv, R, N, d, dtype, rope, softmax_over, block)
    (2, 2, 2, 1, 13, 8, torch.float32, True, "row", None),  # GQA 1, R = 1
    (2, 4, 2, 3, 13, 8, torch.float32, True, "row", 8),  # GQA 2, R > 1, several blocks
    (1, 8, 2, 5, 21, 16, torch.float32, False, "keys", 16),  # GQA 4, no RoPE, tl.dot tiles
    (2, 4, 1, 3, 19, 8, torch.float32, True, "keys", 8),  # GQA 4, subset softmax
    (2, 4, 2, 3, 13, 8, torch.bfloat16, True, "row", None),
    (2, 4, 4, 1, 11, 8, torch.float16, True, "keys", None),
]


@needs_triton
@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: f"H{c[1]}/{c[2]}-R{c[3]}-N{c[4]}-{str(c[6])[6:]}-{c[8]}")
def test_attention_scores_match_reference(case):
    B, H, H_kv, R, N, d, dtype, rope, softmax_over, block = case
    q, k, q_idx, k_valid, cos, sin, subset, subset_ok, row_ok = _scores_case(B, H, H_kv, R, N, d, dtype)
    kw = dict(scaling=d ** -0.5, cos=cos if rope else None, sin=sin if rope else None, subset=subset,
              subset_ok=subset_ok, softmax_over=softmax_over, row_ok=row_ok)
    for reduce in ("mean", "max", "none"):
        want = ref.attention_scores(q, k, q_idx, k_valid, reduce=reduce, **kw)
        got = K["scores"].attention_scores(q, k, q_idx, k_valid, reduce=reduce, block_m=block, block_n=block, **kw)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        if reduce != "none":  # the scores select the same tokens
            kk = subset_ok.sum(1) // 2
            assert torch.equal(ref.topk(got, subset_ok, kk)[0], ref.topk(want, subset_ok, kk)[0])
    if R > 1:  # the all-masked query row has no probability anywhere
        assert ref.attention_scores(q, k, q_idx, k_valid, reduce="none", **kw)[0, :, 0].abs().sum() == 0


@needs_triton
def test_attention_scores_whole_keys_and_split_heads():
    """No subset (every key returned), pass 2 split over head groups, dispatch through ``ops``."""
    q, k, q_idx, k_valid, cos, sin, *_ = _scores_case(2, 8, 4, 2, 9, 8, torch.float32, seed=1)
    for reduce in ("mean", "max"):
        want = ops.attention_scores(q, k, q_idx, k_valid, scaling=0.3, cos=cos, sin=sin, reduce=reduce, backend="torch")
        got = K["scores"].attention_scores(q, k, q_idx, k_valid, scaling=0.3, cos=cos, sin=sin, reduce=reduce, split=3)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    got = ops.attention_scores(q, k, q_idx, k_valid, scaling=0.3, reduce="mean", backend="triton")
    torch.testing.assert_close(got, ref.attention_scores(q, k, q_idx, k_valid, scaling=0.3), atol=2e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("case", [SCORE_CASES[1], SCORE_CASES[3], SCORE_CASES[4]],
                         ids=lambda c: f"H{c[1]}/{c[2]}-R{c[3]}-N{c[4]}-{str(c[6])[6:]}-{c[8]}")
def test_attention_scores_with_row_keys_match_reference(case):
    """Per-row key sets instead of the causal rule (Gemma 3: each row its own sliding window, image rows their
    block, keys after the query included), an empty row: kernel == reference; the causal rows as row_keys ==
    no row_keys."""
    B, H, H_kv, R, N, d, dtype, rope, softmax_over, block = case
    q, k, q_idx, k_valid, cos, sin, subset, subset_ok, row_ok = _scores_case(B, H, H_kv, R, N, d, dtype)
    g = torch.Generator().manual_seed(5)
    pos = torch.arange(N)
    window = (pos[None, None, :] > q_idx[:, :, None] - 4) & (pos[None, None, :] <= q_idx[:, :, None])
    row_keys = window | (torch.rand(B, R, N, generator=g) < 0.3)  # some keys after the query
    row_keys[-1, 0] = False  # a row without any key
    kw = dict(scaling=d ** -0.5, cos=cos if rope else None, sin=sin if rope else None, subset=subset,
              subset_ok=subset_ok, softmax_over=softmax_over, row_ok=row_ok)
    causal = pos[None, None, :] <= q_idx[:, :, None]
    for reduce in ("mean", "max", "none"):
        want = ref.attention_scores(q, k, q_idx, k_valid, reduce=reduce, row_keys=row_keys, **kw)
        got = K["scores"].attention_scores(q, k, q_idx, k_valid, reduce=reduce, row_keys=row_keys, block_m=block,
                                           block_n=block, **kw)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(K["scores"].attention_scores(q, k, q_idx, k_valid, reduce=reduce, row_keys=causal,
                                                                block_m=block, block_n=block, **kw),
                                   ref.attention_scores(q, k, q_idx, k_valid, reduce=reduce, **kw), atol=2e-6, rtol=1e-5)
    assert not torch.allclose(want, ref.attention_scores(q, k, q_idx, k_valid, reduce="none", **kw))


def test_reference_scores_chunking_is_exact_enough(monkeypatch):
    """The reference's row chunking (its memory bound) does not change its result."""
    q, k, q_idx, k_valid, cos, sin, subset, subset_ok, row_ok = _scores_case(2, 4, 2, 5, 13, 8, torch.float32)
    kw = dict(scaling=0.3, cos=cos, sin=sin, subset=subset, subset_ok=subset_ok, row_ok=row_ok)
    whole = {r: ref.attention_scores(q, k, q_idx, k_valid, reduce=r, **kw) for r in ("mean", "max")}
    monkeypatch.setattr(ref, "SCORES_CHUNK_ELEMENTS", 2 * 4 * 13 * 2)  # 2 rows per chunk
    for r, want in whole.items():
        torch.testing.assert_close(ref.attention_scores(q, k, q_idx, k_valid, reduce=r, **kw), want, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# top-k
# ------------------------------------------------------------------------------------------------
def _topk_inputs(seed, B, N, dtype=torch.float32, ties=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 4, (B, N), generator=g).float() if ties else torch.randn(B, N, generator=g)
    valid = torch.rand(B, N, generator=g) > 0.25
    return s.to(dtype), valid


@needs_triton
@pytest.mark.parametrize("N,block,ties", [
    (1, None, False), (7, None, True), (37, None, False), (37, None, True),
    (45, 16, True), (70, 64, False),  # streaming over blocks (rows longer than a block)
])
def test_topk_identical_to_reference(N, block, ties):
    s, valid = _topk_inputs(N, 4, N, ties=ties)
    valid[1] = False  # an all-masked row: keeps nothing
    n_valid = valid.sum(1)
    k = torch.stack([n_valid[0] // 2, torch.tensor(0), n_valid[2], torch.minimum(n_valid[3], torch.tensor(3))])
    want = ref.topk(s, valid, k)
    got = K["topk"].topk(s, valid, k, block=block)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
def test_topk_special_values_and_budgets():
    """k = 0 everywhere, k = N (everything valid), ties at -inf / +-0 / NaN, bf16 and fp16 scores."""
    s = torch.tensor([[0.0, -0.0, 1.0, float("nan"), -float("inf"), 1.0, float("inf"), -0.0, 2.5]])
    for valid in (torch.ones_like(s, dtype=torch.bool), torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1, 1]]).bool()):
        for kk in range(int(valid.sum()) + 1):
            k = torch.tensor([kk])
            want, got = ref.topk(s, valid, k), K["topk"].topk(s, valid, k)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kk
    s, valid = _topk_inputs(3, 3, 23)
    zero = torch.zeros(3, dtype=torch.long)
    idx, ok = ops.topk(s, valid, zero, backend="triton")
    assert idx.shape == (3, 0) and ok.shape == (3, 0)
    full = torch.full((3,), 23)
    everything = torch.ones(3, 23, dtype=torch.bool)
    assert torch.equal(ops.topk(s, everything, full, backend="triton")[0], torch.arange(23).expand(3, 23))
    for dtype in (torch.bfloat16, torch.float16):
        sd, vd = _topk_inputs(5, 3, 29, dtype=dtype)  # low precision: many exact ties
        k = torch.tensor([4, 9, 1])
        assert torch.equal(K["topk"].topk(sd, vd, k)[0], ref.topk(sd, vd, k)[0])


# ------------------------------------------------------------------------------------------------
# gathers and scatters
# ------------------------------------------------------------------------------------------------
@needs_triton
def test_gather_one_launch_matches_reference():
    g = torch.Generator().manual_seed(0)
    B, L, D, d = 2, 11, 24, 6
    hidden = torch.randn(B, L, D, generator=g).to(torch.bfloat16)
    cos = torch.randn(1, L, d, generator=g)  # batch broadcast
    sin = torch.randn(B, L, d, generator=g)[:, :, ::2]  # non-contiguous
    pos3 = torch.randint(0, 50, (3, B, L), generator=g)  # M-RoPE position ids
    pos = torch.arange(L)[None]  # [1, L]
    mask = torch.rand(B, L, generator=g) > 0.3
    idx = torch.tensor([[0, 0, 4, 5, 9, 10, 1], [2, 3, 4, 6, 7, 8, 10]])
    ok = torch.ones_like(idx, dtype=torch.bool)
    ok[0, :2] = False
    tensors = [hidden, cos, None, sin, pos3, pos, mask]
    dims = [1, 1, 1, 1, -1, -1, 1]
    zero = [False, False, False, False, False, False, True]
    want = ops.gather_tokens(idx, tensors, dims=dims, ok=ok, zero_invalid=zero, backend="torch")
    got = K["gather"].gather_tokens(idx, tensors, dims=dims, ok=ok, zero_invalid=zero, block_m=4, block_w=8)
    for w, h in zip(want, got):
        assert (w is None and h is None) or (w.dtype == h.dtype and torch.equal(w, h))
    assert want[6][0, :2].sum() == 0  # dropped slots masked
    empty = K["gather"].gather_tokens(idx[:, :0], [hidden], dims=[1], zero_invalid=[False])[0]
    assert empty.shape == (B, 0, D)


@needs_triton
def test_scatter_and_weighted_scatter_add_match_reference():
    g = torch.Generator().manual_seed(0)
    B, M, L, D = 2, 5, 9, 7
    src = torch.randn(B, M, D, generator=g)
    idx = torch.tensor([[0, 2, 3, 7, 8], [1, 4, 5, 6, 8]])
    ok = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]]).bool()
    base = torch.randn(B, L, D, generator=g)
    assert torch.equal(K["gather"].scatter_tokens(src, idx, L, ok=ok, base=base, block_m=2),
                       ref.scatter_tokens(src, idx, L, ok=ok, base=base))
    assert torch.equal(ops.scatter_tokens(src.half(), idx, L, backend="triton"), ref.scatter_tokens(src.half(), idx, L))
    dup = torch.tensor([[0, 0, 3, 3, 3], [8, 1, 8, 1, 4]])  # merging: repeated destinations
    w = torch.rand(B, M, generator=g)
    want = ref.scatter_add_tokens(src.bfloat16(), dup, L, weight=w, ok=ok, base=base)
    got = K["gather"].scatter_add_tokens(src.bfloat16(), dup, L, weight=w, ok=ok, base=base, block_w=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # gather then scatter back is the identity on the gathered slots
    h = torch.randn(B, L, D, generator=g)
    back = ops.scatter_tokens(ops.gather_tokens(idx, [h], backend="triton")[0], idx, L, base=torch.zeros_like(h), backend="triton")
    assert torch.equal(back[0, idx[0]], h[0, idx[0]])


# ------------------------------------------------------------------------------------------------
# the whole FastV path: backend="triton" == backend="torch"
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    return {impl: tiny_llava(impl) for impl in ("sdpa", FLASH)}


def _run(model, inputs, policy, backend):
    with vtp.patch(model, policy, backend=backend) as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    return logits, [s.kept_positions for s in trace.stages]


@needs_triton
@pytest.mark.parametrize("impl,policy", [
    ("sdpa", "fastv:layer=2,keep=0.5"),  # 4-D masks; hidden states join the kwargs' gather
    (FLASH, "fastv:layer=1,keep=0.5+fastv:layer=3,keep=0.25"),  # 2-D mask gathered in the same launch; 2nd stage
])
def test_fastv_triton_backend_equals_torch(models, impl, policy):
    model = models[impl]
    inputs = make_batch(model, [[5, "img", 7], [3, "img", 2, "img", 4]])  # batch 2, left padding
    want_logits, want_keep = _run(model, inputs, policy, "torch")
    got_logits, got_keep = _run(model, inputs, policy, "triton")
    assert got_keep == want_keep
    assert torch.equal(got_logits, want_logits)
    # not vacuous: another budget keeps other tokens
    assert _run(model, inputs, policy.replace("keep=0.5", "keep=0.3"), "torch")[1] != want_keep


@needs_triton
def test_gemma3_several_rows_at_a_sliding_layer_triton_equals_torch():
    """EfficientVLA's instruction rows at a Gemma 3 sliding layer on a prompt 6x the window (per-row key sets from the
    layer's own mask, streamed by the kernel): the torch backend's kept tokens (== oracle in test_gemma3)."""
    from vlm_tokenprune.eval.tiny_gemma3 import build_tiny_gemma3, make_gemma3_batch

    model = build_tiny_gemma3("sdpa")
    inputs = make_gemma3_batch(model, [[3, "img", 2, "img", 6], [2, "img", 5]])
    want_logits, want_keep = _run(model, inputs, "efficientvla:layer=2,keep=0.3", "torch")
    got_logits, got_keep = _run(model, inputs, "efficientvla:layer=2,keep=0.3", "triton")
    assert got_keep == want_keep
    torch.testing.assert_close(got_logits, want_logits, atol=1e-6, rtol=0)


@needs_triton
def test_attention_rows_triton_equals_torch_on_a_layer(models):
    """Per-head rows (``ctx.attention``) for several query rows, both softmax modes, captured keys or not."""
    model = models["sdpa"]
    inputs = make_batch(model, [[5, "img", 7], [3, "img", 2, "img", 4]])
    layer = model.model.language_model.layers[1]
    got = {}
    hook = layer.register_forward_pre_hook(
        lambda m, a, kw: got.update(hidden=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    B, L = ids.shape
    key_idx = torch.stack([torch.arange(2, L - 3)] * B)
    key_ok = valid.gather(1, key_idx)
    q = torch.stack([torch.tensor([L - 3, L - 2, L - 1])] * B)
    keys = layer.self_attn.k_proj(layer.input_layernorm(got["hidden"]))
    for softmax_over, k in (("row", None), ("keys", keys)):
        for reduce in ("none", "max"):
            args = (layer, got["hidden"], got["pe"], q, key_idx, key_ok, valid)
            kw = dict(softmax_over=softmax_over, keys=k, reduce=reduce)
            with torch.no_grad():
                want = attention_rows(*args, backend="torch", **kw)
                out = attention_rows(*args, backend="triton", **kw)
            torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# backend errors: at patch() time, naming the field, before any hook
# ------------------------------------------------------------------------------------------------
@needs_triton
def test_triton_backend_refused_where_kernels_cannot_run(models, monkeypatch):
    model = models["sdpa"]
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    # triton present but the kernels compiled for the GPU (no TRITON_INTERPRET at their import): CPU refused
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pkg = sys.modules["vlm_tokenprune.kernels"]
    for m in _KERNEL_MODULES:
        monkeypatch.delitem(sys.modules, m)
        monkeypatch.delattr(pkg, m.rsplit(".", 1)[1], raising=False)
    assert not ops.kernels_interpreted()
    with pytest.raises(vtp.PolicyError, match="TRITON_INTERPRET=1") as e:
        vtp.patch(model, "fastv", backend="triton")
    assert e.value.field == "backend"
    with pytest.raises(vtp.PolicyError, match="backend"):
        ops.topk(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]), backend="triton")
    monkeypatch.undo()  # the interpreted modules are the live ones again
    assert ops.kernels_interpreted()
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


def test_triton_backend_without_triton_is_refused_at_patch(monkeypatch):
    from vlm_tokenprune import kernels

    model = tiny_llava("sdpa", layers=2)
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    for backend in ("auto", "torch"):
        vtp.patch(model, "fastv:layer=1", backend=backend).unpatch()
    with pytest.raises(vtp.PolicyError, match="needs the triton package") as e:
        vtp.patch(model, "fastv:layer=1", backend="triton")
    assert e.value.field == "backend" and "pip install" in str(e.value)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_package_imports_without_triton():
    """A fresh interpreter where ``import triton`` fails: ``import vlm_tokenprune`` works, never imports
    triton, and ``backend="triton"`` is a PolicyError naming the field."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import vlm_tokenprune as vtp
        from vlm_tokenprune import kernels, ops
        assert kernels.HAS_TRITON is False
        ops.check_backend("auto"), ops.check_backend("torch")
        try:
            ops.check_backend("triton")
        except vtp.PolicyError as e:
            assert e.field == "backend", e
            print("REFUSED", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "REFUSED backend: 'triton' needs the triton package" in r.stdout, r.stdout
