"""SGLang 0.5.23's and sglang-router 0.3.2's own command-line parsers, built from the published wheels.

Tests check every argv the launcher builds with the parser the real program runs:

- ``python -m sglang.launch_server ARGS``: ``sglang.srt.server_args.prepare_server_args(ARGS)``
  (SGLang 0.5.23 launch_server.py:80, server_args.py:668-719: ``ServerArgs.add_cli_args`` and a
  strict ``parse_args``, exit 2 on an unknown flag);
- ``python -m sglang_router.launch_router ARGS``: ``sglang_router.launch_router.parse_router_args(ARGS)``
  (sglang-router 0.3.2 launch_router.py:64-101, with its compiled ``sglang_router_rs`` module).

The wheels are read from ``.venv/wheels`` (``scripts/setup.sh`` downloads them; ``SGLANG_WHEEL`` /
``SGLANG_ROUTER_WHEEL`` point elsewhere), extracted to a scratch directory and imported there,
never installed or vendored. Importing ``server_args`` pulls in a few packages SGLang's runtime
needs and this project does not install (zmq, orjson, aiohttp, ...); when absent, those (and only
those, listed in ``STUBBED_MODULES``) are replaced by inert modules. Nothing they provide is used to
build the parsers. The parsing runs in a subprocess (``python tests/sglang_parsers.py``) so the
stubs and SGLang's modules never enter the test process.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".venv" / "wheels"
SERVER_MODULE = "sglang.launch_server"
ROUTER_MODULE = "sglang_router.launch_router"

# top-level packages the import chain of each parser touches but this project does not install
STUBBED_MODULES = {
    SERVER_MODULE: ("orjson", "pybase64", "requests", "zmq", "IPython", "aiohttp"),
    ROUTER_MODULE: ("setproctitle", "aiohttp", "orjson"),
}


def sglang_wheel() -> Path | None:
    """The sglang 0.5.23 wheel, or None."""
    return _find("SGLANG_WHEEL", "sglang-0.5.23-*.whl")


def router_wheel() -> Path | None:
    """The sglang-router 0.3.2 wheel, or None."""
    return _find("SGLANG_ROUTER_WHEEL", "sglang_router-0.3.2-*.whl")


def _find(variable: str, pattern: str) -> Path | None:
    candidates = [os.environ.get(variable, "")] + sorted(glob.glob(str(WHEELS / pattern)))
    return next((Path(c) for c in candidates if c and os.path.isfile(c)), None)


def parse_commands(commands: list[list[str]], wheel: Path, scratch: Path, timeout: float = 240) -> list[dict]:
    """Parse each full argv (``[python, "-m", MODULE, *args]``, all for the same MODULE) with that
    module's real parser; one result per argv: ``{"ok": bool, "exit_code": int | None,
    "error": str, "values": {dest: value}}`` (``values``: the parsed arguments, JSON-encoded)."""
    modules = {tuple(c[1:3]) for c in commands}
    if len(modules) != 1 or next(iter(modules))[0] != "-m" or next(iter(modules))[1] not in STUBBED_MODULES:
        raise ValueError(f"commands must all run one of {sorted(STUBBED_MODULES)} with -m, got {sorted(modules)}")
    module = next(iter(modules))[1]
    scratch.mkdir(parents=True, exist_ok=True)
    request = scratch / "request.json"
    request.write_text(json.dumps({"module": module, "wheel": str(wheel), "root": str(scratch / "site"),
                                   "argvs": [c[3:] for c in commands]}))
    proc = subprocess.run([sys.executable, __file__, str(request)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"building {module}'s parser failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the subprocess side ------------------------------------------------------------------------


def _install_stubs(names: tuple[str, ...]) -> None:
    """Inert modules for ``names`` (and their submodules), used only where the real one is absent."""
    import importlib.abc
    import importlib.machinery
    import types

    class Inert:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else Inert()  # decorators

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Inert()

        def __mro_entries__(self, bases):
            return (object,)

    class InertModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Inert()

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] not in names:
                return None
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

        def create_module(self, spec):
            return InertModule(spec.name)

        def exec_module(self, module):
            module.__path__ = []

    sys.meta_path.append(Finder())  # last: a real installed module always wins


def _extract(wheel: str, root: Path, top: str) -> None:
    marker = root / f".{top}-extracted"
    if marker.exists():
        return
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(f"{top}/") and not name.endswith((".cu", ".cuh", ".h", ".cpp", ".md")):
                zf.extract(name, root)
    marker.write_text(wheel)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def _parse_all(request: dict) -> list[dict]:
    module, root = request["module"], Path(request["root"])
    top = module.split(".")[0]
    _extract(request["wheel"], root, top)
    if not (root / Path(*module.split("."))).with_suffix(".py").is_file():
        raise SystemExit(f"{module} is not in {request['wheel']}")
    sys.path.insert(0, str(root))
    _install_stubs(STUBBED_MODULES[module])
    if module == SERVER_MODULE:
        from sglang.srt.server_args import prepare_server_args as parse
    else:
        from sglang_router.launch_router import parse_router_args as parse
    results = []
    for argv in request["argvs"]:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parsed = parse(list(argv))
        except SystemExit as exc:  # argparse's error exit (2) or --help (0)
            results.append({"ok": False, "exit_code": exc.code, "error": err.getvalue()[-2000:], "values": {}})
            continue
        fields = parsed.__struct_fields__ if hasattr(parsed, "__struct_fields__") else vars(parsed)
        values = {name: _jsonable(getattr(parsed, name)) for name in fields}
        results.append({"ok": True, "exit_code": None, "error": "", "values": values})
    return results


if __name__ == "__main__":
    req = json.loads(Path(sys.argv[1]).read_text())
    out = _parse_all(req)
    sys.stdout.flush()
    print(json.dumps(out))
