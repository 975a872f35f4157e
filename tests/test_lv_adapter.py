"""LV-Adapter: offline tokenizer, frozen text tower, prompt gradients, score maps, cache, alignment loss."""

from __future__ import annotations

import os
import socket
import zipfile

import open_clip
import pytest
import torch

from paf_ray.config import ConfigError, LVAdapterConfig, from_dict
from paf_ray.models.clip_text import TINY_CLIP, TINY_CLIP_CONFIG, ClipTextEncoder, PromptLearner, get_tokenizer
from paf_ray.models.lv_adapter import LVAdapter, alignment_loss
from paf_ray.tasks import TASKS, ordered


def P(*tasks) -> dict:
    """The prompt names of `tasks`, as the model hands them to the LV-Adapter."""
    return {t: TASKS[t].prompt_names for t in tasks}


THREE = P("det", "sem", "drv")

CHANNELS = {1: 8, 2: 16, 3: 32, 4: 64}


def tiny_cfg(**kw) -> LVAdapterConfig:
    base = dict(enabled=True, clip_model=TINY_CLIP, random_init=True, n_ctx=4, heads=2)
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
    adapter = LVAdapter(LVAdapterConfig(enabled=True, random_init=True), THREE,
                        {1: 256, 2: 512, 3: 1024, 4: 2048})
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
    names = {"drv": TASKS["drv"].prompt_names, "det": TASKS["det"].prompt_names[:3]}
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
    adapter = LVAdapter(tiny_cfg(clip_weights=str(path), random_init=False), P("sem"), CHANNELS)
    assert torch.equal(adapter.text_encoder.token_embedding.weight, reference.token_embedding.weight)
    assert torch.equal(adapter.text_encoder.text_projection, reference.text_projection)

    missing = tiny_cfg(clip_weights=str(tmp_path / "missing.safetensors"), random_init=False)
    with pytest.raises(FileNotFoundError, match="model.lv_adapter.clip_weights"):
        LVAdapter(missing, P("sem"), CHANNELS)
    # Before a paf_ray checkpoint (which holds the text tower) is loaded, the file is not needed.
    rebuilt = LVAdapter(missing, P("sem"), CHANNELS, load_weights=False).eval()
    stale = rebuilt.class_embeddings()["sem"]  # from random weights, cached
    rebuilt.load_state_dict(adapter.state_dict())
    assert torch.equal(rebuilt.text_encoder.token_embedding.weight, reference.token_embedding.weight)
    expected = adapter.eval().class_embeddings()["sem"]
    assert not torch.allclose(stale, expected)
    torch.testing.assert_close(rebuilt.class_embeddings()["sem"], expected)  # the cache followed the load


def test_bad_config_values_are_named_at_load():
    base = {"model": {"backbone": {"random_init": True}, "lv_adapter": {"enabled": True, "random_init": True,
                                                                        "clip_model": TINY_CLIP, "heads": 2}}}
    for key, value, match in (("levels", [5], "model.lv_adapter.levels"), ("heads", 3, "model.lv_adapter.heads"),
                              ("tau", 0.0, "model.lv_adapter.tau"), ("n_ctx", 0, "model.lv_adapter.n_ctx"),
                              ("clip_model", "RN5O", "model.lv_adapter.clip_model: unknown open_clip model 'RN5O'"),
                              ("clip_model", "hf-hub:timm/resnet50_clip.openai", "model.lv_adapter.clip_model: .* would download")):
        data = {"model": {**base["model"], "lv_adapter": {**base["model"]["lv_adapter"], key: value}}}
        with pytest.raises(ConfigError, match=match):
            from_dict(data)


def test_gradients_reach_context_vectors_and_never_the_text_tower():
    adapter = LVAdapter(tiny_cfg(), THREE, CHANNELS)
    adapter.train()
    assert not adapter.text_encoder.training, "the frozen text tower must stay in eval mode"
    frozen_before = {n: p.clone() for n, p in adapter.text_encoder.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)

    out, scores = adapter(features())
    batch = synthetic_batch(2, 64, 96)
    loss = align(scores, batch)
    loss.backward()
    for task in ("det", "sem", "drv"):
        grad = adapter.prompts.ctx[task].grad
        assert grad is not None and grad.abs().sum() > 0, task
    assert all(not p.requires_grad and p.grad is None for p in adapter.text_encoder.parameters())
    optimizer.step()
    for n, p in adapter.text_encoder.named_parameters():
        assert torch.equal(p, frozen_before[n]), n


def test_shared_and_initialised_context():
    shared = LVAdapter(tiny_cfg(task_specific=False, n_ctx=6, ctx_init="a photo of a"), THREE, CHANNELS)
    assert list(shared.prompts.ctx.keys()) == ["shared"]
    enc = shared.text_encoder
    phrase = get_tokenizer(TINY_CLIP)(["a photo of a"])[0, 1:5]
    ctx = shared.prompts.ctx["shared"]
    # The phrase sits right before the class name; the 2 slots in front are random.
    torch.testing.assert_close(ctx[2:], enc.token_embedding.weight[phrase])

    short = LVAdapter(tiny_cfg(n_ctx=2, ctx_init="a photo of a"), P("sem"), CHANNELS)
    torch.testing.assert_close(short.prompts.ctx["sem"], short.text_encoder.token_embedding.weight[phrase[2:]])

    random_init = LVAdapter(tiny_cfg(n_ctx=16, ctx_init=""), P("sem"), CHANNELS)
    assert 0.01 < random_init.prompts.ctx["sem"].std() < 0.03


@pytest.mark.parametrize("context", ["per_task", "shared"])
def test_score_maps_per_task_and_untrained_adapter_leaves_features_unchanged(context):
    adapter = LVAdapter(tiny_cfg(levels=[3, 4], context=context), P("sem", "drv"), CHANNELS)
    assert adapter.score_channels == {"sem": len(TASKS["sem"].classes), "drv": len(TASKS["drv"].classes)}
    feats = features(batch=3)
    out, scores = adapter(feats)
    # Score maps at the finest configured level (3 = stride 16): 64x96 input -> 4x6.
    assert {t: tuple(s.shape) for t, s in scores.items()} == {"sem": (3, 19, 4, 6), "drv": (3, 3, 4, 6)}
    # cosine / tau: bounded by 1 / tau.
    assert all(s.abs().max() <= 1 / 0.07 + 1e-3 for s in scores.values())
    assert set(out) == {"sem", "drv"} and all(set(f) == {1, 2, 3, 4} for f in out.values())
    for task in out:
        for lv in out[task]:
            assert torch.equal(out[task][lv], feats[lv]), (task, lv)
    with torch.no_grad():
        for p in adapter.scale.values():
            p.fill_(1.0)
    out, _ = adapter(feats)
    for task in out:
        assert not torch.equal(out[task][3], feats[3]) and not torch.equal(out[task][4], feats[4])
        assert torch.equal(out[task][1], feats[1]) and torch.equal(out[task][2], feats[2])
    if context == "shared":  # one set of features for every head: the tasks' contexts averaged
        assert out["sem"] is out["drv"] and set(adapter.scale) == {"3", "4"}
    else:  # each task's branch reads its own context
        assert set(adapter.scale) == {"3_sem", "3_drv", "4_sem", "4_drv"}
        assert not torch.allclose(out["sem"][4], out["drv"][4])


def test_per_task_context_is_the_tasks_own_language_context():
    """Per task, a task's features change with its own class embeddings only; shared, with every task's."""
    def changes(context):
        torch.manual_seed(0)
        adapter = LVAdapter(tiny_cfg(context=context), P("sem", "drv"), CHANNELS).eval()
        with torch.no_grad():
            for p in adapter.scale.values():
                p.fill_(1.0)
        feats = features()
        before, _ = adapter(feats)
        with torch.no_grad():
            adapter.prompts.ctx["drv"].add_(torch.randn_like(adapter.prompts.ctx["drv"]))  # drv's prompts only
        after, _ = adapter(feats)
        return {t: not torch.allclose(before[t][4], after[t][4]) for t in ("sem", "drv")}

    assert changes("per_task") == {"sem": False, "drv": True}
    assert changes("shared") == {"sem": True, "drv": True}


def test_cached_and_uncached_embeddings_are_equal_and_cache_follows_updates():
    adapter = LVAdapter(tiny_cfg(learn_tau=True), THREE, CHANNELS)
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


def make_batch(sem, drv, labels, has_det, has_sem, has_drv):
    """A collated batch (data/contracts.Batch) with the targets the alignment loss reads."""
    n = len(labels)
    det = {"boxes": [torch.zeros(len(x), 4) for x in labels], "labels": labels,
           "ignore_boxes": [torch.zeros(0, 4)] * n, "ignore_labels": [torch.zeros(0, dtype=torch.int64)] * n}
    return {"targets": {"det": det, "sem": sem.to(torch.uint8), "drv": drv.to(torch.uint8)},
            "has": {"det": has_det, "sem": has_sem, "drv": has_drv}}


def with_(batch, **changes):
    """A copy of `batch` with some targets (sem=, drv=) or has-flags (has_det=, ...) replaced."""
    out = {"targets": dict(batch["targets"]), "has": dict(batch["has"])}
    for key, value in changes.items():
        if key.startswith("has_"):
            out["has"][key[4:]] = value
        else:
            out["targets"][key] = value.to(torch.uint8)
    return out


def align(scores, batch):
    return alignment_loss(scores, batch, ordered(["det", "sem", "drv"]))


def synthetic_batch(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    sem = torch.randint(0, 19, (batch, height, width), generator=g)
    drv = torch.randint(0, 3, (batch, height, width), generator=g)
    sem[:, :4] = 255
    return make_batch(sem, drv, [torch.randint(0, 10, (3,), generator=g) for _ in range(batch)],
                      torch.tensor([True, False] * (batch // 2) + [True] * (batch % 2)),
                      torch.ones(batch, dtype=torch.bool),
                      torch.tensor([False, True] * (batch // 2) + [False] * (batch % 2)))


def test_alignment_loss_is_grad_connected_zero_without_labels_and_finite_when_all_ignored():
    adapter = LVAdapter(tiny_cfg(), THREE, CHANNELS)
    _, scores = adapter(features())
    batch = synthetic_batch(2, 64, 96)
    none = with_(batch, has_det=torch.zeros(2, dtype=torch.bool), has_sem=torch.zeros(2, dtype=torch.bool),
                 has_drv=torch.zeros(2, dtype=torch.bool))
    loss = align(scores, none)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert adapter.proj["4"].weight.grad is not None

    ignored = with_(batch, sem=torch.full((2, 64, 96), 255), has_det=torch.zeros(2, dtype=torch.bool),
                    has_drv=torch.zeros(2, dtype=torch.bool))
    _, scores = adapter(features())
    assert align(scores, ignored).item() == 0.0

    # Only the tasks a sample has: changing an unlabelled sample's mask changes nothing.
    _, scores = adapter(features())
    base = align(scores, batch)
    drv = batch["targets"]["drv"].clone()
    drv[0] = (drv[0] + 1) % 3  # sample 0 has no drivable label
    assert torch.equal(align(scores, with_(batch, drv=drv)), base)
    # Each task present adds its term: without drivable labels the sum is smaller.
    fewer = with_(batch, has_drv=torch.zeros(2, dtype=torch.bool))
    assert 0 < align(scores, fewer) < base


def test_alignment_loss_falls_when_overfitting_a_few_samples():
    torch.manual_seed(0)
    adapter = LVAdapter(tiny_cfg(levels=[3, 4]), THREE, CHANNELS)
    # Features that carry the label: each stride-16 pixel's feature is a fixed code of its sem class.
    sem = torch.randint(0, 19, (4, 4, 6)).repeat_interleave(16, 1).repeat_interleave(16, 2)
    drv = (sem % 3).clone()
    codes = torch.randn(19, CHANNELS[3])
    f3 = codes[sem[:, ::16, ::16]].permute(0, 3, 1, 2) + 0.1 * torch.randn(4, CHANNELS[3], 4, 6)
    feats = features(batch=4)
    feats[3] = f3
    labels = [torch.unique(m[::16, ::16]) for m in sem]
    labels = [l[l < 10] for l in labels]
    ones = torch.ones(4, dtype=torch.bool)
    batch = make_batch(sem, drv, labels, ones, ones, ones)
    adapter.train()
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        _, scores = adapter(feats)
        loss = align(scores, batch)
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
            "backbone": {"name": "tiny", "tiny": {"width": 8}, "random_init": True},
            "adapter": {"kind": "bypass"},
            "fpn_channels": 16,
            "heads": {"sem": {"channels": 8}, "drv": {"channels": 8},
                      "det": {"kind": "faster_rcnn", "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
                              "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
                              "box_batch_size_per_image": 32, "representation_size": 32}},
            "lv_adapter": {"enabled": True, "clip_model": TINY_CLIP, "random_init": True, "n_ctx": 4, "heads": 2, **lv},
        },
        "train": {"stages": [{"kind": "adapt"}, {"kind": "finetune"}]},
    })


def model_batch(batch=2, height=96, width=128):
    b = synthetic_batch(batch, height, width)
    b["targets"]["det"]["boxes"] = [torch.tensor([[10.0, 20.0, 50.0, 60.0], [60.0, 30.0, 90.0, 80.0],
                                                  [5.0, 5.0, 30.0, 40.0]])] * batch
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
        apply_stage(model, stage, cfg.model.lv_adapter.train_prompts_in_finetune)
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
        assert lv.scale["4_sem"].grad is not None and lv.proj["4"].weight.grad.abs().sum() > 0
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


# --------------------------------------------------------------------------- CLIP's prior: weights, activation, projection

REPO = os.path.join(os.path.dirname(__file__), "..")


def test_lv_adapter_or_clip_backbone_without_weights_is_refused_at_load(tmp_path):
    import subprocess
    import sys

    from paf_ray.config import ConfigError, from_dict

    def cfg(lv=None, backbone=None):  # finetune only: the adapt stage's own weights rule stays out of the way
        return from_dict({"model": {"backbone": {"name": "tiny", **(backbone or {})},
                                    "lv_adapter": {"enabled": True, **(lv or {})}},
                          "train": {"stages": [{"kind": "finetune"}]}})

    with pytest.raises(ConfigError, match=r"model\.lv_adapter\.clip_weights: the LV-Adapter carries CLIP"):
        cfg()
    assert cfg({"random_init": True}).model.lv_adapter.random_init
    assert cfg({"clip_weights": "s3://bucket/weights/RN50.pt"}).model.lv_adapter.clip_weights
    with pytest.raises(ConfigError, match=r"model\.lv_adapter\.random_init: true, but"):
        cfg({"clip_weights": "RN50.pt", "random_init": True})
    with pytest.raises(ConfigError, match=r"model\.lv_adapter\.activation: gelu contradicts"):
        cfg({"random_init": True, "clip_model": "RN50-quickgelu", "activation": "gelu"})
    with pytest.raises(ConfigError, match=r"model\.backbone\.weights: backbone clip_rn50 needs CLIP"):
        cfg({"random_init": True}, {"name": "clip_rn50"})
    assert cfg({"random_init": True}, {"name": "clip_rn50", "random_init": True}).model.backbone.random_init
    assert not from_dict({}, rules=False).model.lv_adapter.random_init  # the default refuses

    # From the command line, in a process pointed at an address where no Ray runs: refused first.
    job = tmp_path / "lv.yaml"
    job.write_text("model:\n  backbone: {name: tiny}\n  lv_adapter: {enabled: true}\n"
                   "train:\n  stages: [{kind: finetune}]\n")
    proc = subprocess.run([sys.executable, "-m", "paf_ray", "run", str(job), "--out", str(tmp_path / "runs")],
                          env={**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "model.lv_adapter.clip_weights" in proc.stderr, proc.stderr[-2000:]

    # Every job file with the LV-Adapter on names CLIP's weights in the bucket.
    from paf_ray.config import load_config

    with_lv = []
    for name in sorted(os.listdir(os.path.join(REPO, "jobs"))):
        if name.endswith(".yaml"):
            job_cfg = load_config(os.path.join(REPO, "jobs", name))
            if job_cfg.model.lv_adapter.enabled:
                with_lv.append(name)
                assert job_cfg.model.lv_adapter.clip_weights.startswith("s3://"), name
    assert {"adapt_lv.yaml", "tune.yaml"} <= set(with_lv)


def _tree_module(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An nn.Module holding `state` under the same dotted names (as buffers), for torch.jit.script."""

    class Node(torch.nn.Module):
        def forward(self) -> int:
            return 0

    root = Node()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, Node())
            node = getattr(node, part)
        node.register_buffer(leaf, value.detach().clone())
    return root


def save_openai_archive(model: torch.nn.Module, path) -> dict[str, torch.Tensor]:
    """Save `model` as OpenAI publishes CLIP: a TorchScript archive, conv/linear/attention weights and the
    text projection in float16 (OpenAI's convert_weights), plus the archive's input_resolution,
    context_length and vocab_size. Returns the float32 state dict a faithful loader must give back."""
    from open_clip.model import convert_weights_to_lp

    convert_weights_to_lp(model, torch.float16)
    state = dict(model.state_dict())
    expected = {k: v.float() for k, v in state.items()}
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.jit.save(torch.jit.script(_tree_module(state)), str(path))
    model.float()
    return expected


def _assert_same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]):
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_openai_torchscript_rn50_loads_into_quickgelu_exactly(tmp_path):
    from open_clip.transformer import QuickGELU

    from paf_ray.models.clip_text import load_clip, set_text_activation

    torch.manual_seed(7)
    reference = open_clip.create_model("RN50-quickgelu")
    path = tmp_path / "RN50.pt"
    expected = save_openai_archive(reference, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(RuntimeError):  # what a plain weights_only load says about TorchScript
        torch.load(path, weights_only=True)

    # `clip_model: RN50` (GELU in open_clip's config): the file decides, QuickGELU.
    model = load_clip("RN50", str(path)).eval()
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    _assert_same_state(model, expected)
    # The fixture is what open_clip's own OpenAI reader takes, and both give the same text embedding.
    openai_reader = open_clip.load_openai_model(str(path), precision="fp32", device="cpu").eval()
    tokens = get_tokenizer("RN50")(["a photo of a car", "road"])
    with torch.no_grad():
        ours = model.encode_text(tokens)
        torch.testing.assert_close(ours, openai_reader.encode_text(tokens), atol=0, rtol=0)
        torch.testing.assert_close(ours, reference.eval().encode_text(tokens), atol=0, rtol=0)
        # ... and the activation matters: the same weights in the GELU tower give another embedding.
        set_text_activation(model, "gelu")
        assert not torch.allclose(model.encode_text(tokens), ours, atol=1e-4)


def test_openai_state_dict_and_open_clip_files_round_trip_with_their_activation(tmp_path):
    from safetensors.torch import save_file

    from paf_ray.models.clip_text import load_clip, read_clip_weights

    tokens = get_tokenizer(TINY_CLIP)(["a photo of a bus", "sky"])

    # OpenAI's layout as a state dict: what torch.jit.load(RN50.pt).state_dict() gives, saved with torch.save.
    torch.manual_seed(3)
    quick = open_clip.CLIP(**TINY_CLIP_CONFIG, quick_gelu=True)
    archive = tmp_path / "tiny_openai.pt"
    expected = save_openai_archive(quick, archive)
    openai_sd = tmp_path / "tiny_openai_state_dict.pt"
    torch.save(torch.jit.load(str(archive)).state_dict(), openai_sd)
    assert read_clip_weights(str(openai_sd))[1] == "openai"
    model = load_clip(TINY_CLIP, str(openai_sd)).eval()
    assert ClipTextEncoder(TINY_CLIP, str(openai_sd)).activation == "quick_gelu"
    for openai_file in (archive, openai_sd):
        with pytest.raises(ValueError, match=r"model\.lv_adapter\.activation: gelu, but .*QuickGELU"):
            ClipTextEncoder(TINY_CLIP, str(openai_file), activation="gelu")
    _assert_same_state(model, expected)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), quick.eval().encode_text(tokens), atol=0, rtol=0)

    # open_clip's layouts: its .safetensors and its training checkpoint ({"state_dict": {"module.…"}}).
    torch.manual_seed(4)
    gelu = open_clip.CLIP(**TINY_CLIP_CONFIG).eval()
    expected = {k: v.clone() for k, v in gelu.state_dict().items()}
    safetensors = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in expected.items()}, str(safetensors))
    training = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in expected.items()}}, training)
    with torch.no_grad():
        reference = gelu.encode_text(tokens)
    for path in (safetensors, training):
        assert read_clip_weights(str(path))[1] == "open_clip", path
        model = load_clip(TINY_CLIP, str(path)).eval()
        assert isinstance(model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU), path
        _assert_same_state(model, expected)
        with torch.no_grad():
            torch.testing.assert_close(model.encode_text(tokens), reference, atol=0, rtol=0)

    # open_clip's layout is also how OpenAI's weights are republished (timm/resnet50_clip.openai) and
    # how open_clip's RN50 yfcc15m/cc12m ship: the file cannot tell, so an explicit quick_gelu is honoured.
    explicit = load_clip(TINY_CLIP, str(safetensors), activation="quick_gelu").eval()
    as_quick = open_clip.CLIP(**TINY_CLIP_CONFIG, quick_gelu=True).eval()
    as_quick.load_state_dict(expected)
    with torch.no_grad():
        torch.testing.assert_close(explicit.encode_text(tokens), as_quick.encode_text(tokens), atol=0, rtol=0)

    # A file of another CLIP is refused with both keys named.
    with pytest.raises(ValueError, match=r"model\.lv_adapter\.clip_weights: .* does not fit model\.lv_adapter\.clip_model"):
        load_clip(TINY_CLIP, str(_other_clip(tmp_path)))


def _other_clip(tmp_path):
    from safetensors.torch import save_file

    other = dict(TINY_CLIP_CONFIG, embed_dim=32)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**other).state_dict().items()}, str(path))
    return path


def _pool_attention(pool, tokens: torch.Tensor) -> torch.Tensor:
    """The attention weights of CLIP's pool for its query, the mean token: [B, heads, 1 + hw]."""
    import torch.nn.functional as F

    x = tokens.transpose(0, 1)  # [L, B, C], as open_clip's AttentionPool2d runs it
    _, weights = F.multi_head_attention_forward(
        x[:1], x, x, x.shape[-1], pool.num_heads, None,
        torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
        pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=True, use_separate_proj_weight=True,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        average_attn_weights=False)
    return weights[:, :, 0]


def _pool_tokens(pool, x: torch.Tensor) -> torch.Tensor:
    """The tokens CLIP's pool attends over: the mean of the pixels, then the pixels, each + its position."""
    flat = x.flatten(2).transpose(1, 2)
    return torch.cat([flat.mean(1, keepdim=True), flat], 1) + pool.positional_embedding


def test_one_head_pool_embedding_is_the_attention_weighted_average_of_the_pixel_embeddings():
    from open_clip.modified_resnet import AttentionPool2d

    from paf_ray.models.lv_adapter import FROM_CLIP, FROM_SCRATCH

    torch.manual_seed(0)
    pool = AttentionPool2d(spacial_dim=3, embed_dim=CHANNELS[4], num_heads=1, output_dim=TINY_CLIP_CONFIG["embed_dim"])
    adapter = LVAdapter(tiny_cfg(levels=[3, 4]), P("sem"), CHANNELS, attnpool=pool)
    assert adapter.projection_source == {3: FROM_SCRATCH, 4: FROM_CLIP}
    x = torch.randn(2, CHANNELS[4], 3, 3)
    with torch.no_grad():
        pooled = pool(x)  # open_clip's own forward: [B, D]
        pixels = adapter.pixel_embeddings(4, x).flatten(2).transpose(1, 2)  # [B, 9, D]
        mean = x.mean((2, 3), keepdim=True) + pool.positional_embedding[0].view(1, -1, 1, 1)
        tokens = torch.cat([adapter.proj["4"](mean).flatten(2).transpose(1, 2), pixels], 1)  # [B, 10, D]
        weights = _pool_attention(pool, _pool_tokens(pool, x))[:, 0]  # one head: [B, 10]
    torch.testing.assert_close(pooled, torch.einsum("bj,bjd->bd", weights, tokens), atol=1e-5, rtol=1e-5)
    # The score maps at level 3 (the finest) still come from the learned projection; level 4 feeds
    # the cross-attention from CLIP's.
    _, scores = adapter(features())
    assert scores["sem"].shape[-2:] == (4, 6)


def test_clip_rn50_model_starts_its_pixel_text_projection_from_clip_attnpool(capsys):
    from paf_ray.models.backbones import BACKBONES
    from paf_ray.models.inspect import inspect_model, report_text
    from paf_ray.models.lv_adapter import FROM_CLIP, FROM_SCRATCH
    from paf_ray.models.multitask import build_model
    from paf_ray.models.normalize import normalize_images

    cfg = from_dict({
        "data": {"input_size": [224, 224]},
        "model": {"tasks": ["sem"], "backbone": {"name": "clip_rn50", "random_init": True},
                  "fpn_channels": 16, "heads": {"sem": {"channels": 8}},
                  "lv_adapter": {"enabled": True, "random_init": True, "n_ctx": 2}},
        "train": {"stages": [{"kind": "adapt"}]},
    })
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.input_size)
    torch.manual_seed(0)
    clip_visual = BACKBONES["clip_rn50"].build(None)  # the same random CLIP image tower, pool kept
    # BatchNorm on batch statistics: features of order 1 (random running statistics give ~1e-3),
    # so the pixels, not only the positional embedding, carry the embeddings compared below.
    model.backbone.train()
    clip_visual.train()
    pool = clip_visual.attnpool
    assert not hasattr(model.backbone, "attnpool")  # no idle parameters in the backbone (DDP)
    assert model.lv_adapter.projection_source == {4: FROM_CLIP}

    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = normalize_images(images, model.normalization)
        c5 = model.backbone(x)[4]  # [2, 2048, 7, 7]: the pool's own 7x7 grid
        torch.testing.assert_close(c5, clip_visual(x)[4])
        pooled = pool(c5)  # CLIP's image embedding, [2, 1024]
        pixels = model.lv_adapter.pixel_embeddings(4, c5).flatten(2).transpose(1, 2)  # [2, 49, 1024]

        # Per head h: E[j, h] = c_proj restricted to head h's value channels, applied to v_proj(t_j).
        tokens = _pool_tokens(pool, c5)  # [2, 50, 2048]
        heads, width = pool.num_heads, c5.shape[1] // pool.num_heads
        values = pool.v_proj(tokens).view(2, 50, heads, width)
        w_out = pool.c_proj.weight.view(-1, heads, width)  # [1024, heads, width]
        per_head = torch.einsum("bjhc,dhc->bjhd", values, w_out)  # [2, 50, heads, 1024]
        # The adapter's pixel embedding is c_proj(v_proj(t_j)): the heads' parts plus c_proj's bias.
        torch.testing.assert_close(pixels, per_head[:, 1:].sum(2) + pool.c_proj.bias, atol=2e-5, rtol=1e-5)
        # CLIP's pooled embedding is their average weighted by the pool's own attention, head by head.
        weights = _pool_attention(pool, tokens)  # [2, heads, 50]
        weighted = torch.einsum("bhj,bjhd->bd", weights, per_head) + pool.c_proj.bias
    torch.testing.assert_close(pooled, weighted, atol=2e-5, rtol=1e-5)
    assert c5.abs().mean() > 0.1 and pooled.abs().mean() > 0.1  # not an identity between near-zeros

    # paf-ray inspect says where the projection starts.
    report = inspect_model(cfg, flops=False)
    assert report["lv_projection"] == {"4": FROM_CLIP}
    assert "pixel→text projection (level 4): from CLIP attnpool (v_proj, c_proj)" in report_text(report)
    plain = from_dict({"model": {"backbone": {"name": "tiny", "tiny": {"width": 8}, "random_init": True},
                                 "fpn_channels": 16, "heads": {"sem": {"channels": 8}, "drv": {"channels": 8}},
                                 "lv_adapter": {"enabled": True, "clip_model": TINY_CLIP, "random_init": True,
                                                "n_ctx": 2, "heads": 2}},
                       "data": {"input_size": [64, 64]}})
    assert inspect_model(plain, flops=False)["lv_projection"] == {"4": FROM_SCRATCH}


def test_checkpoint_keeps_the_text_towers_activation_without_the_clip_file(tmp_path):
    from paf_ray.models.multitask import build_model
    from paf_ray.train.checkpoint import load_model, save_checkpoint

    torch.manual_seed(3)
    archive = tmp_path / "tiny_openai.pt"
    save_openai_archive(open_clip.CLIP(**TINY_CLIP_CONFIG, quick_gelu=True), archive)
    cfg = tiny_model_config(clip_weights=str(archive), random_init=False)
    model = build_model(cfg.model, cfg.data.input_size).eval()
    assert model.lv_adapter.text_encoder.activation == "quick_gelu"
    expected = model.lv_adapter.class_embeddings()["sem"]
    save_checkpoint(str(tmp_path / "ckpt"), model, cfg, {"stage": "adapt"})
    os.remove(archive)  # inference never needs the CLIP file: the checkpoint holds the tower

    # Rebuilt from the config alone the tower would be GELU (the tiny CLIP's default); meta.json says QuickGELU.
    loaded, _, meta = load_model(str(tmp_path / "ckpt"))
    assert meta["clip_activation"] == "quick_gelu"
    assert loaded.lv_adapter.text_encoder.activation == "quick_gelu"
    torch.testing.assert_close(loaded.lv_adapter.class_embeddings()["sem"], expected, atol=0, rtol=0)
