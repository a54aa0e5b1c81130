"""ATP-LLaVA (arXiv 2412.00447) in vlm_tokenprune == an independent oracle (tests/reference/atp_oracle.py).

The oracle reads the eager model's attention maps, computes the paper's scores, thresholds and masks
with plain loops from the module's weight tensors, and drops the tokens outside the hard mask before
layer K (original positions). The library runs the bound criterion inside the real forward /
generate under every attention backend, batched with rows keeping different counts. The training
forward (soft mask as an additive log-mask) is checked against both, and training is checked to
reduce its loss, to resume exactly and to write a file that loads back.
"""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, FLASH, assert_generate_matches_rows_alone, fresh_llava, row_alone, tiny_llava
from reference import atp_oracle as oracle
from vlm_tokenprune.errors import IncompatiblePolicyError, InputError, PolicyError
from vlm_tokenprune.eval.tiny_models import make_batch
from vlm_tokenprune.learned.artifact import load_weights, save_weights
from vlm_tokenprune.learned.atp import ATPModule, spatial_scores
from vlm_tokenprune.train.atp import ATPTrainConfig, atp_loss, soft_forward, train_atp

torch.set_num_threads(1)

ATOL = 1e-5
# fp32 library vs fp64 oracle: min-max normalisation divides by the score range; margin = tau * (...)
SCORE_ATOL = {"s_self": 3e-5, "s_cross": 3e-5, "s_red": 3e-5, "s_sp": 0.0, "margin": 3e-4, "soft": 8e-5}
MARGIN = 1e-4  # every oracle margin is at least this far from the threshold (no luck in equal kept sets)
ROWS = [[5, "img", 7], [2, "img", 3], [9, "img", 1]]


def tiny(attn: str):
    return tiny_llava(attn)  # 4 layers, hidden 64, 6 x 6 patch grid


def make_module(layer: int, seed: int = 0, scale: float = 4.0) -> ATPModule:
    """A module with fixed random weights whose thresholds vary between instances (fc1 scaled up)."""
    torch.manual_seed(seed)
    m = ATPModule(64, head_hidden=16, tau=10.0, strides=(2, 3, 4, 6), layer=layer)
    with torch.no_grad():
        m.fc1.weight.mul_(scale)
    return m.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """layer -> (path, module, hparams) for the tiny model."""
    d = tmp_path_factory.mktemp("atp")
    out = {}
    for layer in (1, 2):
        m = make_module(layer, seed=layer)
        path = save_weights(str(d / f"atp_l{layer}.safetensors"), "atp", m.state_dict(), m.hparams(), tiny("eager"))
        out[layer] = (path, m, m.hparams())
    return out


def policy(path: str, layer: int) -> dict:
    return {"stages": [{"criterion": "atp", "layer": layer, "keep": 0.25, "params": {"weights": path}}]}


def run_patched(model, inputs, path, layer):
    """Logits, trace and the bound criterion's outputs (captured inside the real forward)."""
    seen = {}
    with vtp.patch(model, policy(path, layer)) as h, torch.no_grad():
        bound = h.criteria[0]
        orig = bound.outputs

        def spy(ctx):
            seen["out"], seen["ctx"] = orig(ctx), ctx
            return seen["out"]

        bound.outputs = spy
        logits = model(**inputs).logits
        trace = h.last_trace()
    assert not vtp.patching.is_patched(model)
    return logits, trace, seen


def oracle_run(model, inputs, entry):
    path, m, hp = entry
    run = oracle.atp_run(model, inputs, {k: v.detach() for k, v in m.state_dict().items()}, hp)
    assert min(abs(v) for v in run["margin"].values()) > MARGIN, "ill-conditioned case: a margin sits on the threshold"
    return run


def per_position(values: torch.Tensor, ctx, b: int = 0) -> dict[int, float]:
    ok = ctx.visual_ok[b]
    return dict(zip(ctx.orig_pos[b][ok].tolist(), values[b][ok].tolist()))


# ------------------------------------------------------------------------------------------------
# the module's forward and the hard mask vs the oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("attn", BACKENDS)
def test_scores_thresholds_masks_kept_and_logits_match_oracle(attn, layer, weights):
    model = tiny(attn)
    inputs = make_batch(model, [ROWS[0]], seed=1)
    want = oracle_run(model, inputs, weights[layer])
    logits, trace, seen = run_patched(model, inputs, weights[layer][0], layer)
    out, ctx = seen["out"], seen["ctx"]
    for name in ("s_self", "s_cross", "s_red", "s_sp", "margin", "soft"):
        got = per_position(getattr(out, name), ctx)
        assert list(got) == list(want[name])
        torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want[name].values()), dtype=torch.float32),
                                   atol=SCORE_ATOL[name], rtol=0, msg=name)
    assert abs(float(out.theta_r[0]) - want["theta_r"]) < ATOL and abs(float(out.theta_s[0]) - want["theta_s"]) < ATOL
    # the hard mask really drops tokens: only the kept visual tokens enter layers >= K
    assert trace.stages[0].kept_positions[0] == want["kept"]
    n_vis, n_kept = 36, len(want["kept"])
    assert 0 < n_kept < n_vis
    L = inputs["input_ids"].shape[1]
    assert trace.tokens_per_layer == [L] * layer + [L - n_vis + n_kept] * (4 - layer)
    assert logits.shape == want["logits"].shape
    torch.testing.assert_close(logits, want["logits"], atol=ATOL, rtol=0)


def test_oracle_is_discriminating(weights):
    """Both score views and both thresholds decide: the kept set mixes the redundancy and the grid
    selections, other weights keep another set, and pruning changes the logits."""
    model = tiny("eager")
    inputs = make_batch(model, [ROWS[0]], seed=1)
    run = oracle_run(model, inputs, weights[1])
    red = {p for p, v in run["s_red"].items() if v > run["theta_r"]}
    grid = {p for p, v in run["s_sp"].items() if v > run["theta_s"]}
    assert red - grid and grid - red, (sorted(red), sorted(grid))
    assert set(run["kept"]) == red | grid
    other = oracle.atp_run(model, inputs, make_module(1, seed=7).state_dict(), weights[1][2])
    assert other["kept"] != run["kept"]
    with torch.no_grad():
        plain = model(**inputs).logits
    assert (run["logits"][0, -1] - plain[0, -1]).abs().max() > 1e-3


def test_spatial_score_per_grid():
    """SAP: 1 - 1/s for the sparsest grid holding the token, grids anchored per segment, newline / CLS 0."""
    # segment 0: rows 0..5 x cols 0..5; segment 1: rows 1..4 x cols 2..5 (an unpadded anyres grid)
    cells = [(0, r, c, False) for r in range(6) for c in range(6)] + [(1, r, c, False) for r in range(1, 5) for c in range(2, 6)]
    cells += [(1, -1, -1, True), (2, -1, -1, False)]
    t = {k: torch.tensor([[c[i] for c in cells]]) for i, k in enumerate(("segment", "row", "col"))}
    nl = torch.tensor([[c[3] for c in cells]])
    ok = torch.ones_like(nl)
    got = spatial_scores(t["row"], t["col"], t["segment"], nl, ok, (2, 3, 4, 6))[0]
    want = []
    for s, r, c, is_nl in cells:
        r0, c0 = (0, 0) if s == 0 else (1, 2)
        v = 0.0
        if s in (0, 1) and not is_nl and r >= 0:
            for st in (2, 3, 4, 6):
                if (r - r0) % st == 0 and (c - c0) % st == 0:
                    v = 1 - 1 / st
        want.append(v)
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-7, rtol=0)
    assert got[0] == pytest.approx(1 - 1 / 6) and got[2] == 0.5 and got[3] == pytest.approx(2 / 3) and got[1] == 0


# ------------------------------------------------------------------------------------------------
# batches: rows keep different counts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
def test_rows_with_different_kept_counts_match_rows_alone(attn, weights):
    model = tiny(attn)
    inputs = make_batch(model, ROWS, seed=2)
    L = inputs["input_ids"].shape[1]
    logits, trace, _ = run_patched(model, inputs, weights[1][0], 1)
    counts = trace.stages[0].visual_after
    assert len(set(counts)) > 1, f"the case must have rows keeping different counts, got {counts}"
    lengths = []
    for b in range(len(ROWS)):
        alone = row_alone(inputs, ROWS, b)
        pad = L - alone["input_ids"].shape[1]
        want = oracle_run(model, alone, weights[1])
        assert trace.stages[0].kept_positions[b] == [p + pad for p in want["kept"]], f"row {b}"
        assert counts[b] == len(want["kept"])
        lengths.append(want["logits"].shape[1])
        torch.testing.assert_close(logits[b, -lengths[-1]:], want["logits"][0], atol=ATOL, rtol=0, msg=f"row {b}")
    assert logits.shape[1] == max(lengths)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_generate_matches_oracle(attn, weights):
    model = tiny(attn)
    eos = model.generation_config.eos_token_id
    path, m, hp = weights[1]
    assert_generate_matches_rows_alone(model, make_batch(model, ROWS, seed=2), ROWS, policy(path, 1),
                                       lambda alone: oracle.atp_generate(model, alone, m.state_dict(), hp, 6, eos), steps=6)


# ------------------------------------------------------------------------------------------------
# the training forward and training
# ------------------------------------------------------------------------------------------------
def test_training_forward_soft_mask_and_hard_mask_equal_inference(weights):
    """soft_forward's module output == the oracle's soft mask; with the hard mask, its logits at the
    kept positions == the pruned model's (dropping a key == masking it with log 0)."""
    model = tiny("sdpa")
    inputs = make_batch(model, ROWS, seed=2)
    path, m, hp = weights[1]
    logits_pruned, trace, _ = run_patched(model, inputs, path, 1)
    with torch.no_grad():
        soft_logits, out, ctx = soft_forward(model, m, inputs)
        hard_logits, hout, _ = soft_forward(model, m, inputs, hard=True)
    assert out.margin.requires_grad is False  # computed under no_grad here; the head has gradients in training
    L = inputs["input_ids"].shape[1]
    for b in range(len(ROWS)):
        alone = row_alone(inputs, ROWS, b)
        pad = L - alone["input_ids"].shape[1]
        want = oracle_run(model, alone, weights[1])
        got = per_position(out.soft, ctx, b)
        assert list(got) == [p + pad for p in want["soft"]]
        torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want["soft"].values()), dtype=torch.float32),
                                   atol=ATOL, rtol=0)
        kept = trace.stages[0].kept_positions[b]
        assert sorted(ctx.orig_pos[b][hout.hard[b]].tolist()) == kept
        positions = [p for p in range(L) if inputs["attention_mask"][b, p] and (p not in got or p in set(kept))]
        torch.testing.assert_close(hard_logits[b, positions], logits_pruned[b, -len(positions):], atol=ATOL, rtol=0,
                                   msg=f"row {b}")
    # the soft mask acts as log M on the visual keys of layers >= K (oracle: eager layers with that additive mask)
    alone = row_alone(inputs, ROWS, 0)
    want = oracle_run(model, alone, weights[1])
    with torch.no_grad():
        one, _, _ = soft_forward(model, m, alone)
    torch.testing.assert_close(one, oracle.soft_mask_logits(model, alone, 1, want["soft"]), atol=ATOL, rtol=0)
    # the soft mask really acts: it changes the logits, the hard mask more
    with torch.no_grad():
        plain = model(**inputs).logits
    assert (soft_logits[:, -1] - plain[:, -1]).abs().max() > 1e-4
    assert (hard_logits[:, -1] - soft_logits[:, -1]).abs().max() > 1e-4


def labelled_batch(model):
    inputs = make_batch(model, ROWS, seed=4)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]  # the last 3 tokens play the answer
    return {**inputs, "labels": labels}


def batch_loss(model, module, batch, cfg) -> float:
    with torch.no_grad():
        logits, out, ctx = soft_forward(model, module, batch)
        return atp_loss(logits, batch["labels"], out, ctx.visual_ok, cfg.target, cfg.budget_weight)[1]["loss"]


def test_training_decreases_the_loss_and_resumes_exactly(tmp_path):
    model = fresh_llava("sdpa", seed=1)
    batch = labelled_batch(model)
    cfg = ATPTrainConfig(layer=2, target=0.1, steps=12, batch_size=3, lr=1e-2, checkpoint_every=6, head_hidden=8)
    module, hist = train_atp(model, lambda step: batch, cfg, str(tmp_path / "a.safetensors"),
                             checkpoint=str(tmp_path / "a.ckpt"), show_progress=False)
    before = hist[0]["loss"]
    after = batch_loss(model, module, batch, cfg)
    assert after < before - 0.25, (before, after)  # deterministic: 5.47 -> 4.98
    assert all(not p.requires_grad for p in model.parameters()), "the LLM stays frozen"
    # an interrupted run (6 steps, checkpoint) resumed to 12 gives the same weights
    cfg6 = ATPTrainConfig(**{**cfg.__dict__, "steps": 6})
    train_atp(model, lambda step: batch, cfg6, str(tmp_path / "b.safetensors"), checkpoint=str(tmp_path / "b.ckpt"),
              show_progress=False)
    state = torch.load(str(tmp_path / "b.ckpt"), weights_only=False)
    state["config"]["steps"] = 12  # the same run, stopped at step 6
    torch.save(state, str(tmp_path / "b.ckpt"))
    resumed, hist2 = train_atp(model, lambda step: batch, cfg, str(tmp_path / "b.safetensors"),
                               checkpoint=str(tmp_path / "b.ckpt"), resume=True, show_progress=False)
    assert [h["step"] for h in hist2] == list(range(1, 13))
    for k, v in module.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=0, rtol=0)


def test_unfrozen_llm_trains_the_language_model(tmp_path):
    model = fresh_llava("sdpa", seed=1)
    batch = labelled_batch(model)
    before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    cfg = ATPTrainConfig(layer=2, steps=2, batch_size=3, unfreeze_llm=True, llm_lr=1e-3, head_hidden=8)
    train_atp(model, lambda step: batch, cfg, str(tmp_path / "u.safetensors"), show_progress=False)
    after = model.model.language_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "u.llm" / "config.json").exists()


# ------------------------------------------------------------------------------------------------
# weight files
# ------------------------------------------------------------------------------------------------
def test_save_load_round_trip_and_policy_use(tmp_path):
    model = fresh_llava("sdpa", seed=1)
    batch = labelled_batch(model)
    cfg = ATPTrainConfig(layer=2, steps=2, batch_size=3, head_hidden=8, tau=7.0, strides=(2, 3))
    path = str(tmp_path / "w.safetensors")
    module, _ = train_atp(model, lambda step: batch, cfg, path, show_progress=False)
    tensors, hp = load_weights(path, "atp", model, "w")
    assert hp["layer"] == 2 and hp["tau"] == 7.0 and hp["strides"] == [2, 3] and hp["target"] == 0.25
    for k, v in module.state_dict().items():
        assert torch.equal(tensors[k], v)
    again = ATPModule.from_state(tensors, hp)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        a, _, _ = soft_forward(model, module, inputs, hard=True)
        b, _, _ = soft_forward(model, again, inputs, hard=True)
    assert torch.equal(a, b)
    with vtp.patch(model, policy(path, 2)) as h, torch.no_grad():
        model(**inputs)
        assert h.last_trace().stages[0].visual_after != [36, 36, 36]


def test_bad_weight_files_are_refused_before_any_hook(tmp_path, weights):
    path = weights[1][0]
    other = tiny_llava("sdpa", hidden=32)
    with pytest.raises(IncompatiblePolicyError, match="trained on another model") as e:
        vtp.patch(other, policy(path, 1))
    assert e.value.field == "stages[0].weights.config_hash" and not vtp.patching.is_patched(other)
    model = tiny("sdpa")
    with pytest.raises(PolicyError, match="is not a file") as e:
        vtp.patch(model, policy(str(tmp_path / "missing.safetensors"), 1))
    assert e.value.field == "stages[0].weights"
    wrong = save_weights(str(tmp_path / "c.safetensors"), "covipal", {"x": torch.zeros(1)}, {}, model)
    with pytest.raises(IncompatiblePolicyError, match="holds 'covipal' weights") as e:
        vtp.patch(model, policy(wrong, 1))
    assert e.value.field == "stages[0].weights.kind"
    broken = save_weights(str(tmp_path / "d.safetensors"), "atp", {"x": torch.zeros(1)}, {"layer": 1}, model)
    with pytest.raises(PolicyError, match="not a valid ATP weight file") as e:
        vtp.patch(model, policy(broken, 1))
    assert not vtp.patching.is_patched(model)
    # weights trained for layer 1 used at layer 2: refused at the first forward, model unchanged
    inputs = make_batch(model, [ROWS[0]], seed=1)
    with vtp.patch(model, policy(path, 2)), pytest.raises(IncompatiblePolicyError, match="allowed: layer=1") as e:
        model(**inputs)
    assert e.value.field == "stages[0].layer"
    with pytest.raises(PolicyError, match="stages\\[0\\].weights"):
        vtp.patch(model, "atp:weights=3")


def test_shipped_weights_run_on_the_tiny_vlm():
    """The preset works out of the box on the shipped tiny VLM: counts vary per sample, about 25 % on average."""
    from vlm_tokenprune.eval.synthetic import make_split
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm, prompts

    model, processor = load_tiny_vlm()
    ex = make_split("test", 10)
    inputs = processor(images=[e["image"] for e in ex], text=prompts([e["question"] for e in ex]), return_tensors="pt", padding=True)
    with vtp.patch(model, "atp") as h, torch.no_grad():
        model(**inputs)
        counts = h.last_trace().stages[0].visual_after
    assert len(set(counts)) > 1 and 0.1 < sum(counts) / len(counts) / 256 < 0.45, counts
    with pytest.raises(IncompatiblePolicyError, match="trained on another model"):
        vtp.patch(tiny("sdpa"), "atp")


def test_bad_training_settings_name_the_field(tmp_path):
    model = fresh_llava("sdpa", seed=1)
    batch = labelled_batch(model)
    out = tmp_path / "x.safetensors"
    cases = [("layer", {"layer": 4}), ("layer", {"layer": 0}), ("target", {"target": 0.0}), ("steps", {"steps": 0}),
             ("strides", {"strides": (1, 2)})]
    for field, kw in cases:
        with pytest.raises(InputError) as e:
            train_atp(model, lambda step: batch, ATPTrainConfig(head_hidden=8, **kw), str(out), show_progress=False)
        assert e.value.field == field, kw
    with pytest.raises(InputError) as e:
        train_atp(tiny(FLASH), lambda step: batch, ATPTrainConfig(head_hidden=8, steps=1), str(out), show_progress=False)
    assert e.value.field == "attn_implementation"
    assert not out.exists()
    ckpt = str(tmp_path / "x.ckpt")
    train_atp(model, lambda step: batch, ATPTrainConfig(head_hidden=8, steps=1, layer=2), str(out), checkpoint=ckpt,
              show_progress=False)
    with pytest.raises(InputError, match="another configuration") as e:
        train_atp(model, lambda step: batch, ATPTrainConfig(head_hidden=8, steps=2, layer=2, lr=0.1), str(out),
                  checkpoint=ckpt, resume=True, show_progress=False)
    assert e.value.field == "resume"
    from vlm_tokenprune.train.atp import main

    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--strides", "1,2"])
    assert e.value.code == 2
