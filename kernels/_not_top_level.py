"""What `import kernels` gets when a process has put this repository's root on sys.path (`python -m`
or `python -c` started in the root, PYTHONPATH=.): never our kernels under the wrong name.

This folder ships as `pixtral_fast.kernels`. Under the name `kernels` the import belongs to Hugging
Face's `kernels` package, which transformers imports: this hands the name over to the first
`kernels` found on sys.path outside the repository root. Where there is none, the name is left to
an empty shell with no file, path or version, which is what a stray namespace folder looks like:
transformers' availability check (find_spec, then an import when no distribution says a version)
reads it as "not installed", and any attribute asked of it raises an error that says why."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, folder: str) -> None:
    sys.modules.pop(__name__, None)  # this helper, registered under the borrowed name
    root = os.path.realpath(os.path.dirname(folder))
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        _leave_a_shell(sys.modules[name], root)
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement returns what sys.modules holds once we are done
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _leave_a_shell(module, root: str) -> None:
    def explain(attribute: str):
        raise AttributeError(
            f"kernels.{attribute}: no package 'kernels' is installed; this empty module stands for "
            f"{root}/kernels/, which is pixtral_fast's (import pixtral_fast.kernels) and is found as a "
            "top-level package only because the repository root is on sys.path")

    for key in [k for k in vars(module) if not k.startswith("__")]:
        delattr(module, key)
    module.__file__ = None
    module.__path__ = []  # no submodule of ours is importable as kernels.*
    module.__getattr__ = explain
