"""What `import kernels` gets when a process has put this repository's root on sys.path (`python -m`
or `python -c` started in the root, PYTHONPATH=.): never our kernels under the wrong name.

This folder ships as `pixtral_fast.kernels`. Under the name `kernels` the import belongs to Hugging
Face's `kernels` package, which transformers imports: this hands the name over to the first
`kernels` found on sys.path outside the repository root, or raises ModuleNotFoundError (what
`import kernels` raises where that package is not installed) when there is none."""
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
        del sys.modules[name]
        raise ModuleNotFoundError(
            f"No module named {name!r} (outside {root}, whose kernels/ folder is pixtral_fast's: import "
            "pixtral_fast.kernels; that folder is found as a top-level package only because the repository "
            "root is on sys.path)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement returns what sys.modules holds once we are done
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
