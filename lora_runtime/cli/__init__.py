"""The `lora-runtime` command (also `python -m lora_runtime`).

    lora-runtime train CONFIG [--set dotted.key=value ...]
    lora-runtime inspect CONFIG [--set ...]
    lora-runtime merge --adapter DIR --out DIR (--base DIR | [CONFIG] [--set ...])
    lora-runtime export CONFIG --format torchscript|aoti [--merged] --out FILE [--set ...]
    lora-runtime eval CONFIG [--episodes N] [--adapter DIR | --merged] [--json FILE] [--set ...]
    lora-runtime demo [--configs DIR] [--output-root DIR] [--set ...]
    lora-runtime bench [bench options ...]

Every failure (a config that does not validate, an unknown --set key, a missing adapter or
model folder, an output folder that holds results or cannot be written, an adapter that
does not fit the model, a disk error) prints one paragraph to stderr naming the file or
key and what to do, and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lora_runtime.cli.exit_codes import EXIT_INTERRUPTED, EXIT_USAGE
from lora_runtime.errors import AdapterError, ConfigError, MergeError, UsageError


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="dotted.key=value",
        help="override one config value (YAML syntax), e.g. --set runner.steps=20; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-runtime",
        description="Fused LoRA runtime for RL actors: train, inspect and merge adapters in PEFT's format.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune the actor in the config's mode (new / resume / full)",
                       description="Fine-tune the actor on the config's task (task.kind: babyai, gym, text, reach) "
                       "with its algorithm (algorithm.name: grpo or ppo). The mode comes "
                       "from actor.model: is_lora + lora_path null = new adapter, is_lora + lora_path = resume "
                       "that adapter, is_lora false = full fine-tuning. Outputs go to runner.output_dir. "
                       "Ctrl-C (SIGINT) or SIGTERM saves a last checkpoint and exits with status 130 or 143.")
    p.add_argument("config", metavar="CONFIG", help="the run's YAML file, e.g. configs/lora_new.yaml")
    _add_set(p)

    p = sub.add_parser("inspect", help="show the mode, the patched modules and parameter counts",
                       description="Build the actor as `train` would (without training or writing anything) "
                       "and print the mode, a table of patched modules with shapes and ranks, and parameter counts.")
    p.add_argument("config", metavar="CONFIG", help="the run's YAML file")
    _add_set(p)

    p = sub.add_parser("merge", help="fold an adapter into the base weights and write a model folder",
                       description="Load the base model, apply the adapter, fold it into the weights and write "
                       "the merged model (safetensors + config.json + the base folder's tokenizer, processor "
                       "and generation files, Hugging Face layout) to --out. The base is --base DIR (a model "
                       "folder, as with PEFT), or the one a run CONFIG names; by default the config.yaml a "
                       "`train` run saved beside the adapter.")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create for the merged model (must not hold files)")
    p.add_argument("--base", metavar="DIR", help="the base model folder (config.json + *.safetensors); no run YAML needed")
    p.add_argument("config", nargs="?", metavar="CONFIG", help="run YAML naming the base (default: DIR/../config.yaml)")
    _add_set(p)

    p = sub.add_parser("export", help="write the actor as a TorchScript file or an AOTInductor package",
                       description="Build the actor of CONFIG (its trained adapter: actor.model.lora_path, or a "
                       "full-mode model folder) and write its forward as a TorchScript file (.pt; torch.jit.load / "
                       "torch::jit::load) or an AOTInductor package (.pt2; torch._inductor.aoti_load_package / "
                       "torch::inductor::AOTIModelPackageLoader). Unmerged files call the fused op: load "
                       "lora_runtime.ops.library_path() first. --merged folds the adapter in: plain torch.")
    p.add_argument("config", metavar="CONFIG", help="the run's YAML file (e.g. RUN/config.yaml with --set actor.model.lora_path=RUN/adapter)")
    p.add_argument("--format", required=True, choices=["torchscript", "aoti"], help="torchscript (.pt) or aoti (.pt2)")
    p.add_argument("--merged", action="store_true", help="fold the adapter into the weights first (the file needs only torch)")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to create (.pt or .pt2; must not exist)")
    _add_set(p)

    p = sub.add_parser("eval", help="greedy success rate and return on held-out seeds or prompts",
                       description="Evaluate greedily on held-out seeds (never a training seed): the config's base "
                       "(with its lora_path adapter, if any), --adapter DIR on the base, or with --merged the adapter "
                       "folded into the base weights. A full run's model/: --set actor.model.model_path=RUN/model.")
    p.add_argument("config", metavar="CONFIG", help="the run's YAML file (task.kind babyai, gym or text)")
    p.add_argument("--episodes", type=int, metavar="N",
                   help="held-out episodes or prompts (default: task.eval_episodes; text: task.eval_prompts or all)")
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE (JSON)")
    p.add_argument("--adapter", metavar="DIR", help="adapter folder to evaluate on the config's base")
    p.add_argument("--merged", action="store_true", help="fold the adapter into the base weights before evaluating")
    _add_set(p)

    p = sub.add_parser("demo", help="run new -> resume -> full from configs/ and compare them",
                       description="Train configs/lora_new.yaml, then configs/lora_resume.yaml (resuming the "
                       "adapter the first run saved), with configs/full.yaml alongside (its output in "
                       "<its output_dir>/train.log), each in its own process, and print one table comparing them. Results of an earlier demo in the same folders are replaced.")
    p.add_argument("--configs", default=None, metavar="DIR", help="folder holding the three YAML files (default: configs)")
    p.add_argument("--task", metavar="NAME", help="the demo of configs/NAME/ (e.g. --task text: GRPO on a language "
                   "model); the same as --configs configs/NAME")
    p.add_argument("--output-root", metavar="DIR", help="write the runs to DIR/lora_new, DIR/lora_resume, DIR/full "
                   "(default: each config's runner.output_dir)")
    _add_set(p)

    p = sub.add_parser("bench", help="benchmark this runtime against PEFT and the base (see `bench --help`)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _fail(message: str) -> int:
    print(f"lora-runtime: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every later argument (--help included) belongs to bench
        from lora_runtime.bench.main import main as bench_main  # deferred: start-up time

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)

    try:
        if args.command == "train":
            from lora_runtime.cli.commands import run_train  # deferred: start-up time

            return run_train(args.config, args.overrides)
        if args.command == "inspect":
            from lora_runtime.cli.commands import run_inspect  # deferred: start-up time

            return run_inspect(args.config, args.overrides)
        if args.command == "merge":
            from lora_runtime.cli.commands import run_merge  # deferred: start-up time

            return run_merge(args.adapter, args.out, args.config, args.overrides, base=args.base)
        if args.command == "export":
            from lora_runtime.cli.export import run_export  # deferred: start-up time

            return run_export(args.config, args.format, args.merged, args.out, args.overrides)
        if args.command == "eval":
            from lora_runtime.cli.evaluate import run_eval  # deferred: start-up time

            return run_eval(args.config, args.episodes, args.adapter, args.merged, args.overrides, args.json)
        from lora_runtime.cli.demo import run_demo  # deferred: start-up time

        if args.task is not None and args.configs is not None:
            return _fail("demo: give --task or --configs, not both")
        configs = args.configs or (os.path.join("configs", args.task) if args.task else "configs")
        return run_demo(configs, args.output_root, args.overrides)
    except (ConfigError, AdapterError, UsageError, MergeError) as exc:
        return _fail(str(exc).strip())
    except KeyboardInterrupt:
        print("lora-runtime: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a disk full, a folder removed or made read-only while running
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(f"{args.command}: {exc.strerror or exc}{where}; nothing half-written was left "
                     "in place (outputs are written atomically). Free space or fix permissions and run again")
    except Exception as exc:  # noqa: BLE001 (the CLI promises exit 2 and no traceback for every failure)
        text = " ".join(str(exc).split()) or "no message"
        return _fail(f"{args.command} failed: {type(exc).__name__}: {text}. This is unexpected: please "
                     "report it with the command line and config")


if __name__ == "__main__":
    sys.exit(main())
