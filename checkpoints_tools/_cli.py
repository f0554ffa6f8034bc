"""What the conversion tools share: flags, error reporting, the model built for conversion."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Callable, Iterator

import torch

from scope_megatron.logs import setup_logging
from scope_megatron.model.arch import ModelArch, UnsupportedModelError
from scope_megatron.model.checkpoint import (
    CheckpointMismatchError,
    CheckpointReadError,
    OutputExistsError,
    describe_checkpoint_exception,
)
from scope_megatron.model.hf_io import WeightFileError

logger = logging.getLogger("checkpoints_tools")



class InputError(ValueError):
    """The tool's input (a directory, a config.json, a layout flag) is unusable; the message says why."""


@contextlib.contextmanager
def reading_input() -> Iterator[None]:
    """Around the calls that only read and check the user's input (config.json, checkpoint meta,
    the --tp/--pp layout, the world size): their ``ValueError`` is an :class:`InputError`. A
    ``ValueError`` anywhere else is a bug and keeps its traceback (exit 1)."""
    try:
        yield
    except InputError:
        raise
    except ValueError as err:
        raise InputError(str(err)) from err


# Errors that are the user's input, reported in one line with exit code 2.
INPUT_ERRORS = (InputError, UnsupportedModelError, OutputExistsError, WeightFileError, FileNotFoundError,
                CheckpointMismatchError, CheckpointReadError)


def tool_command(module: str, *args: str, nproc: int = 1) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that run ``python -m module args``, or torchrun with ``nproc`` local ranks, as a user would.

    The environment drops any torch.distributed variables of the calling process.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", module, *args], env
    return [sys.executable, "-m", module, *args], env


def add_layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun when > 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (run under torchrun when > 1)")


def run_tool(name: str, body: Callable[[argparse.Namespace], dict], parser: argparse.ArgumentParser,
             argv: list[str] | None) -> int:
    """Parse args, run ``body``, print its result as one JSON line on rank 0; map input errors to exit 2."""
    from torch.distributed.checkpoint.api import CheckpointException

    from scope_megatron.device_check import probe_transformer_engine

    args = parser.parse_args(argv)
    setup_logging()
    probe_transformer_engine()  # before any megatron-core import: a TE that does not import is hidden
    try:
        result = body(args)
    except INPUT_ERRORS as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except CheckpointException as err:  # a BaseException (torch/distributed/checkpoint/api.py:30): a failed write
        print(f"{name}: error: checkpoint write failed: {describe_checkpoint_exception(err)}", file=sys.stderr)
        return 1
    finally:
        from scope_megatron.parallel import destroy_parallel

        destroy_parallel()
    if result and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
    return int(result.get("exit_code", 0)) if result else 0


def build_for_conversion(arch: ModelArch, dtype: torch.dtype):
    """The model chunk of this rank, on CPU, uninitialised (weights are loaded right after)."""
    from scope_megatron.model.builder import build_gpt_model

    return build_gpt_model(arch, params_dtype=dtype, impl="local", perform_initialization=False, device="cpu")
