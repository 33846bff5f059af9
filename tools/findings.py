"""Replays the one-line changes of issue 14's audit and checks that a test now fails on each.

    .venv/bin/python tools/findings.py            # all rows; prints the TESTING.md table
    .venv/bin/python tools/findings.py 3 7        # rows 3 and 7 only

Each row changes one line of the library (the text must occur exactly once), runs the
named test alone (`-p no:randomly`), and puts the file back byte for byte, whatever
happens. A row passes when the test FAILS on the change. Not collected by pytest (the
name does not start with `test_`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (finding, file, original text, changed text, test that must fail)
ROWS: list[tuple[str, str, str, str, str]] = [
    ("clipped surrogate: minimum -> maximum", "lora_runtime/rl/grpo.py",
     "surrogate = torch.minimum(", "surrogate = torch.maximum(",
     "tests/rl/test_grpo.py::test_clipped_surrogate_one_sample"),
    ("clipped surrogate: no clip at all", "lora_runtime/rl/grpo.py",
     "ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)", "ratio * adv)",
     "tests/rl/test_grpo.py::test_clipped_surrogate_one_sample"),
    ("kl_coef term dropped", "lora_runtime/rl/grpo.py",
     "loss = pg_loss + kl_coef * kl_mean", "loss = pg_loss",
     "tests/rl/test_grpo.py::test_kl_term_is_weighted_by_kl_coef"),
    ("advantages not divided by the group's std", "lora_runtime/rl/grpo.py",
     "adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)",
     "adv = (r - r.mean(dim=1, keepdim=True))",
     "tests/rl/test_grpo.py::test_group_advantages_mean_and_std_per_group"),
    ("temperature ignored in the log-probs", "lora_runtime/rl/grpo.py",
     ".float() / temperature, dim=-1)", ".float(), dim=-1)",
     "tests/rl/test_grpo.py::test_action_log_probs_keep_only_action_ids_and_apply_temperature"),
    ("temperature not passed to sampling", "lora_runtime/rl/step.py",
     "cfg.group_size, cfg.temperature, generator", "cfg.group_size, 1.0, generator",
     "tests/e2e/test_config_wiring.py::test_temperature_reaches_sampling_and_scoring"),
    ("KL direction swapped", "lora_runtime/rl/grpo.py",
     "return (logp_dist.exp() * (logp_dist - ref_dist)).sum(dim=-1)",
     "return (ref_dist.exp() * (ref_dist - logp_dist)).sum(dim=-1)",
     "tests/rl/test_grpo.py::test_kl_divergence_exact_against_hand_values"),
    ("training-state fingerprint check disabled", "lora_runtime/rl/train_state.py",
     'if data["weights_sha256"] != weights_fingerprint(model):', "if False:",
     "tests/e2e/test_readme_promises.py::test_training_state_of_other_weights_is_refused"),
    ("prepare_actor drops lora_alpha", "lora_runtime/actor.py",
     "alpha=model_cfg.lora_alpha,", "",
     "tests/e2e/test_config_wiring.py::test_rank_alpha_and_rslora_set_the_scaling"),
    ("prepare_actor drops lora_dropout", "lora_runtime/actor.py",
     "dropout=model_cfg.lora_dropout,", "",
     "tests/e2e/test_config_wiring.py::test_dropout_is_active_in_train_and_off_in_eval"),
    ("prepare_actor drops exclude_modules", "lora_runtime/actor.py",
     "exclude_modules=model_cfg.exclude_modules,", "",
     "tests/e2e/test_config_wiring.py::test_target_and_exclude_modules_choose_the_patched_layers"),
    ("prepare_actor drops init_lora_weights", "lora_runtime/actor.py",
     "init=model_cfg.init_lora_weights,", "",
     "tests/e2e/test_config_wiring.py::test_init_lora_weights_statistics"),
    ("prepare_actor drops use_rslora", "lora_runtime/actor.py",
     "use_rslora=model_cfg.use_rslora,", "",
     "tests/e2e/test_config_wiring.py::test_rank_alpha_and_rslora_set_the_scaling"),
    ("use_rslora forced False on load", "lora_runtime/adapters/checkpoint.py",
     'use_rslora=bool(cfg.get("use_rslora", False)),', "use_rslora=False,",
     "tests/e2e/test_config_wiring.py::test_rslora_alpha_and_exclusions_survive_save_peft_and_reload"),
    ("`* scaling` dropped from the delta weight", "lora_runtime/adapters/layer.py",
     "return (b @ a) * self.scaling", "return b @ a",
     "tests/adapters/test_merge_reference.py::test_cli_merge_matches_float64_reference"),
    ("`* scaling` dropped: merge, sync", "lora_runtime/adapters/layer.py",
     "return (b @ a) * self.scaling", "return b @ a",
     "tests/adapters/test_merge_reference.py"),
    ("x1.01 scaling error in the delta (bf16/fp16 merges)", "lora_runtime/adapters/layer.py",
     "return (b @ a) * self.scaling", "return (b @ a) * (self.scaling * 1.01)",
     "tests/adapters/test_merge_reference.py::test_merge_lora_matches_float64_reference[dtype3]"),
    ("LoRA bias accepted", "lora_runtime/adapters/peft_format.py",
     'if cfg.get("bias", "none") != "none":', "if False:",
     "tests/e2e/test_readme_promises.py::test_unsupported_peft_features_are_refused_and_the_model_unchanged"),
    ("modules_to_save accepted", "lora_runtime/adapters/peft_format.py",
     '"alpha_pattern", "modules_to_save", "layers_to_transform"', '"alpha_pattern", "layers_to_transform"',
     "tests/e2e/test_readme_promises.py::test_unsupported_peft_features_are_refused_and_the_model_unchanged"),
    ("rank_pattern / alpha_pattern accepted", "lora_runtime/adapters/peft_format.py",
     'for key in ("rank_pattern", "alpha_pattern", "modules_to_save"', 'for key in ("modules_to_save"',
     "tests/e2e/test_readme_promises.py::test_unsupported_peft_features_are_refused_and_the_model_unchanged"),
    ("one error per problem, not one listing all", "lora_runtime/adapters/peft_format.py",
     "    if problems:\n        raise AdapterError(f\"{path}: cannot load this adapter:\\n  \" + \"\\n  \".join(problems))",
     "    if problems:\n        raise AdapterError(f\"{path}: cannot load this adapter: {problems[0]}\")",
     "tests/e2e/test_readme_promises.py::test_one_error_lists_every_problem"),
    ("CLI merge builds the base before checking the adapter", "lora_runtime/cli/commands.py",
     "            files = read_adapter(adapter)  # a bad adapter fails before the base is built or written",
     "            files = adapter",
     "tests/cli/test_cli_errors.py"),
    ("save_every ignored", "lora_runtime/rl/trainer.py",
     "if cfg.save_every and step % cfg.save_every == 0", "if False",
     "tests/e2e/test_config_wiring.py::test_save_every_writes_intermediate_checkpoints"),
    ("weight_decay not passed to AdamW", "lora_runtime/rl/trainer.py",
     "lr=cfg.lr, weight_decay=cfg.weight_decay)", "lr=cfg.lr)",
     "tests/e2e/test_config_wiring.py::test_weight_decay_shrinks_the_adapters_by_lr_times_decay"),
    ("max_grad_norm ignored", "lora_runtime/rl/step.py",
     "clip_grad_norm_(params, cfg.max_grad_norm)", "clip_grad_norm_(params, float('inf'))",
     "tests/e2e/test_config_wiring.py::test_max_grad_norm_clips_the_update"),
    ("update_epochs ignored", "lora_runtime/rl/step.py",
     "for _ in range(cfg.update_epochs):", "for _ in range(1):",
     "tests/e2e/test_config_wiring.py::test_update_epochs_and_clip_eps_reach_the_loss"),
    ("clip_eps not passed", "lora_runtime/rl/step.py",
     "rollout.advantages, kl, cfg.clip_eps, cfg.kl_coef)", "rollout.advantages, kl, 0.2, cfg.kl_coef)",
     "tests/e2e/test_config_wiring.py::test_update_epochs_and_clip_eps_reach_the_loss"),
    ("update_epochs > 1 never clips (ratio kept at 1)", "lora_runtime/rl/grpo.py",
     "ratio = torch.exp(logp - old_logp)  # [N, A]", "ratio = torch.exp(logp - logp.detach())  # [N, A]",
     "tests/rl/test_grpo.py::test_update_epochs_above_one_clip"),
    ("RNG not restored on resume (dropout on)", "lora_runtime/rl/train_state.py",
     'torch.set_rng_state(data["torch_rng"])', "pass",
     "tests/e2e/test_readme_promises.py::test_resume_restores_the_rng_with_dropout_on"),
    ("float32 adapters on a bf16 base: backward not cast", "lora_runtime/adapters/layer.py",
     "lora_a, lora_b = lora_a.to(weight.dtype), lora_b.to(weight.dtype)", "pass",
     "tests/e2e/test_readme_promises.py::test_backward_with_float32_adapters_on_a_bfloat16_base"),
]


def run_row(i: int) -> tuple[bool, str]:
    _, rel, old, new, test = ROWS[i]
    path = ROOT / rel
    original = path.read_bytes()
    text = original.decode()
    count = text.count(old)
    if count != 1:
        return False, f"the original text occurs {count} times in {rel}"
    try:
        path.write_text(text.replace(old, new))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", test],
                              cwd=ROOT, capture_output=True, text=True, check=False)
    finally:
        path.write_bytes(original)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-200:]
    return proc.returncode == 1, tail


def main(argv: list[str]) -> int:
    rows = [int(a) for a in argv] or range(len(ROWS))
    print("| # | one-line change | file | test that fails | result |\n|---|---|---|---|---|")
    ok_all = True
    for i in rows:
        ok, tail = run_row(i)
        ok_all &= ok
        finding, rel, _, _, test = ROWS[i]
        print(f"| {i} | {finding} | `{rel}` | `{test.removeprefix('tests/')}` | "
              f"{'fails: ' if ok else 'NOT CAUGHT: '}{tail} |", flush=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
