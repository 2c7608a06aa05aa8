/*
 * Thin wrappers over the Linux calls the services use, with scalar arguments and -errno
 * results (see sbx_native.h for why). The TypeScript side (native/src) gives them types.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#include "sbx_native.h"

#define RET(expr)                          \
  do {                                     \
    long r_ = (long)(expr);                \
    return r_ < 0 ? -(int64_t)errno : r_;  \
  } while (0)

int64_t sbx_userfaultfd(int flags) { RET(syscall(SYS_userfaultfd, flags)); }

/* /dev/userfaultfd works where the unprivileged syscall is disabled (vm.unprivileged_userfaultfd=0). */
int64_t sbx_userfaultfd_dev(int flags) {
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev < 0) return -(int64_t)errno;
  int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
  int saved = errno;
  close(dev);
  return fd < 0 ? -(int64_t)saved : fd;
}

/* out[0] = features granted, out[1] = ioctls. */
int64_t sbx_uffd_api(int fd, uint64_t features, uint64_t *out) {
  struct uffdio_api api = {.api = UFFD_API, .features = features};
  if (ioctl(fd, UFFDIO_API, &api) < 0) return -(int64_t)errno;
  out[0] = api.features;
  out[1] = api.ioctls;
  return 0;
}

/* Returns the ioctls the range supports (always positive on success on x86-64). */
int64_t sbx_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out) {
  struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
  if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0) return -(int64_t)errno;
  if (ioctls_out) *ioctls_out = reg.ioctls;
  return 0;
}

int64_t sbx_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode) {
  struct uffdio_writeprotect wp = {.range = {.start = start, .len = len}, .mode = mode};
  RET(ioctl(fd, UFFDIO_WRITEPROTECT, &wp));
}

/*
 * PAGEMAP_SCAN on a /proc/<pid>/pagemap fd: fills `vec` (3 u64 per region: start, end,
 * categories), returns the number of regions, and stores where the walk ended in *walk_end.
 */
int64_t sbx_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags, uint64_t category_mask,
                         uint64_t category_inverted, uint64_t category_anyof, uint64_t return_mask, uint64_t *vec,
                         uint64_t vec_len, uint64_t *walk_end) {
  struct pm_scan_arg arg = {
      .size = sizeof(arg),
      .flags = flags,
      .start = start,
      .end = end,
      .vec = (uint64_t)(uintptr_t)vec,
      .vec_len = vec_len,
      .max_pages = 0,
      .category_inverted = category_inverted,
      .category_mask = category_mask,
      .category_anyof_mask = category_anyof,
      .return_mask = return_mask,
  };
  int r = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
  if (r < 0) return -(int64_t)errno;
  if (walk_end) *walk_end = arg.walk_end;
  return r;
}

int64_t sbx_memfd_create(const char *name, unsigned int flags) { RET(syscall(SYS_memfd_create, name, flags)); }

int64_t sbx_pidfd_open(int pid, unsigned int flags) { RET(syscall(SYS_pidfd_open, pid, flags)); }

int64_t sbx_eventfd(unsigned int initval, int flags) { RET(eventfd(initval, flags)); }

/* mmap returning the address, or -errno (addresses never reach the top 4 KiB on x86-64). */
int64_t sbx_mmap(uint64_t addr, uint64_t len, int prot, int flags, int fd, int64_t off) {
  void *p = mmap((void *)(uintptr_t)addr, len, prot, flags, fd, off);
  if (p == MAP_FAILED) return -(int64_t)errno;
  return (int64_t)(uintptr_t)p;
}

int64_t sbx_munmap(uint64_t addr, uint64_t len) { RET(munmap((void *)(uintptr_t)addr, len)); }
int64_t sbx_madvise(uint64_t addr, uint64_t len, int advice) { RET(madvise((void *)(uintptr_t)addr, len, advice)); }
int64_t sbx_mprotect(uint64_t addr, uint64_t len, int prot) { RET(mprotect((void *)(uintptr_t)addr, len, prot)); }

/* Copies between a caller buffer and a raw address (guest memory, a mapped file). */
void sbx_copy_from_address(void *dst, uint64_t src, uint64_t len) { memcpy(dst, (const void *)(uintptr_t)src, len); }
void sbx_copy_to_address(uint64_t dst, const void *src, uint64_t len) { memcpy((void *)(uintptr_t)dst, src, len); }
void sbx_fill_address(uint64_t dst, int byte, uint64_t len) { memset((void *)(uintptr_t)dst, byte, len); }

int64_t sbx_close(int fd) { RET(close(fd)); }
int64_t sbx_read(int fd, void *buf, uint64_t len) { RET(read(fd, buf, len)); }
int64_t sbx_write(int fd, const void *buf, uint64_t len) { RET(write(fd, buf, len)); }
int64_t sbx_pread(int fd, void *buf, uint64_t len, int64_t off) { RET(pread(fd, buf, len, off)); }
int64_t sbx_pwrite(int fd, const void *buf, uint64_t len, int64_t off) { RET(pwrite(fd, buf, len, off)); }
int64_t sbx_lseek(int fd, int64_t off, int whence) { RET(lseek(fd, off, whence)); }
int64_t sbx_pread_address(int fd, uint64_t addr, uint64_t len, int64_t off) {
  RET(pread(fd, (void *)(uintptr_t)addr, len, off));
}
int64_t sbx_pwrite_address(int fd, uint64_t addr, uint64_t len, int64_t off) {
  RET(pwrite(fd, (const void *)(uintptr_t)addr, len, off));
}
int64_t sbx_ftruncate(int fd, int64_t len) { RET(ftruncate(fd, len)); }
int64_t sbx_fcntl(int fd, int cmd, int64_t arg) { RET(fcntl(fd, cmd, arg)); }
int64_t sbx_ioctl(int fd, uint64_t request, void *arg) { RET(ioctl(fd, request, arg)); }

/* pollfds: 2 int32 per entry (fd, events); revents written into `revents`. */
int64_t sbx_poll(const int32_t *fds_events, int32_t *revents, int n, int timeout_ms) {
  struct pollfd pfd[64];
  if (n > 64) return -EINVAL;
  for (int i = 0; i < n; i++) {
    pfd[i].fd = fds_events[2 * i];
    pfd[i].events = (short)fds_events[2 * i + 1];
    pfd[i].revents = 0;
  }
  int r = poll(pfd, n, timeout_ms);
  if (r < 0) return -(int64_t)errno;
  for (int i = 0; i < n; i++) revents[i] = pfd[i].revents;
  return r;
}

static int fill_sun(struct sockaddr_un *sun, const char *path) {
  memset(sun, 0, sizeof(*sun));
  sun->sun_family = AF_UNIX;
  size_t n = strlen(path);
  if (n >= sizeof(sun->sun_path)) return -ENAMETOOLONG;
  memcpy(sun->sun_path, path, n);
  return 0;
}

int64_t sbx_unix_socket(int type) { RET(socket(AF_UNIX, type | SOCK_CLOEXEC, 0)); }

int64_t sbx_unix_bind_listen(int fd, const char *path, int backlog) {
  struct sockaddr_un sun;
  int r = fill_sun(&sun, path);
  if (r < 0) return r;
  if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) return -(int64_t)errno;
  if (backlog >= 0 && listen(fd, backlog) < 0) return -(int64_t)errno;
  return 0;
}

int64_t sbx_unix_connect(int fd, const char *path) {
  struct sockaddr_un sun;
  int r = fill_sun(&sun, path);
  if (r < 0) return r;
  RET(connect(fd, (struct sockaddr *)&sun, sizeof(sun)));
}

int64_t sbx_accept(int fd, int flags) { RET(accept4(fd, NULL, NULL, flags | SOCK_CLOEXEC)); }

int64_t sbx_shutdown(int fd, int how) { RET(shutdown(fd, how)); }

/* out: pid, uid, gid of the socket's peer (SO_PEERCRED). */
int64_t sbx_peer_cred(int fd, int32_t *out) {
  struct ucred cred;
  socklen_t len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return -(int64_t)errno;
  out[0] = cred.pid;
  out[1] = (int32_t)cred.uid;
  out[2] = (int32_t)cred.gid;
  return 0;
}

/* One message: `len` payload bytes plus `nfds` descriptors as SCM_RIGHTS. */
int64_t sbx_send_fds(int sock, const void *buf, uint64_t len, const int32_t *fds, int nfds, int flags) {
  if (nfds < 0 || nfds > 253) return -EINVAL;
  char cbuf[CMSG_SPACE(sizeof(int) * 253)];
  struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
  if (nfds > 0) {
    memset(cbuf, 0, CMSG_SPACE(sizeof(int) * nfds));
    msg.msg_control = cbuf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  RET(sendmsg(sock, &msg, flags | MSG_NOSIGNAL));
}

/*
 * Receives one message. Descriptors (all SCM_RIGHTS messages, in order) go to `fds` up to
 * `maxfds`; any beyond that are closed here so a hostile peer cannot leak fds into us.
 * info[0] = number of fds stored, info[1] = fds received in total, info[2] = msg_flags.
 * Returns the payload length.
 */
int64_t sbx_recv_fds(int sock, void *buf, uint64_t len, int32_t *fds, int maxfds, int32_t *info, int flags) {
  char cbuf[CMSG_SPACE(sizeof(int) * 64)];
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf)};
  ssize_t n = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
  if (n < 0) return -(int64_t)errno;
  int stored = 0, total = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    int *p = (int *)CMSG_DATA(c);
    for (int i = 0; i < count; i++) {
      int fd;
      memcpy(&fd, p + i, sizeof(int));
      total++;
      if (stored < maxfds)
        fds[stored++] = fd;
      else
        close(fd);
    }
  }
  info[0] = stored;
  info[1] = total;
  info[2] = msg.msg_flags;
  return n;
}

int64_t sbx_kill(int pid, int sig) { RET(kill(pid, sig)); }
