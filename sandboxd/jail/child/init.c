/*
 * sandboxd-init: pid 1 of a worker's pid namespace.  Not Python: a few pages.
 *
 *     sandboxd-init RUNNER_PID      (exec'd by the worker's first process, fd 1 the report pipe)
 *
 * The worker's first process (forked by the fork server into a new pid namespace) does the
 * worker's setup steps, forks the runner R, and execs this: from then on pid 1 is a program
 * that touches a handful of pages, already confined as the run (its uid, no capabilities,
 * no_new_privs, the jail's namespaces and cgroup), and that does three things:
 *
 *   - reaps every process of the namespace (orphans are re-parented to pid 1);
 *   - when R ends, writes one record to fd 1 -- R's wait status and rusage -- and exits,
 *     which makes the kernel kill and reap whatever else of the run is left;
 *   - nothing else: its own seccomp filter allows wait4, write and exit only, and as pid 1
 *     of the namespace it gets no signal from inside it.
 *
 * It dies with the fork server (PR_SET_PDEATHSIG, set before the exec, survives it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#else
#error "sandboxd-init: unsupported architecture"
#endif

#define REPORT_FD 1
#define MAGIC 0x49584253u /* "SBXI" */

struct report { /* read by sandboxd/jail/workers/worker.py (INIT_REPORT) */
    uint32_t magic;
    int32_t wstatus;
    int64_t utime_us;
    int64_t stime_us;
    int64_t maxrss_kb;
};

#define ALLOW(nr) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)

static int confine(void) {
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        ALLOW(__NR_wait4),
        ALLOW(__NR_write),
        ALLOW(__NR_exit),
        ALLOW(__NR_exit_group),
        ALLOW(__NR_rt_sigreturn),
        ALLOW(__NR_restart_syscall),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
    };
    struct sock_fprog prog = {.len = sizeof(filter) / sizeof(filter[0]), .filter = filter};
    if (prctl(PR_SET_NAME, (unsigned long)"sbx-init", 0, 0, 0) != 0) return -1; /* not the fd it came from */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) return -1;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
    return (int)syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    pid_t runner = (pid_t)atol(argv[1]);
    if (runner <= 1) return 2;
    /* Only the report pipe stays (what the first process left open goes). */
    syscall(__NR_close_range, 0, 0, 0);
    syscall(__NR_close_range, 2, ~0u, 0);
    if (confine() != 0) _exit(121); /* EXIT_SETUP: the worker's report shows no record */
    for (;;) {
        int status = 0;
        struct rusage ru;
        pid_t pid = (pid_t)syscall(__NR_wait4, -1, &status, 0, &ru);
        if (pid < 0) {
            if (errno == EINTR) continue;
            break; /* no child left (cannot be while R lives) */
        }
        if (pid == runner) {
            struct report r = {
                .magic = MAGIC,
                .wstatus = status,
                .utime_us = (int64_t)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec,
                .stime_us = (int64_t)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec,
                .maxrss_kb = ru.ru_maxrss,
            };
            ssize_t n = syscall(__NR_write, REPORT_FD, &r, sizeof r);
            (void)n;
            break; /* exiting as pid 1 ends everything else of the run */
        }
    }
    syscall(__NR_exit_group, 0);
    return 0;
}
