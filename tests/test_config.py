"""Config: YAML in, typed objects out; errors name the key and the file; --set overrides."""

from __future__ import annotations

import pytest

from paf_ray import cli
from paf_ray.config import Config, ConfigError, dump_config, load_config


# the default stages start with adapt, which needs pretrained weights or this explicit switch
RANDOM_INIT = "model:\n  backbone:\n    random_init: true\n"


def _write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_and_typed_values(tmp_path):
    cfg = load_config(_write(tmp_path, "data:\n  input_size: [320, 192]\n  on_bad_sample: skip\n" + RANDOM_INIT))
    assert isinstance(cfg, Config)
    assert cfg.data.input_size == (320, 192) and cfg.data.on_bad_sample == "skip"
    assert cfg.data.root is None and cfg.data.synth.size == (640, 360)
    assert [s.kind for s in cfg.train.stages] == ["adapt", "finetune"]


def test_unknown_key_is_an_error_naming_key_and_file(tmp_path):
    path = _write(tmp_path, "data:\n  input_sise: [320, 192]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert path in str(e.value) and "data.input_sise" in str(e.value)


def test_wrong_type_is_an_error_naming_key_and_file(tmp_path):
    path = _write(tmp_path, "data:\n  batch_size: four\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert path in str(e.value) and "data.batch_size" in str(e.value) and "int" in str(e.value)
    path = _write(tmp_path, "data:\n  on_bad_sample: ignore\n", "d.yaml")
    with pytest.raises(ConfigError, match=r"data\.on_bad_sample"):
        load_config(path)
    path = _write(tmp_path, "data:\n  input_size: [320]\n", "e.yaml")
    with pytest.raises(ConfigError, match=r"data\.input_size.*a list of 2"):
        load_config(path)


def test_missing_required_value_is_an_error(tmp_path):
    path = _write(tmp_path, "train:\n  stages:\n    - epochs: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert path in str(e.value) and "missing required key 'train.stages[0].kind'" in str(e.value)


def test_set_overrides_including_list_items(tmp_path):
    path = _write(tmp_path, "data:\n  batch_size: 2\n" + RANDOM_INIT)
    cfg = load_config(path, ["data.batch_size=8", "train.stages.0.epochs=3", "data.root=s3://bucket/bdd",
                             "data.synth.size=[320, 180]"])
    assert cfg.data.batch_size == 8 and cfg.train.stages[0].epochs == 3 and cfg.train.stages[1].epochs == 1
    assert cfg.data.root == "s3://bucket/bdd" and cfg.data.synth.size == (320, 180)
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_config(path, ["data.batch_size=lots"])
    with pytest.raises(ConfigError, match="no list item"):
        load_config(path, ["train.stages.7.epochs=3"])
    with pytest.raises(ConfigError, match="unknown key 'data.nope'"):
        load_config(path, ["data.nope=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["data.batch_size"])


def test_round_trip_and_missing_file(tmp_path):
    cfg = load_config(None, ["data.cpus=0.5", "model.backbone.random_init=true"])
    again = load_config(_write(tmp_path, dump_config(cfg)))
    assert again == cfg
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "absent.yaml"))


def test_set_flags_from_the_command_line_reach_the_config(tmp_path):
    path = _write(tmp_path, "data:\n  cpus: 0.5\n" + RANDOM_INIT)
    args = cli.build_parser().parse_args(["run", path, "--set", "train.stages.0.epochs=3", "--set", "data.cpus=1"])
    cfg = load_config(args.config, args.overrides)
    assert cfg.train.stages[0].epochs == 3 and cfg.data.cpus == 1.0


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.input_size=[320, 190]", "data.input_size"),
        ("model.tasks=[det, det]", "model.tasks"),
        ("model.adapter.stages=[0, 2]", "model.adapter.stages"),
        ("model.loss.weights={seg: 0.5}", "model.loss.weights.*unknown task 'seg'"),
        ("model.heads.det.anchor_sizes=[32, 64]", "model.heads.det.anchor_sizes"),
        ("model.heads.sem.class_balance=-1", "model.heads.sem.class_balance"),
        ("model.adapter.lora.rank=0", "model.adapter.lora.rank"),
        ("model.backbone.format=clip", "model.backbone.format.*not a checkpoint layout of resnet50"),
        ("model.backbone.name=resnet7", "model.backbone.name.*unknown backbone 'resnet7'"),
        ("model.tasks=[det, pose]", "model.tasks.*unknown task 'pose'.*registered: det, sem, drv, lane"),
        ("model.adapter.kind=prefix", "model.adapter.kind.*unknown adapter kind"),
        ("train.stages.0.head_lr_mult={depth: 0.5}", r"train.stages\[0\].head_lr_mult"),
        ("train.stages.1.epochs=0", r"train.stages\[1\].epochs"),
        ("name=../escape", "name: a run name"),
        ("name=/abs/olute", "name: a run name"),
        ("data.cpus=.nan", "data.cpus: must be a finite number"),
        ("data.hflip=.inf", "data.hflip: must be a finite number"),
    ],
)
def test_impossible_combinations_fail_at_load_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(_write(tmp_path, "name: x\n" + RANDOM_INIT), [override])


def test_run_refuses_a_bad_config_before_ray_starts(tmp_path):
    """In a fresh process pointed at an address where no Ray runs: a config error must come first
    (exit 2, one line naming the key), never an attempt to reach Ray."""
    import os
    import subprocess
    import sys

    path = _write(tmp_path, "data:\n  input_size: [320, 190]\n")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "paf_ray", "run", path, "--out", str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and "data.input_size" in err[0] and "c.yaml" in err[0]
    assert not (tmp_path / "runs").exists()


def test_adapt_without_weights_is_an_error_unless_random_init_is_explicit(tmp_path):
    path = _write(tmp_path, "model:\n  backbone:\n    name: resnet18\n")
    with pytest.raises(ConfigError, match=r"model\.backbone\.weights.*random_init") as e:
        load_config(path)
    assert path in str(e.value)
    assert load_config(path, ["model.backbone.random_init=true"]).model.backbone.random_init is True
    assert load_config(path, ["model.backbone.weights=s3://bucket/weights/r18.pth"]).model.backbone.weights
    # a finetune-only run may start from random weights (the pretrain-free baseline)
    assert load_config(path, ["train.stages=[{kind: finetune}]"]).train.stages[0].kind == "finetune"


def test_worker_start_timeout_is_one_key_and_positive(tmp_path):
    path = _write(tmp_path, RANDOM_INIT + "ray:\n  worker_start_timeout_s: 0\n")
    with pytest.raises(ConfigError, match=r"ray\.worker_start_timeout_s"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'tune\.worker_start_timeout_s'"):
        load_config(None, ["model.backbone.random_init=true", "tune.worker_start_timeout_s=60"])
    assert load_config(None, ["model.backbone.random_init=true"]).ray.worker_start_timeout_s == 1800


# --------------------------------------------------------------------------- the loader's own guards


def test_duplicate_keys_are_an_error_with_line_and_column(tmp_path):
    # YAML lets the last one win: here the adapt stage would silently disappear
    path = _write(tmp_path, RANDOM_INIT + "train:\n  stages:\n    - {kind: adapt}\n  stages:\n    - {kind: finetune}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:7:3: duplicate key 'stages' \(first at line 5\)"):
        load_config(path)


def test_alias_expansion_is_bounded_and_errors_stay_one_short_line(tmp_path):
    path = _write(tmp_path, "a: &a [x]\nb: [" + ", ".join(["*a"] * 70) + "]\n")
    with pytest.raises(ConfigError, match="more than 64 YAML alias uses") as e:
        load_config(path)
    assert len(str(e.value)) < 300
    # within the bound but expanding beyond MAX_NODES
    few = ["b0: &b0 [" + ", ".join(["y"] * 1000) + "]"] + [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 20)}]" for i in (1, 2)]
    path = _write(tmp_path, "\n".join(few) + "\nname: *b2\n", "few.yaml")
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(path)
    # a wrong type shows at most a short cut of the value
    path = _write(tmp_path, "name: [" + ", ".join(["word"] * 500) + "]\n", "long.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "name: expected str" in str(e.value) and len(str(e.value)) < 300


def test_syntax_errors_keep_line_and_column_and_non_utf8_is_named(tmp_path):
    path = _write(tmp_path, "data:\n  batch_size: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+:\d+: not valid YAML"):
        load_config(path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 9\)"):
        load_config(str(bad))
    tagged = _write(tmp_path, "name: !!python/object/apply:os.system [echo hi]\n", "tag.yaml")
    with pytest.raises(ConfigError, match=r"tag\.yaml:1:7: not valid YAML"):
        load_config(tagged)


def test_plugin_sections_are_built_and_checked_by_their_plugin(tmp_path):
    cfg = load_config(None, ["model.backbone.random_init=true", "model.backbone.name=tiny",
                             "model.backbone.tiny.width=8", "model.adapter.lora.rank=4", "model.heads.det.kind=fcos"])
    assert cfg.model.backbone.options["tiny"].width == 8 and cfg.model.adapter.options["lora"].rank == 4
    assert cfg.model.heads["det"].kind == "fcos" and cfg.model.heads["lane"].channels == 64  # defaults for every task
    with pytest.raises(ConfigError, match=r"unknown key 'model\.heads\.depth'"):
        load_config(None, ["model.backbone.random_init=true", "model.heads.depth.channels=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'model\.adapter\.lora\.ranks'"):
        load_config(None, ["model.backbone.random_init=true", "model.adapter.lora.ranks=3"])
    with pytest.raises(ConfigError, match=r"model\.fpn_channels: FCOS needs a multiple of 32"):
        load_config(None, ["model.backbone.random_init=true", "model.heads.det.kind=fcos", "model.fpn_channels=48"])


def test_a_users_plugin_module_registers_before_the_config_is_read(tmp_path, monkeypatch):
    """`plugins:` imports the user's module first; its adapter kind is then a name the config accepts."""
    (tmp_path / "my_adapters.py").write_text(
        "from dataclasses import dataclass\n"
        "from torch import nn\n"
        "from paf_ray.models.adapters import ADAPTERS, AdapterKind\n\n"
        "@dataclass\nclass ScaleConfig:\n    init: float = 1.0\n\n"
        "class Scale(AdapterKind):\n"
        "    name = 'scale'\n    placement = 'a learnable scale on each stage output'\n    config = ScaleConfig\n"
        "    def attach(self, backbone, entry, stages, section):\n"
        "        import torch\n"
        "        return nn.ParameterDict({str(k): nn.Parameter(torch.full((1,), section.init)) for k in stages})\n"
        "    def features(self, backbone, adapters, x):\n"
        "        return {k: f * adapters[str(k)] if str(k) in adapters else f for k, f in backbone(x).items()}\n"
        "    def owned(self, model):\n        return list(model.adapters.parameters())\n\n"
        "ADAPTERS.register(Scale())\n")
    from paf_ray.models.adapters import ADAPTERS

    # the kind registers in this process only for this test: later tests (and Ray workers, which
    # never import this module) see the registry as the product ships it
    monkeypatch.setattr(ADAPTERS, "_entries", dict(ADAPTERS._entries))
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _write(tmp_path, "plugins: [my_adapters]\n" + RANDOM_INIT + "  adapter: {kind: scale, scale: {init: 0.5}}\n")
    cfg = load_config(path)
    assert cfg.model.adapter.kind == "scale" and cfg.model.adapter.options["scale"].init == 0.5
    with pytest.raises(ConfigError, match=r"plugins\[0\]: cannot import 'not_a_module'"):
        load_config(_write(tmp_path, "plugins: [not_a_module]\n", "p.yaml"))
