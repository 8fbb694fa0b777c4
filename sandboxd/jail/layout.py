"""Names in the root that both the builder and the worker rely on, and where a root may
not take files from."""

DEVICE_NODES = ("null", "zero", "full", "random", "urandom")  # in /dev, each run its own nodes
DEVICE_NUMBERS = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}
# Mount points: what a run sees at / is the configured paths and these, nothing of the jail's own.
SKELETON_DIRS = ("dev", "dev/shm", "tmp", "var", "var/tmp", "work", "etc")
# Never brought into a root, whatever the configuration says.
FORBIDDEN_PREFIXES = ("/proc", "/sys", "/dev", "/run", "/var/run", "/etc/sandboxd", "/root", "/home", "/tmp")


def under(path: str, top: str) -> bool:
    """``path`` is ``top`` or inside it (plain string paths, no link resolution)."""
    top = top.rstrip("/")
    return path == top or path.startswith(top + "/")


def forbidden_prefix(path: str) -> str | None:
    """The forbidden place ``path`` lies in, if any."""
    return next((prefix for prefix in FORBIDDEN_PREFIXES if under(path, prefix)), None)
