"""One probe per attack class of THREATS.md, run through the real daemon.

Each probe is hostile code that must fail; the test asserts the verdict the user
gets and that nothing of the host, the daemon or another run was touched.  Numbers
in the test names follow THREATS.md.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import require
from harness import DaemonProcess, run_uid_processes, wait_until

CTYPES = "import ctypes, ctypes.util, errno, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
REPO_PARENT_MARK = "/tests/harness"  # a path of the test tree: nothing of it belongs in a run


@pytest.fixture
def d(daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    yield daemon
    # The daemon still serves, promptly, after every probe.
    t0 = time.monotonic()
    r = daemon.run("print('still here')")
    assert r["status"] == "ok" and r["stdout"] == b"still here\n"
    assert time.monotonic() - t0 < 5


def syscall_probe(d: DaemonProcess, call: str, **kw: Any) -> Any:
    """Run ``call`` (a ctypes expression); print its return value and errno."""
    code = CTYPES + f"rc = {call}\nprint(rc, ctypes.get_errno())\n"
    return d.run(code, **kw)


# 1 -------------------------------------------------------------------------------------
def test_01_no_leaked_file_descriptors(d: DaemonProcess) -> None:
    code = """
import os
open_fds = []
for fd in range(3, 4096):
    try:
        os.fstat(fd)
        open_fds.append(fd)
    except OSError:
        pass
print(open_fds)
"""
    r = d.run(code)
    assert (r["status"], r["stdout"]) == ("ok", b"[]\n"), r["stderr"]


# 2 -------------------------------------------------------------------------------------
def test_02_chroot_escape_fails(d: DaemonProcess) -> None:
    code = """
import os
os.makedirs("jail", exist_ok=True)
os.chroot("jail")
for _ in range(64):
    os.chdir("..")
os.chroot(".")
print(open("/etc/shadow").read())
"""
    r = d.run(code)
    assert r["status"] == "blocked_syscall"
    assert r["blocked_syscall"] == "chroot"
    assert b"PermissionError" in r["stderr"]
    assert r["stdout"] == b""
    r = d.run("import os; print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())")
    uid, euid, gid, groups = r["stdout"].decode().split(" ", 3)
    assert int(uid) == int(euid) != 0 and int(gid) != 0 and groups.strip() == "[]"


# 3 -------------------------------------------------------------------------------------
def test_03_ptrace_and_process_vm_are_refused(d: DaemonProcess) -> None:
    r = syscall_probe(d, "libc.ptrace(16, 1, 0, 0)")  # PTRACE_ATTACH to the run's pid 1
    assert r["stdout"] == b"-1 1\n" and r["denied_syscalls"] == {"ptrace": 1}
    code = CTYPES + """
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(64)
local = iovec(ctypes.addressof(buf), 64)
remote = iovec(0x400000, 64)
rc = libc.process_vm_readv(1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
rc2 = libc.process_vm_writev(1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
print(rc, rc2)
raise SystemExit(1 if rc < 0 else 0)
"""
    r = d.run(code)
    assert r["stdout"] == b"-1 -1\n"
    assert r["status"] == "blocked_syscall" and r["blocked_syscall"] == "process_vm_readv"
    assert set(r["denied_syscalls"]) == {"process_vm_readv", "process_vm_writev"}


# 4 -------------------------------------------------------------------------------------
def test_04_no_proc_leaks(d: DaemonProcess) -> None:
    code = """
import os
for p in ("/proc", "/proc/self/mountinfo", "/proc/1/environ", "/proc/kallsyms", "/sys", "/sys/kernel"):
    print(p, os.path.exists(p))
print(sorted(os.listdir("/")))
"""
    r = d.run(code)
    lines = r["stdout"].decode().splitlines()
    assert all(line.endswith(" False") for line in lines[:6]), lines
    top = eval(lines[6])
    assert "proc" not in top and "sys" not in top and "home" not in top and "root" not in top


# 5 -------------------------------------------------------------------------------------
def test_05_no_setuid_binaries_nosuid_and_no_new_privs(d: DaemonProcess) -> None:
    code = CTYPES + """
import stat
setid = []
for top, dirs, files in os.walk("/"):
    for name in files:
        st = os.lstat(os.path.join(top, name))
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            setid.append(os.path.join(top, name))
print(setid)
print(libc.prctl(39, 0, 0, 0, 0))  # PR_GET_NO_NEW_PRIVS
for path in ("/", "/usr/bin", "/work", "/tmp", "/dev/shm"):
    f = os.statvfs(path).f_flag
    print(path, bool(f & os.ST_NOSUID), bool(f & os.ST_NODEV), bool(f & os.ST_RDONLY))
"""
    r = d.run(code)
    lines = r["stdout"].decode().splitlines()
    assert lines[0] == "[]"
    assert lines[1] == "1"
    assert lines[2:] == ["/ True True True", "/usr/bin True True True", "/work True True False",
                         "/tmp True True False", "/dev/shm True True False"]


# 6 -------------------------------------------------------------------------------------
def test_06_fork_bomb_with_setsid_hits_the_pids_limit(d: DaemonProcess) -> None:
    code = """
import os
while True:
    try:
        if os.fork() == 0:
            os.setsid()
            os.setpgid(0, 0)
    except OSError:
        pass
"""
    before = len(os.listdir("/proc"))
    r = d.run(code, timeout_ms=2000)
    assert r["status"] == "pids_limit", r
    assert_run_gone(r["run_uid"])
    assert len(os.listdir("/proc")) < before + 20


def test_06_plain_fork_bomb_is_reported_as_pids_limit(d: DaemonProcess) -> None:
    # Its processes die as soon as a fork fails: RLIMIT_NPROC (which counts them until
    # they are reaped) must not trip before the pids cgroup, or the verdict is exit_nonzero.
    for _ in range(5):
        r = d.run("import os\nwhile True:\n    os.fork()", timeout_ms=5000)
        assert r["status"] == "pids_limit", r
        assert_run_gone(r["run_uid"])


def assert_run_gone(uid: int, within: float = 3.0) -> None:
    """Nothing of a finished run is left on the host."""
    assert wait_until(lambda: not run_uid_processes(uid, 1), within, 0.02)


# 7 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [
    "x = bytearray(10**11)",                                          # one huge allocation
    "a = []\nwhile True: a.append(bytearray(1 << 20))",               # many small ones
    "a = []\nwhile True: a.append(b'x' * 4096)",                      # very many small ones
], ids=["huge", "many-mb", "many-pages"])
def test_07_memory_bombs(d: DaemonProcess, code: str) -> None:
    r = d.run(code, memory_mb=64, timeout_ms=20000)
    assert r["status"] == "memory_limit", r
    assert r["memory_peak_kb"] is not None and r["memory_peak_kb"] <= 64 * 1024


def test_07_memory_bomb_from_many_threads(d: DaemonProcess) -> None:
    code = """
import threading, time
hold = []
def grab():
    hold.append(bytearray(8 << 20))
    time.sleep(10)
ts = [threading.Thread(target=grab) for _ in range(40)]
for t in ts: t.start()
for t in ts: t.join()
"""
    r = d.run(code, memory_mb=64, timeout_ms=10000)
    assert r["status"] in ("memory_limit", "pids_limit"), r


def test_07_page_cache_of_a_large_file_counts(d: DaemonProcess) -> None:
    code = """
for i in range(8):
    with open(f"/tmp/big{i}", "wb") as f:
        for _ in range(8):
            f.write(b"x" * (1 << 20))
print("wrote")
"""
    r = d.run(code, memory_mb=24, timeout_ms=10000)
    # tmpfs pages are charged to the run: the kernel kills it at its memory limit.
    assert r["status"] == "memory_limit", r
    assert r["memory_peak_kb"] <= 24 * 1024


def test_07_io_uring_is_refused(d: DaemonProcess) -> None:
    r = syscall_probe(d, "libc.syscall(425, 8, ctypes.create_string_buffer(120))")
    assert r["stdout"] == b"-1 1\n" and "io_uring_setup" in r["denied_syscalls"]


# 8 -------------------------------------------------------------------------------------
def test_08_disk_and_inode_exhaustion_stay_in_scratch(d: DaemonProcess) -> None:
    host = os.statvfs(d.state_dir)
    code = """
import os, errno
n = 0
try:
    while True:
        with open(f"fill{n}", "wb") as f:   # files of 4M: below RLIMIT_FSIZE, so the tmpfs cap speaks
            f.write(b"x" * (4 << 20))
        n += 1
except OSError as e:
    print("size", e.errno == errno.ENOSPC, n * 4)
for name in os.listdir("."):
    if name.startswith("fill"):
        os.remove(name)
k = 0
try:
    while True:
        open(f"/tmp/f{k}", "w").close(); k += 1
except OSError as e:
    print("inodes", e.errno == errno.ENOSPC, k)
"""
    r = d.run(code, memory_mb=256, timeout_ms=20000)
    lines = r["stdout"].decode().split("\n")
    size_line, inode_line = lines[0].split(), lines[1].split()
    assert size_line[:2] == ["size", "True"] and int(size_line[2]) <= 64
    assert inode_line[:2] == ["inodes", "True"] and int(inode_line[2]) < 5000
    after = os.statvfs(d.state_dir)
    assert abs(after.f_bavail - host.f_bavail) * after.f_frsize < 32 << 20  # nothing landed on the host disk
    r = d.run("import os; print(os.listdir('.'), os.listdir('/tmp'))")
    assert r["stdout"] == b"['out'] []\n"


# 9 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("code,stream", [
    ("while True: print('flood' * 100)", "stdout"),
    ("import sys; sys.stdout.write('x' * (50 << 20))", "stdout"),
    ("import sys\nwhile True:\n    sys.stdout.write('o' * 1000); sys.stderr.write('e' * 1000)", "either"),
    ("import sys\nwhile True: sys.stderr.write('e' * 10000)", "stderr"),
], ids=["loop", "one-write", "both", "stderr"])
def test_09_output_floods(d: DaemonProcess, code: str, stream: str) -> None:
    r = d.run(code, max_output=1 << 20, timeout_ms=10000)
    assert r["status"] == "output_limit", r["status"]
    assert len(r["stdout"]) <= 1 << 20 and len(r["stderr"]) <= 1 << 20
    if stream == "either":
        assert r["stdout_truncated"] or r["stderr_truncated"]
    else:
        assert r[f"{stream}_truncated"] is True
        assert len(r[stream]) == 1 << 20
    assert "exceeded" in r["reason"]


# 10 ------------------------------------------------------------------------------------
def test_10_signals_reach_only_the_run_itself(d: DaemonProcess) -> None:
    sibling: dict[str, Any] = {}

    def long_run() -> None:
        sibling.update(d.run("import time; time.sleep(1.5); print('sibling ok')", timeout_ms=10000))

    t = threading.Thread(target=long_run)
    t.start()
    time.sleep(0.3)
    code = """
import os, signal
print(os.getpid(), os.getppid(), flush=True)
os.kill(1, signal.SIGSTOP)     # its init (pid 1 of its own namespace) ignores it
os.kill(1, signal.SIGKILL)
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2, signal.SIGCHLD, signal.SIGPIPE):
    os.kill(1, sig)            # none of them ends its init (SIGINT used to: KeyboardInterrupt)
try:
    os.kill(-1, signal.SIGKILL)  # everything it may signal: in its own namespace that is nothing
except ProcessLookupError:
    print("nothing to kill", flush=True)
print("survived", flush=True)
"""
    r = d.run(code)
    t.join()
    assert r["status"] == "ok", r
    assert r["stdout"] == b"2 1\nnothing to kill\nsurvived\n"  # its own pid namespace: no daemon in it
    assert sibling["status"] == "ok" and sibling["stdout"] == b"sibling ok\n"
    assert d.proc is not None and d.proc.poll() is None


# 11 ------------------------------------------------------------------------------------
NET_PROBE = """
import socket, errno
results = {}
for name, fam, typ, proto in [("inet", 2, 1, 0), ("inet6", 10, 1, 0), ("udp", 2, 2, 0), ("raw", 2, 3, 1),
                              ("packet", 17, 3, 0), ("netlink", 16, 3, 0), ("unix", 1, 1, 0), ("vsock", 40, 1, 0)]:
    try:
        s = socket.socket(fam, typ, proto)
        results[name] = "open"
        s.close()
    except OSError as e:
        results[name] = errno.errorcode.get(e.errno, e.errno)
print(sorted(results.items()))
"""


def test_11_network_off_refuses_every_socket_family_but_unix(d: DaemonProcess) -> None:
    r = d.run(NET_PROBE)
    results = dict(eval(r["stdout"]))
    assert results.pop("unix") == "open"  # every run has its own network namespace (see below)
    assert all(v == "EPERM" for v in results.values()), results
    assert r["denied_syscalls"] == {"socket": 7}
    r = d.run(f"import os; print(os.path.exists({d.socket!r}), os.path.exists('/run'))")
    assert r["stdout"] == b"False False\n"


def test_11_unix_sockets_reach_nothing_outside_the_run(d: DaemonProcess) -> None:
    """Abstract Unix names belong to a network namespace: the host's are out of reach, and
    two runs binding the same name do not meet.  The daemon's socket is not in the root."""
    import socket

    name = f"sandboxd-test-host-{os.getpid()}"
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.bind("\0" + name)
    host.listen(1)
    try:
        code = f"""
import socket, errno
for target in ("\\0{name}", {d.socket!r}, "/run/sandboxd/sandboxd.sock"):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(target); print("connected")
    except OSError as e:
        print(errno.errorcode[e.errno])
"""
        for network in (False, True):
            r = d.run(code, network=network)
            assert r["stdout"] == b"ECONNREFUSED\nENOENT\nENOENT\n", r
    finally:
        host.close()


def test_11_network_on_still_refuses_raw_packet_netlink(d: DaemonProcess) -> None:
    r = d.run(NET_PROBE, network=True)
    results = dict(eval(r["stdout"]))
    assert results["inet"] == "open" and results["udp"] == "open" and results["unix"] == "open"
    for fam in ("raw", "packet", "netlink", "vsock"):
        assert results[fam] == "EPERM", (fam, results)
    r = d.run(f"import os; print(os.path.exists({d.socket!r}))", network=True)
    assert r["stdout"] == b"False\n"


# 12 ------------------------------------------------------------------------------------
def test_12_no_terminal_and_tiocsti_refused(d: DaemonProcess) -> None:
    code = CTYPES + """
print([os.isatty(fd) for fd in (0, 1, 2)], os.path.exists("/dev/tty"), os.path.exists("/dev/ptmx"))
c = ctypes.c_char(b"x")
print(libc.ioctl(0, 0x5412, ctypes.byref(c)), ctypes.get_errno())
print(libc.ioctl(0, ctypes.c_ulong(0x100005412), ctypes.byref(c)), ctypes.get_errno())
print(os.getsid(0) == os.getpid())
"""
    r = d.run(code)
    assert r["stdout"] == b"[False, False, False] False False\n-1 1\n-1 1\nTrue\n"
    assert r["denied_syscalls"] == {"ioctl": 2}


# 13 ------------------------------------------------------------------------------------
def test_13_keyrings_refused(d: DaemonProcess) -> None:
    code = CTYPES + """
print(libc.syscall(248, b"user", b"k", b"secret", 6, -2), ctypes.get_errno())  # add_key to the user keyring
print(libc.syscall(250, 0, -4, 0, 0, 0), ctypes.get_errno())                     # keyctl GET_KEYRING_ID
"""
    if platform.machine() != "x86_64":
        pytest.skip("syscall numbers in this probe are x86_64's")
    r = d.run(code)
    assert r["stdout"] == b"-1 1\n-1 1\n"
    assert set(r["denied_syscalls"]) == {"add_key", "keyctl"}


# 14 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,call", [
    ("bpf", "libc.syscall(321, 0, 0, 0)"),
    ("userfaultfd", "libc.syscall(323, 0)"),
    ("perf_event_open", "libc.syscall(298, ctypes.create_string_buffer(128), 0, -1, -1, 0)"),
    ("io_uring_setup", "libc.syscall(425, 8, ctypes.create_string_buffer(120))"),
    ("kexec_load", "libc.syscall(246, 0, 0, 0, 0)"),
    ("init_module", "libc.syscall(175, 0, 0, b'')"),
    ("finit_module", "libc.syscall(313, 0, b'', 0)"),
    ("reboot", "libc.syscall(169, 0xfee1dead, 672274793, 0x1234567, 0)"),
    ("personality", "libc.personality(0x0008)"),  # PER_LINUX32
])
def test_14_kernel_attack_surface_refused(d: DaemonProcess, name: str, call: str) -> None:
    require(platform.machine() == "x86_64", "syscall numbers in these probes are x86_64's")
    r = syscall_probe(d, call)
    assert r["stdout"] == b"-1 1\n", r
    assert name in r["denied_syscalls"]


def test_14_x32_abi_is_killed(d: DaemonProcess) -> None:
    require(platform.machine() == "x86_64", "the x32 ABI exists on x86_64")
    r = d.run(CTYPES + "print('calling', flush=True)\nlibc.syscall(0x40000000 | 39)\nprint('survived')")
    assert r["stdout"] == b"calling\n"
    assert r["status"] == "blocked_syscall" and r["signal_name"] == "SIGSYS", r


def test_14_32bit_abi_is_killed(d: DaemonProcess) -> None:
    require(platform.machine() == "x86_64", "int 0x80 is the i386 ABI on x86_64")
    code = """
import ctypes, mmap
code = bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3])   # mov eax, 20 (getpid); int 0x80; ret
m = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(code)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print("calling", flush=True)
print(ctypes.CFUNCTYPE(ctypes.c_int)(addr)())
"""
    r = d.run(code)
    assert r["stdout"] == b"calling\n"
    assert r["status"] == "blocked_syscall" and r["signal_name"] == "SIGSYS", r
    assert r["blocked_syscall"]


# 15 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,call", [
    ("unshare", "libc.unshare(0x10000000)"),                         # CLONE_NEWUSER
    ("setns", "libc.setns(0, 0)"),
    ("mount", "libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)"),
    ("umount2", "libc.umount2(b'/work', 2)"),
    ("pivot_root", "libc.syscall(155, b'/tmp', b'/tmp')"),
    ("clone", "libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)"),       # clone(CLONE_NEWUSER|SIGCHLD)
])
def test_15_namespace_and_mount_games_refused(d: DaemonProcess, name: str, call: str) -> None:
    require(platform.machine() == "x86_64", "syscall numbers in these probes are x86_64's")
    r = syscall_probe(d, call)
    assert r["stdout"] == b"-1 1\n", r
    assert name in r["denied_syscalls"]


def test_15_clone3_is_enosys_and_threads_still_work(d: DaemonProcess) -> None:
    require(platform.machine() == "x86_64", "syscall number of clone3 is x86_64's")
    code = CTYPES + """
print(libc.syscall(435, 0, 0), ctypes.get_errno())
import threading
t = threading.Thread(target=lambda: print("thread ran")); t.start(); t.join()
pid = os.fork()
if pid == 0:
    os._exit(7)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    r = d.run(code)
    assert r["stdout"] == b"-1 38\nthread ran\n7\n"
    assert r["denied_syscalls"] == {}  # ENOSYS for clone3 is policy, not a reported refusal


# 16 ------------------------------------------------------------------------------------
def test_16_no_capabilities_and_open_by_handle_at_refused(d: DaemonProcess) -> None:
    code = CTYPES + """
print(libc.syscall(304, -100, ctypes.create_string_buffer(128), 0), ctypes.get_errno())   # open_by_handle_at
print([libc.prctl(23, cap, 0, 0, 0) for cap in range(41)].count(1))                     # PR_CAPBSET_READ
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
data = (ctypes.c_uint32 * 6)()
print(libc.capget(ctypes.byref(Header(0x20080522, 0)), data), list(data))
"""
    require(platform.machine() == "x86_64", "syscall number of open_by_handle_at is x86_64's")
    r = d.run(code)
    assert r["stdout"] == b"-1 1\n0\n0 [0, 0, 0, 0, 0, 0]\n"
    assert "open_by_handle_at" in r["denied_syscalls"]


# 17 ------------------------------------------------------------------------------------
def test_17_daemon_secrets_are_invisible(d: DaemonProcess) -> None:
    paths = [d.config_path, d.state_dir, d.socket, d.log_path, "/etc/sandboxd", "/etc/shadow", "/var/lib/sandboxd",
             "/root", "/home", os.path.dirname(d.socket)]
    code = f"import os\nprint([os.path.exists(p) for p in {paths!r}])\nprint(sorted(os.environ))"
    r = d.run(code)
    lines = r["stdout"].decode().splitlines()
    assert lines[0] == str([False] * len(paths))
    assert "NOTIFY_SOCKET" not in lines[1]
    r = d.run("print(open('/etc/passwd').read())")
    assert b"sbx-alice" not in r["stdout"]  # the host's user database is not in the root


# The needles travel XOR-ed, so that the walker's own code holds none of them (it would find itself).
WALK_OBJECTS = r"""
import gc, sys
MASKED = NEEDLES
skip = {id(m) for m in MASKED} | {id(MASKED)}
found = set()
seen = set()
todo = []
frame = sys._getframe()
while frame is not None:  # the run's own stack, down to the bottom
    todo += [frame.f_locals, frame.f_globals, frame.f_code]
    frame = frame.f_back
todo += gc.get_objects() + [sys.modules, vars(sys), sys.orig_argv, sys.path]
steps = 0
while todo and steps < 3_000_000:
    obj = todo.pop()
    steps += 1
    if id(obj) in seen or id(obj) in skip:
        continue
    seen.add(id(obj))
    if isinstance(obj, (str, bytes)):
        data = obj.encode("utf-8", "replace") if isinstance(obj, str) else obj
        masked = bytes(b ^ 0x5A for b in data)
        found.update(i for i, m in enumerate(MASKED) if m in masked)
        continue
    if isinstance(obj, (int, float, bool, type(None))):
        continue
    todo.extend(gc.get_referents(obj))
print(sorted(found), steps)
"""


def test_17_nothing_of_the_daemon_is_reachable_from_user_code(d: DaemonProcess) -> None:
    """The run is forked from the fork server: walking its frames (``f_back``), the objects
    the collector knows and everything they refer to finds none of the daemon's knowledge --
    its state directory, root, cgroup parent, socket, config, or the host pids of its
    processes."""
    with d.client() as c:
        st = c.status()
    needles = [d.state_dir, os.path.basename(st["root"]["path"]), st["root"]["build_id"], d.socket, d.config_path,
               d.config["jail"]["cgroup_parent"], f"sandboxd-test-{os.getpid()}", REPO_PARENT_MARK]
    masked = [bytes(b ^ 0x5A for b in n.encode()) for n in needles]
    r = d.run(WALK_OBJECTS.replace("NEEDLES", repr(masked)), timeout_ms=30000, memory_mb=512)
    assert r["status"] == "ok", r["stderr"][-2000:]
    found, steps = r["stdout"].decode().rsplit(" ", 1)
    assert found == "[]", [needles[int(i)] for i in found.strip("[]").split(",")]
    assert int(steps) > 1000  # it did walk


# 18 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", [
    "os.rmdir('out'); os.symlink('/etc', 'out')",
    "os.symlink('/etc/shadow', 'out/shadow'); os.symlink('/', 'out/root')",
    "os.mkfifo('out/fifo'); open('out/ok.txt', 'w').write('fine')",
], ids=["out-is-a-link", "links-inside-out", "fifo-inside-out"])
def test_18_daemon_never_follows_run_controlled_paths(d: DaemonProcess, setup: str) -> None:
    r = d.run(f"import os\n{setup}\nprint('planted')", timeout_ms=5000)
    assert r["status"] == "ok" and r["stdout"] == b"planted\n", r
    assert all(v in (b"fine",) for v in r["files"].values())
    assert set(r["files"]) <= {"ok.txt"}
    if "mkfifo" in setup:  # the regular file beside the fifo still comes back
        assert r["files"] == {"ok.txt": b"fine"}, r["files"]


def test_18_input_file_names_cannot_escape(d: DaemonProcess) -> None:
    from sandboxd.client import SandboxdError

    for name in ("../x", "/etc/passwd", "a/../../b", "", "a//b", "./x"):
        with pytest.raises(SandboxdError) as e, d.client() as c:
            c.run("pass", files={name: b"x"})
        assert e.value.code == "bad_request" and e.value.details["field"] == "files"


# 19 ------------------------------------------------------------------------------------
def test_19_time_limit_cannot_be_escaped(d: DaemonProcess) -> None:
    code = """
import os, signal, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(1000)
    os._exit(0)
if os.fork() == 0:
    os.kill(os.getpid(), signal.SIGSTOP)
for _ in range(5):
    if os.fork() == 0:
        os._exit(0)   # zombies nobody reaps
while True:
    time.sleep(1)
"""
    t0 = time.monotonic()
    r = d.run(code, timeout_ms=1000)
    assert r["status"] == "timeout"
    assert 0.9 < time.monotonic() - t0 < 5
    assert_run_gone(r["run_uid"])


# 20 ------------------------------------------------------------------------------------
def test_20_no_cross_run_channels(d: DaemonProcess) -> None:
    holder: dict[str, Any] = {}
    code_a = CTYPES + """
import mmap, time
shmid = libc.shmget(0x5bd, 4096, 0o1666)           # IPC_CREAT | 0666
open("/dev/shm/sandboxd-probe", "w").write("A was here")
import fcntl
shared = os.open("/usr/lib/python3.11/os.py", os.O_RDONLY)  # the root's files: shared inodes
fcntl.lockf(shared, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 1000)  # a read lock is allowed, and harmless
null = os.open("/dev/null", os.O_RDWR)
fcntl.lockf(null, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1000)  # on this run's own device node
print("shm", shmid >= 0, flush=True)
time.sleep(1.5)
"""

    def run_a() -> None:
        holder.update(d.run(code_a, timeout_ms=10000))

    t = threading.Thread(target=run_a)
    t.start()
    time.sleep(0.5)
    code_b = CTYPES + """
print(libc.shmget(0x5bd, 4096, 0o666), ctypes.get_errno() == errno.ENOENT)
print(os.path.exists("/dev/shm/sandboxd-probe"))
import fcntl
try:
    fcntl.flock(open("/usr/lib/python3.11/os.py"), fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("flock allowed")
except OSError as e:
    print("flock", errno.errorcode[e.errno])
import struct
shared = os.open("/usr/lib/python3.11/os.py", os.O_RDONLY)
for cmd in (fcntl.F_GETLK, 36):  # F_GETLK, F_OFD_GETLK: would show A's lock
    try:
        fcntl.fcntl(shared, cmd, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 1000, 1, 0))
        print("getlk allowed")
    except OSError as e:
        print("getlk", errno.errorcode[e.errno])
try:  # dnotify would show A's reads of the root's files
    fcntl.fcntl(os.open("/usr/lib/python3.11", os.O_RDONLY), fcntl.F_NOTIFY, fcntl.DN_ACCESS)
    print("dnotify allowed")
except OSError as e:
    print("dnotify", errno.errorcode[e.errno])
null = os.open("/dev/null", os.O_RDWR)
fcntl.lockf(null, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1000)  # A holds the same range: not the same node
print("own /dev/null")
"""
    r = d.run(code_b)
    t.join()
    assert holder["stdout"] == b"shm True\n"
    assert r["stdout"] == (b"-1 True\nFalse\nflock EPERM\ngetlk EPERM\ngetlk EPERM\ndnotify EPERM\n"
                           b"own /dev/null\n")
    assert r["denied_syscalls"]["fcntl"] == 3


# 21 ------------------------------------------------------------------------------------
def test_21_user_code_starts_fully_confined(d: DaemonProcess) -> None:
    code = CTYPES + "print(os.getuid() != 0, libc.prctl(21, 0, 0, 0, 0), libc.prctl(39, 0, 0, 0, 0))"
    r = d.run(code)
    assert r["stdout"] == b"True 2 1\n"  # seccomp filter mode, no_new_privs, from the first statement
    from sandboxd.client import SandboxdError

    with pytest.raises(SandboxdError) as e, d.client() as c:
        c.call("run", code="pass", preload="import os")
    assert e.value.code == "bad_request" and e.value.details["field"] == "preload"


# 22 ------------------------------------------------------------------------------------
def test_22_failed_setup_step_fails_closed(tmp_path: Any) -> None:
    """A worker whose setup cannot complete reports sandbox_error and never runs the code."""
    import asyncio

    from conftest import require_root
    from harness import CGROUP_PARENT

    from sandboxd.config import jail_settings, parse
    from sandboxd.jail.jail import Jail
    from sandboxd.jail.spec.plans import RunPlan

    require_root()
    cfg = parse({"jail": {"run_uids": "878500-878563", "cgroup_parent": CGROUP_PARENT + "-closed"},
                 "pool": {"min": 0, "max": 0}, "daemon": {"workers": 2}})
    settings = jail_settings(cfg, str(tmp_path))
    # An impossible host name makes the "namespaces" step fail (sethostname: EINVAL).
    import dataclasses

    settings = dataclasses.replace(settings, jail=dataclasses.replace(settings.jail, hostname="h" * 100))
    marker = tmp_path / "ran"

    async def go() -> Any:
        jail = Jail(settings)
        await jail.start()
        try:
            return await jail.run(RunPlan(run_id="closed", code=f"open({str(marker)!r}, 'w')"))
        finally:
            await jail.close()

    result = asyncio.run(go())
    assert result.status == "sandbox_error"
    assert result.error["step"] == "namespaces" and result.error["errno"] == 22
    assert not marker.exists()
