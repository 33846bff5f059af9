"""GRPO on a language model, head to head: lora-runtime's text task against TRL's
`GRPOTrainer` + PEFT (and TRL on a `prepare_actor` model, docs/trl.md), on one thread.

    .venv/bin/pip install trl            # the benchmark's optional dependency, never the runtime's
    .venv/bin/python bench/text_vs_trl.py [--steps 20] [--json bench/results/text_vs_trl.json]

The same model folder (a random tiny Llama: hidden 256, 4 layers, 4 heads, intermediate 688,
a character tokenizer), prompts (`a+b=` with an `answer` column), reward functions (exact
answer + a shaped share of digits), 1 prompt x 8 completions of up to 8 tokens a step, r = 16
(alpha 16) on the seven projections, learning rate 1e-3 constant, beta (KL) 0.04, token-mean
loss (TRL's "dapo"), gradient checkpointing off, seed 0. Each variant runs in its own process
(its peak RSS is its own); the three run at the same time but take their steps in turn
(`gate`: step k of every variant, then step k + 1 of every variant), so a change in the
machine's load hits every variant alike and the ratios are those of one interleaved run.
Per step: the whole step, the generation in it, the rest (update); the reward of each step.
Steps after the first `--warmup` are summarised (median).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, BETA, GROUP, NEW_TOKENS, RANK = 1e-3, 0.04, 8, 8, 16
REWARDS = '''
def exact(prompts, completions, answer, **kw):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def digits(prompts, completions, **kw):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''


def make_inputs(root: str) -> tuple[str, str, str]:
    """The model folder, the JSONL prompts and the reward file (made once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_runtime.rl.models.tiny_lm import char_tokenizer

    model, data, rewards = (os.path.join(root, n) for n in ("model", "prompts.jsonl", "rewards.py"))
    if not os.path.isfile(os.path.join(model, "config.json")):
        tok = char_tokenizer()
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(model)
        tok.save_pretrained(model)
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a in range(50) for b in range(50))
    with open(rewards, "w") as f:
        f.write(REWARDS)
    return model, data, rewards


def gate() -> None:
    """Waits for the parent's turn signal (a line on stdin) between two steps; the time spent
    here is outside every timed window."""
    print("READY", flush=True)
    if not sys.stdin.readline():
        raise SystemExit("the parent is gone")


def _load_rewards(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_rewards", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [module.exact, module.digits]


def run_trl(root: str, steps: int, variant: str) -> dict:
    """TRL's GRPOTrainer with a `peft_config` ("trl_peft") or on a `prepare_actor` model ("trl_runtime")."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    model_dir, data, rewards = (os.path.join(root, n) for n in ("model", "prompts.jsonl", "rewards.py"))
    with open(data) as f:
        rows = [json.loads(line) for line in f]
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    args = trl.GRPOConfig(output_dir=os.path.join(root, f"out_{variant}"), use_cpu=True, bf16=False, report_to="none",
                          per_device_train_batch_size=GROUP, num_generations=GROUP, max_completion_length=NEW_TOKENS,
                          learning_rate=LR, lr_scheduler_type="constant", beta=BETA, max_steps=steps,
                          gradient_checkpointing=False, save_strategy="no", logging_steps=1, seed=0,
                          loss_type="dapo", disable_tqdm=True)
    kwargs = {}
    trainer_cls = trl.GRPOTrainer
    if variant == "trl_peft":
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=SEVEN, task_type="CAUSAL_LM")
    else:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "rl"))
        from test_text_trl import RuntimeGRPOTrainer  # the shim of docs/trl.md

        from lora_runtime.actor import prepare_actor
        from lora_runtime.adapters import group_siblings
        from lora_runtime.config import ActorModelConfig

        model = prepare_actor(model, ActorModelConfig(is_lora=True, lora_rank=RANK, lora_alpha=RANK,
                                                      target_modules=SEVEN), seed=0)
        group_siblings(model, input_ids=torch.tensor([tok.encode("1+2=", add_special_tokens=False)]))
        trainer_cls = RuntimeGRPOTrainer
    times, gens = [], []

    class Timed(trainer_cls):
        def _generate_single_turn(self, *a, **kw):
            start = time.perf_counter()
            try:
                return super()._generate_single_turn(*a, **kw)
            finally:
                gens.append(time.perf_counter() - start)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            gate()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            times.append(time.perf_counter() - self.start)

    trainer = Timed(model=model, reward_funcs=_load_rewards(rewards), args=args,
                    train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, callbacks=[StepTimer()],
                    **kwargs)
    trainer.train()
    curve = [float(h["reward"]) for h in trainer.state.log_history if "reward" in h]
    lengths = [float(h["completions/mean_length"]) for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": times, "generate_s": gens[: len(times)], "reward": curve, "completion_len": lengths}


def run_ours(root: str, steps: int) -> dict:
    """lora-runtime's trainer on `task.kind: text` with the same settings."""
    from lora_runtime.config import validate_config
    from lora_runtime.rl.trainer import train

    model_dir, data, rewards = (os.path.join(root, n) for n in ("model", "prompts.jsonl", "rewards.py"))
    raw = {"actor": {"model": {"is_lora": True, "lora_rank": RANK, "lora_alpha": RANK, "model_path": model_dir,
                               "target_modules": SEVEN}},
           "task": {"kind": "text", "dataset": data, "eval_fraction": 0.1, "max_new_tokens": NEW_TOKENS,
                    "reward": [f"{rewards}:exact", f"{rewards}:digits"]},
           "algorithm": {"name": "grpo", "batch_size": 1, "group_size": GROUP, "lr": LR, "kl_coef": BETA,
                         "loss_type": "token_mean"},
           "runner": {"output_dir": os.path.join(root, "out_ours"), "overwrite": True, "steps": steps, "seed": 0,
                      "num_threads": 1, "progress": False, "plot": False}}
    records = []

    def on_step(record: dict) -> None:  # after step k (its time taken inside the trainer): wait for step k + 1's turn
        records.append(record)
        if len(records) < steps:
            gate()

    train(validate_config(raw), on_step=on_step, log=lambda m: None)
    return {"step_s": [r["step_time_s"] for r in records], "generate_s": [r["generate_s"] for r in records],
            "reward": [r["reward_mean"] for r in records], "completion_len": [r["completion_len"] for r in records],
            "logp_gap_max": max(r["rollout_logp_gap"] for r in records)}


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    out = run_ours(args.root, args.steps) if args.child == "ours" else run_trl(args.root, args.steps, args.child)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def summarise(name: str, out: dict, warmup: int) -> dict:
    step = out["step_s"][warmup:] or out["step_s"]
    gen = out["generate_s"][warmup:] or out["generate_s"]
    upd = [s - g for s, g in zip(step, gen, strict=False)]
    lengths = out["completion_len"][warmup:] or out["completion_len"]
    return {"variant": name, "step_s": statistics.median(step), "generate_s": statistics.median(gen),
            "update_s": statistics.median(upd), "completion_len": statistics.mean(lengths), "peak_rss_mib": round(out["peak_rss_mib"], 1), "per_step": out}


def run_interleaved(args, variants: list[str]) -> list[dict]:
    """Starts one child per variant and lets them take their steps in turn (round robin:
    each child's step runs alone); returns each child's RESULT."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = []
    for variant in variants:
        cmd = [sys.executable, __file__, "--child", variant, "--root", args.root, "--steps", str(args.steps)]
        err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed once the child has ended)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        children.append({"variant": variant, "proc": proc, "err": err, "result": None})

    def until_ready(c: dict) -> None:
        """Reads `c`'s output until it waits for its turn (READY) or has finished (RESULT)."""
        for line in c["proc"].stdout:
            if line.startswith("READY"):
                return
            if line.startswith("RESULT "):
                c["result"] = json.loads(line[7:])
                return
        c["err"].seek(0)
        print(c["err"].read()[-3000:], file=sys.stderr)
        for other in children:
            other["proc"].kill()
        raise SystemExit(f"{c['variant']} failed")

    for c in children:  # each loaded and waiting (start-up runs side by side; it is never timed)
        until_ready(c)
    while any(c["result"] is None for c in children):
        for c in children:
            if c["result"] is None:
                c["proc"].stdin.write("GO\n")
                c["proc"].stdin.flush()
                until_ready(c)
    for c in children:
        c["proc"].wait()
        c["err"].close()
    return [c["result"] for c in children]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--root", default="runs/bench_text")
    p.add_argument("--json", default="bench/results/text_vs_trl.json")
    p.add_argument("--variants", default="ours,trl_peft,trl_runtime")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    os.makedirs(args.root, exist_ok=True)
    make_inputs(args.root)
    variants = args.variants.split(",")
    rows = [summarise(v, out, args.warmup) for v, out in zip(variants, run_interleaved(args, variants), strict=True)]
    for r in rows:
        print(f"{r['variant']:12s} step {r['step_s']:.4f} s (generate {r['generate_s']:.4f}, update {r['update_s']:.4f}), "
              f"mean completion {r['completion_len']:.2f} tokens, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    load = os.getloadavg()
    result = {"settings": {"steps": args.steps, "warmup": args.warmup, "lr": LR, "beta": BETA, "group": GROUP,
                           "max_new_tokens": NEW_TOKENS, "rank": RANK, "threads": 1, "loadavg": load},
              "variants": rows}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"load average {load[0]:.2f}; raw figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
