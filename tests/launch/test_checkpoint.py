"""Checkpoint manager: atomic layout, checksums, fallback past bad checkpoints, pruning; load_model and export."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from model_configs import model_config
from omegaconf import OmegaConf

from ebt import ModelConfig, build_model
from launch.checkpoint import CheckpointManager, verify
from launch.cli import main as cli_main
from launch.run_dir import load_model


def tiny_model_cfg(kind: str = "ebt") -> ModelConfig:
    return model_config(kind=kind, vocab_size=64, context_length=8, dim=16, n_layers=1, n_heads=2)


def save(mgr: CheckpointManager, step: int, model: torch.nn.Module, cfg: ModelConfig) -> None:
    yaml = OmegaConf.to_yaml(OmegaConf.create({"model": dataclasses.asdict(cfg)}))
    mgr.save(step, {"model": model.state_dict(), "trainer": {"step": step}}, {"rng": torch.get_rng_state()}, yaml)


def test_save_verify_fallback_and_prune(tmp_path):
    logs: list[str] = []
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=3, log=logs.append)
    cfg = tiny_model_cfg()
    model = build_model(cfg)
    for step in (2, 4, 6, 8):
        save(mgr, step, model, cfg)
    assert mgr.list_steps() == [4, 6, 8]  # keep_last=3 pruned step 2
    manifest = json.loads((tmp_path / "ckpt" / "step_8" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "trainer.pt", "rank_0.pt", "config.yaml"}
    assert manifest["step"] == 8 and manifest["world_size"] == 1
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))

    # Truncate the newest: it is reported and the previous one is used.
    newest = tmp_path / "ckpt" / "step_8" / "model.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    assert "truncated" in verify(tmp_path / "ckpt" / "step_8")
    assert mgr.latest_valid() == tmp_path / "ckpt" / "step_6"
    assert "step_8" in logs[-1] and "truncated" in logs[-1] and "falling back" in logs[-1]

    # Same size, flipped bytes: the checksum catches it. A missing manifest (a save killed mid-way) too.
    corrupt = tmp_path / "ckpt" / "step_6" / "trainer.pt"
    raw = bytearray(corrupt.read_bytes())
    raw[-1] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    (tmp_path / "ckpt" / "step_4" / "manifest.json").unlink()
    assert mgr.latest_valid() is None
    assert any("checksum" in line for line in logs) and any("no manifest" in line for line in logs)


def test_world_size_change_is_reported(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    cfg = tiny_model_cfg()
    save(mgr, 1, build_model(cfg), cfg)
    assert "saved with 1 ranks but this run has 2" in verify(tmp_path / "step_1", world_size=2)
    assert verify(tmp_path / "step_1", world_size=1) is None


def test_partial_save_is_invisible_and_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    (tmp_path / ".tmp-step_5").mkdir()
    (tmp_path / ".tmp-step_5" / "model.pt").write_bytes(b"partial")
    assert mgr.list_steps() == [] and mgr.latest_valid() is None
    mgr.clean_partial()
    assert not (tmp_path / ".tmp-step_5").exists()


@pytest.mark.parametrize("kind", ["ebt", "transformer"])
def test_load_model_and_export_round_trip(tmp_path, kind, capsys):
    cfg = tiny_model_cfg(kind)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the init: loading must really restore these
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=2)
    save(mgr, 3, model, cfg)

    tokens = torch.randint(0, cfg.architecture.vocab_size, (2, cfg.architecture.context_length + 1))
    model.eval()
    torch.manual_seed(1)
    expected = model.loss(tokens)[0]

    for source in (tmp_path / "run" / "checkpoints" / "step_3", tmp_path / "run"):
        loaded, loaded_cfg = load_model(source)
        assert loaded_cfg == cfg
        torch.manual_seed(1)
        assert torch.equal(loaded.loss(tokens)[0], expected)

    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    exported_files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert exported_files == [".ebt-export", "config.yaml", "model.safetensors"]
    exported, exported_cfg = load_model(tmp_path / "export")
    assert exported_cfg == cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), exported.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_load_model_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        load_model(tmp_path / "empty")
    assert cli_main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("ebt export: error: no such checkpoint")
