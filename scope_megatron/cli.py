"""The ``scope-megatron`` console script: one sub-command per job.

Each sub-command lives in its own module and exposes ``main(argv: list[str]) -> int``;
this file only dispatches, so ``scope-megatron NAME --help`` is that module's own help.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("scope_megatron.examples.demo", "CPU demo: SCOPE distillation of a tiny student, before/after table"),
    "parity-demo": ("scope_megatron.examples.parity_demo", "tiny model: convert, check Megatron-vs-HF parity, train, export"),
    "train": ("scope_megatron.train", "SCOPE training run (also: torchrun -m scope_megatron.train)"),
    "serve": ("scope_megatron.rollout.embedded_server", "embedded engine speaking SGLang's HTTP protocol"),
    "eval": ("scope_megatron.evaluation.cli", "Avg@k / Pass@k on math benchmarks (HF dir or SGLang URL)"),
}


def _usage() -> str:
    lines = ["usage: scope-megatron COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``scope-megatron COMMAND ...`` to ``COMMAND``'s module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"scope-megatron: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
