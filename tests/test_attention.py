"""attention_rows equals the corresponding rows of eager attention weights, under every backend."""
from __future__ import annotations

import pytest
import torch

from vlm_tokenprune.attention import attention_rows
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, make_batch

from kit import BACKENDS, tiny_llava

ROWS = [[5, "img", 7], [3, "img", 2, "img", 4]]


def _capture(model, inputs, j):
    """Input hidden states, kwargs and k_proj output of decoder layer j during one forward."""
    layer = model.model.language_model.layers[j]
    got = {}

    def pre(mod, args, kwargs):
        got["hidden"] = args[0] if args else kwargs["hidden_states"]
        got["pe"] = kwargs["position_embeddings"]

    def kp(mod, args, out):
        got["keys"] = out

    h1 = layer.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = layer.self_attn.k_proj.register_forward_hook(kp)
    with torch.no_grad():
        out = model(**inputs, output_attentions=model.config.text_config._attn_implementation == "eager")
    h1.remove()
    h2.remove()
    return layer, got, out


@pytest.fixture(scope="module")
def eager_weights():
    model = tiny_llava("eager")
    inputs = make_batch(model, ROWS)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return inputs, out.attentions  # per layer [B, H, L, L]


def _rows_and_keys(inputs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    B, L = ids.shape
    vis = ids == IMAGE_TOKEN_ID
    N = int(vis.sum(1).max())
    key_idx = torch.zeros(B, N, dtype=torch.long)
    key_ok = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        pos = vis[b].nonzero().flatten()
        key_idx[b, : len(pos)] = pos
        key_ok[b, : len(pos)] = True
    # queries: the last token and two text tokens after the image (R = 3)
    q = torch.stack([torch.tensor([L - 3, L - 2, L - 1])] * B)
    return q, key_idx, key_ok, mask


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("j", [0, 1, 3])
@pytest.mark.parametrize("captured_keys", [False, True])
def test_rows_equal_eager_weights(eager_weights, impl, j, captured_keys):
    inputs, weights = eager_weights
    model = tiny_llava(impl)  # same seed, same weights
    layer, got, _ = _capture(model, inputs, j)
    q, key_idx, key_ok, valid = _rows_and_keys(inputs)
    rows = attention_rows(layer, got["hidden"], got["pe"], q, key_idx, key_ok, valid,
                          keys=got["keys"] if captured_keys else None)
    W = weights[j]
    for b in range(q.shape[0]):
        ref = W[b][:, q[b]][:, :, key_idx[b]] * key_ok[b]
        torch.testing.assert_close(rows[b], ref, atol=2e-6, rtol=1e-4)
        # softmax over the visual keys only = eager rows renormalised over those keys
        sub = attention_rows(layer, got["hidden"], got["pe"], q, key_idx, key_ok, valid, softmax_over="keys")
        ref_sub = ref / ref.sum(-1, keepdim=True)
        torch.testing.assert_close(sub[b], ref_sub * key_ok[b], atol=2e-6, rtol=1e-4)


def test_rope_off_is_plain_dot_product(eager_weights):
    inputs, _ = eager_weights
    model = tiny_llava("eager")
    layer, got, _ = _capture(model, inputs, 1)
    q, key_idx, key_ok, valid = _rows_and_keys(inputs)
    rows = attention_rows(layer, got["hidden"], got["pe"], q[:, -1:], key_idx, key_ok, valid,
                          rope=False, softmax_over="keys")
    attn = layer.self_attn
    x = layer.input_layernorm(got["hidden"])
    H, Hkv, d = 4, 2, attn.head_dim
    for b in range(q.shape[0]):
        qq = attn.q_proj(x[b, q[b, -1]]).view(H, d)
        kk = attn.k_proj(x[b, key_idx[b]]).view(-1, Hkv, d).repeat_interleave(H // Hkv, dim=1)
        logits = torch.einsum("hd,nhd->hn", qq, kk) * attn.scaling
        logits = logits.masked_fill(~key_ok[b], float("-inf"))
        ref = torch.softmax(logits, -1).nan_to_num(0)
        torch.testing.assert_close(rows[b, :, 0], ref.detach(), atol=2e-6, rtol=1e-4)
    with_rope = attention_rows(layer, got["hidden"], got["pe"], q[:, -1:], key_idx, key_ok, valid, softmax_over="keys")
    assert not torch.allclose(with_rope, rows)
