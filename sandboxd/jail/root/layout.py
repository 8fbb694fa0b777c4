"""Names in the root that both the builder and the worker rely on (the device nodes are the
kernel layer's: ``mounts`` makes them; where a root may not take files from is
``spec.sections``')."""

from ..kernel.mounts import DEVICE_NODES

__all__ = ["DEVICE_NODES", "SKELETON_DIRS"]
# Mount points: what a run sees at / is the configured paths and these, nothing of the jail's own.
SKELETON_DIRS = ("dev", "dev/shm", "tmp", "var", "var/tmp", "work", "etc")
