/*
 * Benchmark peer: a minimal C UFFD handler, the baseline bench/uffd compares uffd-server with.
 * Listens on --socket, takes one Firecracker-style handshake (JSON regions + uffd), maps
 * --memfile and answers each fault with one UFFDIO_COPY of --copy-bytes (4096: the naive
 * handler; 2097152: the aligned 2 MiB block holding the fault), single-threaded, until the
 * peer hangs up. Prints "listening" once the socket is ready and "served <faults> <bytes>" at
 * the end.
 *
 * usage: uffd-c-handler --socket <path> --memfile <path> [--copy-bytes <n>]
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

struct region {
  uint64_t base, size, offset, page;
};

static void die(const char *what) {
  fprintf(stderr, "uffd-c-handler: %s: %s\n", what, strerror(errno));
  exit(2);
}

static uint64_t field(const char *obj, const char *key) {
  char pat[64];
  snprintf(pat, sizeof(pat), "\"%s\":", key);
  const char *p = strstr(obj, pat);
  return p ? strtoull(p + strlen(pat), NULL, 10) : 0;
}

int main(int argc, char **argv) {
  const char *sock_path = NULL, *memfile = NULL;
  uint64_t copy_bytes = 4096;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--socket")) sock_path = argv[i + 1];
    else if (!strcmp(argv[i], "--memfile")) memfile = argv[i + 1];
    else if (!strcmp(argv[i], "--copy-bytes")) copy_bytes = strtoull(argv[i + 1], NULL, 0);
  }
  if (!sock_path || !memfile || copy_bytes < 4096 || copy_bytes % 4096) {
    fprintf(stderr, "usage: uffd-c-handler --socket <path> --memfile <path> [--copy-bytes <n>]\n");
    return 2;
  }
  int mf = open(memfile, O_RDONLY | O_CLOEXEC);
  if (mf < 0) die("open memfile");
  struct stat st;
  fstat(mf, &st);
  uint8_t *src = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, mf, 0);
  if (src == MAP_FAILED) die("mmap memfile");

  int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sun = {.sun_family = AF_UNIX};
  strncpy(sun.sun_path, sock_path, sizeof(sun.sun_path) - 1);
  unlink(sock_path);
  if (bind(ls, (struct sockaddr *)&sun, sizeof(sun)) < 0 || listen(ls, 1) < 0) die("listen");
  printf("listening\n");
  fflush(stdout);
  int conn = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
  if (conn < 0) die("accept");

  char json[16384];
  char cbuf[CMSG_SPACE(sizeof(int) * 4)];
  struct iovec iov = {.iov_base = json, .iov_len = sizeof(json) - 1};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf)};
  ssize_t n = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
  if (n <= 0) die("recvmsg");
  json[n] = 0;
  struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
  if (!c || c->cmsg_type != SCM_RIGHTS) die("no fd");
  int uffd;
  memcpy(&uffd, CMSG_DATA(c), sizeof(int));

  struct region regions[64];
  int nreg = 0;
  for (const char *p = strchr(json, '{'); p && nreg < 64; p = strchr(p + 1, '{')) {
    uint64_t page = field(p, "page_size");
    if (!page) page = field(p, "page_size_kib");
    regions[nreg++] = (struct region){field(p, "base_host_virt_addr"), field(p, "size"), field(p, "offset"), page};
  }

  uint64_t faults = 0, bytes = 0;
  struct pollfd pfd[2] = {{.fd = uffd, .events = POLLIN}, {.fd = conn, .events = POLLIN | POLLRDHUP}};
  for (;;) {
    if (poll(pfd, 2, -1) < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (pfd[1].revents) break; /* the peer hung up (or sent something: it has nothing to say) */
    if (!(pfd[0].revents & POLLIN)) continue;
    struct uffd_msg m;
    if (read(uffd, &m, sizeof(m)) != sizeof(m)) continue;
    if (m.event != UFFD_EVENT_PAGEFAULT) continue;
    uint64_t addr = m.arg.pagefault.address;
    struct region *r = NULL;
    for (int i = 0; i < nreg; i++)
      if (addr >= regions[i].base && addr < regions[i].base + regions[i].size) r = &regions[i];
    if (!r) {
      fprintf(stderr, "uffd-c-handler: fault outside regions\n");
      return 1;
    }
    uint64_t unit = copy_bytes > r->page ? copy_bytes : r->page;
    uint64_t start = r->base + ((addr - r->base) / unit) * unit;
    uint64_t len = unit;
    if (start + len > r->base + r->size) len = r->base + r->size - start;
    struct uffdio_copy cp = {.dst = start, .src = (uint64_t)(uintptr_t)(src + r->offset + (start - r->base)), .len = len};
    if (ioctl(uffd, UFFDIO_COPY, &cp) < 0 && errno != EEXIST) {
      /* a racing thread filled part of the block: fall back to the faulting page */
      uint64_t page = r->base + ((addr - r->base) / r->page) * r->page;
      struct uffdio_copy one = {.dst = page, .src = (uint64_t)(uintptr_t)(src + r->offset + (page - r->base)), .len = r->page};
      if (ioctl(uffd, UFFDIO_COPY, &one) < 0 && errno != EEXIST) die("UFFDIO_COPY");
      cp.copy = (int64_t)r->page;
    }
    faults++;
    if (cp.copy > 0) bytes += (uint64_t)cp.copy;
  }
  printf("served %" PRIu64 " %" PRIu64 "\n", faults, bytes);
  return 0;
}
