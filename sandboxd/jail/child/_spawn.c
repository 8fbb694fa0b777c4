/*
 * sandboxd.jail.child._spawn: make a worker's two processes with one copy of the fork
 * server's address space.
 *
 *     pid = _spawn.spawn(init_fd, status_fd, sync_fd, uid, gid)
 *         in the fork server: the host pid of the worker's pid 1
 *         in R, the runner:   0
 *
 * The fork server has just unshared CLONE_NEWPID, so its next child is pid 1 of a new pid
 * namespace.  That child, X, is made with clone(CLONE_VM | CLONE_VFORK): it shares the
 * fork server's memory (no page tables copied) while the fork server waits.  X forks R
 * (pid 2, the one copy of the interpreter's address space a worker gets), drops to the
 * run's uid and gid (raw system calls: X must not touch the memory it shares), sets
 * no_new_privs and PDEATHSIG, says so on the sync pipe, and execs sandboxd-init, whose
 * parent stays the fork server.  R, a copy of the fork server as it was in the clone,
 * jumps back into this function's frame and returns 0 to Python, as os.fork's child does
 * (PyOS_AfterFork_Child: the interpreter's own post-fork housekeeping).  So R's parent is
 * pid 1 of its namespace (getppid() is 1, as in any container), and pid 1 is never an
 * interpreter: not for a microsecond.
 *
 * X runs on a stack of its own in this module (the fork server is single-threaded and
 * waits: one X at a time), calls nothing that could take a lock or write shared state
 * (raw syscalls, and glibc's _Fork, which runs no atfork handlers and fixes the child's
 * thread id), and blocks every signal: the fork server's handlers are in the memory it
 * shares.  R's first step restores its signal mask.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define X_STACK (256 * 1024)
#define RUNNER_PID "2"

static char x_stack[X_STACK] __attribute__((aligned(16)));
static jmp_buf back_to_python; /* R jumps here, in its copy of the fork server's stack */

struct x_args {
    int init_fd, status_fd, sync_fd;
    uid_t uid;
    gid_t gid;
};

static int x_main(void *arg) {
    struct x_args *a = arg;
    pid_t r = _Fork();
    if (r == 0) {
        longjmp(back_to_python, 1); /* R: continue as the fork server's copy */
    }
    if (r < 0) syscall(SYS_exit_group, 121);
    /* X: pid 1 of the namespace.  Only raw system calls from here on (shared memory). */
    if (syscall(SYS_setgroups, 0, NULL) != 0 || syscall(SYS_setresgid, a->gid, a->gid, a->gid) != 0 ||
        syscall(SYS_setresuid, a->uid, a->uid, a->uid) != 0 ||
        syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 ||
        syscall(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        syscall(SYS_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
        syscall(SYS_exit_group, 121);
    }
    if (syscall(SYS_dup3, a->status_fd, 1, 0) < 0) syscall(SYS_exit_group, 121);
    char one = 1;
    if (syscall(SYS_write, a->sync_fd, &one, 1) != 1) syscall(SYS_exit_group, 121);
    static char *const argv[] = {"sandboxd-init", RUNNER_PID, NULL};
    static char *const envp[] = {NULL};
    syscall(SYS_execveat, a->init_fd, "", argv, envp, AT_EMPTY_PATH);
    syscall(SYS_exit_group, 121);
    return 121;
}

static PyObject *spawn(PyObject *self, PyObject *args) {
    (void)self;
    struct x_args a;
    unsigned int uid, gid;
    if (!PyArg_ParseTuple(args, "iiiII", &a.init_fd, &a.status_fd, &a.sync_fd, &uid, &gid)) return NULL;
    a.uid = uid;
    a.gid = gid;
    if (uid == 0 || gid == 0) {
        PyErr_SetString(PyExc_ValueError, "refusing a worker pid 1 with uid or gid 0");
        return NULL;
    }
    sigset_t all, saved;
    sigfillset(&all);
    PyOS_BeforeFork();
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    if (setjmp(back_to_python) != 0) {
        /* R.  Its signal mask is still "all blocked": its signals step sets it. */
        PyOS_AfterFork_Child();
        return PyLong_FromLong(0);
    }
    pid_t x = clone(x_main, x_stack + X_STACK, CLONE_VM | CLONE_VFORK | SIGCHLD, &a);
    int err = errno;
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    PyOS_AfterFork_Parent();
    if (x < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(x);
}

static PyMethodDef methods[] = {
    {"spawn", spawn, METH_VARARGS, "Make a worker's pid 1 (sandboxd-init) and R; 0 in R, pid 1's pid here."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_spawn", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__spawn(void) { return PyModule_Create(&module); }
