"""Hostile inputs, round 2 (issue 15, items 5-7; docs/bad-inputs.md rows 67-86): silent wrong results become
the unpatched behaviour or a named refusal, crashes become named errors, and a fixed policy serves every valid
input (a row it cannot reduce keeps its visual tokens, recorded in the trace; ``strict=True`` refuses)."""
from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError, InputError, Policy, PolicyError, UnsupportedModelError
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava("sdpa")


def no_pixels(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "pixel_values"}


# -- item 5: silent wrong results ------------------------------------------------------------------------
def test_image_placeholders_without_pixels_are_text_like_the_unpatched_model(llava):
    """Row 67: image_token_id in input_ids but no pixels / features: the unpatched model embeds them as text,
    so the patched one passes them untouched (old main pruned them as visual tokens)."""
    inputs = no_pixels(make_batch(llava, [[5, "img", 7], [3, "img", 4]]))
    with torch.no_grad():
        ref = llava(**inputs).logits
        with vtp.patch(llava, "fastv:layer=2,keep=0.25") as h:
            out = llava(**inputs).logits
            trace = h.last_trace()
    assert trace.phase == "passthrough" and trace.stages == []
    assert torch.equal(out, ref)


def test_qwen_placeholders_without_pixels_are_text_too():
    """Row 120 on Qwen2-VL: image placeholders without pixel_values / image_grid_thw."""
    from vlm_tokenprune.eval.tiny_models import build_tiny_qwen2_vl, make_qwen_batch

    model = build_tiny_qwen2_vl("sdpa")
    inputs = make_qwen_batch(model, [[3, "img", 4], [2, "img", 5]], image_grids=[(2, 3), (3, 2)])
    inputs = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtp.patch(model, "fastv:layer=2,keep=0.25") as h:
            out = model(**inputs).logits
            assert h.last_trace().phase == "passthrough"
    assert torch.equal(out, ref)


def test_vision_stage_refuses_features_from_another_tower_call():
    """Row 51 after a first run: features made by an earlier tower call (another image) get a named refusal
    instead of the last call's kept set; the features of the last call are accepted."""
    import inspect

    model = build_tiny_llava("sdpa", vision_layers=6)
    if "mm_encoder_outputs" not in inspect.signature(type(model).forward).parameters:
        pytest.skip("this transformers runs the tower inside every forward (no precomputed mm_encoder_outputs)")
    a = make_batch(model, [[5, "img", 7]], seed=0)
    b = make_batch(model, [[5, "img", 7]], seed=1)
    kw = dict(vision_feature_layer=model.config.vision_feature_layer, vision_feature_select_strategy="default",
              return_dict=True)
    with vtp.patch(model, "flowcut_vit:tokens=8") as h, torch.no_grad():
        enc_b = model.model.get_image_features(pixel_values=b["pixel_values"], **kw)
        ref_b = model(**b).logits  # the tower runs again on b's pixels
        enc_b = model.model.get_image_features(pixel_values=b["pixel_values"], **kw)
        assert torch.equal(model(**no_pixels(b), mm_encoder_outputs={"image": enc_b}).logits, ref_b)
        model(**a)  # a later tower call, on another image
        with pytest.raises(InputError) as e:
            model(**no_pixels(b), mm_encoder_outputs={"image": enc_b})
        assert e.value.field == "pixel_values" and "mm_encoder_outputs" in str(e.value)
        assert h.last_trace() is not None and torch.equal(model(**b).logits, ref_b)


def test_dict_params_cannot_override_stage_fields():
    """Row 68: params {keep, layer, criterion, ...} silently replaced the stage's own fields."""
    for key, value in (("keep", 0.1), ("layer", 3), ("criterion", "random"), ("tokens", 4), ("site", "pre_llm")):
        spec = {"stages": [{"criterion": "fastv", "layer": 2, "keep": 0.5, "params": {key: value}}]}
        with pytest.raises(PolicyError) as e:
            Policy.parse(spec)
        assert e.value.field == f"stages[0].params.{key}"


def test_calibration_file_with_more_layers_than_the_model_is_refused(llava, tmp_path):
    """Row 69: a valid header (this model's config hash) over data of another shape, or corrupt data."""
    good = tmp_path / "layers.json"
    vtp.calibrate(llava, [make_batch(llava, [[5, "img", 7]])], what="layers", path=str(good), progress=False)
    art = json.loads(good.read_text())
    n = len(art["importance"])
    for name, importance in (("more", art["importance"] + [0.5, 0.5]), ("strings", ["x"] * n), ("nan", [float("nan")] * n)):
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps({**art, "importance": importance}))
        with pytest.raises(PolicyError) as e:
            vtp.patch(llava, f"efficientvla_layers:calibration={bad},layers_kept=3,of=4")
        assert e.value.field == "stages[0].calibration.importance", name
    missing = tmp_path / "missing_key.json"
    missing.write_text(json.dumps({k: v for k, v in art.items() if k != "importance"}))
    with pytest.raises(PolicyError) as e:
        vtp.patch(llava, f"efficientvla_layers:calibration={missing},layers_kept=3,of=4")
    assert e.value.field == "stages[0].calibration.importance"
    non_utf8 = tmp_path / "latin1.json"
    non_utf8.write_bytes(b'{"format": "caf\xe9"}')
    with pytest.raises(PolicyError) as e:
        vtp.patch(llava, f"efficientvla_layers:calibration={non_utf8},layers_kept=3,of=4")
    assert e.value.field == "stages[0].calibration"
    assert not vtp.is_patched(llava) if hasattr(vtp, "is_patched") else True


def test_aim_tiny_tau_does_not_zero_every_score(llava):
    """Row 70: aim:tau=1e-300 overflowed logits / tau to inf, so every score was 0 (kept set = first k)."""
    from vlm_tokenprune.methods.aim import pagerank_importance

    layer = llava.model.language_model.layers[1]
    torch.manual_seed(0)
    hidden = torch.randn(1, 12, llava.config.text_config.hidden_size)
    rot = llava.model.language_model.rotary_emb
    pe = rot(hidden, torch.arange(12)[None])
    valid = torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        tiny = pagerank_importance(layer, hidden, pe, valid, tau=1e-300)
        small = pagerank_importance(layer, hidden, pe, valid, tau=1e-30)
    assert bool((tiny > 0).any()) and torch.allclose(tiny, small)
    for bad in ("inf", "nan"):
        with pytest.raises(PolicyError) as e:
            Policy.parse(f"aim:layer=2,keep=0.5,tau={bad}")
        assert e.value.field == "stages[0].tau"


# -- item 6: crashes -> named errors ---------------------------------------------------------------------
def test_policy_survives_pickle_deepcopy_and_torch_save():
    """Row 71: a Policy (mappingproxy params) could not be pickled / deep-copied / torch.save'd."""
    pol = Policy.parse("fastv:layer=2,keep=0.5+feather:layer=3,keep=0.25,stride=2")
    buf = io.BytesIO()
    torch.save(pol, buf)
    buf.seek(0)
    for other in (pickle.loads(pickle.dumps(pol)), copy.deepcopy(pol), torch.load(buf, weights_only=False)):
        assert other == pol and other.to_string() == pol.to_string()


def test_patched_model_copy_pickle_save_are_named_errors(llava):
    """Row 72: deepcopy / pickle / torch.save of a patched model (hooks hold the handle): a named refusal;
    state_dict() saves, and after unpatch() the model copies as usual."""
    inputs = make_batch(llava, [[5, "img", 7]])
    with vtp.patch(llava, "fastv:layer=2,keep=0.5") as h:
        for fn in (lambda: copy.deepcopy(llava), lambda: pickle.dumps(llava), lambda: torch.save(llava, io.BytesIO())):
            with pytest.raises(UnsupportedModelError) as e:
                fn()
            assert e.value.field == "model" and "unpatch()" in str(e.value)
        torch.save(llava.state_dict(), io.BytesIO())
        with torch.no_grad():
            llava(**inputs)  # still serves
    twin = copy.deepcopy(llava)
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, llava(**inputs).logits)
    assert h.active is False


@pytest.mark.parametrize("spec,field", [("random:layer=2,keep=0.5,seed=100000000000000000000000", "stages[0].seed"),
                                        ("feather:layer=2,keep=0.5,stride=100000000000000000000", "stages[0].stride")])
def test_parameters_that_failed_at_the_first_forward_fail_at_parse(spec, field):
    """Row 73: values torch cannot hold (int64) were accepted and crashed inside the first forward."""
    with pytest.raises(PolicyError) as e:
        Policy.parse(spec)
    assert e.value.field == field


def test_deep_nesting_and_files(tmp_path):
    """Rows 74-76: deeply nested JSON / YAML (RecursionError), non-UTF-8 files, missing paths ("must be a
    mapping"), duplicated keys (last one silently won)."""
    deep = '{"stages": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(PolicyError) as e:
        Policy.from_json(deep)
    assert e.value.field == "policy" and "nested" in str(e.value)
    with pytest.raises(PolicyError) as e:
        Policy.from_yaml("stages: " + "[" * 5000 + "]" * 5000)
    assert e.value.field == "policy"
    latin = tmp_path / "p.yaml"
    latin.write_bytes(b"stages:\n  - {criterion: fastv, layer: 2, keep: 0.5}  # caf\xe9\n")
    with pytest.raises(PolicyError) as e:
        Policy.from_file(str(latin))
    assert "UTF-8" in str(e.value)
    for name in ("nowhere.yaml", "nowhere.json"):
        with pytest.raises(PolicyError) as e:
            Policy.from_file(str(tmp_path / name))
        assert "no such file" in str(e.value)
    # duplicated keys: an error in every syntax
    with pytest.raises(PolicyError) as e:
        Policy.parse("fastv:layer=2,keep=0.5,keep=0.25")
    assert e.value.field == "stages[0].keep"
    with pytest.raises(PolicyError) as e:
        Policy.from_json('{"stages": [{"criterion": "fastv", "layer": 2, "keep": 0.5, "keep": 0.25}]}')
    assert e.value.field == "policy.keep"
    with pytest.raises(PolicyError) as e:
        Policy.from_yaml("stages:\n  - criterion: fastv\n    layer: 2\n    keep: 0.5\n    keep: 0.25\n")
    assert e.value.field == "policy.keep"


def test_corrupt_weight_files_with_a_valid_header(llava, tmp_path):
    """Row 77: a safetensors file with vlm_tokenprune's metadata and this model's hash but missing / misshapen
    tensors or hyper-parameters: a PolicyError naming the weights, no raw KeyError / RuntimeError."""
    from vlm_tokenprune.learned.artifact import save_weights

    for kind, hp in (("covipal", {"in_dim": 1}), ("covipal", {}), ("atp", {}), ("atp", {"hidden_size": 3})):
        f = tmp_path / f"{kind}_{len(hp)}.safetensors"
        save_weights(str(f), kind, {"w": torch.zeros(2, 2)}, hp, llava)
        with pytest.raises(PolicyError) as e:
            vtp.patch(llava, f"{kind}:keep=0.5,weights={f}")
        assert e.value.field == "stages[0].weights"
    assert not any(m._forward_pre_hooks for m in llava.modules())


def test_patching_an_inner_module_is_a_named_error(llava):
    """Row 78: patch(model.model) raised AttributeError."""
    with pytest.raises(UnsupportedModelError) as e:
        vtp.patch(llava.model, "fastv:layer=2,keep=0.5")
    assert e.value.field == "model" and "patch(model)" in str(e.value)


def test_return_dict_false_then_decoding_on_its_cache(llava):
    """Row 79: a plain-tuple prefill output's cache was not recognised, so decoding on it crashed."""
    inputs = make_batch(llava, [[5, "img", 7], [3, "img", 4]])
    nxt = torch.tensor([[5], [6]])
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    with vtp.patch(llava, "fastv:layer=2,keep=0.25") as h, torch.no_grad():
        d = llava(**inputs, use_cache=True)
        ref = llava(input_ids=nxt, attention_mask=mask, past_key_values=d.past_key_values if hasattr(d, "past_key_values") and d.past_key_values is not None else d["cache"]).logits
        t = llava(**inputs, use_cache=True, return_dict=False)
        cache = next(o for o in t if hasattr(o, "get_seq_length"))
        out = llava(input_ids=nxt, attention_mask=mask, past_key_values=cache, return_dict=False)[0]
        assert h.last_trace().phase == "decode"
    assert torch.equal(out, ref)


# -- item 7: fixed policies in serving code ---------------------------------------------------------------
def test_budget_above_a_rows_visual_tokens_keeps_that_row(llava):
    """Row 25 / 61 in serving mode: the row keeps all its visual tokens for that stage, the trace says which row
    and why; strict=True is the old InputError. The other rows are pruned as before."""
    inputs = make_batch(llava, [[5, "img", 7], [3, "img", 2, "img", 4]])  # 36 and 72 visual tokens
    with torch.no_grad():
        with vtp.patch(llava, "fastv:layer=2,tokens=40") as h:
            out = llava(**inputs).logits
            st = h.last_trace().stages[0]
        assert st.visual_after == [36, 40] and list(st.kept_all) == [0] and "above" in st.kept_all[0]
        with vtp.patch(llava, "fastv:layer=2,tokens=40", strict=True) as h:
            with pytest.raises(InputError) as e:
                llava(**inputs)
            assert e.value.field == "stages[0].tokens"
        with vtp.patch(llava, "aim_merge:tokens=40") as h:
            llava(**inputs)
            st = h.last_trace().stages[0]
        assert st.visual_after[0] == 36 and list(st.kept_all) == [0]
        # the row alone, unpruned for that stage, equals the unpatched row (FastV keeps everything for it)
        alone = make_batch(llava, [[5, "img", 7]])
        with vtp.patch(llava, "fastv:layer=2,tokens=40"):
            one = llava(**alone).logits
        assert torch.allclose(one, llava(**alone).logits, atol=1e-5)
    assert out.shape[0] == 2


def test_text_guided_criterion_without_text_keeps_that_row(llava):
    """A text-guided criterion (efficientvla) on a row with no text after its image: that row keeps all its
    visual tokens (recorded), the other row is pruned; strict=True refuses, naming the criterion."""
    inputs = make_batch(llava, [[5, "img"], [3, "img", 6]])
    with vtp.patch(llava, "efficientvla:layer=2,tokens=8") as h, torch.no_grad():
        llava(**inputs)
        st = h.last_trace().stages[0]
    assert st.visual_after == [36, 8] and list(st.kept_all) == [0] and "text" in st.kept_all[0]
    with vtp.patch(llava, "efficientvla:layer=2,tokens=8", strict=True), torch.no_grad():
        with pytest.raises(InputError) as e:
            llava(**inputs)
        assert e.value.field == "stages[0].criterion"
    with pytest.raises(PolicyError) as e:
        vtp.patch(llava, "fastv", strict="yes")
    assert e.value.field == "strict"


@pytest.mark.parametrize("policy,changes", [
    ("fastv:layer=2,keep=0.25", False), ("aim_merge:keep=0.25", False), ("visual_drop:layer=2", False),
    ("skip_layers:layers=2,scope=visual", False), ("prune_heads:heads=1/0", False),
    ("neighbor_attention:window=3", False),
    ("ffn_cut:ratio=2", False),
    ("skip_layers:layers=2", True), ("prune_heads:heads=1/0,scope=all", True),
])
def test_text_only_inputs(llava, policy, changes):
    """What applies to a text-only input (README "Text-only inputs"): token stages and visual-scope
    structural ops (ffn_cut, neighbor_attention, scope=visual) pass it untouched; weight-level ops
    (skip_layers / prune_heads with scope=all)
    change every token, text included, exactly as they do for the text of a multimodal prompt."""
    text = make_batch(llava, [[9], [6]])
    with torch.no_grad():
        ref = llava(**text).logits
        with vtp.patch(llava, policy) as h:
            out = llava(**text).logits
            assert h.last_trace().stages == []
    assert torch.equal(out, ref) != changes


# -- the catalogue ---------------------------------------------------------------------------------------
def test_catalogue_rows_of_this_round_name_existing_tests():
    """docs/bad-inputs.md rows 120-139 (this round) each name tests that exist (``file::test``, ``::test`` = same file)."""
    from kit.catalogue import assert_rows_name_existing_tests, catalogue_rows

    assert [n for n in catalogue_rows() if 120 <= n <= 139] == list(range(120, 140))
    assert_rows_name_existing_tests(range(120, 140))
