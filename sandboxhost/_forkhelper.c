/*
 * Fork one policy child and harden it before it runs any Python.
 *
 * The zygote's Python version of these steps (zygote.Zygote._harden) costs
 * a child about 170 copy-on-write page faults, each ~2.4 us on a virtual
 * machine, because every Python object it touches has its refcount
 * written. Here the child runs no Python until it is hardened: it returns
 * to the interpreter only with its limits applied and its channel on
 * CHILD_FD, or it ends with EXIT_SETUP_FAILED and a line on stderr.
 *
 * Like zygote.Zygote.raw_fork, the fork skips Python's after-fork work:
 * the zygote calls this only while it has exactly one thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#ifndef SYS_landlock_restrict_self
#define SYS_landlock_restrict_self 446
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif

/* Keep in step with zygote.py. */
#define CHILD_FD 3
#define EXIT_SETUP_FAILED 121

/* Write why the child cannot run, then end it; never returns. */
static void
child_fail(const char *step, int err)
{
    char line[256];
    int n = snprintf(line, sizeof line,
                     "sandboxhost: child %d could not apply its limits:"
                     " %s: %s\n", (int)getpid(), step, strerror(err));
    if (n > 0) {
        ssize_t unused = write(2, line, (size_t)n < sizeof line
                                        ? (size_t)n : sizeof line - 1);
        (void)unused;
    }
    _exit(EXIT_SETUP_FAILED);
}

static void
set_limit(int resource, rlim_t soft, rlim_t hard, const char *step)
{
    struct rlimit limit = {soft, hard};
    if (setrlimit(resource, &limit) != 0)
        child_fail(step, errno);
}

static void
close_from(unsigned int first, unsigned int last)
{
    if (syscall(SYS_close_range, first, last, 0) == 0)
        return;
    /* Kernels before 5.9: close one by one. */
    for (unsigned int fd = first; fd <= last && fd < 65536; fd++)
        close((int)fd);
}

/* The child's side: apply every limit, or die. */
static void
harden(int channel_fd, pid_t zygote_pid, long long open_files,
       long long cpu_s, long long memory_bytes, int uid, int gid,
       int ruleset_fd, const struct sock_fprog *seccomp)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    /* The zygote's handler would write into its wake-up pipe. */
    if (sigaction(SIGCHLD, &dfl, NULL) != 0)
        child_fail("sigaction(SIGCHLD)", errno);
    if (setsid() < 0)
        child_fail("setsid", errno);

    set_limit(RLIMIT_CORE, 0, 0, "RLIMIT_CORE");
    set_limit(RLIMIT_FSIZE, 0, 0, "RLIMIT_FSIZE");
    set_limit(RLIMIT_NOFILE, (rlim_t)open_files, (rlim_t)open_files,
              "RLIMIT_NOFILE");
    set_limit(RLIMIT_NPROC, 0, 0, "RLIMIT_NPROC");
    /* Soft below hard: SIGXCPU names the cause, SIGKILL is the backstop. */
    set_limit(RLIMIT_CPU, (rlim_t)cpu_s, (rlim_t)cpu_s + 1, "RLIMIT_CPU");
    set_limit(RLIMIT_AS, (rlim_t)memory_bytes, (rlim_t)memory_bytes,
              "RLIMIT_AS");

    if (uid >= 0) {
        if (setgroups(0, NULL) != 0)
            child_fail("setgroups", errno);
        if (setgid((gid_t)gid) != 0)
            child_fail("setgid", errno);
        if (setuid((uid_t)uid) != 0)
            child_fail("setuid", errno);
    }

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        child_fail("no_new_privs", errno);
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
        child_fail("dumpable", errno);
    /* After setuid: a change of credentials clears the death signal. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        child_fail("pdeathsig", errno);
    if (getppid() != zygote_pid)
        child_fail("the zygote died before the child was ready", ESRCH);

    if (ruleset_fd >= 0
            && syscall(SYS_landlock_restrict_self, ruleset_fd, 0) != 0)
        child_fail("landlock_restrict_self", errno);
    if (seccomp != NULL
            && prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, seccomp, 0, 0) != 0)
        child_fail("seccomp", errno);

    if (channel_fd != CHILD_FD && dup2(channel_fd, CHILD_FD) < 0)
        child_fail("dup2", errno);
    close_from(0, CHILD_FD - 1);
    close_from(CHILD_FD + 1, ~0U);
}

PyDoc_STRVAR(fork_child_doc,
"fork_child(channel_fd, zygote_pid, open_files, cpu_s, memory_bytes,\n"
"           uid, gid, ruleset_fd, seccomp_program) -> int\n\n"
"Fork; in the child, apply the limits and return 0 with the channel on\n"
"fd 3 and every other descriptor closed. uid, gid and ruleset_fd are -1\n"
"when not used; seccomp_program is the classic BPF program or None.\n"
"Returns the child's pid in the parent; raises OSError if fork fails.");

static PyObject *
fork_child(PyObject *module, PyObject *args)
{
    int channel_fd, zygote_pid, uid, gid, ruleset_fd;
    long long open_files, cpu_s, memory_bytes;
    const char *program = NULL;
    Py_ssize_t program_len = 0;
    struct sock_fprog fprog;
    pid_t pid;

    if (!PyArg_ParseTuple(args, "iiLLLiiiz#", &channel_fd, &zygote_pid,
                          &open_files, &cpu_s, &memory_bytes, &uid, &gid,
                          &ruleset_fd, &program, &program_len))
        return NULL;
    if (open_files < 0 || cpu_s < 0 || memory_bytes < 0) {
        PyErr_SetString(PyExc_ValueError, "limits must not be negative");
        return NULL;
    }
    if (program != NULL) {
        if (program_len == 0
                || program_len % (Py_ssize_t)sizeof(struct sock_filter)
                || program_len / (Py_ssize_t)sizeof(struct sock_filter)
                   > BPF_MAXINSNS) {
            PyErr_SetString(PyExc_ValueError, "not a seccomp BPF program");
            return NULL;
        }
        fprog.len = (unsigned short)(program_len / sizeof(struct sock_filter));
        fprog.filter = (struct sock_filter *)program;
    }

    pid = fork();
    if (pid < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (pid == 0)
        harden(channel_fd, (pid_t)zygote_pid, open_files, cpu_s,
               memory_bytes, uid, gid, ruleset_fd,
               program != NULL ? &fprog : NULL);
    return PyLong_FromLong((long)pid);
}

static PyMethodDef methods[] = {
    {"fork_child", fork_child, METH_VARARGS, fork_child_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sandboxhost._forkhelper",
    "Fork and harden policy children without running Python in between.",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__forkhelper(void)
{
    return PyModule_Create(&module);
}
