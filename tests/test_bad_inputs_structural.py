"""The bad-input catalogue (docs/bad-inputs.md, rows 34-65) over structural ops, pre-LLM stages,
calibration files and learned-weight files: every refusal names its field and happens in
``patch()`` before anything on the model changes (no hook, same state dict, same forwards, same
attention backend), so the same model then serves an unpatched forward exactly as before.
"""
from __future__ import annotations

import json

import pytest
import torch
from kit import FLASH, tiny_llava, tiny_qwen

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError, PolicyError, UnsupportedModelError
from vlm_tokenprune.eval.tiny_models import (
    make_batch,
)

ROWS = [[5, "img", 7], [3, "img", 2, "img", 4]]


def fingerprint(model) -> dict:
    """Everything patch() could touch: hooks, instance attributes, parameters and buffers, attention backend."""
    return {
        "hooks": [(n, tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for n, m in model.named_modules()],
        "instance": [(n, sorted(k for k in vars(m) if not k.startswith("_")), id(m.__dict__.get("forward")))
                     for n, m in model.named_modules()],
        "state": {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()},
        "attn": (model.config._attn_implementation, model.config.get_text_config()._attn_implementation),
    }


def assert_untouched(model, before: dict) -> None:
    after = fingerprint(model)
    assert after["hooks"] == before["hooks"] and after["instance"] == before["instance"]
    assert after["attn"] == before["attn"]
    assert after["state"].keys() == before["state"].keys()
    for k, (ptr, value) in before["state"].items():
        assert after["state"][k][0] == ptr and torch.equal(after["state"][k][1], value), k


@pytest.fixture(scope="module")
def models():
    return {"llava": tiny_llava("sdpa"), "other": tiny_llava("sdpa", layers=6),
            "flash": tiny_llava(FLASH), "qwen2_vl": tiny_qwen("sdpa")}


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    """Calibration and learned-weight files, good and bad, for the tiny LLaVA."""
    from safetensors.torch import save_file

    from vlm_tokenprune.learned.artifact import save_weights

    d = tmp_path_factory.mktemp("bad_files")
    llava, other = models["llava"], models["other"]
    batches = [make_batch(llava, ROWS)]
    f = {k: str(d / v) for k, v in {
        "heads": "heads.json", "layers": "layers.json", "other_heads": "other_heads.json", "not_json": "not.json",
        "foreign_json": "foreign.json", "covipal_w": "covipal.safetensors", "other_atp": "other_atp.safetensors",
        "not_st": "weights.safetensors", "plain_st": "plain.safetensors"}.items()}
    vtp.calibrate(llava, batches, what="heads", path=f["heads"], progress=False)
    vtp.calibrate(llava, batches, what="layers", path=f["layers"], progress=False)
    vtp.calibrate(other, [make_batch(other, ROWS)], what="heads", path=f["other_heads"], progress=False)
    (d / "not.json").write_text("{ this is not json")
    (d / "foreign.json").write_text(json.dumps({"importance": [0.1, 0.2]}))
    w = {"w": torch.zeros(2, 2)}
    save_weights(f["covipal_w"], "covipal", w, {}, llava)
    save_weights(f["other_atp"], "atp", w, {}, other)
    (d / "weights.safetensors").write_bytes(b"not a safetensors file at all")
    save_file(w, f["plain_st"])  # a safetensors file without our metadata
    f["missing"] = str(d / "missing.json")
    return f


# (test id, model, policy (formatted with the files), error, field)
CASES = [
    # structural stages
    ("skip_layers beyond the model", "llava", "skip_layers:layers=2;7", IncompatiblePolicyError, "stages[0].layers"),
    ("skip_layers layer 0 for all tokens", "llava", "skip_layers:layers=0", IncompatiblePolicyError, "stages[0].layers"),
    ("prune_heads head beyond the model", "llava", "prune_heads:heads=1/4", IncompatiblePolicyError, "stages[0].heads"),
    ("prune_heads layer beyond the model", "llava", "prune_heads:heads=9/0", IncompatiblePolicyError, "stages[0].heads"),
    ("prune_heads every head, scope=all", "llava", "prune_heads:heads=1/0;1/1;1/2;1/3,scope=all",
     IncompatiblePolicyError, "stages[0].heads"),
    ("prune_heads malformed pairs", "llava", "prune_heads:heads=1-0", PolicyError, "stages[0].heads"),
    ("ffn_cut ratio below 1", "llava", "ffn_cut:ratio=0.5", PolicyError, "stages[0].ratio"),
    ("ffn_cut layer beyond the model", "llava", "ffn_cut:layers=1;4", IncompatiblePolicyError, "stages[0].layers"),
    ("neighbor_attention even window", "llava", "neighbor_attention:window=4", PolicyError, "stages[0].window"),
    ("neighbor_attention on a 2-D-mask backend", "flash", "neighbor_attention", UnsupportedModelError,
     "attn_implementation"),
    # prune_heads(scope=visual) alone runs on 2-D-mask backends (head split); with a neighbour window it is refused
    ("prune_heads scope=visual + neighbor_attention on a 2-D-mask backend", "flash",
     "prune_heads:heads=1/0+neighbor_attention:layers=2", UnsupportedModelError, "attn_implementation"),
    ("visual_drop beyond the model", "llava", "visual_drop:layer=4", IncompatiblePolicyError, "stages[0].layer"),
    ("visual_drop before a token stage", "llava", "visual_drop:layer=2+fastv:layer=3", PolicyError, "stages[1].op"),
    ("a structural op twice", "llava", "ffn_cut+ffn_cut:ratio=4", PolicyError, "stages[1].op"),
    ("efficientvla_layers without calibration", "llava", "efficientvla_layers", PolicyError, "stages[0].layers"),
    ("efficientvla_layers keeps more than of", "llava", "efficientvla_layers:calibration={layers},layers_kept=5,of=4",
     PolicyError, "stages[0].layers_kept"),
    # calibration files
    ("calibration: missing file", "llava", "prune_heads:calibration={missing},threshold=0.1", PolicyError,
     "stages[0].calibration"),
    ("calibration: not JSON", "llava", "prune_heads:calibration={not_json},threshold=0.1", PolicyError,
     "stages[0].calibration"),
    ("calibration: JSON of another kind", "llava", "skip_layers:calibration={foreign_json},layers_kept=3,of=4",
     PolicyError, "stages[0].calibration"),
    ("calibration: other model", "llava", "prune_heads:calibration={other_heads},threshold=0.1",
     IncompatiblePolicyError, "stages[0].calibration.config_hash"),
    ("calibration: wrong what", "llava", "efficientvla_layers:calibration={heads},layers_kept=3,of=4",
     IncompatiblePolicyError, "stages[0].calibration.what"),
    ("calibration: shipped YOPO heads on another model", "llava", "yopo_25:drop=3", IncompatiblePolicyError,
     "stages[2].calibration.config_hash"),
    # pre-LLM stages
    ("aim_merge keep 0", "llava", "aim_merge:keep=0", PolicyError, "stages[0].keep"),
    ("aim_merge keep above 1", "llava", "aim_merge:keep=1.5", PolicyError, "stages[0].keep"),
    ("aim_merge tokens 0", "llava", "aim_merge:tokens=0", PolicyError, "stages[0].tokens"),
    ("aim_merge bad positions", "llava", "aim_merge:positions=dense", PolicyError, "stages[0].positions"),
    ("aim_merge with a layer", "llava", "aim_merge:layer=2", PolicyError, "stages[0].layer"),
    ("two pre_llm stages", "llava", "aim_merge+uniform:site=pre_llm,keep=0.1", PolicyError, "stages[1].site"),
    ("pre_llm after an LLM stage", "llava", "fastv:layer=2,keep=0.5+aim_merge", PolicyError, "stages[1].site"),
    ("pre_llm budget growing into an LLM stage", "llava", "aim_merge+fastv:layer=2,keep=0.5", PolicyError,
     "stages[1].keep"),
    ("pre_llm repack on Qwen2-VL (M-RoPE)", "qwen2_vl", "aim_merge", IncompatiblePolicyError, "stages[0].positions"),
    ("pre_llm for a criterion without that site", "llava", "fastv:site=pre_llm", PolicyError, "stages[0].site"),
    # vision-site stages
    ("vision and pre_llm stages together", "llava", "flowcut_vit+aim_merge", PolicyError, "stages[0].site"),
    ("vision stage on a tower reading layer 0", "llava", "flowcut_vit", IncompatiblePolicyError, "stages[0].site"),
    ("vision stage beyond the feature layer", "llava", "mctf:layer=3", IncompatiblePolicyError, "stages[0].layer"),
    ("CLS vision stage on Qwen2-VL", "qwen2_vl", "visionzip:positions=gaps", IncompatiblePolicyError,
     "stages[0].criterion"),
    # learned-weight files
    ("weights: missing file", "llava", "atp:weights={missing}", PolicyError, "stages[0].weights"),
    ("weights: not safetensors", "llava", "atp:weights={not_st}", PolicyError, "stages[0].weights"),
    ("weights: safetensors without our metadata", "llava", "atp:weights={plain_st}", PolicyError, "stages[0].weights"),
    ("weights: wrong kind", "llava", "atp:weights={covipal_w}", IncompatiblePolicyError, "stages[0].weights.kind"),
    ("weights: other model", "llava", "atp:weights={other_atp}", IncompatiblePolicyError,
     "stages[0].weights.config_hash"),
    ("weights: shipped tiny-VLM weights on another model", "llava", "atp", IncompatiblePolicyError,
     "stages[0].weights.config_hash"),
]


@pytest.mark.parametrize("name, which, policy, error, field", CASES, ids=[c[0] for c in CASES])
def test_refused_before_the_model_changes(models, files, name, which, policy, error, field):
    model = models[which]
    before = fingerprint(model)
    with pytest.raises(error) as e:
        vtp.patch(model, policy.format(**files)).unpatch()  # (unpatch: a wrongly accepted policy must not leak)
    assert e.value.field == field, str(e.value)
    assert str(e.value).startswith(f"{field}: ") and len(str(e.value)) > len(field) + 20  # says what and why
    assert_untouched(model, before)
    assert not vtp.patching.is_patched(model)


def test_good_files_are_accepted(models, files):
    """The control: the same files and models work when they fit (so the refusals above are about the input)."""
    model = models["llava"]
    inputs = make_batch(model, ROWS)
    with torch.no_grad():
        ref = model(**inputs).logits
        for policy in ("prune_heads:calibration={heads},threshold=0.1", "efficientvla_layers:calibration={layers},layers_kept=3,of=4",
                       "skip_layers:layers=2;3", "ffn_cut:layers=1;3", "aim_merge:keep=0.5,positions=gaps"):
            with vtp.patch(model, policy.format(**files)):
                assert torch.isfinite(model(**inputs).logits).all()
        assert torch.equal(model(**inputs).logits, ref)


def test_pre_llm_budget_above_a_rows_visual_tokens_is_an_input_error(models):
    model = models["llava"]
    inputs = make_batch(model, [[4, "img", 3]])  # 36 visual tokens
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtp.patch(model, "aim_merge:tokens=40", strict=True) as h:
            with pytest.raises(vtp.InputError) as e:
                model(**inputs)
            assert e.value.field == "stages[0].tokens" and h.state is None
            h.unpatch()
        assert torch.equal(model(**inputs).logits, ref)
