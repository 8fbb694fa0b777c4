"""Names in the root that both the builder and the worker rely on, and where a root may
not take files from."""

MARKER = ".sandboxd-root"  # a file every root has: "am I inside the jail root?"
DEVICE_NODES = ("null", "zero", "full", "random", "urandom")  # in /dev, each run its own nodes
DEVICE_NUMBERS = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}
SKELETON_DIRS = ("dev", "dev/shm", "tmp", "var", "var/tmp", "work", ".scratch", ".old", "etc")
# Never brought into a root, whatever the configuration says.
FORBIDDEN_PREFIXES = ("/proc", "/sys", "/dev", "/run", "/var/run", "/etc/sandboxd", "/root", "/home", "/tmp")


def under(path: str, top: str) -> bool:
    """``path`` is ``top`` or inside it (plain string paths, no link resolution)."""
    top = top.rstrip("/")
    return path == top or path.startswith(top + "/")


def forbidden_prefix(path: str) -> str | None:
    """The forbidden place ``path`` lies in, if any."""
    return next((prefix for prefix in FORBIDDEN_PREFIXES if under(path, prefix)), None)
