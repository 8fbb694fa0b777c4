"""sandboxctl: use and administer sandboxd over its socket (see sandboxctl(8)).

    cli        the command line and its dispatch to a command
    base       exit statuses, argument types, output for scripts and for terminals
    runs       run, syscalls, root why, jobs, kill
    sessions   session open/exec/close/interrupt/list, repl
    admin      status, usage, reload, drain, undrain, check-config, rebuild-root, env list/build
"""

from .cli import main, parser

__all__ = ["main", "parser"]
