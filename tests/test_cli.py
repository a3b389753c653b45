"""The ``radio`` command line and the trainer config (TOML, --set, errors)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from radio import RadioModel
from radio.cli import SUBCOMMANDS, main, register_subcommand
from radio.train.config import (
    TrainConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    parse_value,
    save_config,
    to_toml,
    valid_keys,
)
from radio.train.plots import read_metrics

FAST = ["--no-progress", "--steps", "2", "--set", "data.batch_size=2", "--set", "data.num_workers=0",
        "--set", "data.low_resolutions=[32]", "--set", "data.high_resolutions=[64]",
        "--set", "fidelity.resolution=32", "--set", "fidelity.crops_per_image=1"]  # fmt: skip


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--config", "--set", "--steps", "--stop-after", "--out", "--resume", "--device", "--list-keys"):
        assert option in text


def test_bad_key_fails_with_the_list_of_valid_keys(capsys):
    assert main(["train", "--set", "optim.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr'" in err
    for key in ("optim.lr", "data.image_dir", "teachers.sam3.name_or_path", "student.model.window_size", "damp.sigma"):
        assert f"  {key}\n" in err
    assert main(["train", "--set", "teachers.dinov3.bogus=1"]) == 2
    assert main(["train", "--set", "student.model.nope=1"]) == 2
    assert main(["train", "--set", "nokey"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_bad_values_name_the_key(capsys):
    assert main(["train", "--set", "optim.lr=fast"]) == 2
    assert "optim.lr must be a number" in capsys.readouterr().err
    assert main(["train", "--set", "data.crop_scale=[0.9, 0.1]"]) == 2
    assert "data.crop_scale" in capsys.readouterr().err
    assert main(["train", "--set", "teachers.extra.kind=clip"]) == 2
    assert "teachers.extra.kind must be one of" in capsys.readouterr().err


def test_empty_image_folder_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "images"
    empty.mkdir()
    code = main(["train", "--set", f"data.image_dir={empty}", "--out", str(tmp_path / "run"), *FAST])
    assert code == 2
    assert "holds no images" in capsys.readouterr().err


def test_list_keys_and_print_config(capsys):
    assert main(["train", "--list-keys"]) == 0
    assert capsys.readouterr().out.split() == valid_keys()
    assert main(["train", "--preset", "c-radiov4", "--set", "optim.lr=3e-4", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert 'name_or_path = "facebook/dinov3-vit7b16-pretrain-lvd1689m"' in text
    assert "high_resolutions = [512, 768, 1024, 1152]" in text and "lr = 0.0003" in text


def test_toml_round_trip(tmp_path):
    for cfg in (TrainConfig(), TrainConfig.preset("c-radiov4")):
        cfg = apply_overrides(cfg, ["student.model.window_size=8", "teachers.sam3.high_res_mode=resize"])
        save_config(cfg, tmp_path / "c.toml")
        assert config_to_dict(load_config(tmp_path / "c.toml")) == config_to_dict(cfg)
    (tmp_path / "bad.toml").write_text("[optim]\nlr = 1e-3\nwarp = 2\n")
    with pytest.raises(ValueError, match="unknown config key 'optim.warp'"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "broken.toml").write_text("[optim\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")
    # a config file that lists teachers replaces the teacher set
    (tmp_path / "two.toml").write_text('[teachers.dinov3]\nkind = "dinov3"\n[teachers.sam3]\nkind = "sam3"\n')
    assert list(load_config(tmp_path / "two.toml").teachers) == ["dinov3", "sam3"]
    assert "[teachers.siglip2]" in to_toml(TrainConfig())


def test_parse_value():
    assert parse_value("1e-3") == 1e-3
    assert parse_value("[64, 96]") == [64, 96]
    assert parse_value("true") is True
    assert parse_value("none") is None
    assert parse_value("google/siglip2-giant-opt-patch16-384") == "google/siglip2-giant-opt-patch16-384"
    assert parse_value('"quoted"') == "quoted"


def test_overrides_set_optional_and_new_teachers():
    cfg = apply_overrides(TrainConfig(), ["teachers.sam3.enabled=false", "data.image_dir=/x", "data.image_dir=none"])
    assert list(cfg.enabled_teachers()) == ["siglip2", "dinov3"] and cfg.data.image_dir is None
    cfg = apply_overrides(cfg, ["teachers.dino2.kind=dinov3", "teachers.dino2.seed=3"])
    assert cfg.teachers["dino2"].kind == "dinov3" and cfg.teachers["dino2"].seed == 3


def test_train_resume_and_export_through_the_cli(tmp_path, capsys):
    run, model_dir = tmp_path / "run", tmp_path / "model"
    assert main(["train", "--out", str(run), "--stop-after", "1", *FAST]) == 0
    assert (run / "checkpoints" / "step_00000001.pt").is_file() and not (run / "fidelity.json").exists()
    with open(run / "metrics.jsonl", "a") as f:  # a record logged after the last checkpoint, then a crash
        f.write('{"step": 2, "loss": 123.0}\n')
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] != 123.0
    assert (run / "checkpoints" / "step_00000002.pt").is_file() and (run / "fidelity.json").is_file()
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "x")]) == 2
    assert main(["export", "--run", str(run), "--out", str(model_dir)]) == 0
    assert "EMA" in capsys.readouterr().out
    assert len(RadioModel.from_pretrained(model_dir).adaptor_specs) == 3
    assert main(["export", "--run", str(tmp_path / "none"), "--out", str(model_dir)]) == 2


def test_subcommand_registry():
    calls = []
    register_subcommand("hello", "say hello", lambda p: p.add_argument("--name"), lambda a: calls.append(a.name) or 0)
    try:
        assert main(["hello", "--name", "radio"]) == 0 and calls == ["radio"]
    finally:
        SUBCOMMANDS.pop("hello")
    assert {"train", "export"} <= set(SUBCOMMANDS)


def test_python_dash_m_radio():
    proc = subprocess.run([sys.executable, "-m", "radio", "train", "--list-keys"], capture_output=True, text=True)
    assert proc.returncode == 0 and "optim.lr" in proc.stdout.split()
