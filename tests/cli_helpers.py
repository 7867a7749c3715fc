"""Running `ftplan` from tests the way a user does: the real entry point, exit code, stdout and stderr.

    from cli_helpers import error_line, ftplan
    rc, out, err = ftplan(capsys, "plan", "--model", "mistral-7b")
"""

from __future__ import annotations

import sys

from ftplan.planner.cli import main

# The console script in a fresh process (`sys.exit(main())`), wherever the venv put `ftplan`.
FTPLAN_PROCESS = [sys.executable, "-c", "import sys; from ftplan.planner.cli import main; sys.exit(main())"]


def ftplan(capsys, *args: str) -> tuple[int, str, str]:
    """Run the real entry point in-process: exit code, and what this call alone wrote to stdout and stderr."""
    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(capsys, *args: str) -> str:
    """The single `error: ...` line of a command that must refuse its input with exit code 2."""
    rc, out, err = ftplan(capsys, *args)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
