"""``python -m smtpd``.

``python -m`` puts the current directory first on the module path, and the parent
runs as root: from any directory but the one holding our packages, that entry is
dropped before anything else is imported, so a module planted there
(``setproctitle.py``...) is never loaded.  (The children run isolated anyway:
``parent.child_argv``.)
"""
import os
import sys

_here = os.path.realpath(os.getcwd())
_ours = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if sys.path and os.path.realpath(sys.path[0] or ".") == _here != _ours:
    del sys.path[0]

from smtpd.main import main  # noqa: E402  (after the path is cleaned)

main()
