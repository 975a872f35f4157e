"""LV-Adapter: offline tokenizer, frozen text tower, prompt gradients, score maps, cache, alignment loss."""

from __future__ import annotations

import socket

import open_clip
import pytest
import torch

from paf_ray.config import LVAdapterConfig
from paf_ray.data.bdd100k import NUM_CLASSES, PROMPT_NAMES
from paf_ray.models.clip_text import TINY_CLIP, TINY_CLIP_CONFIG, ClipTextEncoder, PromptLearner, get_tokenizer
from paf_ray.models.lv_adapter import LVAdapter

CHANNELS = {1: 8, 2: 16, 3: 32, 4: 64}


def tiny_cfg(**kw) -> LVAdapterConfig:
    base = dict(enabled=True, clip_model=TINY_CLIP, n_ctx=4, heads=2)
    base.update(kw)
    return LVAdapterConfig(**base)


def features(batch=2, height=64, width=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {lv: torch.randn(batch, c, height // 2 ** (lv + 1), width // 2 ** (lv + 1), generator=g) for lv, c in CHANNELS.items()}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def placeholder_context(learner: PromptLearner, encoder: ClipTextEncoder):
    """Set every context vector to the real embedding of the placeholder token 'X'."""
    x_id = int(get_tokenizer(encoder.clip_model)(["X"])[0, 1])
    with torch.no_grad():
        x_emb = encoder.token_embedding.weight[x_id]
        for p in learner.ctx.values():
            p.copy_(x_emb.expand_as(p))


def test_tokenizer_and_real_rn50_text_tower_work_offline(no_network):
    tok = get_tokenizer("RN50")(["a photo of a car"])
    assert tok.shape == (1, 77)
    assert tok[0, :7].tolist() == [49406, 320, 1125, 539, 320, 1615, 49407]

    # The default config: the real RN50 text tower (random weights), encoded once through the adapter.
    torch.manual_seed(0)
    adapter = LVAdapter(LVAdapterConfig(enabled=True), ["det", "sem", "drv"], {1: 256, 2: 512, 3: 1024, 4: 2048})
    assert adapter.text_encoder.width == 512 and adapter.text_encoder.embed_dim == 1024
    assert len(adapter.text_encoder.transformer.resblocks) == 12
    feats = {1: torch.randn(1, 256, 16, 16), 2: torch.randn(1, 512, 8, 8), 3: torch.randn(1, 1024, 4, 4), 4: torch.randn(1, 2048, 2, 2)}
    adapter.eval()
    with torch.no_grad():
        out, scores = adapter(feats)
    assert {t: s.shape for t, s in scores.items()} == {
        "det": (1, 10, 2, 2),
        "sem": (1, 19, 2, 2),
        "drv": (1, 3, 2, 2),
    }
    # Prompts are cut after the longest end-of-text token, not padded to 77.
    assert adapter.prompts.tokens("sem").shape[1] < 20


@pytest.mark.parametrize("clip_model", [TINY_CLIP, "RN50"])
def test_placeholder_prompts_equal_open_clip_encode_text(clip_model, tmp_path):
    if clip_model == TINY_CLIP:
        # Through a local weights file, as a user's config would name it.
        reference = open_clip.CLIP(**TINY_CLIP_CONFIG)
        path = tmp_path / "tiny_clip.pt"
        torch.save(reference.state_dict(), path)
        encoder = ClipTextEncoder(clip_model, str(path))
    else:
        # Same seed, same construction: the same random RN50 weights without a 400 MB file.
        torch.manual_seed(123)
        reference = open_clip.create_model("RN50")
        torch.manual_seed(123)
        encoder = ClipTextEncoder("RN50")
    reference.eval()
    names = {"drv": PROMPT_NAMES["drv"], "det": PROMPT_NAMES["det"][:3]}
    learner = PromptLearner(encoder, names, n_ctx=4, ctx_init="", task_specific=True)
    placeholder_context(learner, encoder)
    tokenizer = get_tokenizer(clip_model)
    with torch.no_grad():
        ours = learner(encoder)
        for task, task_names in names.items():
            expected = reference.encode_text(tokenizer([f"X X X X {n}." for n in task_names]))
            torch.testing.assert_close(ours[task], expected, atol=1e-5, rtol=1e-4)


def test_clip_weights_file_is_loaded_and_missing_file_is_named(tmp_path):
    torch.manual_seed(1)
    reference = open_clip.CLIP(**TINY_CLIP_CONFIG)
    path = tmp_path / "clip.pt"
    torch.save(reference.state_dict(), path)
    adapter = LVAdapter(tiny_cfg(clip_weights=str(path)), ["sem"], CHANNELS)
    assert torch.equal(adapter.text_encoder.token_embedding.weight, reference.token_embedding.weight)
    assert torch.equal(adapter.text_encoder.text_projection, reference.text_projection)

    missing = tiny_cfg(clip_weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.lv_adapter.clip_weights"):
        LVAdapter(missing, ["sem"], CHANNELS)
    # Before a paf_ray checkpoint (which holds the text tower) is loaded, the file is not needed.
    rebuilt = LVAdapter(missing, ["sem"], CHANNELS, load_weights=False).eval()
    stale = rebuilt.class_embeddings()["sem"]  # from random weights, cached
    rebuilt.load_state_dict(adapter.state_dict())
    assert torch.equal(rebuilt.text_encoder.token_embedding.weight, reference.token_embedding.weight)
    expected = adapter.eval().class_embeddings()["sem"]
    assert not torch.allclose(stale, expected)
    torch.testing.assert_close(rebuilt.class_embeddings()["sem"], expected)  # the cache followed the load


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="model.lv_adapter.levels"):
        LVAdapter(tiny_cfg(levels=[5]), ["sem"], CHANNELS)
    with pytest.raises(ValueError, match="model.lv_adapter.heads"):
        LVAdapter(tiny_cfg(heads=3), ["sem"], CHANNELS)
    with pytest.raises(ValueError, match="model.lv_adapter.tau"):
        LVAdapter(tiny_cfg(tau=0.0), ["sem"], CHANNELS)
    with pytest.raises(ValueError, match="model.lv_adapter.n_ctx"):
        LVAdapter(tiny_cfg(n_ctx=0), ["sem"], CHANNELS)
    with pytest.raises(ValueError, match="model.lv_adapter.clip_model: unknown open_clip model 'RN5O'"):
        LVAdapter(tiny_cfg(clip_model="RN5O"), ["sem"], CHANNELS)
    with pytest.raises(ValueError, match="model.lv_adapter.clip_model: .* would download"):
        LVAdapter(tiny_cfg(clip_model="hf-hub:timm/resnet50_clip.openai"), ["sem"], CHANNELS)


def test_gradients_reach_context_vectors_and_never_the_text_tower():
    adapter = LVAdapter(tiny_cfg(), ["det", "sem", "drv"], CHANNELS)
    adapter.train()
    assert not adapter.text_encoder.training, "the frozen text tower must stay in eval mode"
    frozen_before = {n: p.clone() for n, p in adapter.text_encoder.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)

    out, scores = adapter(features())
    batch = synthetic_batch(2, 64, 96)
    loss = adapter.alignment_loss(scores, batch)
    loss.backward()
    for task in ("det", "sem", "drv"):
        grad = adapter.prompts.ctx[task].grad
        assert grad is not None and grad.abs().sum() > 0, task
    assert all(not p.requires_grad and p.grad is None for p in adapter.text_encoder.parameters())
    optimizer.step()
    for n, p in adapter.text_encoder.named_parameters():
        assert torch.equal(p, frozen_before[n]), n


def test_shared_and_initialised_context():
    shared = LVAdapter(tiny_cfg(task_specific=False, n_ctx=6, ctx_init="a photo of a"), ["det", "sem", "drv"], CHANNELS)
    assert list(shared.prompts.ctx.keys()) == ["shared"]
    enc = shared.text_encoder
    phrase = get_tokenizer(TINY_CLIP)(["a photo of a"])[0, 1:5]
    ctx = shared.prompts.ctx["shared"]
    # The phrase sits right before the class name; the 2 slots in front are random.
    torch.testing.assert_close(ctx[2:], enc.token_embedding.weight[phrase])

    short = LVAdapter(tiny_cfg(n_ctx=2, ctx_init="a photo of a"), ["sem"], CHANNELS)
    torch.testing.assert_close(short.prompts.ctx["sem"], short.text_encoder.token_embedding.weight[phrase[2:]])

    random_init = LVAdapter(tiny_cfg(n_ctx=16, ctx_init=""), ["sem"], CHANNELS)
    assert 0.01 < random_init.prompts.ctx["sem"].std() < 0.03


def test_score_maps_per_task_and_untrained_adapter_leaves_features_unchanged():
    adapter = LVAdapter(tiny_cfg(levels=[3, 4]), ["sem", "drv"], CHANNELS)
    assert adapter.score_channels == {"sem": NUM_CLASSES["sem"], "drv": NUM_CLASSES["drv"]}
    feats = features(batch=3)
    out, scores = adapter(feats)
    # Score maps at the finest configured level (3 = stride 16): 64x96 input -> 4x6.
    assert {t: tuple(s.shape) for t, s in scores.items()} == {"sem": (3, 19, 4, 6), "drv": (3, 3, 4, 6)}
    # cosine / tau: bounded by 1 / tau.
    assert all(s.abs().max() <= 1 / 0.07 + 1e-3 for s in scores.values())
    assert set(out) == {1, 2, 3, 4}
    for lv in out:
        assert torch.equal(out[lv], feats[lv]), lv
    with torch.no_grad():
        for p in adapter.scale.values():
            p.fill_(1.0)
    out, _ = adapter(feats)
    assert not torch.equal(out[3], feats[3]) and not torch.equal(out[4], feats[4])
    assert torch.equal(out[1], feats[1]) and torch.equal(out[2], feats[2])


def test_cached_and_uncached_embeddings_are_equal_and_cache_follows_updates():
    adapter = LVAdapter(tiny_cfg(learn_tau=True), ["det", "sem", "drv"], CHANNELS)
    adapter.train()
    uncached = adapter.class_embeddings()
    assert uncached["sem"].requires_grad and adapter._cache is None

    adapter.eval()
    cached = adapter.class_embeddings()
    assert adapter.class_embeddings() is cached  # computed once
    for task in uncached:
        torch.testing.assert_close(cached[task], uncached[task].detach())
        assert not cached[task].requires_grad

    # A training step on the prompts invalidates the cache.
    adapter.train()
    optimizer = torch.optim.SGD(adapter.prompts.parameters(), lr=1.0)
    sum(e.sum() for e in adapter.class_embeddings().values()).backward()
    optimizer.step()
    adapter.eval()
    updated = adapter.class_embeddings()
    assert not torch.allclose(updated["sem"], cached["sem"])
    adapter.train()
    with torch.no_grad():
        torch.testing.assert_close(updated["sem"], adapter.prompts(adapter.text_encoder)["sem"])

    # Frozen prompts (finetune with train_prompts_in_finetune: false): cached even in train mode.
    adapter.set_prompts_trainable(False)
    first = adapter.class_embeddings()
    assert adapter.class_embeddings() is first and not first["det"].requires_grad


def synthetic_batch(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    sem = torch.randint(0, 19, (batch, height, width), generator=g)
    drv = torch.randint(0, 3, (batch, height, width), generator=g)
    sem[:, :4] = 255
    return {
        "sem": sem,
        "drv": drv,
        "labels": [torch.randint(0, 10, (3,), generator=g) for _ in range(batch)],
        "has_det": torch.tensor([True, False] * (batch // 2) + [True] * (batch % 2)),
        "has_sem": torch.ones(batch, dtype=torch.bool),
        "has_drv": torch.tensor([False, True] * (batch // 2) + [False] * (batch % 2)),
    }


def test_alignment_loss_is_grad_connected_zero_without_labels_and_finite_when_all_ignored():
    adapter = LVAdapter(tiny_cfg(), ["det", "sem", "drv"], CHANNELS)
    _, scores = adapter(features())
    batch = synthetic_batch(2, 64, 96)
    none = dict(batch, has_det=torch.zeros(2, dtype=torch.bool), has_sem=torch.zeros(2, dtype=torch.bool),
                has_drv=torch.zeros(2, dtype=torch.bool))
    loss = adapter.alignment_loss(scores, none)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert adapter.proj["4"].weight.grad is not None

    ignored = dict(batch, sem=torch.full((2, 64, 96), 255), has_det=torch.zeros(2, dtype=torch.bool),
                   has_drv=torch.zeros(2, dtype=torch.bool))
    _, scores = adapter(features())
    assert adapter.alignment_loss(scores, ignored).item() == 0.0

    # Only the tasks a sample has: changing an unlabelled sample's mask changes nothing.
    _, scores = adapter(features())
    base = adapter.alignment_loss(scores, batch)
    other = dict(batch, drv=batch["drv"].clone())
    other["drv"][0] = (other["drv"][0] + 1) % 3  # sample 0 has no drivable label
    assert torch.equal(adapter.alignment_loss(scores, other), base)
    # Each task present adds its term: without drivable labels the sum is smaller.
    fewer = dict(batch, has_drv=torch.zeros(2, dtype=torch.bool))
    assert 0 < adapter.alignment_loss(scores, fewer) < base


def test_alignment_loss_falls_when_overfitting_a_few_samples():
    torch.manual_seed(0)
    adapter = LVAdapter(tiny_cfg(levels=[3, 4]), ["det", "sem", "drv"], CHANNELS)
    # Features that carry the label: each stride-16 pixel's feature is a fixed code of its sem class.
    sem = torch.randint(0, 19, (4, 4, 6)).repeat_interleave(16, 1).repeat_interleave(16, 2)
    drv = (sem % 3).clone()
    codes = torch.randn(19, CHANNELS[3])
    f3 = codes[sem[:, ::16, ::16]].permute(0, 3, 1, 2) + 0.1 * torch.randn(4, CHANNELS[3], 4, 6)
    feats = features(batch=4)
    feats[3] = f3
    labels = [torch.unique(m[::16, ::16]) for m in sem]
    labels = [l[l < 10] for l in labels]
    batch = {"sem": sem, "drv": drv, "labels": labels, "has_det": torch.ones(4, dtype=torch.bool),
             "has_sem": torch.ones(4, dtype=torch.bool), "has_drv": torch.ones(4, dtype=torch.bool)}
    adapter.train()
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        _, scores = adapter(feats)
        loss = adapter.alignment_loss(scores, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------- in the multi-task model

def tiny_model_config(**lv):
    from paf_ray.config import from_dict

    return from_dict({
        "data": {"input_size": [128, 96]},
        "model": {
            "backbone": {"name": "tiny", "tiny_width": 8, "random_init": True},
            "adapter": {"kind": "bypass"},
            "fpn_channels": 16,
            "seg_channels": 8,
            "det": {"kind": "faster_rcnn", "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
                    "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 32,
                    "representation_size": 32},
            "lv_adapter": {"enabled": True, "clip_model": TINY_CLIP, "n_ctx": 4, "heads": 2, **lv},
        },
        "train": {"stages": [{"kind": "adapt"}, {"kind": "finetune"}]},
    })


def model_batch(batch=2, height=96, width=128):
    b = synthetic_batch(batch, height, width)
    b["boxes"] = [torch.tensor([[10.0, 20.0, 50.0, 60.0], [60.0, 30.0, 90.0, 80.0], [5.0, 5.0, 30.0, 40.0]])] * batch
    b["ignore_boxes"] = [torch.zeros(0, 4)] * batch
    return b


@pytest.mark.parametrize("train_prompts_in_finetune", [True, False])
def test_stage_policy_and_a_training_step_in_the_multitask_model(train_prompts_in_finetune):
    from paf_ray.models.multitask import build_model
    from paf_ray.models.stages import apply_stage

    cfg = tiny_model_config(train_prompts_in_finetune=train_prompts_in_finetune)
    model = build_model(cfg.model, cfg.data.input_size)
    lv = model.lv_adapter
    frozen_before = {n: p.clone() for n, p in lv.text_encoder.named_parameters()}
    for stage in ("adapt", "finetune"):
        apply_stage(model, stage, cfg)
        model.train()
        assert not lv.text_encoder.training
        assert not any(p.requires_grad for p in lv.text_encoder.parameters())
        prompts_train = stage == "adapt" or train_prompts_in_finetune
        assert all(p.requires_grad == prompts_train for p in lv.prompts.parameters()), stage
        assert all(p.requires_grad for n, p in lv.named_parameters() if not n.startswith(("text_encoder.", "prompts.")))

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)
        losses = model(images, model_batch())
        assert torch.isfinite(losses["align"]) and losses["align"] > 0
        model.total_loss(losses).backward()
        ctx_grad = lv.prompts.ctx["sem"].grad
        assert (ctx_grad is not None and ctx_grad.abs().sum() > 0) == prompts_train, stage
        assert lv.scale["4"].grad is not None and lv.proj["4"].weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for n, p in lv.text_encoder.named_parameters():
        assert torch.equal(p, frozen_before[n]), n

    # Eval: the cached class embeddings serve every call.
    model.eval()
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8))
    assert out["sem"].shape == (1, 19, 96, 128) and out["drv"].shape == (1, 3, 96, 128)
    assert lv._cache is not None


def test_inspect_lists_lv_adapter_trainable_and_text_encoder_frozen(capsys):
    import json
    import os

    from paf_ray.cli import main

    job = os.path.join(os.path.dirname(__file__), "..", "jobs", "adapt_lv.yaml")
    with open(job, encoding="utf-8") as f:
        assert f.readline().rstrip("\n") == "#!/usr/bin/env -S python -m paf_ray run"
    # The real job file (CLIP RN50 backbone + RN50 text tower); a small input keeps the FLOP count cheap.
    assert main(["inspect", job, "--json", "--set", "data.input_size=[128,96]"]) == 0
    report = json.loads(capsys.readouterr().out)
    modules = report["modules"]
    assert report["stage"] == "adapt"
    assert modules["lv_adapter"]["trainable"] > 0
    assert modules["text_encoder"]["total"] > 0 and modules["text_encoder"]["trainable"] == 0
    assert modules["backbone"]["trainable"] == 0
