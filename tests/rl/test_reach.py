"""The reach task: token layout, scenes, the verifiable reward, exact chance, the base warm start."""

from __future__ import annotations

import pytest
import torch

from lora_runtime.config import BuiltinActorConfig, ConfigError, TaskConfig
from lora_runtime.rl.models.vla import build_tiny_vla
from lora_runtime.rl.pretrain import clear_action_rows, pretrain_base, where_batch
from lora_runtime.rl.tasks.reach import BACKGROUND, PALETTE, ReachTask, TokenLayout

pytestmark = pytest.mark.usefixtures("one_thread")


def make_task(grid: int = 4, objects: int = 3, colors: int = 4, noise: float = 0.0, image: int = 16, vocab: int = 32):
    return ReachTask(TaskConfig(grid=grid, num_objects=objects, num_colors=colors, noise=noise), image, vocab)


def test_token_layout_is_disjoint_with_actions_last():
    t = TokenLayout.for_vocab(32, grid=4, num_colors=4)
    groups = [(t.bos,), (t.go,), (t.where,), t.colors, t.scene, t.numbers, t.actions]
    flat = [i for g in groups for i in g]
    assert len(flat) == len(set(flat)) and 0 not in flat
    assert t.actions == (28, 29, 30, 31) and len(t.numbers) == 4 and len(t.scene) == 5
    assert max(flat) < 32


def test_small_vocabulary_is_refused_with_the_keys():
    with pytest.raises(ConfigError, match=r"at least 21 token ids.*vocab_size=20.*actor.builtin.vocab_size"):
        TokenLayout.for_vocab(20, grid=4, num_colors=4)


def test_grid_must_divide_the_image():
    with pytest.raises(ConfigError, match=r"task.grid=5 does not divide the actor's image size 16"):
        make_task(grid=5)


def test_task_config_rules():
    with pytest.raises(ValueError, match="every object needs its own colour"):
        TaskConfig(num_objects=5, num_colors=4)


def test_scenes_are_consistent():
    task = make_task()
    s = task.sample(64, torch.Generator().manual_seed(0))
    assert s.pixel_values.shape == (64, 3, 16, 16) and s.prompt_ids.shape == (64, 3)
    assert s.scene_ids.shape == (64, 16) and s.target.shape == (64, 2)
    t = task.tokens
    empty = t.scene[0]
    assert ((s.scene_ids != empty).sum(dim=1) == 3).all()  # three objects, distinct cells
    for i in range(64):
        occupied = s.scene_ids[i][s.scene_ids[i] != empty]
        assert len(set(occupied.tolist())) == 3  # distinct colours
        color = t.colors.index(int(s.prompt_ids[i, 2]))
        r, c = s.target[i].tolist()
        assert int(s.scene_ids[i, r * 4 + c]) == t.scene[color + 1]  # the named object is at the target
        cell = s.pixel_values[i, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4]  # noise 0: exact colour
        assert torch.equal(cell, torch.tensor(PALETTE[color][1]).view(3, 1, 1).expand(3, 4, 4))
    assert (s.prompt_ids[:, :2] == torch.tensor([t.bos, t.go])).all()
    empty_cells = (s.scene_ids == empty).nonzero()
    i, k = empty_cells[0].tolist()
    assert (s.pixel_values[i, :, (k // 4) * 4, (k % 4) * 4] == BACKGROUND).all()


def test_sampling_is_deterministic_per_generator():
    task = make_task(noise=0.05)
    a = task.sample(8, torch.Generator().manual_seed(3))
    b = task.sample(8, torch.Generator().manual_seed(3))
    c = task.sample(8, torch.Generator().manual_seed(4))
    assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.target, b.target)
    assert not torch.equal(a.pixel_values, c.pixel_values)


def test_reward_is_one_exactly_on_the_target_cell():
    task = make_task()
    s = task.sample(4, torch.Generator().manual_seed(1))
    hits = s.target.repeat_interleave(2, dim=0)  # G = 2: [hit, miss] per scene
    hits[1::2, 1] = (hits[1::2, 1] + 1) % 4
    assert task.reward(s, hits).tolist() == [1.0, 0.0] * 4


def test_chance_reward_is_exact():
    """Every cell exactly once per scene: the mean reward is 1 / grid**2 exactly."""
    task = make_task()
    s = task.sample(16, torch.Generator().manual_seed(2))
    cells = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).view(16, 2)  # [16, 2]
    actions = cells.repeat(16, 1)  # scene i answered with all 16 cells
    rewards = task.reward(s, actions)
    assert rewards.view(16, 16).sum(dim=1).tolist() == [1.0] * 16
    assert rewards.mean().item() == task.chance_reward == 1 / 16
    assert "chance reward 0.0625 (1/16)" in task.describe()


def test_where_batch_answers_in_number_words():
    task = make_task()
    _, ids, answers = where_batch(task, 32, torch.Generator().manual_seed(0), token_noise=0.0)
    t = task.tokens
    assert (ids[:, 1] == t.where).all() and (ids[:, 3] == answers[:, 0]).all()
    assert set(answers.flatten().tolist()) <= set(t.numbers)
    assert not set(answers.flatten().tolist()) & set(t.actions)


def test_warm_start_learns_where_and_leaves_the_policy_uniform():
    sizes = BuiltinActorConfig(image_size=8, patch_size=4, vision_dim=32, vision_layers=1, vision_heads=2,
                               vision_mlp_dim=64, text_dim=32, text_layers=2, text_heads=2, text_mlp_dim=64,
                               vocab_size=24)
    task = ReachTask(TaskConfig(grid=2, num_objects=2, num_colors=3), 8, 24)
    model = build_tiny_vla(sizes)
    report = pretrain_base(model, task, steps=200, batch_size=64, lr=3e-3, seed=0)
    assert report.accuracy > 0.9 and report.steps == 200
    again = build_tiny_vla(sizes)
    report2 = pretrain_base(again, task, steps=200, batch_size=64, lr=3e-3, seed=0)
    assert report2 == report  # deterministic
    clear_action_rows(model, task)
    s = task.sample(8, torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(s.pixel_values, s.prompt_ids)[:, -1]  # [8, V]
    actions = logits[:, list(task.tokens.actions)]
    assert (actions == 0).all()  # every action token has the same logit: uniform policy
