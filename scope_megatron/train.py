"""Entry point of a SCOPE training run (single process, or one process per rank under torchrun)::

    python -m scope_megatron.train --config configs/tiny_cpu.yaml [key=value ...]
    torchrun --nproc_per_node=8 -m scope_megatron.train --config configs/r1_distill_1p5b_from_skywork_7b.yaml

The config (``scope_megatron.config``) is validated before anything starts, printed on rank 0
and saved as ``RUN_DIR/config.yaml``. Exit status: 0 after the last step or a clean stop
(SIGTERM / Ctrl-C: checkpoint written), 1 when the run was aborted (engine failure, failed
weight sync, too many NaN steps: the message says which; the last checkpoint is intact),
2 for a configuration error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .runtime_env import apply_runtime_env, log_runtime_env

logger = logging.getLogger("scope_megatron.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scope_megatron.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (see docs/training.md)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. rollout.group_size=4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    # first: CUDA reads CUDA_DEVICE_MAX_CONNECTIONS when its context is created, NCCL its
    # variables when the first communicator is
    runtime_env = apply_runtime_env()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from .config import ConfigError, load_config
    from .logs import setup_logging

    try:
        config = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"scope-megatron train: {exc}", file=sys.stderr)
        return 2
    setup_logging(getattr(logging, config.logging.level))
    text = config.to_yaml()
    rank = int(os.environ.get("RANK", "0"))
    log_runtime_env(runtime_env, rank)
    if args.print_config:
        if rank == 0:
            print(text)
        return 0
    if rank == 0:
        logger.info("resolved config:\n%s", text)

    from .trainer.loop import Trainer, TrainingAborted

    trainer = Trainer(config, text)
    try:
        return trainer.run()
    except ConfigError as exc:  # checks that need the world or the devices (e.g. embedded engine placement)
        print(f"scope-megatron train: {exc}", file=sys.stderr, flush=True)
        return 2
    except TrainingAborted as exc:
        logger.error("training aborted after step %d: %s", trainer.step, exc)
        print(f"scope-megatron train: ABORTED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        try:
            from .parallel import destroy_parallel

            destroy_parallel()
        except Exception:  # teardown after a failure is best effort
            pass


def _exit(status: int) -> None:
    """Exit with ``status`` without the interpreter's final garbage collection over every object
    torch / transformers / megatron created (seconds on a loaded machine, inside a launcher's
    SIGTERM grace): the objects are frozen out of it; atexit handlers still run."""
    import gc

    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":  # the guard matters: megatron's checkpoint writer spawns processes
    _exit(main())
