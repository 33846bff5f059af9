"""Run configs at toy sizes for the multi-step (BabyAI / gym) tests.

The built-in actor reads a 14x14 view (2 px per cell) in 4 patches of 7x7; episodes are
capped at 12 steps; the warm start clones 4 expert episodes for 5 steps. A step takes well
under a second.
"""

from __future__ import annotations

import copy
from typing import Any

BUILTIN = {
    "image_size": 14, "patch_size": 7, "vision_dim": 16, "vision_layers": 1, "vision_heads": 2,
    "vision_mlp_dim": 32, "text_dim": 16, "text_layers": 1, "text_heads": 2, "text_mlp_dim": 32,
    "vocab_size": 64, "max_text_len": 24, "pretrain_steps": 5, "pretrain_batch_size": 16,
}
TASK = {"kind": "babyai", "env_id": "BabyAI-GoToRedBall-v0", "num_envs": 4, "max_episode_steps": 16,
        "bc_episodes": 4, "eval_episodes": 4}


def tiny_episodic_raw(output_dir, base_dir, mode: str = "new", lora_path=None, task: dict | None = None,
                      **trainer: Any) -> dict[str, Any]:
    """A babyai run config dict at toy sizes; `task` and `trainer` entries override the defaults."""
    model = {"is_lora": mode != "full", "lora_rank": 4, "lora_path": None if lora_path is None else str(lora_path)}
    cfg = {
        "output_dir": str(output_dir), "base_dir": str(base_dir), "steps": 2, "batch_size": 2,
        "group_size": 4, "lr": 1.0e-2, "seed": 2,  # seed 2: groups with differing returns in both iterations (seed 1 has none, so no update)
        "num_threads": 1, "progress": False, "plot": False, "kl_coef": 0.01,
        "lr_schedule": "constant",
    }
    cfg.update(trainer)
    return {"actor": {"model": model, "builtin": copy.deepcopy(BUILTIN)}, "task": {**TASK, **(task or {})},
            "trainer": cfg}
