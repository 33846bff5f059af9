"""The main job: RL fine-tuning of an actor (built-in VLA or a transformers model).

The floor is plug-ins around one loop:

- `models/`: one family object per kind of model (built-in VLA, transformers language
  model): how it reads `ModelInputs`, its folders, its export; the built-in VLA itself
  (which knows nothing of LoRA);
- `tasks/`: one module per task (reach, babyai, gym), a registry keyed by `task.kind`;
  each task builds itself from its config section, warm-starts the built-in base, rolls
  out and scores (`collect` -> `Experience`), and evaluates;
- `algorithms/`: the algorithms' math as pure functions of tensors (GRPO);
- `loop.py`: the one step for every task and algorithm (rollout -> advantages -> update);
- `policy.py` (log-probabilities over the action tokens), `reference.py` (the KL's
  reference policy), `supervised.py` (the one supervised loop of the warm starts);
- `builtin_base.py` (the cached built-in base), `actor_builder.py` (config -> actor);
- `trainer.py` (run control: config -> actor -> loop -> outputs, signals, train state),
  `train_state.py` (checkpoints), `outputs.py` (what a run writes), `run_control.py`
  (signals, threads), `seeding.py` (every random stream of a run).

Only `tasks/` knows task kinds and only `models/` knows model classes.
"""
