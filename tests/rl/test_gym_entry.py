"""`task.kind: gym`: an environment defined in tests/support/ (gym_corridor.py), trained for a few
steps through `task.entry`; bad entries are refused before any work."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from support.tiny_episodic import tiny_episodic_raw

from lora_runtime.cli import main
from lora_runtime.config import ConfigError, validate_config
from lora_runtime.rl.builtin_base import builtin_base_dir
from lora_runtime.rl.outputs import read_metrics
from lora_runtime.rl.trainer import train

GYM = {"kind": "gym", "entry": "support.gym_corridor:make_env", "max_episode_steps": None}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_own_environment_trains_through_the_entry_point(tmp_path):
    torch.manual_seed(0)
    raw = tiny_episodic_raw(tmp_path / "run", tmp_path / "base", task=GYM, steps=3, batch_size=4)
    result = train(validate_config(raw), log=lambda m: None)
    records = read_metrics(os.path.join(result.output_dir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert 0.0 <= r["success_rate"] <= 1.0 and 1.0 <= r["episode_len"] <= 8.0
        assert r["reward_mean"] == pytest.approx(r["success_rate"])  # reward 1 exactly on success
    assert os.path.isdir(os.path.join(result.output_dir, "adapter"))
    with open(os.path.join(builtin_base_dir(validate_config(raw)), "config.json"), encoding="utf-8") as f:
        report = __import__("json").load(f)["pretrain"]
    assert report["expert_success"] == 1.0  # the adapter's expert() warm-started the base


@pytest.mark.parametrize(("entry", "message"), [
    ("no_such_module_xyz:make_env", r"task.entry='no_such_module_xyz:make_env': cannot import module 'no_such_module_xyz'"),
    ("support.gym_corridor:nope",
     r"task.entry='support.gym_corridor:nope': module 'support.gym_corridor' has no function 'nope'"),
    ("support.gym_corridor:make_nothing",
     r"task.entry='support.gym_corridor:make_nothing' returned str; it must return \(env, adapter\)"),
])
def test_bad_entry_refused_before_any_work(tmp_path, entry, message):
    raw = tiny_episodic_raw(tmp_path / "run", tmp_path / "base", task={**GYM, "entry": entry})
    with pytest.raises(ConfigError, match=message):
        train(validate_config(raw), log=lambda m: None)
    assert not (tmp_path / "run").exists() and not (tmp_path / "base").exists()


def test_entry_form_and_cli_exit_status(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"task.entry: got 'gym_corridor.make_env': expected "
                                          r"'package.module:function'"):
        validate_config(tiny_episodic_raw(tmp_path, tmp_path, task={**GYM, "entry": "gym_corridor.make_env"}))
    with pytest.raises(ConfigError, match=r"task.entry: required key is missing"):
        validate_config(tiny_episodic_raw(tmp_path, tmp_path, task={"kind": "gym"}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_episodic_raw(tmp_path / "run", tmp_path / "base",
                                                       task={**GYM, "entry": "no_such_module_xyz:f"})))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "cannot import module 'no_such_module_xyz'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_distributed_grpo_on_multi_step_tasks_is_refused_and_ppo_is_not(tmp_path):
    """GRPO's whole episodes differ in length between ranks: refused, naming PPO as the way;
    PPO's fixed-length rollouts pass the check (tests/parallel: its 2-rank parity)."""
    from lora_runtime.rl.builtin_base import check_task

    raw = tiny_episodic_raw(tmp_path / "run", tmp_path / "base", distributed="ddp")
    with pytest.raises(ConfigError, match=r"runner.distributed='ddp' is not supported with task.kind: babyai and "
                                          r"algorithm.name: grpo.*use algorithm.name: ppo"):
        check_task(validate_config(raw))
    ppo = tiny_episodic_raw(tmp_path / "run", tmp_path / "base", distributed="fsdp", algorithm={"name": "ppo"})
    check_task(validate_config(ppo))


def test_environments_that_do_not_split_over_the_ranks_are_refused(tmp_path, monkeypatch):
    from lora_runtime.rl.models import build_tiny_vla
    from lora_runtime.rl.tasks import episodic
    from lora_runtime.rl.tasks.registry import build_task

    run_cfg = validate_config(tiny_episodic_raw(tmp_path / "run", tmp_path / "base", task={"num_envs": 5},
                                                distributed="ddp", algorithm={"name": "ppo"}))
    monkeypatch.setattr(episodic, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"task.num_envs=5 cannot be split over 2 ranks; use a multiple of 2"):
        build_task(run_cfg, build_tiny_vla(run_cfg.actor.builtin))


def test_the_console_script_finds_an_entry_module_in_the_working_directory(tmp_path):
    """`lora-runtime train` (a console script, not `python -m`) imports `task.entry` from the
    folder it runs in, as the error message tells the user to do."""
    import shutil
    import subprocess
    import sys

    from support import gym_corridor

    shutil.copy(gym_corridor.__file__, tmp_path / "my_corridor.py")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_episodic_raw(tmp_path / "run", tmp_path / "base", steps=1,
                                                       task={**GYM, "entry": "my_corridor:make_env"})))
    script = os.path.join(os.path.dirname(sys.executable), "lora-runtime")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([script, "train", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
