"""BabyAI through gymnasium: the observation adapter against minigrid's own rendering,
the vocabulary, seed-grouped rollouts, advantages, eval seeds, and refusals."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from minigrid.wrappers import RGBImgPartialObsWrapper
from support.tiny_episodic import tiny_episodic_raw

from lora_runtime.config import ConfigError, validate_config
from lora_runtime.rl.actor_setup import episode_logits, make_task
from lora_runtime.rl.episode_step import collect_groups, episode_advantages
from lora_runtime.rl.episodes import ExpertPolicy, run_episodes
from lora_runtime.rl.evaluation import evaluate
from lora_runtime.rl.models.vla import build_tiny_vla
from lora_runtime.rl.tasks.babyai import (
    VOCABULARY,
    BabyAIAdapter,
    check_env_id,
    make_babyai_env,
    mission_words,
    symbol_words,
)
from lora_runtime.rl.tasks.episodic import HELD_OUT_SEED, TRAIN_SEED_LIMIT, quiet

LEVELS = ("BabyAI-GoToRedBall-v0", "BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0", "BabyAI-OpenDoor-v0")


@pytest.mark.parametrize("level", LEVELS)
def test_adapter_image_equals_minigrids_rgb_partial_view(level):
    """Our tiles-from-the-symbolic-view image is minigrid's RGBImgPartialObsWrapper's, pixel for pixel."""
    ours = BabyAIAdapter(level, tile_size=4)
    theirs = RGBImgPartialObsWrapper(gym.make(level), tile_size=4)
    plain = make_babyai_env(level)
    rng = np.random.default_rng(0)
    checked = 0
    seen, refs = [], []
    with quiet():
        for seed in range(3):
            ref, _ = theirs.reset(seed=seed)
            obs, _ = plain.reset(seed=seed)
            for _ in range(15):
                assert obs["mission"] == ref["mission"]
                assert np.array_equal(ours.image(obs), ref["image"]), (level, seed, checked)
                seen.append(obs)
                refs.append(ref["image"])
                action = int(rng.integers(7))
                ref, r1, t1, u1, _ = theirs.step(action)
                obs, r2, t2, u2, _ = plain.step(action)
                assert (r1, t1, u1) == (r2, t2, u2)
                checked += 1
                if t1 or u1:
                    break
    assert checked >= 10
    assert np.array_equal(ours.images(seen), np.stack(refs))  # the batched renderer, all at once


def test_symbol_words_read_the_symbolic_view():
    env = make_babyai_env("BabyAI-GoToRedBall-v0")
    with quiet():
        obs, _ = env.reset(seed=3)
    words = symbol_words(obs["image"])
    assert len(words) == 49
    # row y, column x of the rendered view is cell [x, y] of the symbolic view
    from minigrid.core.constants import IDX_TO_OBJECT

    for y in range(7):
        for x in range(7):
            assert words[y * 7 + x].split("_")[0] == IDX_TO_OBJECT[int(obs["image"][x, y, 0])]
    assert words[6 * 7 + 3].startswith(("empty", "ball", "key", "box"))  # the agent's own cell


def test_vocabulary_covers_the_babyai_grammar_and_refuses_unknown_words():
    assert mission_words("go to the red ball, then pick up a grey key") == [
        "go", "to", "the", "red", "ball", ",", "then", "pick", "up", "a", "grey", "key"]
    assert mission_words("put the blue box next to the door on your left after you open the yellow door")
    with quiet():
        for level in ("BabyAI-Synth-v0", "BabyAI-GoToLocal-v0", "BabyAI-PutNextLocal-v0"):
            env = make_babyai_env(level)
            for seed in range(5):
                obs, _ = env.reset(seed=seed)
                assert all(w in VOCABULARY for w in mission_words(obs["mission"], level))
    with pytest.raises(ConfigError, match=r"the mission 'go to the pink ball' has the word 'pink' outside the BabyAI vocabulary"):
        mission_words("go to the pink ball", "BabyAI-X")


def test_unknown_env_id_is_refused_with_close_matches():
    with pytest.raises(ConfigError, match=r"task.env_id='BabyAI-GoToRedBal-v0' is not a registered BabyAI/MiniGrid "
                                          r"environment; did you mean BabyAI-GoToRedBall-v0"):
        check_env_id("BabyAI-GoToRedBal-v0")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("babyai")
    torch.set_num_threads(1)
    cfg = validate_config(tiny_episodic_raw(d / "run", d / "base"))
    model = build_tiny_vla(cfg.actor.builtin)
    return cfg, model, make_task(cfg, model)


def test_encoded_observation_matches_the_adapter(tiny):
    cfg, _model, task = tiny
    env = make_babyai_env(cfg.task.env_id)
    with quiet():
        obs, _ = env.reset(seed=7)
    batch = task.encode([obs])
    words = mission_words(obs["mission"])
    assert batch.prompt_ids[0, : len(words) + 1].tolist() == [1] + [task.word_ids[w] for w in words]
    assert batch.lengths.tolist() == [len(words) + 1]
    assert batch.pixels.shape == (1, 3, 14, 14) and batch.pixels.dtype == torch.uint8
    assert torch.equal(batch.pixels[0].permute(1, 2, 0), torch.from_numpy(task.adapter.image(obs)))
    assert task.action_ids.tolist() == list(range(57, 64))


def test_seed_grouped_rollout_is_reproducible_from_its_seed(tiny):
    _cfg, model, task = tiny
    a = collect_groups(model, episode_logits, task, 3, 2, 1.0, torch.Generator().manual_seed(5))
    b = collect_groups(model, episode_logits, task, 3, 2, 1.0, torch.Generator().manual_seed(5))
    c = collect_groups(model, episode_logits, task, 3, 2, 1.0, torch.Generator().manual_seed(6))
    assert a.seeds == b.seeds and a.seeds[0::2] == a.seeds[1::2]  # groups of 2 share a seed
    assert all(0 <= s < TRAIN_SEED_LIMIT for s in a.seeds)
    for x, y in ((a.actions, b.actions), (a.logp, b.logp), (a.returns, b.returns), (a.lengths, b.lengths),
                 (a.obs.pixels, b.obs.pixels)):
        assert torch.equal(x, y)
    assert a.seeds != c.seeds
    # the episodes of a group start from the same observation (same layout and mission)
    starts = [int((a.episode == e).nonzero()[0]) for e in range(6)]
    for e in (0, 2, 4):
        assert torch.equal(a.obs.pixels[starts[e]], a.obs.pixels[starts[e + 1]])
        assert torch.equal(a.obs.prompt_ids[starts[e]], a.obs.prompt_ids[starts[e + 1]])
    assert int(a.lengths.sum()) == len(a.actions) and a.lengths.max() <= 16


def test_episode_advantages_hand_computed():
    returns = torch.tensor([0.9, 0.0, 0.5, 0.7, 0.3, 0.3])  # groups of 2: (0.9, 0), (0.5, 0.7), (0.3, 0.3)
    episode = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5])
    adv = episode_advantages(returns, episode, 2).double()
    s = 2 ** -0.5  # a pair's unbiased std is |a - b| / sqrt(2); (a - mean) / std = +-1/sqrt(2)
    want = torch.tensor([s, s, -s, -s, s, s, s, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(adv, want, atol=1e-5, rtol=0)


def test_expert_succeeds_and_eval_uses_held_out_seeds_only(tiny, monkeypatch):
    _cfg, model, task = tiny
    demos = run_episodes(task, [11, 12, 13], ExpertPolicy(task.adapter))
    assert demos.success.all() and demos.stats()["success_rate"] == 1.0
    seen: list[list[int]] = []
    reset = task.env.reset

    def spy(*args, **kwargs):
        seen.append(list(kwargs["seed"]))
        return reset(*args, **kwargs)

    monkeypatch.setattr(task.env, "reset", spy)
    result = evaluate(model, episode_logits, task, 6)
    assert result["episodes"] == 6 and result["first_seed"] == HELD_OUT_SEED
    assert seen == [[HELD_OUT_SEED + i for i in range(4)], [HELD_OUT_SEED + 4] + [HELD_OUT_SEED + 5] * 3]  # spare envs repeat the last seed
    again = evaluate(model, episode_logits, task, 6)
    timing = ("rollout_s", "env_steps_per_s")
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in result.items() if k not in timing}
    seen.clear()
    collect_groups(model, episode_logits, task, 2, 2, 1.0, torch.Generator().manual_seed(0))
    assert seen and all(s < TRAIN_SEED_LIMIT for chunk in seen for s in chunk)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("env_id", "BabyAI-Nope-v0", r"task.env_id='BabyAI-Nope-v0' is not a registered BabyAI/MiniGrid environment"),
    ("num_envs", 0, r"task.num_envs: got 0: Input should be greater than or equal to 1"),
])
def test_bad_task_values_refused_before_any_work(tmp_path, key, value, message):
    from lora_runtime.rl.trainer import train

    raw = tiny_episodic_raw(tmp_path / "run", tmp_path / "base", task={key: value})
    with pytest.raises(ConfigError, match=message):
        train(validate_config(raw), log=lambda m: None)
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "base")


def test_text_only_language_model_reads_the_view_as_words(tiny):
    """A transformers causal LM plays BabyAI from the 49 cell words + the mission."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg, _, _ = tiny
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)).eval()
    task = make_task(cfg, lm)
    assert task.image_size is None and len(task.action_ids) == 7 and task.action_ids[-1] == 299
    env = make_babyai_env(cfg.task.env_id)
    with quiet():
        obs, _ = env.reset(seed=2)
    batch = task.encode([obs])
    assert batch.pixels is None and batch.symbol_ids.shape == (1, 49)
    assert batch.symbol_ids[0].tolist() == [task.word_ids[w] for w in symbol_words(obs["image"])]
    logits = episode_logits(lm, batch)  # [1, 300] at the mission's last word
    full = lm(input_ids=torch.cat([batch.symbol_ids, batch.prompt_ids], dim=1)).logits[0, 49 + batch.lengths[0] - 1]
    torch.testing.assert_close(logits[0], full)
    a = collect_groups(lm, episode_logits, task, 2, 2, 1.0, torch.Generator().manual_seed(1))
    b = collect_groups(lm, episode_logits, task, 2, 2, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(a.actions, b.actions) and torch.equal(a.returns, b.returns)
    with pytest.raises(ConfigError, match=r"needs a vocabulary of at least 255 token ids .* vocab_size=128"):
        make_task(cfg, LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, num_key_value_heads=2, vocab_size=128)))
