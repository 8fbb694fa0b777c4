"""Names in the root that both the builder and the worker rely on."""

MARKER = ".sandboxd-root"  # a file every root has: "am I inside the jail root?"
DEVICE_NODES = ("null", "zero", "full", "random", "urandom")  # in /dev, each run its own nodes
DEVICE_NUMBERS = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}
SKELETON_DIRS = ("dev", "dev/shm", "tmp", "var", "var/tmp", "work", ".scratch", ".old", "etc")
