"""The main job: GRPO fine-tuning of an actor (built-in VLA or a transformers model).

`models/` (the built-in actor, which knows nothing of LoRA), `tasks/` (what the actor is
asked to do), `pretrain` (the built-in base's warm start), `grpo` and `step` (the RL
maths), `trainer` (the run), `train_state` (checkpoints), `hf_loading` (model folders),
`outputs` (what a run writes).
"""
