/*
 * The zygote's fork server loop, and the hardening of each policy child.
 *
 * Why C: after every fork the zygote's pages are shared copy-on-write with
 * the new child, so any page the zygote writes afterwards costs it a page
 * fault (~2.4 us on a virtual machine). A Python loop writes refcounts and
 * allocates on every request: measured, ~128 faults per run in the zygote
 * and ~170 more in each child between fork and policy code. Here the loop
 * and the hardening run no Python at all; the interpreter is entered again
 * only in a child that is fully hardened, with its channel on CHILD_FD.
 *
 * Control messages are fixed-size records on the SOCK_SEQPACKET control
 * socket (native byte order; both ends run on the same machine):
 *
 *   host -> zygote  struct request  REQ_FORK (+ the child's channel fd)
 *                                   REQ_KILL
 *   zygote -> host  struct report   REP_FORKED, REP_FORK_FAILED, REP_EXIT
 *
 * The zygote is the children's parent and reaper, so only it can signal a
 * child's process group without risking a recycled pid: it kills a group
 * on request and, before reaping a leader, kills what is left of its group.
 *
 * fork() is called without Python's after-fork hooks: the zygote has
 * exactly one thread (zygote.py checks it before it calls serve()).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stddef.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

/* Landlock's system calls have the same numbers on every architecture. */
#define SYS_LANDLOCK_CREATE_RULESET 444
#define SYS_LANDLOCK_ADD_RULE 445
#define SYS_LANDLOCK_RESTRICT_SELF 446
#define LANDLOCK_CREATE_RULESET_VERSION (1U << 0)
#define LANDLOCK_RULE_PATH_BENEATH 1
#define LL_FS_READ_FILE (1ULL << 2)
#define LL_FS_READ_DIR (1ULL << 3)
#define LL_NET_BIND_TCP (1ULL << 0)
#define LL_NET_CONNECT_TCP (1ULL << 1)
#define LL_SCOPE_ABSTRACT_UNIX_SOCKET (1ULL << 0)
#define LL_SCOPE_SIGNAL (1ULL << 1)
#ifndef PR_SET_MDWE
#define PR_SET_MDWE 65
#define PR_MDWE_REFUSE_EXEC_GAIN (1UL << 0)
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif

/*
 * System calls from this number on (Linux 6.6 and later: fchmodat2,
 * statmount, listmount, mseal, the *xattrat calls, file_setattr, ...) are
 * newer than the deny list in zygote.py, which cannot judge them; children
 * get ENOSYS, as on an older kernel. The numbers are shared by every
 * architecture since Linux 5.1.
 */
#define FIRST_UNREVIEWED_SYSCALL 452
#if defined(__x86_64__)
#define NATIVE_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define NATIVE_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

#ifdef NATIVE_AUDIT_ARCH
static struct sock_filter newer_syscalls_insns[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, NATIVE_AUDIT_ARCH, 1, 0),
    /* Another ABI: the main filter refuses it. */
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, FIRST_UNREVIEWED_SYSCALL, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
};
static const struct sock_fprog newer_syscalls = {
    sizeof newer_syscalls_insns / sizeof newer_syscalls_insns[0],
    newer_syscalls_insns,
};
#endif

/* Keep in step with zygote.py. */
#define CHILD_FD 3
#define EXIT_SETUP_FAILED 121

enum { REQ_FORK = 1, REQ_KILL = 2 };
enum { REP_FORKED = 1, REP_FORK_FAILED = 2, REP_EXIT = 3 };
enum { FLAG_SECCOMP = 1, FLAG_LANDLOCK = 2 };

/* Python: struct.Struct("=IIqqqqii") */
struct request {
    uint32_t type;
    uint32_t flags;
    int64_t id;
    int64_t memory_bytes;
    int64_t cpu_time_s;
    int64_t open_files;
    int32_t uid;            /* -1: keep the zygote's user */
    int32_t gid;
};

/* Python: struct.Struct("=Iiqiiq") */
struct report {
    uint32_t type;
    int32_t pid;
    int64_t id;             /* -1 for a child the zygote has no id for */
    int32_t code;           /* exit code, -1 if killed by a signal */
    int32_t signal;         /* the signal that ended it, or 0 */
    int64_t value;          /* REP_EXIT: CPU microseconds; FAILED: errno */
};

_Static_assert(sizeof(struct request) == 48, "request layout");
_Static_assert(sizeof(struct report) == 32, "report layout");

struct ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};

struct path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

/* -- in the child ---------------------------------------------------------- */

/* Write why the child cannot run, then end it; never returns. */
static void
child_fail(const char *step, int err)
{
    char line[256];
    int n = snprintf(line, sizeof line,
                     "sandboxhost: child %d could not apply its limits:"
                     " %s: %s\n", (int)getpid(), step, strerror(err));
    if (n > 0) {
        size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
        ssize_t unused = write(2, line, len);
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
    /* Kernels before 5.9: one by one, up to any descriptor limit. */
    for (unsigned int fd = first; fd <= last && fd < (1U << 20); fd++)
        close((int)fd);
}

/* Apply every limit of the request, or die. */
static void
harden(const struct request *req, int channel_fd, pid_t zygote_pid,
       int ruleset_fd, const struct sock_fprog *seccomp,
       const sigset_t *mask)
{
    struct sigaction dfl;

    /* The zygote blocks SIGCHLD for its signalfd; a child starts clean. */
    if (sigprocmask(SIG_SETMASK, mask, NULL) != 0)
        child_fail("sigprocmask", errno);
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    if (sigaction(SIGCHLD, &dfl, NULL) != 0)
        child_fail("sigaction(SIGCHLD)", errno);
    if (setsid() < 0)
        child_fail("setsid", errno);

    set_limit(RLIMIT_CORE, 0, 0, "RLIMIT_CORE");
    set_limit(RLIMIT_FSIZE, 0, 0, "RLIMIT_FSIZE");
    set_limit(RLIMIT_NOFILE, (rlim_t)req->open_files,
              (rlim_t)req->open_files, "RLIMIT_NOFILE");
    set_limit(RLIMIT_NPROC, 0, 0, "RLIMIT_NPROC");
    /* Soft below hard: SIGXCPU names the cause, SIGKILL is the backstop. */
    set_limit(RLIMIT_CPU, (rlim_t)req->cpu_time_s,
              (rlim_t)req->cpu_time_s + 1, "RLIMIT_CPU");
    set_limit(RLIMIT_AS, (rlim_t)req->memory_bytes,
              (rlim_t)req->memory_bytes, "RLIMIT_AS");

    if (req->uid >= 0) {
        if (setgroups(0, NULL) != 0)
            child_fail("setgroups", errno);
        if (setgid((gid_t)req->gid) != 0)
            child_fail("setgid", errno);
        if (setuid((uid_t)req->uid) != 0)
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

    /* No memory that was writable becomes executable, and none is both
       (Linux 6.3 on; older kernels refuse the option, and the seccomp
       filter still refuses memory both writable and executable). */
    if (prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0
            && errno != EINVAL)
        child_fail("memory-deny-write-execute", errno);

    if (ruleset_fd >= 0
            && syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, 0) != 0)
        child_fail("landlock_restrict_self", errno);
    if (seccomp != NULL) {
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, seccomp, 0, 0) != 0)
            child_fail("seccomp", errno);
#ifdef NATIVE_AUDIT_ARCH
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &newer_syscalls, 0,
                  0) != 0)
            child_fail("seccomp (newer system calls)", errno);
#endif
    }

    if (channel_fd != CHILD_FD && dup2(channel_fd, CHILD_FD) < 0)
        child_fail("dup2", errno);
    close_from(0, CHILD_FD - 1);
    close_from(CHILD_FD + 1, ~0U);
}

/* -- the children's table -------------------------------------------------- */

struct child {
    pid_t pid;
    int64_t id;
};

static struct child *children;
static size_t n_children, cap_children;

static int
add_child(pid_t pid, int64_t id)
{
    if (n_children == cap_children) {
        size_t cap = cap_children ? cap_children * 2 : 16;
        struct child *grown = realloc(children, cap * sizeof *grown);
        if (grown == NULL)
            return -1;
        children = grown;
        cap_children = cap;
    }
    children[n_children].pid = pid;
    children[n_children].id = id;
    n_children++;
    return 0;
}

static int64_t
remove_child(pid_t pid)
{
    for (size_t i = 0; i < n_children; i++) {
        if (children[i].pid == pid) {
            int64_t id = children[i].id;
            children[i] = children[--n_children];
            return id;
        }
    }
    return -1;
}

static pid_t
find_child(int64_t id)
{
    for (size_t i = 0; i < n_children; i++)
        if (children[i].id == id)
            return children[i].pid;
    return 0;
}

static void
kill_group(pid_t pid)
{
    /* The leader first: a child killed before its setsid() has no group. */
    kill(pid, SIGKILL);
    kill(-pid, SIGKILL);
}

/* -- the loop -------------------------------------------------------------- */

struct server {
    int control_fd;
    int signal_fd;
    pid_t pid;
    int ruleset_fd;
    const struct sock_fprog *seccomp;
    sigset_t old_mask;
};

enum { GO_ON, STOP, IN_CHILD };

static int
send_report(const struct server *srv, uint32_t type, pid_t pid, int64_t id,
            int32_t code, int32_t signo, int64_t value)
{
    struct report rep = {type, (int32_t)pid, id, code, signo, value};
    for (;;) {
        if (send(srv->control_fd, &rep, sizeof rep, MSG_NOSIGNAL) >= 0)
            return GO_ON;
        if (errno != EINTR)
            return STOP;   /* the host is gone */
    }
}

static int
reap(const struct server *srv)
{
    for (;;) {
        siginfo_t info;
        struct rusage usage;
        int status;
        memset(&info, 0, sizeof info);
        if (waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) != 0) {
            if (errno == EINTR)
                continue;
            return GO_ON;   /* ECHILD: no children */
        }
        if (info.si_pid == 0)
            return GO_ON;
        /* The leader is a zombie, so its pid (the group id) cannot be
           reused yet: whatever is left of its group dies now. */
        kill_group(info.si_pid);
        if (wait4(info.si_pid, &status, 0, &usage) < 0) {
            if (errno == EINTR)
                continue;
            return GO_ON;
        }
        int64_t cpu_us =
            (int64_t)(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000000
            + usage.ru_utime.tv_usec + usage.ru_stime.tv_usec;
        int32_t code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        int32_t signo = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
        if (send_report(srv, REP_EXIT, info.si_pid,
                        remove_child(info.si_pid), code, signo,
                        cpu_us) == STOP)
            return STOP;
    }
}

static void
close_fds(const int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++)
        close(fds[i]);
}

static int
fork_request(struct server *srv, const struct request *req, int fd)
{
    const struct sock_fprog *seccomp = NULL;
    int ruleset_fd = -1;
    pid_t pid;

    if (req->memory_bytes < 0 || req->cpu_time_s < 0 || req->open_files < 0
            || (req->uid >= 0) != (req->gid >= 0)) {
        close(fd);
        return send_report(srv, REP_FORK_FAILED, 0, req->id, -1, 0, EINVAL);
    }
    if (req->flags & FLAG_LANDLOCK)
        ruleset_fd = srv->ruleset_fd;
    if (req->flags & FLAG_SECCOMP)
        seccomp = srv->seccomp;

    pid = fork();
    if (pid == 0) {
        harden(req, fd, srv->pid, ruleset_fd, seccomp, &srv->old_mask);
        return IN_CHILD;
    }
    int err = errno;
    close(fd);
    if (pid < 0)
        return send_report(srv, REP_FORK_FAILED, 0, req->id, -1, 0, err);
    if (add_child(pid, req->id) != 0) {
        /* No room to remember it: it must not run unwatched. */
        kill_group(pid);
        return send_report(srv, REP_FORK_FAILED, 0, req->id, -1, 0, ENOMEM);
    }
    return send_report(srv, REP_FORKED, pid, req->id, 0, 0, 0);
}

static int
handle_control(struct server *srv)
{
    struct request req;
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {&req, sizeof req};
    struct msghdr msg;
    int fds[4];
    size_t n_fds = 0;
    ssize_t n;

    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    n = recvmsg(srv->control_fd, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0)
        return errno == EINTR || errno == EAGAIN ? GO_ON : STOP;
    if (n == 0)
        return STOP;   /* the host closed the control socket */
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL;
         c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count && n_fds < 4; i++)
            memcpy(&fds[n_fds++], CMSG_DATA(c) + i * sizeof(int),
                   sizeof(int));
    }
    /* The host is trusted: anything else is noise to drop. */
    if (n != (ssize_t)sizeof req || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
        close_fds(fds, n_fds);
        return GO_ON;
    }
    if (req.type == REQ_FORK && n_fds == 1)
        return fork_request(srv, &req, fds[0]);
    close_fds(fds, n_fds);
    if (req.type == REQ_FORK)   /* no channel: say so, do not leave it waiting */
        return send_report(srv, REP_FORK_FAILED, 0, req.id, -1, 0, EBADF);
    if (req.type == REQ_KILL) {
        pid_t pid = find_child(req.id);
        if (pid > 0)
            kill_group(pid);
    }
    return GO_ON;
}

static void
drain_signals(int signal_fd)
{
    struct signalfd_siginfo info[8];
    while (read(signal_fd, info, sizeof info) > 0)
        ;
}

static void
stop_children(void)
{
    for (size_t i = 0; i < n_children; i++)
        kill_group(children[i].pid);
    for (size_t i = 0; i < n_children; i++)
        while (waitpid(children[i].pid, NULL, 0) < 0 && errno == EINTR)
            ;
    n_children = 0;
}

PyDoc_STRVAR(serve_doc,
"serve(control_fd, ruleset_fd, seccomp_program) -> bool\n\n"
"Serve fork requests on the control socket until the host closes it.\n"
"Returns True in a forked child, hardened, with its channel on fd 3 and\n"
"every other descriptor closed; returns False in the zygote once the host\n"
"is gone and every child has been killed and reaped. ruleset_fd is the\n"
"Landlock ruleset or -1; seccomp_program is classic BPF or None.");

static PyObject *
serve(PyObject *module, PyObject *args)
{
    struct server srv;
    struct sock_fprog fprog;
    const char *program = NULL;
    Py_ssize_t program_len = 0;
    sigset_t chld;
    int outcome = GO_ON;
    (void)module;

    memset(&srv, 0, sizeof srv);
    if (!PyArg_ParseTuple(args, "iiz#", &srv.control_fd, &srv.ruleset_fd,
                          &program, &program_len))
        return NULL;
    if (program != NULL) {
        Py_ssize_t insns = program_len / (Py_ssize_t)sizeof(struct sock_filter);
        if (program_len == 0
                || program_len % (Py_ssize_t)sizeof(struct sock_filter)
                || insns > BPF_MAXINSNS) {
            PyErr_SetString(PyExc_ValueError, "not a seccomp BPF program");
            return NULL;
        }
        fprog.len = (unsigned short)insns;
        fprog.filter = (struct sock_filter *)program;
        srv.seccomp = &fprog;
    }
    srv.pid = getpid();

    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &chld, &srv.old_mask) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    srv.signal_fd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
    if (srv.signal_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        sigprocmask(SIG_SETMASK, &srv.old_mask, NULL);
        return NULL;
    }

    struct pollfd fds[2] = {{srv.control_fd, POLLIN, 0},
                            {srv.signal_fd, POLLIN, 0}};
    while (outcome == GO_ON) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[1].revents) {
            drain_signals(srv.signal_fd);
            outcome = reap(&srv);
        }
        if (outcome == GO_ON && fds[0].revents)
            outcome = handle_control(&srv);
    }
    if (outcome == IN_CHILD)
        Py_RETURN_TRUE;

    stop_children();
    close(srv.signal_fd);
    sigprocmask(SIG_SETMASK, &srv.old_mask, NULL);
    Py_RETURN_FALSE;
}

/* -- Landlock, set up once in the zygote ----------------------------------- */

PyDoc_STRVAR(landlock_ruleset_doc,
"landlock_ruleset(read_dirs) -> (fd, abi)\n\n"
"A Landlock ruleset that handles every filesystem right the kernel knows\n"
"(and TCP bind/connect, signals and abstract sockets where it can) and\n"
"allows only reading files and directories beneath read_dirs. Raises\n"
"OSError(errno, step) when the kernel has no Landlock or refuses a step.");

static PyObject *
os_error(int err, const char *step)
{
    PyObject *value = Py_BuildValue("(is)", err, step);
    if (value != NULL) {
        PyErr_SetObject(PyExc_OSError, value);
        Py_DECREF(value);
    }
    return NULL;
}

static PyObject *
landlock_ruleset(PyObject *module, PyObject *args)
{
    PyObject *dirs, *seq;
    struct ruleset_attr attr;
    size_t size = sizeof(uint64_t);
    long abi;
    int fd;
    (void)module;

    if (!PyArg_ParseTuple(args, "O", &dirs))
        return NULL;
    abi = syscall(SYS_LANDLOCK_CREATE_RULESET, NULL, 0,
                  LANDLOCK_CREATE_RULESET_VERSION);
    if (abi < 1)
        return os_error(errno, "no Landlock in this kernel");

    memset(&attr, 0, sizeof attr);
    attr.handled_access_fs = abi >= 5 ? (1ULL << 16) - 1
                           : abi >= 3 ? (1ULL << 15) - 1
                           : abi >= 2 ? (1ULL << 14) - 1
                           : (1ULL << 13) - 1;
    if (abi >= 4) {
        /* TCP bind and connect too, with no rule allowing any port. */
        attr.handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP;
        size += sizeof(uint64_t);
    }
    if (abi >= 6) {
        /* Signals and abstract unix sockets stay inside the child's own
           domain: no signal to a sibling, the zygote or the host. */
        attr.scoped = LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL;
        size += sizeof(uint64_t);
    }
    fd = (int)syscall(SYS_LANDLOCK_CREATE_RULESET, &attr, size, 0);
    if (fd < 0)
        return os_error(errno, "cannot create a Landlock ruleset");

    seq = PySequence_Fast(dirs, "read_dirs must be a sequence of paths");
    if (seq == NULL) {
        close(fd);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *encoded;
        struct path_beneath_attr rule;
        int dir_fd, err;

        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(seq, i),
                                   &encoded))
            goto fail;
        dir_fd = open(PyBytes_AS_STRING(encoded), O_PATH | O_CLOEXEC);
        err = errno;
        Py_DECREF(encoded);
        if (dir_fd < 0) {
            os_error(err, "cannot open a directory children may read");
            goto fail;
        }
        rule.allowed_access = LL_FS_READ_FILE | LL_FS_READ_DIR;
        rule.parent_fd = dir_fd;
        if (syscall(SYS_LANDLOCK_ADD_RULE, fd, LANDLOCK_RULE_PATH_BENEATH,
                    &rule, 0) != 0) {
            err = errno;
            close(dir_fd);
            os_error(err, "landlock_add_rule");
            goto fail;
        }
        close(dir_fd);
    }
    Py_DECREF(seq);
    return Py_BuildValue("(il)", fd, abi);

fail:
    Py_DECREF(seq);
    close(fd);
    return NULL;
}

static PyMethodDef methods[] = {
    {"serve", serve, METH_VARARGS, serve_doc},
    {"landlock_ruleset", landlock_ruleset, METH_VARARGS,
     landlock_ruleset_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sandboxhost._forkserver",
    "The zygote's fork server loop and the hardening of policy children.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__forkserver(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "CHILD_FD", CHILD_FD)
            || PyModule_AddIntConstant(m, "EXIT_SETUP_FAILED",
                                       EXIT_SETUP_FAILED)
            || PyModule_AddIntConstant(m, "REQ_FORK", REQ_FORK)
            || PyModule_AddIntConstant(m, "REQ_KILL", REQ_KILL)
            || PyModule_AddIntConstant(m, "REP_FORKED", REP_FORKED)
            || PyModule_AddIntConstant(m, "REP_FORK_FAILED", REP_FORK_FAILED)
            || PyModule_AddIntConstant(m, "REP_EXIT", REP_EXIT)
            || PyModule_AddIntConstant(m, "FLAG_SECCOMP", FLAG_SECCOMP)
            || PyModule_AddIntConstant(m, "FLAG_LANDLOCK", FLAG_LANDLOCK)
            || PyModule_AddIntConstant(m, "REQUEST_BYTES",
                                       sizeof(struct request))
            || PyModule_AddIntConstant(m, "REPORT_BYTES",
                                       sizeof(struct report))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
