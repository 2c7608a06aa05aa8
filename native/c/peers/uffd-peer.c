/*
 * Test peer playing Firecracker's side of the UFFD handshake (DESIGN.md §4): maps guest memory
 * (anonymous, memfd, optionally hugetlb), registers it with its own userfaultfd, connects to the
 * handler's socket and sends the JSON regions with the uffd (and memfd) as SCM_RIGHTS. Then it
 * acts as the guest, driven by line commands on stdin; offsets are memory-file offsets.
 *
 *   check <file> <off> <len>               compare guest memory with a file  -> ok | mismatch <off>
 *   checkrand <file> <seed> <count> <len>  same at random offsets
 *   write <off> <len> <seed>               write a pattern                   -> ok
 *   fill <off> <len> <byte>                write one byte value              -> ok
 *   drop <off> <len>                       give pages back (MADV_DONTNEED, MADV_REMOVE on memfd)
 *   hash <off> <len>                       FNV-1a 64 of guest memory          -> <hex>
 *   dump <file>                            write all guest memory (a Full snapshot's memory file)
 *   touch <threads>                        read one byte per 4 KiB, memory split across threads -> ns <n>
 *   touchw <threads>                       the same, writing one byte per 4 KiB                 -> ns <n>
 *   exit
 *
 * usage: uffd-peer --socket <path> --size <bytes> [--page-size <bytes>] [--memfd] [--hugetlb]
 *        [--regions <n>] [--tracking wp-async|wp-sync|none] [--key page_size|page_size_kib]
 *        [--declare <n>]   describe only the first n regions (a peer that faults outside them)
 *        [--events-remove] negotiate UFFD_FEATURE_EVENT_REMOVE (as Firecracker does with a balloon)
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 4
#endif

struct region {
  uint8_t *base;
  uint64_t size, offset;
};

static struct region regions[64];
static int nregions = 1;
static uint64_t total;

static void die(const char *what) {
  fprintf(stderr, "uffd-peer: %s: %s\n", what, strerror(errno));
  exit(2);
}

static uint8_t *addr_of(uint64_t off) {
  for (int i = 0; i < nregions; i++)
    if (off >= regions[i].offset && off < regions[i].offset + regions[i].size)
      return regions[i].base + (off - regions[i].offset);
  return NULL;
}

/* Copies guest bytes [off, off+len) (which may span regions) into dst, or src into the guest. */
static void guest_io(uint64_t off, uint8_t *buf, uint64_t len, int write) {
  while (len > 0) {
    int i;
    for (i = 0; i < nregions; i++)
      if (off >= regions[i].offset && off < regions[i].offset + regions[i].size) break;
    if (i == nregions) {
      fprintf(stderr, "uffd-peer: offset %" PRIu64 " outside memory\n", off);
      exit(2);
    }
    uint64_t n = regions[i].offset + regions[i].size - off;
    if (n > len) n = len;
    uint8_t *g = regions[i].base + (off - regions[i].offset);
    if (write)
      memcpy(g, buf, n);
    else
      memcpy(buf, g, n);
    off += n;
    buf += n;
    len -= n;
  }
}

static uint64_t xorshift(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

static int check_range(int fd, uint64_t off, uint64_t len, uint8_t *a, uint8_t *b) {
  guest_io(off, a, len, 0);
  ssize_t n = pread(fd, b, len, (off_t)off);
  if (n != (ssize_t)len) die("pread memfile");
  for (uint64_t i = 0; i < len; i++)
    if (a[i] != b[i]) {
      printf("mismatch %" PRIu64 "\n", off + i);
      return 0;
    }
  return 1;
}

struct touch_arg {
  uint64_t from, to;
  int write;
  volatile uint64_t sum;
};

static void *touch_thread(void *p) {
  struct touch_arg *t = p;
  uint64_t sum = 0;
  for (uint64_t off = t->from; off < t->to; off += 4096) {
    volatile uint8_t *p = addr_of(off);
    if (t->write)
      *p = (uint8_t)(*p + 1);
    else
      sum += *p;
  }
  t->sum = sum;
  return NULL;
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv) {
  const char *sock_path = NULL, *tracking = "none", *key = "page_size";
  uint64_t page_size = 4096;
  int use_memfd = 0, hugetlb = 0, declare = -1, events_remove = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : "";
    if (!strcmp(a, "--socket")) sock_path = v, i++;
    else if (!strcmp(a, "--size")) total = strtoull(v, NULL, 0), i++;
    else if (!strcmp(a, "--page-size")) page_size = strtoull(v, NULL, 0), i++;
    else if (!strcmp(a, "--regions")) nregions = atoi(v), i++;
    else if (!strcmp(a, "--tracking")) tracking = v, i++;
    else if (!strcmp(a, "--key")) key = v, i++;
    else if (!strcmp(a, "--declare")) declare = atoi(v), i++;
    else if (!strcmp(a, "--memfd")) use_memfd = 1;
    else if (!strcmp(a, "--hugetlb")) hugetlb = 1;
    else if (!strcmp(a, "--events-remove")) events_remove = 1;
    else {
      fprintf(stderr, "uffd-peer: unknown argument %s\n", a);
      return 2;
    }
  }
  if (!sock_path || total == 0 || nregions < 1 || nregions > 64 || total % ((uint64_t)nregions * page_size)) {
    fprintf(stderr, "uffd-peer: need --socket and --size (a multiple of regions * page size)\n");
    return 2;
  }

  int memfd = -1;
  if (use_memfd) {
    memfd = (int)syscall(SYS_memfd_create, "guest-memory", MFD_CLOEXEC | (hugetlb ? MFD_HUGETLB : 0));
    if (memfd < 0) die("memfd_create");
    if (ftruncate(memfd, (off_t)total) < 0) die("ftruncate memfd");
  }
  uint64_t per = total / (uint64_t)nregions;
  for (int i = 0; i < nregions; i++) {
    /* Each region on its own mapping, aligned to the page size (as hugetlbfs would be). */
    uint64_t reserve = per + page_size;
    uint8_t *r = mmap(NULL, reserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) die("mmap reserve");
    uint8_t *aligned = (uint8_t *)(((uintptr_t)r + page_size - 1) & ~(uintptr_t)(page_size - 1));
    int flags = MAP_FIXED | MAP_NORESERVE;
    void *m;
    if (use_memfd)
      m = mmap(aligned, per, PROT_READ | PROT_WRITE, flags | MAP_SHARED, memfd, (off_t)(per * (uint64_t)i));
    else
      m = mmap(aligned, per, PROT_READ | PROT_WRITE, flags | MAP_PRIVATE | MAP_ANONYMOUS | (hugetlb ? MAP_HUGETLB : 0),
               -1, 0);
    if (m == MAP_FAILED) die("mmap guest memory");
    regions[i] = (struct region){aligned, per, per * (uint64_t)i};
  }

  int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (uffd < 0) die("userfaultfd");
  uint64_t features = 0, mode = UFFDIO_REGISTER_MODE_MISSING;
  if (use_memfd) features |= UFFD_FEATURE_MISSING_SHMEM;
  if (hugetlb) features |= UFFD_FEATURE_MISSING_HUGETLBFS;
  if (events_remove) features |= UFFD_FEATURE_EVENT_REMOVE;
  if (!strcmp(tracking, "wp-async") || !strcmp(tracking, "wp-sync")) {
    features |= UFFD_FEATURE_PAGEFAULT_FLAG_WP;
    if (use_memfd || hugetlb) features |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    if (!strcmp(tracking, "wp-async")) features |= UFFD_FEATURE_WP_ASYNC;
    mode |= UFFDIO_REGISTER_MODE_WP;
  }
  struct uffdio_api api = {.api = UFFD_API, .features = features};
  if (ioctl(uffd, UFFDIO_API, &api) < 0) die("UFFDIO_API");
  for (int i = 0; i < nregions; i++) {
    struct uffdio_register reg = {.range = {.start = (uint64_t)(uintptr_t)regions[i].base, .len = per}, .mode = mode};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) die("UFFDIO_REGISTER");
  }

  char json[64 * 160];
  size_t jl = 0;
  jl += (size_t)snprintf(json + jl, sizeof(json) - jl, "[");
  int described = declare >= 0 && declare < nregions ? declare : nregions;
  for (int i = 0; i < described; i++)
    jl += (size_t)snprintf(json + jl, sizeof(json) - jl,
                           "%s{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64 ",\"offset\":%" PRIu64
                           ",\"%s\":%" PRIu64 "}",
                           i ? "," : "", (uint64_t)(uintptr_t)regions[i].base, per, regions[i].offset, key, page_size);
  jl += (size_t)snprintf(json + jl, sizeof(json) - jl, "]");

  int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sun = {.sun_family = AF_UNIX};
  strncpy(sun.sun_path, sock_path, sizeof(sun.sun_path) - 1);
  if (connect(sock, (struct sockaddr *)&sun, sizeof(sun)) < 0) die("connect");
  int fds[2] = {uffd, memfd};
  int nfds = use_memfd ? 2 : 1;
  char cbuf[CMSG_SPACE(sizeof(fds))];
  memset(cbuf, 0, sizeof(cbuf));
  struct iovec iov = {.iov_base = json, .iov_len = jl};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = CMSG_SPACE(sizeof(int) * nfds)};
  struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
  memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  if (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0) die("sendmsg");

  printf("ready %d\n", getpid());
  fflush(stdout);

  size_t bufsz = 4 << 20;
  uint8_t *a = malloc(bufsz), *b = malloc(bufsz);
  char line[4096];
  while (fgets(line, sizeof(line), stdin)) {
    char cmd[32], arg[4000];
    uint64_t x = 0, y = 0, z = 0;
    arg[0] = 0;
    if (sscanf(line, "%31s", cmd) != 1) continue;
    if (!strcmp(cmd, "exit")) break;
    if (!strcmp(cmd, "check") && sscanf(line, "%*s %3999s %" SCNu64 " %" SCNu64, arg, &x, &y) == 3) {
      int fd = open(arg, O_RDONLY | O_CLOEXEC);
      if (fd < 0) die("open memfile");
      int ok = 1;
      for (uint64_t off = x; off < x + y && ok; off += bufsz) {
        uint64_t n = x + y - off < bufsz ? x + y - off : bufsz;
        ok = check_range(fd, off, n, a, b);
      }
      close(fd);
      if (ok) printf("ok\n");
    } else if (!strcmp(cmd, "checkrand") &&
               sscanf(line, "%*s %3999s %" SCNu64 " %" SCNu64 " %" SCNu64, arg, &x, &y, &z) == 4) {
      int fd = open(arg, O_RDONLY | O_CLOEXEC);
      if (fd < 0) die("open memfile");
      uint64_t seed = x | 1;
      int ok = 1;
      if (z > bufsz || z > total) z = 4096;
      for (uint64_t i = 0; i < y && ok; i++) {
        uint64_t off = xorshift(&seed) % (total - z + 1);
        ok = check_range(fd, off, z, a, b);
      }
      close(fd);
      if (ok) printf("ok\n");
    } else if (!strcmp(cmd, "write") && sscanf(line, "%*s %" SCNu64 " %" SCNu64 " %" SCNu64, &x, &y, &z) == 3) {
      uint64_t seed = z | 1;
      for (uint64_t off = x; off < x + y; off += bufsz) {
        uint64_t n = x + y - off < bufsz ? x + y - off : bufsz;
        for (uint64_t i = 0; i < n; i++) a[i] = (uint8_t)xorshift(&seed);
        guest_io(off, a, n, 1);
      }
      printf("ok\n");
    } else if (!strcmp(cmd, "fill") && sscanf(line, "%*s %" SCNu64 " %" SCNu64 " %" SCNu64, &x, &y, &z) == 3) {
      memset(a, (int)z, bufsz);
      for (uint64_t off = x; off < x + y; off += bufsz) guest_io(off, a, x + y - off < bufsz ? x + y - off : bufsz, 1);
      printf("ok\n");
    } else if (!strcmp(cmd, "drop") && sscanf(line, "%*s %" SCNu64 " %" SCNu64, &x, &y) == 2) {
      uint8_t *g = addr_of(x);
      if (!g || madvise(g, y, use_memfd ? MADV_REMOVE : MADV_DONTNEED) < 0) die("madvise");
      printf("ok\n");
    } else if (!strcmp(cmd, "hash") && sscanf(line, "%*s %" SCNu64 " %" SCNu64, &x, &y) == 2) {
      uint64_t h = 1469598103934665603ULL;
      for (uint64_t off = x; off < x + y; off += bufsz) {
        uint64_t n = x + y - off < bufsz ? x + y - off : bufsz;
        guest_io(off, a, n, 0);
        for (uint64_t i = 0; i < n; i++) h = (h ^ a[i]) * 1099511628211ULL;
      }
      printf("%016" PRIx64 "\n", h);
    } else if (!strcmp(cmd, "dump") && sscanf(line, "%*s %3999s", arg) == 1) {
      int fd = open(arg, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (fd < 0) die("open dump");
      for (uint64_t off = 0; off < total; off += bufsz) {
        uint64_t n = total - off < bufsz ? total - off : bufsz;
        guest_io(off, a, n, 0);
        if (pwrite(fd, a, n, (off_t)off) != (ssize_t)n) die("pwrite dump");
      }
      close(fd);
      printf("ok\n");
    } else if ((!strcmp(cmd, "touch") || !strcmp(cmd, "touchw")) && sscanf(line, "%*s %" SCNu64, &x) == 1) {
      int t = (int)(x < 1 ? 1 : x > 16 ? 16 : x);
      pthread_t th[16];
      struct touch_arg ta[16];
      uint64_t slice = (total / (uint64_t)t) & ~4095ULL;
      uint64_t start = now_ns();
      for (int i = 0; i < t; i++) {
        ta[i].from = slice * (uint64_t)i;
        ta[i].to = i == t - 1 ? total : slice * (uint64_t)(i + 1);
        ta[i].write = !strcmp(cmd, "touchw");
        pthread_create(&th[i], NULL, touch_thread, &ta[i]);
      }
      for (int i = 0; i < t; i++) pthread_join(th[i], NULL);
      printf("ns %" PRIu64 "\n", now_ns() - start);
    } else {
      printf("error bad command\n");
    }
    fflush(stdout);
  }
  free(a);
  free(b);
  close(sock);
  return 0;
}
