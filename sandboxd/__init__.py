"""sandboxd: a root daemon that runs untrusted code in a confined, pre-warmed jail."""

__version__ = "0.1.0"
