"""The compiled RL loop has fixed shapes: it compiles in its first iteration and never again
(frames counted with dynamo's `CompileCounter`, no timing)."""

from __future__ import annotations

import pytest
import torch
from support.tiny_episodic import tiny_episodic_raw
from support.tiny_runs import quiet
from torch._dynamo.testing import CompileCounter

from lora_runtime.compile import compile_actor
from lora_runtime.config import validate_config
from lora_runtime.rl import trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("algorithm", [{"name": "ppo", "rollout_steps": 5, "minibatches": 2, "update_epochs": 2},
                                       {"name": "grpo", "batch_size": 2, "group_size": 2, "update_epochs": 2}])
def test_no_recompilation_after_the_first_iteration(tmp_path, monkeypatch, algorithm):
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(trainer, "compile_actor", lambda m, **kw: compile_actor(m, backend=counter, **kw))
    frames, trained = [], []

    def on_step(record):
        frames.append(counter.frame_count)
        trained.append(record["trained_rows"])

    raw = tiny_episodic_raw(tmp_path / "run", tmp_path / "base", steps=5, compile=True, algorithm=algorithm)
    result = trainer.train(validate_config(raw), on_step=on_step, log=quiet)
    # the rollout's graph (no grad) and the update's (grad): each compiled the first time it runs
    # (GRPO's first update waits for a group whose returns differ), never again afterwards
    first = next(i for i, n in enumerate(trained) if n > 0)
    assert first <= 2 and frames[first] == 2, (frames, trained)
    assert frames[first:] == [2] * (5 - first), (frames, trained)
    assert result.summary["compile"] is True
