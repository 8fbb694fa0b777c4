"""sandboxd: a root daemon that runs untrusted code in a confined, pre-warmed jail."""

__version__ = "0.1.0"
__date__ = "2026-11-26"  # release date, shown in the man pages
