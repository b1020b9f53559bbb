"""smtpctl's shell completion scripts (bash, zsh, fish), made from the typer app.

``python -m smtpctl.completion [DIR]`` writes them into DIR (default contrib/completion):
``smtpctl.bash``, ``_smtpctl`` (zsh) and ``smtpctl.fish``, the files the package installs.
The scripts are typer's: on <TAB> they run ``smtpctl`` with ``_SMTPCTL_COMPLETE`` set,
and smtpctl.main answers from its command tree alone (prefixes included: ``smtpctl sh
q<TAB>``), without reading its configuration or connecting to the control socket.

The zsh file is made loadable both ways: autoloaded from $fpath (the file is then the
body of the function ``_smtpctl``, which must complete at once) and sourced by hand
(then it registers itself with compdef).
"""
from __future__ import annotations

import sys
from pathlib import Path

from typer.completion import get_completion_script

from smtpctl.main import COMPLETE_VAR, PROG

FILES = {"bash": "smtpctl.bash", "zsh": "_smtpctl", "fish": "smtpctl.fish"}
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "contrib" / "completion"


def script(shell: str) -> str:
    text = get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell)
    if shell == "zsh":
        register = f"compdef _{PROG}_completion {PROG}"
        assert text.rstrip().endswith(register), "typer's zsh script changed shape"
        text = text.rstrip()[: -len(register)] + (
            'if [[ "${zsh_eval_context[-1]}" == loadautofunc ]]; then\n'
            f'  _{PROG}_completion "$@"\n'
            "else\n"
            f"  {register}\n"
            "fi")
    return text.rstrip() + "\n"


def write(directory: Path = DEFAULT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in FILES.items():
        path = directory / name
        path.write_text(script(shell))
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR):
        print(written_path)
