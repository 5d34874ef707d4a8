"""What a user sees when something goes wrong: one error base for the package and one way for a command to end.

Every layer raises its own subclass of `NanochatError` (`CheckpointError` here for model directories, `DataError`
for corpora and data files, `RunError` for pretraining's flags, `SFTSetupError`, `BundleError`, ...) with a message
that names the file, line or flag at fault and what to do about it. Library callers catch them like any ValueError.
A command line entry point wraps its `main` in `cli_main`: a `NanochatError` (a user's mistake, not a bug) becomes
one `error: ...` line on stderr and exit status 2, Ctrl-C exits 130 without a traceback, anything else is a bug and
keeps its traceback. `--debug` on the command line or `NANOCHAT_DEBUG=1` shows the traceback for user errors too.
"""

from __future__ import annotations

import os
import sys

DEBUG_ENV = "NANOCHAT_DEBUG"
USER_ERROR_EXIT = 2


class NanochatError(ValueError):
    """A user-facing problem (bad input, a broken file, an impossible flag); the message says what and the fix.

    A ValueError so that code catching ValueError around our functions (as the HF stack does) keeps working."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem, self.fix = problem, fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")


class CheckpointError(NanochatError):
    """A model directory or checkpoint that cannot be used as it is on disk."""


class DataError(NanochatError):
    """A corpus, data file or data row that cannot be read as what it should be."""


DEBUG_HELP = (f"--debug (or {DEBUG_ENV}=1), taken by every command: a user error shows its full traceback "
              "instead of one 'error:' line")


def _help_requested(argv: list[str] | None) -> bool:
    return any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def strip_debug(argv: list[str] | None) -> list[str] | None:
    """argv without `--debug` (the flag belongs to `cli_main`, not to the command's own parser)."""
    if argv is None:
        if "--debug" not in sys.argv[1:]:
            return None
        argv = sys.argv[1:]
    return [a for a in argv if a != "--debug"]


def report(error: BaseException, *, file=None) -> None:
    """Print a user error the way every command does: `error: <problem>` (+ the fix line)."""
    print(f"error: {error}", file=file or sys.stderr, flush=True)


def cli_main(main, argv: list[str] | None = None, *, errors: tuple = ()) -> int:
    """Run a command's `main(argv)` and turn user errors into `error: ...` + exit status 2.

    `errors` adds exception types that are user errors for this command only (e.g. the Hub's "not logged in").
    Only the main process prints (under a distributed launch every rank hits the same bad input)."""
    debug = debug_requested(argv)
    argv = strip_debug(argv)
    try:
        return main(argv)
    except SystemExit as e:  # argparse's --help ends here; the flag cli_main takes away is not in its parser
        if e.code in (0, None) and _help_requested(argv):
            print(f"\n{DEBUG_HELP}", flush=True)
        raise
    except (NanochatError, *errors) as e:
        if debug:
            raise
        if _is_main_process():
            report(e)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130


def cli_run(main, argv: list[str] | None = None, *, errors: tuple = ()):
    """`cli_main` for a `main` whose return value callers use (a plan, results): that value, or SystemExit with
    `cli_main`'s exit status after a user error (already reported) or Ctrl-C."""
    out = []
    code = cli_main(lambda a: out.append(main(a)), argv, errors=errors)
    if out:
        return out[0]
    raise SystemExit(code)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


__all__ = ["NanochatError", "CheckpointError", "DataError", "cli_main", "cli_run", "debug_requested", "report",
           "strip_debug", "DEBUG_ENV", "DEBUG_HELP", "USER_ERROR_EXIT"]
