"""Config loading: YAML + includes + key=value overrides onto typed dataclasses, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.cli import main as cli_main
from launch.config import build_config, load_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "train" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing here may write into the repo, even when a test goes wrong


def one_line_error(capsys, argv: list[str]) -> str:
    # A missing data source: a case that wrongly passes validation fails fast instead of training.
    code = cli_main(argv + ["data.source=/nonexistent/ebt-test-corpus.txt"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ebt train: error: ")
    return err


def test_quickstart_and_every_model_size_load():
    cfg = load_config(QUICKSTART)
    assert cfg.model.kind == "ebt" and cfg.model.size == "4xs" and (cfg.model.architecture.dim,
                                                                    cfg.model.architecture.n_layers) == (128, 2)
    assert cfg.model.architecture.vocab_size == cfg.data.vocab_size  # follows the tokenizer unless set
    for path in sorted((REPO / "configs" / "model").glob("*.yaml")):
        sized = load_config([QUICKSTART, path])
        from ebt.sizes import SIZES

        spec = SIZES[path.stem]
        assert (sized.model.size, sized.model.architecture.dim, sized.model.architecture.n_layers,
                sized.model.architecture.n_heads) == (
            path.stem, spec.dim, spec.n_layers, spec.n_heads)


def test_overrides_types_and_size_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {size: xs}\noptim: {betas: [0.9, 0.99]}\n")
    cfg = load_config(path, ["optim.lr=3e-4", "trainer.max_steps=7", "model.architecture.dim=768", "name=other",
                             "logging.wandb=false", "model.architecture.vocab_size=1000"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.trainer.max_steps, int) and cfg.trainer.max_steps == 7
    arch = cfg.model.architecture
    assert (arch.dim, arch.n_layers) == (768, 12)  # explicit key wins over the size table
    assert cfg.name == "other" and cfg.logging.wandb is False and cfg.optim.betas == [0.9, 0.99]
    assert cfg.model.architecture.vocab_size == 1000
    # No optim.lr: the size table's reference peak LR.
    assert load_config(path).peak_lr == pytest.approx(9.0e-4)  # the reference's xs LR (model_utils.py)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("trainer.max_step=3", "'trainer.max_step'; did you mean 'trainer.max_steps'?"),
        ("modle.dim=3", "'modle'; did you mean 'model'?"),
        ("lr=3", "unknown config key 'lr'; did you mean 'optim.lr'?"),
        ("trainer.lr=3", "unknown config key 'trainer.lr'; did you mean 'optim.lr'?"),
        ("model.n_layer=3", "did you mean 'model.architecture.n_layers'?"),
        ("trainer.max_steps=abc", "config key 'trainer.max_steps'"),
        ("optim.lr=fast", "config key 'optim.lr'"),
        ("logging.wandb=maybe", "config key 'logging.wandb'"),
        ("model.size=xxxs", "'model.size': unknown size 'xxxs'"),
        ("model.kind=rnn", "config key 'model.kind': unknown model kind 'rnn'"),
        ("model.architecture.dim=101", "config key 'model.architecture.dim'"),
        ("trainer.precision=fp8", "'trainer.precision'"),
        ("trainer.micro_batch_size=0", "'trainer.micro_batch_size': must be >= 1"),
        ("distributed.fsdp_regather=true", "'distributed.fsdp_regather': is only used with distributed.strategy=fsdp"),
        ("distributed.strategy=deepspeed", "'distributed.deepspeed_config'"),
        (f"distributed.deepspeed_config={REPO}/configs/deepspeed/zero2.json", "only used with"),
        ("data.mode=ftp", "data.mode"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(capsys, override, fragment):
    err = one_line_error(capsys, ["train", str(QUICKSTART), override])
    assert fragment in err


def test_zero3_with_ebt_is_refused_with_the_reason(capsys):
    zero3 = REPO / "configs" / "deepspeed" / "zero3.json"
    err = one_line_error(capsys, ["train", str(QUICKSTART), "distributed.strategy=deepspeed",
                                  f"distributed.deepspeed_config={zero3}"])
    assert "'distributed.deepspeed_config': ZeRO-3 cannot train an EBT" in err and "second-order" in err
    # The same file is fine for Transformer++ (no double backward).
    cfg = load_config(QUICKSTART, ["model.kind=transformer", "distributed.strategy=deepspeed",
                                   f"distributed.deepspeed_config={zero3}"])
    assert cfg.distributed.strategy == "deepspeed"


def test_yaml_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "bad.yaml: not valid YAML" in one_line_error(capsys, ["train", str(bad)])
    assert "config file not found" in one_line_error(capsys, ["train", str(tmp_path / "missing.yaml")])
    nested = tmp_path / "nested.yaml"
    nested.write_text("include: [nope.yaml]\n")
    assert "nope.yaml" in one_line_error(capsys, ["train", str(nested)])
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  weight_decy: 0.1\n")
    assert "did you mean 'optim.weight_decay'?" in one_line_error(capsys, ["train", str(typo)])


def test_build_config_rejects_non_mapping_sections():
    with pytest.raises(ValueError, match="optim: expected a mapping"):
        build_config({"optim": 3})


def test_overrides_after_an_option_still_apply(capsys):
    """`ebt train cfg.yaml --nproc 1 optim.lr=-1`: the override after the option reaches the config."""
    err = one_line_error(capsys, ["train", str(QUICKSTART), "--nproc", "1", "optim.lr=-1"])
    assert "'optim.lr'" in err


def test_unknown_options_are_still_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", str(QUICKSTART), "--nproc", "1", "--no-such-flag"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
