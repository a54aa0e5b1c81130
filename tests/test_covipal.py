"""CoViPAL (arXiv 2508.17243): the learned pre-LLM pruning module, its stage-1 trainer and weight files.

Proven against ``reference/covipal_oracle.py`` (the module's equations in plain loops) and
``reference/pre_llm_oracle.py`` (the language model on the row with the same tokens dropped).
"""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, FLASH, left_padding, tiny_llava
from reference import covipal_oracle as coracle
from reference import pre_llm_oracle as oracle
from vlm_tokenprune.errors import IncompatiblePolicyError, InputError, PolicyError
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, make_batch
from vlm_tokenprune.learned.artifact import load_weights, save_weights
from vlm_tokenprune.learned.covipal import PPM, score_context
from vlm_tokenprune.train.covipal import CoViPALTrainConfig, guidance_targets, kl_loss, train

torch.set_num_threads(1)

ATOL = 1e-5
BATCH = [[2, "img", 9], [4, "img", 1, "img", 8], [7]]  # left padding, two images in a row, a text-only row


def tiny(attn: str, seed: int = 0, **kw):
    return tiny_llava(attn, seed=seed, **kw)


def random_ppm(in_dim: int, seed: int = 0, hidden: int = 16, layers: int = 2, heads: int = 2) -> PPM:
    """A PPM with every parameter perturbed (LayerNorm gains and biases included), so each term matters."""
    torch.manual_seed(seed)
    m = PPM(in_dim, hidden, layers, heads)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def weight_file(tmp_path, model, seed: int = 0, name: str = "w.safetensors", **kw) -> tuple[str, PPM]:
    ppm = random_ppm(model.config.text_config.hidden_size, seed, **kw)
    return save_weights(str(tmp_path / name), "covipal", ppm.state_dict(), ppm.hparams, model), ppm


def _oracle_kept(model, inputs, b, ppm, keep):
    emb, ids = oracle.row_embeds(model, inputs, b)
    return coracle.kept_positions(emb, ids, IMAGE_TOKEN_ID, ppm.state_dict(), ppm.hparams["heads"], keep)


# -- the module ---------------------------------------------------------------------------------------
def test_module_matches_oracle():
    ppm = random_ppm(24, seed=1, hidden=16, layers=2, heads=4)
    g = torch.Generator().manual_seed(0)
    h_v, h_t = torch.randn(2, 7, 24, generator=g), torch.randn(2, 4, 24, generator=g)
    v_ok = torch.tensor([[1] * 7, [1] * 5 + [0] * 2]).bool()
    t_ok = torch.tensor([[1] * 4, [1] * 2 + [0] * 2]).bool()
    with torch.no_grad():
        got = ppm(h_v, v_ok, h_t, t_ok)
    for b in range(2):
        nv, nt = int(v_ok[b].sum()), int(t_ok[b].sum())
        want = coracle.scores(ppm.state_dict(), 4, list(h_v[b, :nv]), list(h_t[b, :nt]))
        torch.testing.assert_close(got[b, :nv].double(), torch.tensor(want, dtype=torch.float64), atol=ATOL, rtol=0)
    # the text contextualises the scores: other text, other scores (the oracle sees it too)
    other = coracle.scores(ppm.state_dict(), 4, list(h_v[0]), list(-h_t[0]))
    assert max(abs(a - b) for a, b in zip(other, got[0].tolist())) > 1e-3


# -- the patched model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("attn,positions", [(BACKENDS[0], "gaps"), (BACKENDS[1], "repack"), (BACKENDS[2], "gaps")])
def test_patched_model_matches_oracle(tmp_path, attn, positions):
    model = tiny(attn)
    path, ppm = weight_file(tmp_path, model)
    inputs = make_batch(model, BATCH)
    with vtp.patch(model, f"covipal:weights={path},keep=0.25,positions={positions}") as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    assert st.site == "pre_llm" and st.visual_before == [36, 72, 0] and st.visual_after == [9, 18, 0]
    for b in range(3):
        pad = left_padding(inputs, b)
        kept = [p - pad for p in st.kept_positions[b]]
        assert kept == _oracle_kept(model, inputs, b, ppm, 0.25)
        x, pos, _ = oracle.reduce_row(model, inputs, b, 0.25, kept=kept)
        want = oracle.row_logits(model, x, pos, positions)
        torch.testing.assert_close(logits[b, logits.shape[1] - len(pos):], want, atol=ATOL, rtol=0)


def test_batch_with_left_padding_equals_rows_alone(tmp_path):
    model = tiny("sdpa")
    path, _ = weight_file(tmp_path, model, seed=3)
    rows = BATCH[:2]
    policy = f"covipal:weights={path},keep=0.11"
    inputs = make_batch(model, rows)
    with vtp.patch(model, policy) as h, torch.no_grad():
        both = model(**inputs).logits[:, -1]
        kept_both = h.last_trace().stages[0].kept_positions
        for b in range(2):
            alone = {k: v[b:b + 1, left_padding(inputs, b):] if k in ("input_ids", "attention_mask") else v
                     for k, v in inputs.items()}
            alone["pixel_values"] = inputs["pixel_values"][:1] if b == 0 else inputs["pixel_values"][1:]
            one = model(**alone).logits[0, -1]
            kept_one = h.last_trace().stages[0].kept_positions[0]
            assert [p - left_padding(inputs, b) for p in kept_both[b]] == kept_one
            torch.testing.assert_close(both[b], one, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn,use_cache", [("sdpa", True), (FLASH, True), ("sdpa", False)])
def test_generate_matches_cache_free_oracle(tmp_path, attn, use_cache):
    model = tiny(attn)
    path, ppm = weight_file(tmp_path, model, seed=2)
    inputs = make_batch(model, BATCH[:2])
    with vtp.patch(model, f"covipal:weights={path},keep=0.25,positions=repack"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache)
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        kept = _oracle_kept(model, inputs, b, ppm, 0.25)
        x, pos, _ = oracle.reduce_row(model, inputs, b, 0.25, kept=kept)
        n_orig = int(inputs["attention_mask"][b].sum())
        assert out[b, L:].tolist() == oracle.greedy(model, x, pos, "repack", n_orig, 4)


def test_oracle_distinguishes_settings(tmp_path):
    """Other weights or another budget keep other tokens: the comparisons above can fail."""
    model = tiny("sdpa")
    inputs = make_batch(model, BATCH[:1])
    a, b = random_ppm(64, seed=0), random_ppm(64, seed=5)
    ka, kb = _oracle_kept(model, inputs, 0, a, 0.25), _oracle_kept(model, inputs, 0, b, 0.25)
    assert ka != kb and len(ka) == 9
    assert set(ka) < set(_oracle_kept(model, inputs, 0, a, 0.5))


def test_instruction_text_changes_the_kept_tokens(tmp_path):
    """Same image, another question: other kept tokens, in the patched model and in the oracle alike."""
    model = tiny("sdpa")
    path, ppm = weight_file(tmp_path, model, seed=6)
    inputs = make_batch(model, BATCH[:1])
    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    ids = other["input_ids"][0]
    after = (ids == IMAGE_TOKEN_ID).nonzero().max() + 1
    ids[after:] = torch.randint(4, 128, (len(ids) - int(after),), generator=torch.Generator().manual_seed(9))
    kept = []
    with vtp.patch(model, f"covipal:weights={path},keep=0.25") as h, torch.no_grad():
        for inp in (inputs, other):
            model(**inp)
            kept.append(h.last_trace().stages[0].kept_positions[0])
            assert kept[-1] == _oracle_kept(model, inp, 0, ppm, 0.25)
    assert kept[0] != kept[1]


# -- weight files ------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    model = tiny("sdpa")
    path, ppm = weight_file(tmp_path, model, seed=4, hidden=8, layers=1, heads=2)
    tensors, hparams = load_weights(path, "covipal", model, "w")
    assert hparams == ppm.hparams
    back = PPM.from_state(tensors, hparams)
    inputs = make_batch(model, BATCH)
    emb = torch.randn(3, inputs["input_ids"].shape[1], 64)
    valid = inputs["attention_mask"].bool()
    vidx = torch.arange(36).expand(3, 36) + 3
    vok = torch.ones(3, 36, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(score_context(ppm, emb, valid, vidx, vok), score_context(back, emb, valid, vidx, vok))


def _no_hooks(model) -> bool:
    return not any(getattr(hk, "__vtp__", False) for m in model.modules()
                   for hk in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))


def test_weights_of_another_model_are_refused(tmp_path):
    other = tiny("sdpa", hidden=32, heads=2, kv_heads=1)
    model = tiny("sdpa")
    ppm = random_ppm(32)
    path = save_weights(str(tmp_path / "o.safetensors"), "covipal", ppm.state_dict(), ppm.hparams, other)
    with pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(model, f"covipal:weights={path}")
    assert e.value.field == "stages[0].weights.config_hash" and "hidden_size" in str(e.value)
    assert _no_hooks(model)
    wrong_kind = save_weights(str(tmp_path / "a.safetensors"), "atp", random_ppm(64).state_dict(), {}, model)
    with pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(model, f"covipal:weights={wrong_kind}")
    assert e.value.field == "stages[0].weights.kind"
    with pytest.raises(PolicyError) as e:
        vtp.patch(model, f"covipal:weights={tmp_path / 'missing.safetensors'}")
    assert e.value.field == "stages[0].weights" and "train covipal" in str(e.value)
    # the shipped file belongs to the shipped tiny VLM, not to this random one
    with pytest.raises(IncompatiblePolicyError):
        vtp.patch(model, "covipal")
    assert _no_hooks(model)


def test_shipped_preset_runs_on_the_tiny_vlm():
    from vlm_tokenprune.eval.synthetic import make_split
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm, prompts

    model, processor = load_tiny_vlm()
    ex = make_split("test", 2)
    inputs = processor(images=[e["image"] for e in ex], text=prompts([e["question"] for e in ex]),
                       return_tensors="pt", padding=True)
    pol = vtp.Policy.parse("covipal")
    assert pol.stages[0].params == {"weights": "shipped", "positions": "repack"} and pol.stages[0].budget.keep == 0.25
    with vtp.patch(model, pol) as h, torch.no_grad():
        model(**inputs)
        assert h.last_trace().stages[0].visual_after == [64, 64]  # 25 % of 256


# -- training ---------------------------------------------------------------------------------------------
def _train_batches(model, n: int = 2):
    return [make_batch(model, [[2, "img", 4], [3, "img", 2]], seed=s) for s in range(n)]


@pytest.mark.parametrize("query", ["last", "text"])
def test_guidance_target_matches_eager_attention(query):
    """Stage-1 label = the eager layer's attention from the last token (or the instruction text), heads summed,
    renormalised over the visual tokens."""
    model = tiny("eager")
    inputs = make_batch(model, BATCH[:2])
    _, _, vidx, vok, target = guidance_targets(model, inputs, 2, query)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions
    for b in range(2):
        pad = left_padding(inputs, b)
        ids = inputs["input_ids"][b, pad:]
        n = int(vok[b].sum())
        want = coracle.guidance_attention(att[2][b, :, pad:, pad:], ids, IMAGE_TOKEN_ID, query)
        torch.testing.assert_close(target[b, :n].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
        other = coracle.guidance_attention(att[3][b, :, pad:, pad:], ids, IMAGE_TOKEN_ID, query)
        assert max(abs(a - c) for a, c in zip(want, other)) > 1e-4  # the guidance layer matters at this tolerance


def test_training_decreases_the_loss(tmp_path):
    model = tiny("sdpa")
    batches = _train_batches(model)
    cfg = CoViPALTrainConfig(steps=40, lr=1e-2, hidden=16, heads=2, guidance_layer=2, warmup=1)

    def kl(ppm):
        with torch.no_grad():
            vals = []
            for bt in batches:
                emb, valid, vidx, vok, t = guidance_targets(model, bt, 2)
                vals.append(float(kl_loss(score_context(ppm, emb, valid, vidx, vok), t, vok)))
            return sum(vals) / len(vals)

    torch.manual_seed(cfg.seed)
    before = kl(PPM(64, 16, 1, 2))  # the trainer's initial module (same seed)
    res = train(model, lambda s: (batches[i % 2] for i in range(s, 10**9)), out=str(tmp_path / "t.safetensors"),
                config=cfg, progress_bar=False)
    tensors, hp = load_weights(res["out"], "covipal", model, "w")
    after = kl(PPM.from_state(tensors, hp))
    assert hp["guidance_layer"] == 2 and hp["stage"] == 1
    assert all(p.grad is None and p.requires_grad for p in model.parameters()) and not model.training  # LLM untouched
    assert after < 0.5 * before, (before, after)


def test_resume_is_deterministic(tmp_path):
    """Crash after step 4 of 6 (checkpoint at step 3), resume: the same losses and weights as one straight run."""
    model = tiny("sdpa")
    data = _train_batches(model, 6)
    cfg = CoViPALTrainConfig(steps=6, hidden=8, heads=2, guidance_layer=1, checkpoint_every=3, warmup=1)
    straight = train(model, data, out=str(tmp_path / "a.safetensors"), config=cfg, progress_bar=False)

    class Crash(Exception):
        pass

    def crashing(start):
        for i in range(start, 6):
            if i == 4:
                raise Crash
            yield data[i]

    ck = str(tmp_path / "c.ckpt")
    with pytest.raises(Crash):
        train(model, crashing, out=str(tmp_path / "c.safetensors"), checkpoint=ck, config=cfg, progress_bar=False)
    assert torch.load(ck, weights_only=False)["step"] == 3
    msgs = []
    resumed = train(model, data, out=str(tmp_path / "c.safetensors"), checkpoint=ck, resume=True, config=cfg,
                    progress_bar=False, log=msgs.append)  # a plain iterable: the consumed batches are skipped
    assert msgs == [f"resuming from {ck} at step 3"] and len(resumed["losses"]) == 3
    assert resumed["losses"] == straight["losses"][3:]
    a, _ = load_weights(straight["out"], "covipal", model, "w")
    c, _ = load_weights(resumed["out"], "covipal", model, "w")
    assert all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(InputError) as e:  # other settings cannot resume this checkpoint
        train(model, data, out=str(tmp_path / "d.safetensors"), checkpoint=ck, resume=True, progress_bar=False,
              config=CoViPALTrainConfig(steps=6, hidden=8, heads=2, guidance_layer=1, checkpoint_every=3, warmup=1,
                                        lr=1.0))
    assert e.value.field == "resume" and "lr" in str(e.value)


@pytest.mark.parametrize("kw,field", [
    ({"guidance_layer": 4}, "guidance_layer"), ({"query": "first"}, "query"), ({"hidden": 10, "heads": 4}, "hidden"),
    ({"steps": 0}, "steps"),
])
def test_bad_training_settings_name_the_field(tmp_path, kw, field):
    model = tiny("sdpa")
    with pytest.raises(InputError) as e:
        train(model, [], out=str(tmp_path / "x.safetensors"), config=CoViPALTrainConfig(**kw), progress_bar=False)
    assert e.value.field == field
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_train_writes_weights_that_load(tmp_path, capsys):
    from vlm_tokenprune import cli

    out = tmp_path / "cv.safetensors"
    rc = cli.main(["train", "covipal", "--steps", "2", "--batch-size", "2", "--n-train", "4", "--hidden", "8",
                   "--heads", "2", "--val-n", "0", "--no-progress", "--out", str(out)])
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm

    model, _ = load_tiny_vlm()
    vtp.patch(model, f"covipal:weights={out}").unpatch()
    assert cli.main(["train", "nope"]) == 2
