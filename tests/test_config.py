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
        ("model.loss.class_balance={seg: 0.5}", "model.loss.class_balance"),
        ("model.det.anchor_sizes=[32, 64]", "model.det.anchor_sizes"),
        ("train.stages.1.epochs=0", r"train.stages\[1\].epochs"),
    ],
)
def test_impossible_combinations_fail_at_load_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(_write(tmp_path, "name: x\n"), [override])


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
