"""`python -m training METHOD [--config run.yaml] [--data FILE] [--out RUN_DIR] [--flags]`.

Dispatches to `training.<METHOD>.main(argv)`; the method module is imported only here, lazily, so a missing
module or dependency is one clear error line instead of a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On 2 cores shared with the app's
# generation engine, spinning threads wait on descheduled peers; measured here under load: 32 tokens × 2 rows took
# 120 s with the default policy and 2.3 s with PASSIVE (training steps suffer likewise). Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from training import METHODS  # noqa: E402  (after the environment is set)

USAGE = f"usage: python -m training {{{','.join(METHODS)}}} [--config run.yaml] [--data FILE] [--out RUN_DIR] [...]"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("`python -m training METHOD --help` lists every option of a method.")
        return 0 if argv else 2
    method, rest = argv[0], argv[1:]
    if method not in METHODS:
        print(f"error: unknown method {method!r}; choose one of {', '.join(METHODS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"training.{method}")
    except ModuleNotFoundError as exc:
        missing = "this installation" if exc.name == f"training.{method}" else f"the module {exc.name!r}"
        print(f"error: training method {method!r} is not available: {missing} lacks it ({exc})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
