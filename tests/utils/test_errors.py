"""How a command ends: cli_main's user errors, --debug, and --help naming the flag that no command's parser holds."""

import argparse

import pytest

from modeling_nanochat.utils.errors import USER_ERROR_EXIT, NanochatError, cli_main


def _command(seen):
    def main(argv):
        p = argparse.ArgumentParser(prog="demo")
        p.add_argument("--data", required=True)
        args = p.parse_args(argv)
        seen.append(argv)
        raise NanochatError(f"{args.data} is empty", "point --data at a corpus")
    return main


def test_user_error_is_one_line_and_debug_shows_the_traceback(capsys):
    seen = []
    assert cli_main(_command(seen), ["--data", "x.txt"]) == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err == "error: x.txt is empty\n  fix: point --data at a corpus\n"
    with pytest.raises(NanochatError, match="x.txt is empty"):
        cli_main(_command(seen), ["--debug", "--data", "x.txt"])
    assert seen == [["--data", "x.txt"]] * 2  # the command's parser never sees --debug


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_names_debug(capsys, flag):
    with pytest.raises(SystemExit) as e:
        cli_main(_command([]), [flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: demo") and "--debug (or NANOCHAT_DEBUG=1)" in out


def test_usage_errors_do_not_print_the_help_note(capsys):
    with pytest.raises(SystemExit) as e:  # -h given, but as --data's missing value: argparse's usage error
        cli_main(_command([]), ["--data", "-h"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "--debug" not in captured.out + captured.err


@pytest.mark.parametrize("module", ["evaluation.core", "recipes.pretrain"])
def test_real_commands_help_names_debug(capsys, module):
    """One command on cli_main, one on cli_run (which returns the command's value)."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--debug (or NANOCHAT_DEBUG=1)" in out
