/* An LD_PRELOAD fault injector for the tests (tests/it/disk_eio.rs): makes fsync and/or writes fail
 * with EIO on the files whose path contains a given substring, while a trigger file exists.
 *
 *   SHOPKEEP_EIO_PATH     substring of the target file's path (e.g. "raft-log.redb")
 *   SHOPKEEP_EIO_TRIGGER  the calls fail only while this file exists (checked at every call)
 *   SHOPKEEP_EIO_OPS      comma list: "fsync" (fsync, fdatasync), "write" (write, pwrite, pwrite64,
 *                         pwritev, pwritev64)
 *
 * Build: cc -shared -fPIC -O2 -o libeio.so eio.c -ldl
 * std's File::sync_data is fdatasync and FileExt::write_at is pwrite64 (all redb uses); the other
 * calls are wrapped so that another path to the same file cannot slip past. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static const char *target, *trigger;
static int fail_fsync, fail_write;

static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off64_t);

/* Runs at load, before the program's main: resolves the real functions and reads the settings. */
__attribute__((constructor)) static void init(void) {
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_pwritev = dlsym(RTLD_NEXT, "pwritev");
    real_pwritev64 = dlsym(RTLD_NEXT, "pwritev64");
    target = getenv("SHOPKEEP_EIO_PATH");
    trigger = getenv("SHOPKEEP_EIO_TRIGGER");
    const char *ops = getenv("SHOPKEEP_EIO_OPS");
    if (target == NULL || *target == '\0' || trigger == NULL || ops == NULL)
        return; /* not configured: every call passes through */
    fail_fsync = strstr(ops, "fsync") != NULL;
    fail_write = strstr(ops, "write") != NULL;
}

/* Whether a call of this kind on `fd` fails now: armed (the trigger file exists) and `fd` is the target.
 * The path is read at every call (correctness over speed: fds are reused for other files). */
static int inject(int enabled, int fd) {
    if (!enabled)
        return 0;
    int saved = errno; /* a call that passes through leaves errno as it found it */
    char link[64], path[PATH_MAX];
    ssize_t n = -1;
    if (access(trigger, F_OK) == 0) {
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        n = readlink(link, path, sizeof path - 1);
    }
    if (n < 0 || (path[n] = '\0', strstr(path, target) == NULL)) {
        errno = saved;
        return 0;
    }
    errno = EIO;
    return 1;
}

int fsync(int fd) { return inject(fail_fsync, fd) ? -1 : real_fsync(fd); }
int fdatasync(int fd) { return inject(fail_fsync, fd) ? -1 : real_fdatasync(fd); }

ssize_t write(int fd, const void *buf, size_t len) {
    return inject(fail_write, fd) ? -1 : real_write(fd, buf, len);
}
ssize_t pwrite(int fd, const void *buf, size_t len, off_t off) {
    return inject(fail_write, fd) ? -1 : real_pwrite(fd, buf, len, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t len, off64_t off) {
    return inject(fail_write, fd) ? -1 : real_pwrite64(fd, buf, len, off);
}
ssize_t pwritev(int fd, const struct iovec *iov, int count, off_t off) {
    return inject(fail_write, fd) ? -1 : real_pwritev(fd, iov, count, off);
}
ssize_t pwritev64(int fd, const struct iovec *iov, int count, off64_t off) {
    return inject(fail_write, fd) ? -1 : real_pwritev64(fd, iov, count, off);
}
