"""Names in the root that both the builder and the worker rely on."""

MARKER = ".sandboxd-root"  # a file every root has: "am I inside the jail root?"
DEVICE_NODES = ("null", "zero", "full", "random", "urandom")  # bound from the host into /dev
SKELETON_DIRS = ("dev", "dev/shm", "tmp", "var", "var/tmp", "work", ".scratch", ".old", "etc")
