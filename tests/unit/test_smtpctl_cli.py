"""smtpctl's typer command tree: the same commands as the grammar, help per command,
the options anywhere, startup without typer's heavy imports, and shell completion (the
committed scripts are current, and bash, fish and zsh complete with them, without the
daemon and without ever connecting to the control socket)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from smtpctl import completion
from smtpctl.main import (PLACEHOLDERS, CommandLine, OtherOption, PrefixGroup, command,
                          command_argv, split_argv)
from smtpctl.parser import COMMANDS, GRAMMAR, parse_command
from tests.conftest import REPO

EVP, MSG = "0123456789abcdef", "89abcdef"


def smtpctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpctl", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


# --- the tree and the grammar -------------------------------------------------------------------

def _leaf_of(pattern: str):
    """Walk a grammar pattern's keywords down the typer tree: (leaf command, its words)."""
    node, tokens = command(), pattern.split()
    while isinstance(node, PrefixGroup):
        node = node.commands[tokens.pop(0)]
    return node, tokens


def test_every_grammar_command_is_a_typer_command_and_nothing_else_is():
    reached = set()
    for pattern, _ in COMMANDS:
        leaf, rest = _leaf_of(pattern)
        reached.add(id(leaf))
        arguments = [p for p in leaf.params if p.param_type_name == "argument"]
        assert arguments or not rest, pattern          # words left over are the leaf's arguments
        assert all(t in PLACEHOLDERS or t in ("from", "for", "all") for t in rest), pattern
    leaves, groups = [], [command()]
    for group in groups:
        for sub in group.commands.values():
            (groups if isinstance(sub, PrefixGroup) else leaves).append(sub)
    assert {id(leaf) for leaf in leaves} == reached


def test_each_group_lists_the_grammar_keywords_in_order():
    groups = [((), command())]
    for path, group in groups:
        assert list(group.commands) == GRAMMAR.keywords(path), path
        groups += [((*path, n), g) for n, g in group.commands.items() if isinstance(g, PrefixGroup)]


@pytest.mark.parametrize("words, argv", [
    (["sh", "q"], ["show", "queue"]),
    (["show", "queue", MSG.upper()], ["show", "queue", "--", MSG]),
    (["rem", "a"], ["remove", "--", "all"]),
    (["remove", ""], ["remove", "--", "all"]),
    (["sch", EVP], ["schedule", "--", EVP]),
    (["pa", "mt", "f", "::ffff:192.0.2.1", "f", "example.org"],
     ["pause", "mta", "--", "from", "::ffff:192.0.2.1", "for", "example.org"]),
    (["tr", "-x"], ["trace", "--", "-x"]),
    (["sp", "w"], ["spf", "walk"]),
    (["sh", "mt", "p"], ["show", "mta", "paused"]),
])
def test_a_parsed_line_runs_as_its_full_typer_command(words, argv):
    assert command_argv(parse_command(words)) == argv
    assert command_argv(parse_command(words), "/s", True)[:2] == ["--socket", "/s"]


def test_json_goes_to_show_queue_only():
    assert command_argv(parse_command(["sh", "q"]), None, True) == ["show", "queue", "--json"]
    assert "--json" not in command_argv(parse_command(["sh", "statu"]), None, True)


@pytest.mark.parametrize("argv, line", [
    (["--socket", "/s", "sh", "q"], CommandLine(["sh", "q"], "/s")),
    (["sh", "q", "-s", "/s", "--json"], CommandLine(["sh", "q"], "/s", True)),
    (["-s/s", "sh", "--socket=/t", "q"], CommandLine(["sh", "q"], "/t")),
    (["encrypt", "--", "-pw", "--json"], CommandLine(["encrypt", "-pw", "--json"])),
    (["sh", "q", "-h"], CommandLine(["sh", "q"], help=True)),
    (["update", "table", "-"], CommandLine(["update", "table", "-"])),
])
def test_options_stand_anywhere(argv, line):
    assert split_argv(argv) == line


@pytest.mark.parametrize("argv", [["-x", "show", "queue"], ["show", "queue", "--socket"], ["--jsn"]])
def test_other_options_are_left_to_click(argv):
    with pytest.raises(OtherOption):
        split_argv(argv)


# --- help -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["show", "queue", "--help"], ["sh", "q", "-h"], ["help", "sh", "q"],
                                  ["--socket", "/nonexistent", "help", "show", "queue"]])
def test_help_of_one_command(args):
    res = smtpctl(*args)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: smtpctl show queue [OPTIONS] [<msgid>]")
    assert "--json" in res.stdout and "One line per envelope" in res.stdout


def test_help_lists_every_command():
    res = smtpctl("help")
    assert res.returncode == 0 and res.stdout == smtpctl("--help").stdout
    listed = [line.split()[0] for line in res.stdout.split("Commands:\n")[1].splitlines()]
    assert listed == GRAMMAR.keywords(())
    assert "--socket" in res.stdout
    pause = smtpctl("help", "pa").stdout
    assert pause.startswith("Usage: smtpctl pause ") and "envelope" in pause and "smtp" in pause


def test_unknown_option_is_a_usage_error():
    res = smtpctl("-x", "show", "queue")
    assert res.returncode == 2 and "No such option: -x" in res.stderr


def test_running_a_command_imports_neither_pydantic_nor_rich(tmp_path):
    # typer 0.2x converts values with pydantic (~90 ms) and renders with rich: mailq runs
    # from scripts, so neither may load when a command runs (nor when it fails).
    code = ("import sys; sys.argv = ['mailq', '--socket', sys.argv[1]]\n"
            "from smtpctl.main import main\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    print(exc.code)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'rich'}))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none.sock")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.stdout == "1\n[]\n" and res.stderr == "smtpctl: smtpd doesn't seem to be running\n"


# --- completion -----------------------------------------------------------------------------------

COMPLETION_DIR = REPO / "contrib" / "completion"


def test_committed_completion_scripts_are_current(tmp_path):
    written = completion.write(tmp_path)
    assert sorted(p.name for p in written) == sorted(completion.FILES.values())
    for path in written:
        assert (COMPLETION_DIR / path.name).read_text() == path.read_text(), (
            f"contrib/completion/{path.name} is stale: run python -m smtpctl.completion")


@pytest.fixture
def shell_env(tmp_path):
    """PATH with an ``smtpctl`` of this tree, and a listening control socket that must stay
    untouched (completion never connects)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "smtpctl"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m smtpctl "$@"\n')
    wrapper.chmod(0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "ctl.sock"))
    listener.listen(8)
    listener.setblocking(False)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "SMTPD_SOCKET": str(tmp_path / "ctl.sock"),
           "HOME": str(tmp_path)}
    yield env
    try:
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def _bash_complete(env: dict, words: list[str]) -> list[str]:
    quoted = " ".join(f"'{w}'" for w in words)
    script = (f"source {COMPLETION_DIR / 'smtpctl.bash'}\n"
              f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
              "_smtpctl_completion smtpctl\n"
              "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    res = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                         text=True, timeout=60, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


@pytest.mark.parametrize("words, expected", [
    (["smtpctl", "sh"], ["show"]),
    (["smtpctl", "show", "q"], ["queue"]),
    (["smtpctl", "sh", "q"], ["queue"]),                  # a prefix before, as smtpctl takes it
    (["smtpctl", "--socket", "/nonexistent", "pa", "e"], ["envelope"]),
    (["smtpctl", "show", "st"], ["stats", "status"]),
    (["smtpctl", ""], GRAMMAR.keywords(())),
    (["smtpctl", "sh", "mt", ""], ["paused"]),
])
def test_bash_completes_with_the_committed_script(shell_env, words, expected):
    assert _bash_complete(shell_env, words) == expected


def _need(shell: str) -> str:
    path = shutil.which(shell)
    if path is None:
        pytest.fail(f"{shell} is not installed: contrib/dev.sh test installs it (apt-get install {shell})")
    return path


def test_fish_completes_with_the_committed_script(shell_env):
    fish = _need("fish")
    script = (f"source {COMPLETION_DIR / 'smtpctl.fish'}; "
              "complete -C 'smtpctl sh q'; complete -C 'smtpctl pa'")
    res = subprocess.run([fish, "--no-config", "-c", script], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **shell_env})
    assert res.returncode == 0, res.stderr
    assert [line.split("\t")[0] for line in res.stdout.splitlines()] == ["queue", "pause"]
    assert subprocess.run([fish, "--no-execute", str(COMPLETION_DIR / "smtpctl.fish")]).returncode == 0


def test_zsh_script_parses_and_its_answers_complete(shell_env):
    zsh = _need("zsh")
    assert subprocess.run([zsh, "-n", str(COMPLETION_DIR / "_smtpctl")]).returncode == 0
    # What the script evals on <TAB>: smtpctl's answer for the words so far.
    res = subprocess.run(["smtpctl"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **shell_env, "_SMTPCTL_COMPLETE": "complete_zsh",
                              "_TYPER_COMPLETE_ARGS": "smtpctl sh q"})
    assert res.returncode == 0 and res.stdout.startswith("_arguments") and '"queue"' in res.stdout
    # Autoloaded from $fpath, the file defines the completer and registers nothing itself.
    script = (f"fpath=({COMPLETION_DIR} $fpath); autoload -Uz compinit; compinit -u -D; "
              "print -r -- ${_comps[smtpctl]}")
    res = subprocess.run([zsh, "-f", "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **shell_env})
    assert res.returncode == 0 and res.stdout.strip() == "_smtpctl", res.stdout + res.stderr
