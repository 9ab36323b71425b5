"""The train-module seam (issue 23): Trainer.fit and the callbacks around it never name a distributed strategy;
everything that differs between DDP, DeepSpeed and FSDP is a launch.strategies.Strategy's."""

from __future__ import annotations

import inspect
import re

import pytest

import launch.callbacks as callbacks_package
from launch.callbacks import base, checkpoint, evaluation, metrics, progress, wandb_logging
from launch.strategies import STRATEGIES, DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy
from launch.trainer import Trainer

FORBIDDEN = ("deepspeed", "fsdp", "ddp", "is_deepspeed", "is_fsdp")
CALLBACK_MODULES = [callbacks_package, base, checkpoint, evaluation, metrics, progress, wandb_logging]


def _named(source: str) -> list[str]:
    lowered = source.lower()
    return [word for word in FORBIDDEN if word in lowered]


def test_fit_names_no_strategy():
    assert _named(inspect.getsource(Trainer.fit)) == []


@pytest.mark.parametrize("module", CALLBACK_MODULES, ids=lambda m: m.__name__)
def test_callbacks_name_no_strategy(module):
    assert _named(inspect.getsource(module)) == []


def test_trainer_loop_methods_do_not_branch_on_the_strategy():
    """The step, evaluation, save and resume ask the strategy; no `if ... deepspeed/fsdp` remains in them."""
    for method in (Trainer.train_step, Trainer.forward_backward, Trainer.optimizer_step, Trainer.evaluate,
                   Trainer.save_checkpoint, Trainer._resume, Trainer.setup_model):
        source = inspect.getsource(method)
        assert not re.search(r"\bif\b[^\n]*(deepspeed|fsdp|ddp)", source, re.IGNORECASE), method.__name__


def test_one_strategy_per_config_value():
    from launch.config import STRATEGIES as CONFIG_STRATEGIES

    assert set(STRATEGIES) == set(CONFIG_STRATEGIES)
    assert {STRATEGIES[name] for name in STRATEGIES} == {DDPStrategy, DeepSpeedStrategy, FSDPStrategy}
    for cls in STRATEGIES.values():
        assert issubclass(cls, Strategy)
        for hook in ("wrap", "forward_backward", "save_parts", "load_state"):
            assert getattr(cls, hook) is not getattr(Strategy, hook), f"{cls.__name__} lacks {hook}"


def test_process_setup_asks_the_strategy_class_not_the_config_value():
    """make_accelerator takes the Accelerate plugin and the need for a process group from the Strategy class."""
    from launch.distributed import make_accelerator

    assert "distributed.strategy" not in inspect.getsource(make_accelerator)
    assert {cls: cls.needs_process_group for cls in STRATEGIES.values()} == {
        DDPStrategy: False, DeepSpeedStrategy: True, FSDPStrategy: True}
    assert DDPStrategy.accelerator_kwargs(None, 1) == FSDPStrategy.accelerator_kwargs(None, 1) == {}
    assert DeepSpeedStrategy.accelerator_kwargs.__func__ is not Strategy.accelerator_kwargs.__func__  # its plugin
