"""The built-in syscall profiles, by name, so one list serves amd64 and arm64.

A profile is an allowlist: anything else is refused with EPERM and reported by
name (the daemon answers the seccomp user notification).  Names that do not
exist on the running architecture (``fork`` on arm64, ``arch_prctl`` off x86) are
skipped.  Administrators extend or narrow profiles in the config (``profiles:``).
"""

from __future__ import annotations

import errno
import socket

# What CPython, its threads and the stdlib (json, re, datetime, decimal, ssl, sqlite3,
# zlib, subprocess of the root's own python) need after start-up.
PYTHON_ALLOW = (
    # memory
    # (madvise is argument-checked, in seccomp.py; mincore, which shows page-cache residency, is left out)
    "brk", "mmap", "munmap", "mprotect", "mremap", "msync", "memfd_create",
    # files (inside the root read-only, inside scratch read-write)
    # (preadv2, pwritev2 and fadvise64 are argument-checked, in seccomp.py)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "open", "openat", "openat2", "creat", "close", "close_range", "lseek", "fsync", "fdatasync",
    "stat", "lstat", "fstat", "newfstatat", "statx", "statfs", "fstatfs", "access", "faccessat", "faccessat2",
    "readlink", "readlinkat", "getdents", "getdents64", "getcwd", "chdir", "fchdir",
    "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "umask",
    "truncate", "ftruncate", "fallocate", "readahead", "utime", "utimes", "utimensat", "futimesat",
    "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr",
    "sendfile", "copy_file_range", "dup", "dup2", "dup3", "pipe", "pipe2",
    # events and waiting
    "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait",
    "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2", "signalfd", "signalfd4",
    "timerfd_create", "timerfd_settime", "timerfd_gettime",
    # time
    "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "time",
    "getitimer", "setitimer", "alarm", "timer_create", "timer_settime", "timer_gettime",
    "timer_getoverrun", "timer_delete",
    # processes and threads (clone is conditional, below)
    "fork", "vfork", "execve", "execveat", "wait4", "waitid", "exit", "exit_group",
    "futex", "futex_waitv", "set_robust_list", "get_robust_list", "set_tid_address", "rseq",
    "getpid", "getppid", "gettid", "getpgid", "setpgid", "getpgrp", "getsid", "setsid",
    "getuid", "geteuid", "getgid", "getegid", "getgroups", "getresuid", "getresgid", "capget",
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "pidfd_send_signal",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend", "rt_sigtimedwait",
    "sigaltstack", "pause", "restart_syscall",
    "sched_yield", "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_getscheduler",
    "sched_get_priority_max", "sched_get_priority_min", "sched_rr_get_interval", "getcpu",
    "getpriority", "setpriority", "getrlimit", "setrlimit", "prlimit64", "getrusage", "times",
    "uname", "sysinfo", "getrandom", "arch_prctl",
    # sockets on fds that exist (socket() itself is conditional, below)
    "bind", "listen", "accept", "accept4", "connect", "getsockname", "getpeername",
    "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "shutdown",
    "getsockopt", "setsockopt",
    # System V IPC is private to the run (IPC namespace)
    "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl",
    "msgget", "msgsnd", "msgrcv", "msgctl",
)

# What Node.js (V8, libuv) needs on top: JIT and memory-protection keys, membarrier.  No
# fork, vfork or execve for user code: a Node worker's clone is for threads only (see
# seccomp.compile_profile), so child_process fails at its fork -- refused and named.
NODE_EXTRA = ("membarrier", "pkey_alloc", "pkey_free", "pkey_mprotect", "sched_setaffinity")
NODE_ALLOW = tuple(dict.fromkeys(s for s in (*PYTHON_ALLOW, *NODE_EXTRA) if s not in ("fork", "vfork")))
# io_uring fails with ENOSYS (as on a kernel without it), so libuv falls back to its thread pool.
NODE_ERRNO: dict[str, int] = {"clone3": errno.ENOSYS, "io_uring_setup": errno.ENOSYS}

# Calls the worker itself makes between loading the filter and starting user code;
# always allowed so a narrowed profile cannot break the jail's own hand-off.
RUNTIME_REQUIRED = (
    "read", "write", "close", "sendmsg", "recvmsg", "exit_group", "exit", "prlimit64", "rt_sigreturn",
    "rt_sigaction", "rt_sigprocmask", "brk", "mmap", "munmap", "mprotect", "openat", "mkdirat", "mkdir",
    "chdir", "fstat", "newfstatat", "lseek", "getdents64", "futex", "getpid", "clock_gettime", "ioctl",
    "madvise", "dup2", "dup3", "unlink", "unlinkat", "getcwd",
)

# Refused silently with a specific errno (not reported as blocked): the caller is
# expected to cope, e.g. glibc falls back from clone3 to clone on ENOSYS.
PYTHON_ERRNO: dict[str, int] = {"clone3": errno.ENOSYS}

# ioctl requests user code may make: terminal queries on a pipe answer ENOTTY.
IOCTL_ALLOWED = (
    0x5401,  # TCGETS (isatty)
    0x5413,  # TIOCGWINSZ
    0x540F,  # TIOCGPGRP
    0x541B,  # FIONREAD
    0x5421,  # FIONBIO
    0x5450,  # FIONCLEX
    0x5451,  # FIOCLEX
    0x5452,  # FIOASYNC
)

# fcntl commands user code may use (fcntl itself is argument-checked).  Left out, because
# the root's files are shared by every run (and by the host: they are hard links):
# F_GETLK and F_OFD_GETLK, which would let one run see another's locks on them, and
# F_NOTIFY, which would let it watch another's reads.  Setting locks stays allowed: on a
# read-only file only read locks can be taken, and they never conflict; device nodes are
# each run's own.
FCNTL_ALLOWED = (
    0, 1, 2, 3, 4,  # F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL
    6, 7,  # F_SETLK, F_SETLKW
    8, 9, 10, 11, 15, 16,  # F_SETOWN, F_GETOWN, F_SETSIG, F_GETSIG, F_SETOWN_EX, F_GETOWN_EX
    37, 38,  # F_OFD_SETLK, F_OFD_SETLKW
    1024, 1025,  # F_SETLEASE, F_GETLEASE (only on files the run owns)
    1030, 1031, 1032, 1033, 1034,  # F_DUPFD_CLOEXEC, F_SETPIPE_SZ, F_GETPIPE_SZ, F_ADD_SEALS, F_GET_SEALS
    1035, 1036, 1037, 1038,  # F_GET_RW_HINT, F_SET_RW_HINT, F_GET_FILE_RW_HINT, F_SET_FILE_RW_HINT
)

# prctl options user code may use.
PRCTL_ALLOWED = (
    1,  # PR_SET_PDEATHSIG
    2,  # PR_GET_PDEATHSIG
    3,  # PR_GET_DUMPABLE
    7,  # PR_GET_KEEPCAPS
    15,  # PR_SET_NAME
    16,  # PR_GET_NAME
    21,  # PR_GET_SECCOMP
    23,  # PR_CAPBSET_READ
    29,  # PR_SET_TIMERSLACK
    30,  # PR_GET_TIMERSLACK
    38,  # PR_SET_NO_NEW_PRIVS
    39,  # PR_GET_NO_NEW_PRIVS
)

# The root's files are shared by every run: whoever could see which of their pages are
# cached, or throw pages out of the cache, could signal to a later run of another caller
# bit by bit.  So the calls that give residency or eviction control are refused (and
# named); plain reads, which only ever load pages, are not.  What is left is timing, which
# no filter can take away (SECURITY.md).
MADVISE_ALLOWED = (*range(0, 20), 22, 23, 24, 25)  # all but MADV_COLD (20) and MADV_PAGEOUT (21)
FADVISE_ALLOWED = (0, 1, 2, 3)  # NORMAL, RANDOM, SEQUENTIAL, WILLNEED; not DONTNEED (4), NOREUSE (5)
RWF_NOWAIT = 0x8  # preadv2/pwritev2: EAGAIN when the data is not cached, a residency probe

NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
CLONE_THREAD = 0x00010000
NETWORK_FAMILIES = (socket.AF_INET, socket.AF_INET6)  # with network only
# Every run may make Unix sockets: each run has its own network namespace, so abstract names
# are its own, and its filesystem holds no socket but what it makes itself (the daemon's
# socket and /run are never in the root).
LOCAL_FAMILIES = (socket.AF_UNIX,)

# Never let through, not even in discovery mode: escapes and kernel attack surface.
NEVER_ALLOW = frozenset(
    {
        "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot", "ptrace",
        "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp", "pidfd_getfd",
        "bpf", "userfaultfd", "perf_event_open", "io_uring_setup", "io_uring_enter", "io_uring_register",
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
        "add_key", "keyctl", "request_key", "open_by_handle_at", "name_to_handle_at",
        "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "settimeofday", "clock_settime",
        "adjtimex", "clock_adjtime", "iopl", "ioperm", "lookup_dcookie", "vhangup", "syslog",
        "fanotify_init", "fanotify_mark", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
        "fspick", "mount_setattr", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
        "setfsuid", "setfsgid", "setgroups", "capset", "personality", "seccomp", "clone", "clone3",
        "socket", "ioctl", "prctl", "vmsplice", "nfsservctl", "uselib", "sysfs", "_sysctl",
        "create_module", "get_kernel_syms", "query_module", "modify_ldt", "memfd_secret",
        "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "sethostname",
        "setdomainname", "mknod", "mknodat", "flock", "inotify_init", "inotify_init1", "inotify_add_watch",
    }
)

# Calls the filter lets through for some arguments only (seccomp.py adds the checks), and why
# one was refused, in words.  Naming one in a profile's allow list lets it through unchecked.
CONDITIONAL = {
    "socket": "sockets: AF_UNIX for every run; AF_INET and AF_INET6 only for runs with network; raw, packet, "
              "netlink and other families never",
    "socketpair": "socketpair: AF_UNIX pairs only",
    "ioctl": "ioctl: only terminal and file requests that reveal nothing of the host",
    "fcntl": "fcntl: only the commands on the profile's list",
    "prctl": "prctl: only options that cannot widen what the process may do",
    "clone": "clone: threads and processes, never new namespaces",
    "personality": "personality: queries only",
    "mknod": "mknod: FIFOs only, no device nodes",
    "mknodat": "mknodat: FIFOs only, no device nodes",
    "madvise": "madvise: not the advice that evicts or reveals what pages another process has in memory",
    "fadvise64": "fadvise64: not the advice that evicts shared page cache",
    "preadv2": "preadv2: not RWF_NOWAIT (it reveals what is in the page cache)",
    "pwritev2": "pwritev2: not RWF_NOWAIT (it reveals what is in the page cache)",
}
REFUSED_WHY = {**CONDITIONAL, "clone3": "clone3: refused with ENOSYS so that libc falls back to clone"}
NETWORK_CALLS = frozenset({"socket", "connect", "bind", "sendto", "sendmsg"})


def refusal_advice(name: str, network: bool) -> str:
    """What to do about a refused system call, pointing only where it can help."""
    if name in NETWORK_CALLS and not network:
        return ("the run had no network: ask for it (sandboxctl run --network, \"network\": true), which your "
                "quota must allow (sandboxctl usage shows network); Unix sockets work without it")
    if name in REFUSED_WHY:
        return f"{REFUSED_WHY[name]}; refused for these arguments, not for the call"
    if name in NEVER_ALLOW:
        return "never allowed in the jail (an escape or kernel attack surface); no setting allows it"
    return (f"an admin can allow it for a language: sandboxctl syscalls FILE runs the program once and prints "
            f"the profiles.LANGUAGE.allow line for {name}")
