"""Run configs at toy sizes for the trainer and CLI tests (a step takes a few milliseconds).

2x2 board, 2 objects of 3 colours: chance reward 1/4. The warm-started base is built once
per test module into a shared `base_dir`.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

BUILTIN = {
    "image_size": 8, "patch_size": 4, "vision_dim": 32, "vision_layers": 1, "vision_heads": 2,
    "vision_mlp_dim": 64, "text_dim": 32, "text_layers": 2, "text_heads": 2, "text_mlp_dim": 64,
    "vocab_size": 24, "pretrain_steps": 200, "pretrain_batch_size": 64,
}
TASK = {"grid": 2, "num_objects": 2, "num_colors": 3}


def tiny_raw(output_dir, base_dir, mode: str = "new", lora_path=None, **trainer: Any) -> dict[str, Any]:
    """A run config dict at toy sizes; `trainer` entries override the defaults below."""
    model = {"is_lora": mode != "full", "lora_rank": 4, "lora_path": None if lora_path is None else str(lora_path)}
    cfg = {
        "output_dir": str(output_dir), "base_dir": str(base_dir), "steps": 6, "batch_size": 16,
        "group_size": 4, "lr": 1.0e-2 if mode != "full" else 3.0e-3, "num_threads": 1,
        "progress": False, "plot": False, "kl_coef": 0.01,
    }
    cfg.update(trainer)
    return {"actor": {"model": model, "builtin": copy.deepcopy(BUILTIN)}, "task": dict(TASK), "trainer": cfg}


def quiet(message: str) -> None:
    """A trainer `log` that prints nothing."""


def write_demo_configs(folder, base_dir, new_steps: int = 2):
    """`lora_new.yaml`, `lora_resume.yaml` (from the new run's adapter) and `full.yaml` at toy
    sizes in `folder`, as `lora-runtime demo --configs` reads them; returns `folder`."""
    folder.mkdir(exist_ok=True)
    write_yaml(folder / "lora_new.yaml", tiny_raw("runs/lora_new", base_dir, steps=new_steps))
    write_yaml(folder / "lora_resume.yaml", tiny_raw("runs/lora_resume", base_dir, mode="resume",
                                                     lora_path="runs/lora_new/adapter", steps=2))
    write_yaml(folder / "full.yaml", tiny_raw("runs/full", base_dir, mode="full", steps=2))
    return folder


def write_yaml(path, raw: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def untrained_raw(output_dir, base_dir, **kwargs: Any) -> dict[str, Any]:
    """`tiny_raw` with a base that skips the warm start (for tests that need no skill)."""
    raw = tiny_raw(output_dir, base_dir, **kwargs)
    raw["actor"]["builtin"]["pretrain_steps"] = 0
    return raw
