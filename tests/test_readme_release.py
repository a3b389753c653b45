"""The README section "Start from a released C-RADIO model": its commands run as shown.

Each line of the section's bash block runs in a temporary folder, in this process (to save the
interpreter start-ups): ``radio ARGS`` through ``radio.cli.main``, ``python -m MODULE ARGS`` through
``runpy``, ``python -c CODE`` through ``exec``.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest
import torch

from radio import RadioModel
from radio.cli import main as radio_main
from radio.train.loop import load_run_config

README = Path(__file__).resolve().parents[1] / "README.md"


def section_commands() -> list[str]:
    text = README.read_text()
    section = text.split("## Start from a released C-RADIO model", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def run_line(line: str, monkeypatch) -> None:
    argv = shlex.split(line)
    if argv[0] == "radio":
        assert radio_main([*argv[1:], "--no-progress"] if argv[1] == "train" else argv[1:]) == 0, line
    elif argv[:2] == ["python", "-c"]:
        exec(compile(argv[2], "<readme>", "exec"), {})
    elif argv[:2] == ["python", "-m"]:
        monkeypatch.setattr(sys, "argv", argv[2:])
        with pytest.raises(SystemExit) as done, warnings.catch_warnings():
            # runpy warns that the module was imported before (by this test session): harmless here
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(argv[2], run_name="__main__")
        assert done.value.code in (0, None), line
    else:
        raise AssertionError(f"README line of an unknown form: {line}")


@pytest.mark.slow
def test_release_section_commands_run_as_shown(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lines = section_commands()
    assert len(lines) == 7
    for line in lines:
        run_line(line, monkeypatch)
    out = capsys.readouterr().out
    assert "['siglip2', 'dinov3']" in out  # the loaded heads
    continued = load_run_config(tmp_path / "runs/continued")
    assert continued.student.init_from == str(tmp_path / "tiny-c-radio.pth.tar")
    assert set(continued.teachers) == {"siglip2", "dinov3", "sam3", "vit"}
    adapted = RadioModel.from_pretrained(tmp_path / "my-adapted")
    assert [s.name for s in adapted.adaptor_specs] == ["siglip2", "dinov3", "sam3"]
    assert not any("lora" in k for k in adapted.state_dict())
    released = RadioModel.from_radio_checkpoint(tmp_path / "tiny-c-radio.pth.tar")
    # freeze=backbone + LoRA: everything but the adapted linear layers is the released backbone
    for key in ("cpe.pos_embed", "blocks.0.norm1.weight", "feature_norm.tx"):
        assert torch.equal(adapted.state_dict()[key], released.state_dict()[key]), key
    assert not torch.equal(adapted.blocks[0].attn.qkv.weight, released.blocks[0].attn.qkv.weight)
