/*
 * The fault-serving engine of uffd-server: native threads that poll a userfaultfd and answer
 * page faults with UFFDIO_COPY straight from a mapped "source view" (the memory file laid out
 * at file offsets: mmapped layer files, a chunk-cache file, or an anonymous buffer JS fills).
 * It runs at C speed off the Node event loop; JS only hears about what needs it (a source range
 * that is not fetched yet, a failure, the peer going away) through an eventfd and an event queue.
 *
 * Bookkeeping is per 4 KiB unit of the memory file ("unit"), whatever the page size:
 *   present[u]: 0 = not installed by us, 1 = installed for a fault, 2 = installed by prefetch,
 *               3 = zero page installed after sourcing stopped (not present before the pause)
 *   dirty[u]:   bit 0 = the guest wrote it (synchronous write-protect faults), bit 1 = the peer
 *               dropped it (UFFD_EVENT_REMOVE/UNMAP, e.g. a balloon): it reads as zeros from now on
 *               and differs from the source, so it belongs in the diff whatever the tracking mode
 *   ready[u]:   1 = source bytes are in the view (NULL when the whole view is ready)
 *
 * Recorded prefetch (issue 15): while `recording`, the first fault on each record block (the
 * build's memory block) is appended to `rec_order`, in fault order; pages the prefetch pass
 * installs are appended too, so the set a resumed sandbox records carries the one it was
 * prefetched from (the guest's reads of prefetched pages are invisible to us). The prefetch pass
 * is one more thread: it copies a recorded set's blocks in order while the serving threads
 * answer faults; it runs at a lower priority and takes no lock a fault needs for long, so faults
 * always win (a page a fault installed first is EEXIST/present and skipped).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#include "sbx_native.h"

#define UNIT 4096ULL
#define MAX_REGIONS 64
#define MAX_THREADS 16
#define HIST_BUCKETS 14
#define UFFD_MSG_BATCH 64

enum { EV_NONE = 0, EV_FETCH = 1, EV_FAILED = 2, EV_PEER_GONE = 3 };
enum {
  ERR_OUTSIDE = 1,
  ERR_COPY = 2,
  ERR_READ = 3,
  ERR_EVENT = 4,
  ERR_POLL = 5,
  ERR_FETCH = 6,
  ERR_WRITEPROTECT = 7,
};
enum { PEER_NONE = 0, PEER_PIDFD = 1, PEER_SOCKET = 2 };

/* Stats slots, read by JS with sbx_serve_stats(). */
enum {
  ST_FAULTS,
  ST_WP_FAULTS,
  ST_BYTES,
  ST_PREFETCH_UNITS,
  ST_EEXIST,
  ST_ZERO_UNITS,
  ST_FETCH_REQUESTS,
  ST_FETCH_WAITS,
  ST_PRESENT_UNITS,
  ST_RECORD_FAULTS,  /* faults served while recording (the start's faults, recorded prefetch or not) */
  ST_PASS_UNITS,     /* 4 KiB units the prefetch pass installed */
  ST_PASS_PRESENT,   /* pass entries already present when it came (a fault or a window was first) */
  ST_PASS_DONE,      /* entries the pass has dealt with */
  ST_COUNT
};
static const uint64_t hist_bounds_us[HIST_BUCKETS] = {5,    10,    25,    50,     100,    250,    500,
                                                      1000, 2500, 10000, 50000, 250000, 1000000, UINT64_MAX};

struct region {
  uint64_t base, size, offset, page_size;
};

struct pending {
  uint64_t addr, flags, since_ns;
};

struct event {
  int64_t type, a, b, c;
};

struct serve {
  int uffd, stop_fd, wake_fd, notify_fd, peer_fd, peer_kind;
  struct region regions[MAX_REGIONS];
  int nregions;
  uint8_t *src;
  uint64_t src_size, units;
  uint8_t *present, *dirty, *ready;
  uint64_t prefetch_bytes;
  /* Sequential streams: a fault in the window right after a stream's last one copies up to
   * `readahead` further windows once the guest is awake (readahead, like the page cache's). */
  uint64_t readahead;
  struct {
    uint64_t next; /* memory-file offset where the stream's next window starts */
    uint64_t len;  /* windows in a row so far */
  } streams[4];
  unsigned stream_rr;
  uint64_t copy_mode; /* UFFDIO_COPY_MODE_WP when write tracking wants pages installed protected */
  int sync_wp;        /* answer write-protect faults (synchronous dirty tracking) */
  uint8_t *zero;      /* a read-only zero buffer as large as the biggest page */
  uint64_t zero_len;
  atomic_int sourcing, running, failed;
  _Atomic uint64_t stats[ST_COUNT];
  _Atomic uint64_t hist[HIST_BUCKETS];
  pthread_mutex_t lock; /* pending and events */
  struct pending *pend;
  size_t npend, cappend;
  struct event *events;
  size_t nevents, capevents, headevent;
  pthread_t threads[MAX_THREADS];
  int nthreads;
  /* Recording (see the top). rec_block: bytes per record block; 0 = not recording. */
  atomic_int recording;
  uint64_t rec_block, rec_blocks, rec_count;
  uint8_t *rec_seen;
  uint32_t *rec_order;
  /* The prefetch pass: its blocks (copied), its thread, and a condition it waits on for fetches. */
  uint32_t *pf_blocks;
  uint64_t pf_count, pf_block;
  pthread_t pf_thread;
  int pf_started;
  pthread_mutex_t pf_run; /* held while the pass copies: stop_sourcing waits for the copy in flight */
  pthread_cond_t pf_cond; /* signalled by mark_ready, stop_sourcing and stop (under lock) */
  /* Served by a shared pool worker instead of threads of its own (see "Shared pool" below). */
  int pooled;
  struct pool_worker *owner;
  struct serve_tag {
    struct serve *s;
    int kind;
  } tags[4];
  int pool_ended;            /* the owner took its fds out of its epoll set (owner thread only) */
  int attached;              /* under owner->m: the owner may still touch it; cleared only between batches */
  int detach_asked;          /* under owner->m */
  struct serve *detach_next; /* under owner->m: the owner's queue of detach requests */
};

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void record_latency(struct serve *s, uint64_t since_ns) {
  uint64_t us = (now_ns() - since_ns) / 1000;
  for (int i = 0; i < HIST_BUCKETS; i++) {
    if (us <= hist_bounds_us[i]) {
      atomic_fetch_add_explicit(&s->hist[i], 1, memory_order_relaxed);
      return;
    }
  }
}

static void stat_add(struct serve *s, int slot, uint64_t v) {
  atomic_fetch_add_explicit(&s->stats[slot], v, memory_order_relaxed);
}

static void notify(struct serve *s) {
  uint64_t one = 1;
  ssize_t r = write(s->notify_fd, &one, sizeof(one));
  (void)r;
}

/* Caller holds s->lock. */
static void push_event_locked(struct serve *s, int64_t type, int64_t a, int64_t b, int64_t c) {
  if (s->nevents == s->capevents) {
    size_t cap = s->capevents ? s->capevents * 2 : 64;
    struct event *n = malloc(cap * sizeof(*n));
    if (!n) return;
    for (size_t i = 0; i < s->nevents; i++) n[i] = s->events[(s->headevent + i) % s->capevents];
    free(s->events);
    s->events = n;
    s->capevents = cap;
    s->headevent = 0;
  }
  s->events[(s->headevent + s->nevents) % s->capevents] = (struct event){type, a, b, c};
  s->nevents++;
}

static void push_event(struct serve *s, int64_t type, int64_t a, int64_t b, int64_t c) {
  pthread_mutex_lock(&s->lock);
  push_event_locked(s, type, a, b, c);
  pthread_mutex_unlock(&s->lock);
  notify(s);
}

static void fail(struct serve *s, int code, uint64_t addr, int err) {
  int expected = 0;
  if (atomic_compare_exchange_strong(&s->failed, &expected, code)) push_event(s, EV_FAILED, code, (int64_t)addr, err);
  atomic_store(&s->running, 0);
}

static void peer_gone(struct serve *s) {
  int expected = 1;
  if (atomic_compare_exchange_strong(&s->running, &expected, 0)) push_event(s, EV_PEER_GONE, 0, 0, 0);
}

static struct region *find_region(struct serve *s, uint64_t addr) {
  for (int i = 0; i < s->nregions; i++) {
    struct region *r = &s->regions[i];
    if (addr >= r->base && addr - r->base < r->size) return r;
  }
  return NULL;
}

static int is_ready(struct serve *s, uint64_t off, uint64_t len) {
  if (!s->ready) return 1;
  for (uint64_t u = off / UNIT; u < (off + len) / UNIT; u++)
    if (!s->ready[u]) return 0;
  return 1;
}

static void mark(uint8_t *map, uint64_t off, uint64_t len, uint8_t v) {
  memset(map + off / UNIT, v, len / UNIT);
}

/*
 * Copies [addr, addr+len) from the view, which must all be absent and ready. Returns 0, or
 * -errno for a failure that ends serving. EEXIST pages (filled by a racing fault) are skipped.
 */
static int copy_run_counted(struct serve *s, struct region *r, uint64_t addr, uint64_t len, uint8_t how,
                            uint64_t *installed) {
  while (len > 0) {
    uint64_t off = r->offset + (addr - r->base);
    int64_t n;
    struct uffdio_copy c = {.dst = addr, .src = (uint64_t)(uintptr_t)(s->src + off), .len = len, .mode = s->copy_mode};
    if (ioctl(s->uffd, UFFDIO_COPY, &c) == 0) {
      n = c.copy;
    } else if (c.copy > 0) {
      n = c.copy;
    } else {
      int e = errno;
      if (e == EEXIST || -c.copy == EEXIST) {
        stat_add(s, ST_EEXIST, 1);
        mark(s->present, off, r->page_size, s->present[off / UNIT] ? s->present[off / UNIT] : how);
        addr += r->page_size;
        len -= r->page_size;
        continue;
      }
      if (e == EINTR) continue;
      /* EAGAIN: the peer's mm is changing (a UFFD_EVENT_REMOVE waits to be read, mremap, fork).
       * Not retried here: the event may be read only by this very thread. The caller parks a
       * fault and retries it after the next read of the uffd; prefetch gives up. */
      return -e;
    }
    mark(s->present, off, (uint64_t)n, how);
    if (installed) *installed += (uint64_t)n;
    stat_add(s, ST_BYTES, (uint64_t)n);
    if (how == 2) stat_add(s, ST_PREFETCH_UNITS, (uint64_t)n / UNIT);
    stat_add(s, ST_PRESENT_UNITS, (uint64_t)n / UNIT);
    addr += (uint64_t)n;
    len -= (uint64_t)n;
  }
  return 0;
}

static int copy_run(struct serve *s, struct region *r, uint64_t addr, uint64_t len, uint8_t how) {
  return copy_run_counted(s, r, addr, len, how, NULL);
}

/* Zero page for a fault after sourcing stopped: the page was not present before the pause. */
static int serve_zero(struct serve *s, struct region *r, uint64_t page) {
  uint64_t off = r->offset + (page - r->base);
  for (;;) {
    int rc;
    if (s->copy_mode) {
      struct uffdio_copy c = {.dst = page, .src = (uint64_t)(uintptr_t)s->zero, .len = r->page_size, .mode = s->copy_mode};
      rc = ioctl(s->uffd, UFFDIO_COPY, &c);
    } else {
      struct uffdio_zeropage z = {.range = {.start = page, .len = r->page_size}, .mode = 0};
      rc = ioctl(s->uffd, UFFDIO_ZEROPAGE, &z);
      /* hugetlbfs has no ZEROPAGE: fall back to copying zeros. */
      if (rc < 0 && errno == EINVAL) {
        struct uffdio_copy c = {.dst = page, .src = (uint64_t)(uintptr_t)s->zero, .len = r->page_size, .mode = 0};
        rc = ioctl(s->uffd, UFFDIO_COPY, &c);
      }
    }
    if (rc == 0 || errno == EEXIST) break;
    if (errno == EINTR) continue;
    return -errno; /* EAGAIN too: parked by handle_fault, like a copy */
  }
  if (!s->present[off / UNIT]) mark(s->present, off, r->page_size, 3);
  stat_add(s, ST_ZERO_UNITS, r->page_size / UNIT);
  return 0;
}

/*
 * Serves the faulted page and prefetches the rest of its aligned window: the faulted page and
 * the absent, ready pages after it go in one UFFDIO_COPY (one wake-up for the guest), then the
 * absent pages of the window before it.
 */
static int serve_page(struct serve *s, struct region *r, uint64_t page) {
  uint64_t win = s->prefetch_bytes > r->page_size ? s->prefetch_bytes : r->page_size;
  uint64_t rel = page - r->base;
  uint64_t wstart = r->base + (rel / win) * win;
  uint64_t wend = wstart + win;
  if (wend > r->base + r->size) wend = r->base + r->size;

  uint64_t end = page + r->page_size;
  while (end < wend) {
    uint64_t off = r->offset + (end - r->base);
    /* A page the peer dropped reads as zeros (its own fault serves them), never the source. */
    if (s->present[off / UNIT] || (s->dirty[off / UNIT] & 2) || !is_ready(s, off, r->page_size)) break;
    end += r->page_size;
  }
  /*
   * One ioctl for the faulted page and the window after it: the guest wakes once, when all of
   * it is in (copying the faulted page alone first would wake it only to fault on the next page
   * while the rest is still being copied). The faulted page is copied even when our map says
   * present (the peer may have dropped it).
   */
  int rc = copy_run(s, r, page, end - page, 2);
  if (rc < 0) return rc;
  uint64_t off = r->offset + (page - r->base);
  if (s->present[off / UNIT] == 2) {
    mark(s->present, off, r->page_size, 1);
    atomic_fetch_sub_explicit(&s->stats[ST_PREFETCH_UNITS], r->page_size / UNIT, memory_order_relaxed);
  }
  uint64_t p = wstart;
  while (p < page) {
    uint64_t off = r->offset + (p - r->base);
    if (s->present[off / UNIT] || (s->dirty[off / UNIT] & 2) || !is_ready(s, off, r->page_size)) {
      p += r->page_size;
      continue;
    }
    uint64_t q = p + r->page_size;
    while (q < page) {
      uint64_t qoff = r->offset + (q - r->base);
      if (s->present[qoff / UNIT] || (s->dirty[qoff / UNIT] & 2) || !is_ready(s, qoff, r->page_size)) break;
      q += r->page_size;
    }
    rc = copy_run(s, r, p, q - p, 2);
    if (rc == -EAGAIN) return 0; /* the faulted page is in; the rest of the window is only prefetch */
    if (rc < 0) return rc;
    p = q;
  }
  return 0;
}

/*
 * After a fault was served: when its window continues a sequential stream, copy the next windows
 * too (the guest already runs again, so this overlaps with its work), as many as the stream is
 * long, up to `readahead`. Only absent, ready pages are copied; it stops at the region's end.
 */
static int read_ahead(struct serve *s, struct region *r, uint64_t page) {
  if (!s->readahead || !s->prefetch_bytes) return 0;
  uint64_t win = s->prefetch_bytes > r->page_size ? s->prefetch_bytes : r->page_size;
  uint64_t wstart = r->base + ((page - r->base) / win) * win;
  uint64_t wstart_off = r->offset + (wstart - r->base);
  uint64_t next_off = wstart_off + win;
  uint64_t ahead = 0;
  pthread_mutex_lock(&s->lock);
  int i;
  for (i = 0; i < 4; i++)
    if (s->streams[i].len && s->streams[i].next == wstart_off) break;
  if (i == 4) {
    i = (int)(s->stream_rr++ % 4);
    s->streams[i].len = 1;
    s->streams[i].next = next_off;
  } else {
    ahead = s->streams[i].len < s->readahead ? s->streams[i].len : s->readahead;
    s->streams[i].len++;
    s->streams[i].next = next_off + ahead * win;
  }
  pthread_mutex_unlock(&s->lock);
  for (uint64_t k = 0; k < ahead; k++) {
    uint64_t a = wstart + (k + 1) * win;
    if (a >= r->base + r->size) break;
    uint64_t end = a + win < r->base + r->size ? a + win : r->base + r->size;
    while (a < end) {
      uint64_t off = r->offset + (a - r->base);
      if (s->present[off / UNIT] || (s->dirty[off / UNIT] & 2) || !is_ready(s, off, r->page_size)) {
        a += r->page_size;
        continue;
      }
      uint64_t q = a + r->page_size;
      while (q < end) {
        uint64_t qoff = r->offset + (q - r->base);
        if (s->present[qoff / UNIT] || (s->dirty[qoff / UNIT] & 2) || !is_ready(s, qoff, r->page_size)) break;
        q += r->page_size;
      }
      int rc = copy_run(s, r, a, q - a, 2);
      if (rc == -EAGAIN) return 0;
      if (rc < 0) return rc;
      a = q;
    }
  }
  return 0;
}

static int errno_means_peer_gone(int e) { return e == ESRCH || e == ENOENT; }

/* Appends the record block holding memory-file offset `off` unless recorded before. */
static void record_block(struct serve *s, uint64_t off) {
  uint64_t b = off / s->rec_block;
  if (b >= s->rec_blocks) return;
  pthread_mutex_lock(&s->lock);
  if (atomic_load(&s->recording) && !s->rec_seen[b]) {
    s->rec_seen[b] = 1;
    s->rec_order[s->rec_count++] = (uint32_t)b;
  }
  pthread_mutex_unlock(&s->lock);
}

static struct region *region_of_offset(struct serve *s, uint64_t off) {
  for (int i = 0; i < s->nregions; i++) {
    struct region *r = &s->regions[i];
    if (off >= r->offset && off - r->offset < r->size) return r;
  }
  return NULL;
}

/* Asks JS for the source window holding `off` (the same window a fault there would ask for). */
static void request_fetch(struct serve *s, struct region *r, uint64_t off) {
  uint64_t win = s->prefetch_bytes > r->page_size ? s->prefetch_bytes : r->page_size;
  uint64_t rel = off - r->offset;
  uint64_t wstart = (rel / win) * win;
  uint64_t wend = wstart + win > r->size ? r->size : wstart + win;
  pthread_mutex_lock(&s->lock);
  push_event_locked(s, EV_FETCH, (int64_t)(r->offset + wstart), (int64_t)(wend - wstart), (int64_t)off);
  pthread_mutex_unlock(&s->lock);
  stat_add(s, ST_FETCH_REQUESTS, 1);
  notify(s);
}

/* Bytes per UFFDIO_COPY of the pass: short runs, so a fault's copy and the VMM's own mm work
 * interleave with the pass (measured: fewer faults at the second start than with 2 MiB runs). */
#define PASS_RUN_MAX (256 * 1024ULL)
#define PASS_NICE 2
#define PASS_FETCH_AHEAD 8           /* source windows asked for ahead of the pass */

/* Copies the absent, ready pages of memory-file range [from, to) in runs of at most PASS_RUN_MAX. */
static int pass_copy(struct serve *s, struct region *r, uint64_t from, uint64_t to, uint64_t *installed) {
  uint64_t p = from;
  while (p < to) {
    if (s->present[p / UNIT] || (s->dirty[p / UNIT] & 2) || !is_ready(s, p, r->page_size)) {
      p += r->page_size;
      continue;
    }
    uint64_t q = p + r->page_size;
    while (q < to && q - p < PASS_RUN_MAX && !s->present[q / UNIT] && !(s->dirty[q / UNIT] & 2) &&
           is_ready(s, q, r->page_size))
      q += r->page_size;
    int rc = copy_run_counted(s, r, r->base + (p - r->offset), q - p, 2, installed);
    if (rc == -EAGAIN) {
      /* The serving threads read the pending event; this pass tries the run again after them. */
      if (!atomic_load(&s->running) || !atomic_load(&s->sourcing)) return 0;
      sched_yield();
      continue;
    }
    if (rc < 0) return rc;
    p = q;
  }
  return 0;
}

/*
 * The prefetch pass: copies the recorded blocks in order. A page already present is skipped (a
 * fault won). A page whose source bytes are not fetched yet asks JS for its window (and for the
 * next few the pass will need) and waits for mark_ready; faults go on meanwhile.
 */
static void *prefetch_thread(void *arg) {
  struct serve *s = arg;
  /* Slightly below the serving threads: on a loaded node a fault's thread gets the CPU first,
   * but the pass is not starved (at nice 10 it fell behind the guest it should run ahead of). */
  setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), PASS_NICE);
  uint64_t asked_until = 0; /* entries [i, asked_until) had their fetch asked for */
  /*
   * Two sweeps, surest first: the recorded blocks themselves (the guest faulted each of them),
   * then the rest of each block's window (--prefetch-bytes), which the first start's fault path
   * installed around each fault and of which the guest read an unknown part (reads of installed
   * pages are invisible to userfaultfd).
   */
  for (int sweep = 1; sweep <= 2; sweep++) {
    for (uint64_t i = 0; i < s->pf_count; i++) {
      if (!atomic_load(&s->running) || !atomic_load(&s->sourcing)) return NULL;
      uint64_t boff = (uint64_t)s->pf_blocks[i] * s->pf_block;
      struct region *r = region_of_offset(s, boff);
      if (!r) {
        /* not in guest memory (the set was recorded for the same size: a hole between regions) */
        if (sweep == 2) stat_add(s, ST_PASS_DONE, 1);
        continue;
      }
      uint64_t off = r->offset + ((boff - r->offset) / r->page_size) * r->page_size;
      if (sweep == 1 && (s->present[off / UNIT] || (s->dirty[off / UNIT] & 2))) {
        /* A fault, or its window, was first; the set keeps the block. */
        if (atomic_load(&s->recording)) record_block(s, off);
        stat_add(s, ST_PASS_PRESENT, 1);
        continue;
      }
      if (sweep == 1 && !is_ready(s, off, r->page_size)) {
        if (asked_until <= i) {
          uint64_t last_win = UINT64_MAX;
          uint64_t asked = 0;
          for (asked_until = i; asked_until < s->pf_count && asked < PASS_FETCH_AHEAD; asked_until++) {
            uint64_t o = (uint64_t)s->pf_blocks[asked_until] * s->pf_block;
            struct region *q = region_of_offset(s, o);
            if (!q) continue;
            uint64_t po = q->offset + ((o - q->offset) / q->page_size) * q->page_size;
            uint64_t win = s->prefetch_bytes > q->page_size ? s->prefetch_bytes : q->page_size;
            if (po / win == last_win || is_ready(s, po, q->page_size)) continue;
            last_win = po / win;
            request_fetch(s, q, po);
            asked++;
          }
        }
        pthread_mutex_lock(&s->lock);
        while (atomic_load(&s->running) && atomic_load(&s->sourcing) && !is_ready(s, off, r->page_size)) {
          struct timespec until;
          clock_gettime(CLOCK_REALTIME, &until);
          until.tv_nsec += 100 * 1000000L;
          if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
          }
          pthread_cond_timedwait(&s->pf_cond, &s->lock, &until);
        }
        pthread_mutex_unlock(&s->lock);
        i--; /* look at this entry again */
        continue;
      }
      /* Sweep 1: the block's page. Sweep 2: the rest of its window (its fetch was asked for in sweep 1). */
      uint64_t win = s->prefetch_bytes > r->page_size ? s->prefetch_bytes : r->page_size;
      uint64_t wstart = sweep == 1 ? off : r->offset + ((off - r->offset) / win) * win;
      uint64_t wend = sweep == 1 ? off + r->page_size : wstart + win;
      if (wend > r->offset + r->size) wend = r->offset + r->size;
      pthread_mutex_lock(&s->pf_run);
      int rc = 0;
      if (atomic_load(&s->sourcing)) {
        uint64_t installed = 0;
        rc = pass_copy(s, r, off, wend, &installed);
        if (rc == 0) rc = pass_copy(s, r, wstart, off, &installed);
        stat_add(s, ST_PASS_UNITS, installed / UNIT);
        /* A fault installed the page between the check above and the copy (EEXIST, or present by
         * then): as late as one found present, and counted so (each entry is installed or late). */
        if (rc == 0 && sweep == 1 && installed == 0) stat_add(s, ST_PASS_PRESENT, 1);
        if (rc == 0 && sweep == 1 && atomic_load(&s->recording)) record_block(s, off);
      }
      pthread_mutex_unlock(&s->pf_run);
      if (rc < 0) {
        if (errno_means_peer_gone(-rc)) peer_gone(s);
        else fail(s, ERR_COPY, r->base + (off - r->offset), -rc);
        return NULL;
      }
      if (sweep == 2) stat_add(s, ST_PASS_DONE, 1);
    }
  }
  return NULL;
}

/*
 * A fault whose copy met EAGAIN (the peer's mm changing: an event waits to be read): parked,
 * and retried by retry_pending once this thread was woken, after it read the uffd again.
 */
static int park_fault(struct serve *s, uint64_t addr, uint64_t flags, uint64_t since) {
  pthread_mutex_lock(&s->lock);
  if (s->npend == s->cappend) {
    size_t cap = s->cappend ? s->cappend * 2 : 64;
    struct pending *n = realloc(s->pend, cap * sizeof(*n));
    if (!n) {
      pthread_mutex_unlock(&s->lock);
      fail(s, ERR_COPY, addr, ENOMEM);
      return -1;
    }
    s->pend = n;
    s->cappend = cap;
  }
  s->pend[s->npend++] = (struct pending){addr, flags, since};
  pthread_mutex_unlock(&s->lock);
  uint64_t one = 1;
  ssize_t w = write(s->wake_fd, &one, sizeof(one));
  (void)w;
  return 0;
}

/* Returns 0 when handled (or parked until fetched), <0 to stop serving. */
static int handle_fault(struct serve *s, uint64_t addr, uint64_t flags, uint64_t since, int from_pending) {
  struct region *r = find_region(s, addr);
  if (!r) {
    fail(s, ERR_OUTSIDE, addr, 0);
    return -1;
  }
  uint64_t page = r->base + ((addr - r->base) / r->page_size) * r->page_size;
  uint64_t off = r->offset + (page - r->base);
  if (!from_pending) stat_add(s, ST_FAULTS, 1);
  if (!from_pending && !(flags & UFFD_PAGEFAULT_FLAG_WP) && atomic_load(&s->recording) && atomic_load(&s->sourcing)) {
    stat_add(s, ST_RECORD_FAULTS, 1);
    record_block(s, off);
  }

  if (flags & UFFD_PAGEFAULT_FLAG_WP) {
    /* Synchronous write tracking: record the page, lift its protection, wake the writer. */
    for (uint64_t u = off / UNIT; u < (off + r->page_size) / UNIT; u++) s->dirty[u] |= 1;
    if (!from_pending) stat_add(s, ST_WP_FAULTS, 1);
    for (;;) {
      struct uffdio_writeprotect wp = {.range = {.start = page, .len = r->page_size}, .mode = 0};
      if (ioctl(s->uffd, UFFDIO_WRITEPROTECT, &wp) == 0) break;
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return park_fault(s, addr, flags, since);
      if (errno_means_peer_gone(errno)) {
        peer_gone(s);
        return -1;
      }
      fail(s, ERR_WRITEPROTECT, addr, errno);
      return -1;
    }
    record_latency(s, since);
    return 0;
  }

  int rc;
  if (!atomic_load(&s->sourcing)) {
    rc = serve_zero(s, r, page);
  } else if (s->dirty[off / UNIT] & 2) {
    /* Dropped by the peer (balloon): it reads as zeros, like fresh anonymous memory. */
    rc = serve_zero(s, r, page);
    if (rc == 0) mark(s->present, off, r->page_size, 1);
  } else if (!is_ready(s, off, r->page_size)) {
    pthread_mutex_lock(&s->lock);
    if (s->npend == s->cappend) {
      size_t cap = s->cappend ? s->cappend * 2 : 64;
      struct pending *n = realloc(s->pend, cap * sizeof(*n));
      if (!n) {
        pthread_mutex_unlock(&s->lock);
        fail(s, ERR_FETCH, addr, ENOMEM);
        return -1;
      }
      s->pend = n;
      s->cappend = cap;
    }
    s->pend[s->npend++] = (struct pending){addr, flags, since};
    uint64_t win = s->prefetch_bytes > r->page_size ? s->prefetch_bytes : r->page_size;
    uint64_t rel = page - r->base;
    uint64_t wstart = r->base + (rel / win) * win;
    uint64_t wend = wstart + win > r->base + r->size ? r->base + r->size : wstart + win;
    /* Ask for the whole window so prefetch has bytes to work with; JS fetches the faulted page first. */
    push_event_locked(s, EV_FETCH, (int64_t)(r->offset + (wstart - r->base)), (int64_t)(wend - wstart), (int64_t)off);
    pthread_mutex_unlock(&s->lock);
    stat_add(s, ST_FETCH_REQUESTS, 1);
    notify(s);
    return 0;
  } else {
    rc = serve_page(s, r, page);
    if (rc == 0) {
      record_latency(s, since);
      since = 0;
      rc = read_ahead(s, r, page);
    }
    if (from_pending) stat_add(s, ST_FETCH_WAITS, 1);
  }
  if (rc == -EAGAIN) return park_fault(s, addr, flags, since);
  if (rc < 0) {
    if (errno_means_peer_gone(-rc)) {
      peer_gone(s);
      return -1;
    }
    fail(s, ERR_COPY, addr, -rc);
    return -1;
  }
  if (since) record_latency(s, since);
  return 0;
}

/* The peer dropped [start, end) (MADV_DONTNEED/REMOVE, munmap): forget it was present. */
static void drop_range(struct serve *s, uint64_t start, uint64_t end) {
  for (int i = 0; i < s->nregions; i++) {
    struct region *r = &s->regions[i];
    uint64_t from = start > r->base ? start : r->base;
    uint64_t to = end < r->base + r->size ? end : r->base + r->size;
    if (from >= to) continue;
    uint64_t off = r->offset + (from - r->base);
    uint64_t len = to - from;
    for (uint64_t u = off / UNIT; u < (off + len + UNIT - 1) / UNIT; u++) {
      s->present[u] = 0;
      s->dirty[u] |= 2;
    }
  }
}

static int retry_pending(struct serve *s) {
  /* At most the faults parked now: one parked again (EAGAIN) waits for the next wake-up, after
   * this thread read the uffd again, instead of being retried here forever. */
  pthread_mutex_lock(&s->lock);
  size_t budget = s->npend;
  pthread_mutex_unlock(&s->lock);
  while (budget-- > 0) {
    struct pending p;
    int found = 0;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->npend; i++) {
      struct region *r = find_region(s, s->pend[i].addr);
      if (!r) continue;
      uint64_t page = r->base + ((s->pend[i].addr - r->base) / r->page_size) * r->page_size;
      uint64_t off = r->offset + (page - r->base);
      if (!atomic_load(&s->sourcing) || is_ready(s, off, r->page_size)) {
        p = s->pend[i];
        s->pend[i] = s->pend[--s->npend];
        found = 1;
        break;
      }
    }
    pthread_mutex_unlock(&s->lock);
    if (!found) return 0;
    if (handle_fault(s, p.addr, p.flags, p.since_ns, 1) < 0) return -1;
  }
  return 0;
}

/* Reads one batch of messages from the uffd and handles them. Returns 0, or -1 when serving ended. */
static int serve_uffd_batch(struct serve *s) {
  struct uffd_msg msgs[UFFD_MSG_BATCH];
  ssize_t got = read(s->uffd, msgs, sizeof(msgs));
  if (got < 0) {
    if (errno == EAGAIN || errno == EINTR) return 0;
    fail(s, ERR_READ, 0, errno);
    return -1;
  }
  uint64_t since = now_ns();
  size_t count = (size_t)got / sizeof(struct uffd_msg);
  for (size_t i = 0; i < count; i++) {
    if (msgs[i].event == UFFD_EVENT_REMOVE || msgs[i].event == UFFD_EVENT_UNMAP) {
      drop_range(s, msgs[i].arg.remove.start, msgs[i].arg.remove.end);
      continue;
    }
    if (msgs[i].event != UFFD_EVENT_PAGEFAULT) {
      /* Firecracker negotiates no non-fault events; anything else means a peer we do not understand. */
      fail(s, ERR_EVENT, msgs[i].event, 0);
      return -1;
    }
    if (handle_fault(s, msgs[i].arg.pagefault.address, msgs[i].arg.pagefault.flags, since, 0) < 0) return -1;
  }
  return 0;
}

/* The peer fd is readable: for a pidfd the peer exited; for the handshake socket, a hang-up. 1 = gone. */
static int peer_fd_says_gone(struct serve *s, short revents) {
  if (s->peer_kind == PEER_PIDFD) return 1;
  char scratch[256];
  ssize_t got = recv(s->peer_fd, scratch, sizeof(scratch), MSG_DONTWAIT);
  return got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR) || (revents & (POLLHUP | POLLERR));
}

static void *serve_thread(void *arg) {
  struct serve *s = arg;
  struct pollfd pfd[4];
  int n = 0;
  pfd[n++] = (struct pollfd){.fd = s->uffd, .events = POLLIN};
  pfd[n++] = (struct pollfd){.fd = s->stop_fd, .events = POLLIN};
  pfd[n++] = (struct pollfd){.fd = s->wake_fd, .events = POLLIN};
  int peer_idx = -1;
  if (s->peer_kind != PEER_NONE && s->peer_fd >= 0) {
    peer_idx = n;
    pfd[n++] = (struct pollfd){.fd = s->peer_fd, .events = POLLIN | POLLRDHUP};
  }
  while (atomic_load(&s->running)) {
    int pr = poll(pfd, n, -1);
    if (pr < 0) {
      if (errno == EINTR) continue;
      fail(s, ERR_POLL, 0, errno);
      break;
    }
    if (pfd[1].revents) break;
    if (peer_idx >= 0 && pfd[peer_idx].revents && peer_fd_says_gone(s, pfd[peer_idx].revents)) {
      peer_gone(s);
      break;
    }
    if (pfd[2].revents & POLLIN) {
      uint64_t v;
      ssize_t r = read(s->wake_fd, &v, sizeof(v));
      (void)r;
      if (retry_pending(s) < 0) break;
    }
    if (pfd[0].revents & (POLLERR | POLLHUP)) {
      peer_gone(s);
      break;
    }
    if (!(pfd[0].revents & POLLIN)) continue;
    if (serve_uffd_batch(s) < 0) break;
  }
  /* Wake every sibling so they see running == 0. */
  uint64_t one = 1;
  ssize_t r = write(s->stop_fd, &one, sizeof(one));
  (void)r;
  return NULL;
}

/*
 * Shared pool: instead of threads of its own, a sandbox can be served by one worker of a pool
 * shared by every sandbox of the process (sbx_serve_start_pooled). Each worker owns the sandboxes
 * assigned to it (the one with the fewest) and waits on one epoll set for their uffd, stop, wake
 * and peer fds; only the owner ever handles a sandbox's events, so a sandbox's faults are served
 * by one thread, as with --threads-per-sandbox 1. A stop asks the owner to let go and waits: the
 * owner takes the sandbox out of its set and answers only between two batches of events, so no
 * event of a batch can reach a sandbox freed meanwhile.
 */
#define POOL_MAX 16
#define POOL_BATCH 64
enum { TAG_UFFD, TAG_STOP, TAG_WAKE, TAG_PEER };

struct pool_worker {
  pthread_t thread;
  int epfd, ctl_fd;
  pthread_mutex_t m;
  pthread_cond_t c; /* a detach was answered */
  struct serve *detach_head;
  int members;
};
static struct pool_worker pool[POOL_MAX];
static int pool_size;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

/* Owner thread: the sandbox's fds leave the epoll set (its serving ended or it is let go). */
static void pool_forget_fds(struct pool_worker *w, struct serve *s) {
  if (s->pool_ended) return;
  s->pool_ended = 1;
  epoll_ctl(w->epfd, EPOLL_CTL_DEL, s->uffd, NULL);
  epoll_ctl(w->epfd, EPOLL_CTL_DEL, s->stop_fd, NULL);
  epoll_ctl(w->epfd, EPOLL_CTL_DEL, s->wake_fd, NULL);
  if (s->peer_kind != PEER_NONE && s->peer_fd >= 0) epoll_ctl(w->epfd, EPOLL_CTL_DEL, s->peer_fd, NULL);
}

/* Owner thread: one event of one of its sandboxes. Returns -1 when serving that sandbox ended. */
static int pool_serve_event(struct serve *s, int kind, uint32_t events) {
  if (!atomic_load(&s->running) || kind == TAG_STOP) return -1;
  if (kind == TAG_PEER) {
    if (!peer_fd_says_gone(s, (short)events)) return 0;
    peer_gone(s);
    return -1;
  }
  if (kind == TAG_WAKE) {
    uint64_t v;
    ssize_t r = read(s->wake_fd, &v, sizeof(v));
    (void)r;
    return retry_pending(s);
  }
  if (events & (EPOLLERR | EPOLLHUP)) {
    peer_gone(s);
    return -1;
  }
  return serve_uffd_batch(s);
}

static void *pool_main(void *arg) {
  struct pool_worker *w = arg;
  struct epoll_event evs[POOL_BATCH];
  for (;;) {
    /* Between batches: answer the stops waiting (nothing of the last batch is still in hand). */
    pthread_mutex_lock(&w->m);
    while (w->detach_head) {
      struct serve *s = w->detach_head;
      w->detach_head = s->detach_next;
      pool_forget_fds(w, s);
      s->attached = 0;
      w->members--;
    }
    pthread_cond_broadcast(&w->c);
    pthread_mutex_unlock(&w->m);
    int n = epoll_wait(w->epfd, evs, POOL_BATCH, -1);
    for (int i = 0; i < n; i++) {
      struct serve_tag *t = evs[i].data.ptr;
      if (!t) {
        uint64_t v;
        ssize_t r = read(w->ctl_fd, &v, sizeof(v));
        (void)r;
        continue;
      }
      struct serve *s = t->s;
      if (s->pool_ended) continue;
      if (pool_serve_event(s, t->kind, evs[i].events) < 0) {
        /* Like a sandbox's own thread exiting: its fds go quiet here; JS hears why through events. */
        atomic_store(&s->running, 0);
        pool_forget_fds(w, s);
      }
    }
  }
  return NULL;
}

/* Starts the pool's workers once (the first call's size counts). Caller holds pool_lock. */
static int pool_start_locked(int size) {
  if (pool_size > 0) return 0;
  for (int i = 0; i < size; i++) {
    struct pool_worker *w = &pool[i];
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    w->ctl_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (w->epfd < 0 || w->ctl_fd < 0) return -errno;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->ctl_fd, &ev) < 0) return -errno;
    pthread_mutex_init(&w->m, NULL);
    pthread_cond_init(&w->c, NULL);
    int r = pthread_create(&w->thread, NULL, pool_main, w);
    if (r != 0) return -r;
    pthread_detach(w->thread);
    pool_size = i + 1;
  }
  return 0;
}

/* Starts the shared pool's `size` workers now (a service does so at start), once per process. */
int64_t sbx_serve_pool_start(int size) {
  if (size < 1 || size > POOL_MAX) return -EINVAL;
  pthread_mutex_lock(&pool_lock);
  int r = pool_start_locked(size);
  int started = pool_size;
  pthread_mutex_unlock(&pool_lock);
  return started > 0 ? started : r;
}

/*
 * Serves the sandbox on the shared pool (`size` workers, started on first use) instead of
 * threads of its own. Instead of sbx_serve_start; stopped by sbx_serve_stop as well.
 */
int64_t sbx_serve_start_pooled(int64_t h, int size) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  if (size < 1 || size > POOL_MAX) return -EINVAL;
  if (s->pooled || s->nthreads) return -EALREADY;
  pthread_mutex_lock(&pool_lock);
  int r = pool_start_locked(size);
  if (r < 0 && pool_size == 0) {
    pthread_mutex_unlock(&pool_lock);
    return r;
  }
  struct pool_worker *w = &pool[0];
  for (int i = 1; i < pool_size; i++)
    if (pool[i].members < w->members) w = &pool[i];
  pthread_mutex_lock(&w->m);
  w->members++;
  pthread_mutex_unlock(&w->m);
  pthread_mutex_unlock(&pool_lock);

  s->pooled = 1;
  s->owner = w;
  atomic_store(&s->running, 1);
  int fds[4] = {s->uffd, s->stop_fd, s->wake_fd, s->peer_fd};
  int kinds = s->peer_kind != PEER_NONE && s->peer_fd >= 0 ? 4 : 3;
  pthread_mutex_lock(&w->m);
  s->attached = 1;
  for (int k = 0; k < kinds; k++) {
    s->tags[k] = (struct serve_tag){s, k};
    struct epoll_event ev = {.events = EPOLLIN | (k == TAG_PEER ? EPOLLRDHUP : 0), .data.ptr = &s->tags[k]};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fds[k], &ev) < 0) {
      int e = errno;
      for (int j = 0; j < k; j++) epoll_ctl(w->epfd, EPOLL_CTL_DEL, fds[j], NULL);
      s->attached = 0;
      s->pooled = 0;
      w->members--;
      atomic_store(&s->running, 0);
      pthread_mutex_unlock(&w->m);
      return -e;
    }
  }
  pthread_mutex_unlock(&w->m);
  return 0;
}

/* Stop of a pooled sandbox: asks its owner to let go and waits until it did (between batches). */
static void pool_detach(struct serve *s) {
  struct pool_worker *w = s->owner;
  pthread_mutex_lock(&w->m);
  if (s->attached && !s->detach_asked) {
    s->detach_asked = 1;
    s->detach_next = w->detach_head;
    w->detach_head = s;
    uint64_t one = 1;
    ssize_t r = write(w->ctl_fd, &one, sizeof(one));
    (void)r;
  }
  while (s->attached) pthread_cond_wait(&w->c, &w->m);
  pthread_mutex_unlock(&w->m);
}

static void free_serve(struct serve *s) {
  if (s->stop_fd >= 0) close(s->stop_fd);
  if (s->wake_fd >= 0) close(s->wake_fd);
  if (s->notify_fd >= 0) close(s->notify_fd);
  if (s->present) munmap(s->present, s->units);
  if (s->dirty) munmap(s->dirty, s->units);
  if (s->ready) munmap(s->ready, s->units);
  if (s->zero) munmap(s->zero, s->zero_len);
  free(s->pend);
  free(s->events);
  free(s->pf_blocks);
  if (s->rec_seen) munmap(s->rec_seen, s->rec_blocks);
  if (s->rec_order) munmap(s->rec_order, s->rec_blocks * sizeof(uint32_t));
  pthread_cond_destroy(&s->pf_cond);
  pthread_mutex_destroy(&s->pf_run);
  pthread_mutex_destroy(&s->lock);
  free(s);
}

static uint8_t *map_bytes(uint64_t len) {
  void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

/*
 * params (int64): [0] uffd, [1] peer fd (-1 none), [2] peer kind, [3] source view address,
 * [4] source size, [5] all ready, [6] prefetch bytes, [7] copy mode (UFFDIO_COPY_MODE_WP or 0),
 * [8] sync wp, [9] region count, [10] readahead windows (0 = off), [11] record block size (0 = do not
 * record the start's faults). regions: 4 u64 each (base, size, offset, page size), already
 * validated by JS (libs/uffd) against the source size. Returns a handle or -errno.
 */
int64_t sbx_serve_create(const int64_t *params, const uint64_t *regions) {
  int nreg = (int)params[9];
  if (nreg <= 0 || nreg > MAX_REGIONS) return -EINVAL;
  struct serve *s = calloc(1, sizeof(*s));
  if (!s) return -ENOMEM;
  pthread_mutex_init(&s->lock, NULL);
  pthread_mutex_init(&s->pf_run, NULL);
  pthread_cond_init(&s->pf_cond, NULL);
  s->stop_fd = s->wake_fd = s->notify_fd = -1;
  s->uffd = (int)params[0];
  s->peer_fd = (int)params[1];
  s->peer_kind = (int)params[2];
  s->src = (uint8_t *)(uintptr_t)params[3];
  s->src_size = (uint64_t)params[4];
  s->units = (s->src_size + UNIT - 1) / UNIT;
  s->prefetch_bytes = (uint64_t)params[6];
  s->readahead = (uint64_t)params[10];
  s->copy_mode = (uint64_t)params[7];
  s->sync_wp = (int)params[8];
  s->nregions = nreg;
  uint64_t maxpage = UNIT;
  for (int i = 0; i < nreg; i++) {
    s->regions[i] = (struct region){regions[4 * i], regions[4 * i + 1], regions[4 * i + 2], regions[4 * i + 3]};
    if (s->regions[i].page_size > maxpage) maxpage = s->regions[i].page_size;
  }
  s->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  s->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  s->present = map_bytes(s->units);
  s->dirty = map_bytes(s->units);
  if (!params[5]) s->ready = map_bytes(s->units);
  s->zero_len = maxpage;
  s->zero = mmap(NULL, maxpage, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (s->zero == MAP_FAILED) s->zero = NULL;
  if (s->stop_fd < 0 || s->wake_fd < 0 || s->notify_fd < 0 || !s->present || !s->dirty || (!params[5] && !s->ready) ||
      !s->zero) {
    free_serve(s);
    return -ENOMEM;
  }
  uint64_t rec_block = (uint64_t)params[11];
  if (rec_block) {
    if (rec_block < UNIT || (rec_block & (rec_block - 1))) {
      free_serve(s);
      return -EINVAL;
    }
    s->rec_block = rec_block;
    s->rec_blocks = (s->src_size + rec_block - 1) / rec_block;
    if (s->rec_blocks > UINT32_MAX) {
      free_serve(s);
      return -EINVAL;
    }
    s->rec_seen = map_bytes(s->rec_blocks);
    s->rec_order = (uint32_t *)map_bytes(s->rec_blocks * sizeof(uint32_t));
    if (!s->rec_seen || !s->rec_order) {
      free_serve(s);
      return -ENOMEM;
    }
    atomic_store(&s->recording, 1);
  }
  atomic_store(&s->sourcing, 1);
  /* The uffd is shared with the peer; we only ever want non-blocking reads on it. */
  int fl = fcntl(s->uffd, F_GETFL);
  if (fl >= 0) fcntl(s->uffd, F_SETFL, fl | O_NONBLOCK);
  return (int64_t)(uintptr_t)s;
}

int64_t sbx_serve_start(int64_t h, int nthreads) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  if (nthreads < 1 || nthreads > MAX_THREADS) return -EINVAL;
  atomic_store(&s->running, 1);
  for (int i = 0; i < nthreads; i++) {
    int r = pthread_create(&s->threads[i], NULL, serve_thread, s);
    if (r != 0) {
      atomic_store(&s->running, 0);
      uint64_t one = 1;
      ssize_t w = write(s->stop_fd, &one, sizeof(one));
      (void)w;
      for (int j = 0; j < s->nthreads; j++) pthread_join(s->threads[j], NULL);
      s->nthreads = 0;
      return -r;
    }
    s->nthreads++;
  }
  return 0;
}

/* The eventfd JS watches (koffi.node.poll) for events. */
int64_t sbx_serve_notify_fd(int64_t h) { return ((struct serve *)(uintptr_t)h)->notify_fd; }

/* Pops one event into out[0..3] (type, a, b, c); returns the type, EV_NONE when empty. */
int64_t sbx_serve_next_event(int64_t h, int64_t *out) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  pthread_mutex_lock(&s->lock);
  if (s->nevents == 0) {
    uint64_t v;
    ssize_t r = read(s->notify_fd, &v, sizeof(v));
    (void)r;
    pthread_mutex_unlock(&s->lock);
    return EV_NONE;
  }
  struct event e = s->events[s->headevent];
  s->headevent = (s->headevent + 1) % s->capevents;
  s->nevents--;
  pthread_mutex_unlock(&s->lock);
  out[0] = e.type;
  out[1] = e.a;
  out[2] = e.b;
  out[3] = e.c;
  return e.type;
}

/* JS fetched [off, off+len) into the view: mark it and let the threads retry parked faults. */
int64_t sbx_serve_mark_ready(int64_t h, uint64_t off, uint64_t len) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  if (!s->ready) return 0;
  if (off % UNIT || len % UNIT || off + len > s->units * UNIT) return -EINVAL;
  pthread_mutex_lock(&s->lock);
  mark(s->ready, off, len, 1);
  pthread_cond_broadcast(&s->pf_cond);
  pthread_mutex_unlock(&s->lock);
  uint64_t one = 1;
  ssize_t r = write(s->wake_fd, &one, sizeof(one));
  (void)r;
  return 0;
}

/* A fetch failed for good: the sandbox fails (its parked faults can never be answered). */
int64_t sbx_serve_fail(int64_t h, int code, uint64_t off, int err) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  fail(s, code, off, err);
  uint64_t one = 1;
  ssize_t r = write(s->stop_fd, &one, sizeof(one));
  (void)r;
  return 0;
}

/* From now on faults get zero pages; parked faults are answered with zeros too. */
int64_t sbx_serve_stop_sourcing(int64_t h) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  atomic_store(&s->sourcing, 0);
  atomic_store(&s->recording, 0);
  pthread_mutex_lock(&s->lock);
  pthread_cond_broadcast(&s->pf_cond);
  pthread_mutex_unlock(&s->lock);
  /* A pass copy in flight finishes before the caller reads the present map. */
  pthread_mutex_lock(&s->pf_run);
  pthread_mutex_unlock(&s->pf_run);
  uint64_t one = 1;
  ssize_t r = write(s->wake_fd, &one, sizeof(one));
  (void)r;
  return 0;
}

/* out: ST_COUNT stats, then HIST_BUCKETS bounds, then HIST_BUCKETS counts, then failed code. */
int64_t sbx_serve_stats(int64_t h, uint64_t *out) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  int k = 0;
  for (int i = 0; i < ST_COUNT; i++) out[k++] = atomic_load_explicit(&s->stats[i], memory_order_relaxed);
  for (int i = 0; i < HIST_BUCKETS; i++) out[k++] = hist_bounds_us[i];
  for (int i = 0; i < HIST_BUCKETS; i++) out[k++] = atomic_load_explicit(&s->hist[i], memory_order_relaxed);
  out[k++] = (uint64_t)atomic_load(&s->failed);
  out[k++] = (uint64_t)s->npend;
  return k;
}

/* Copies a bookkeeping map (0 present, 1 dirty, 2 ready) for units [first, first+count). */
int64_t sbx_serve_copy_map(int64_t h, int which, uint64_t first, uint64_t count, uint8_t *out) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  uint8_t *m = which == 0 ? s->present : which == 1 ? s->dirty : s->ready;
  if (first + count > s->units) return -EINVAL;
  if (!m) {
    memset(out, 1, count);
    return 0;
  }
  memcpy(out, m + first, count);
  return 0;
}

int64_t sbx_serve_units(int64_t h) { return (int64_t)((struct serve *)(uintptr_t)h)->units; }

/* Stops and joins the threads. Idempotent. The uffd and peer fd stay open (JS owns them). */
int64_t sbx_serve_stop(int64_t h) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  atomic_store(&s->running, 0);
  uint64_t one = 1;
  ssize_t r = write(s->stop_fd, &one, sizeof(one));
  (void)r;
  pthread_mutex_lock(&s->lock);
  pthread_cond_broadcast(&s->pf_cond);
  pthread_mutex_unlock(&s->lock);
  for (int i = 0; i < s->nthreads; i++) pthread_join(s->threads[i], NULL);
  s->nthreads = 0;
  if (s->pooled) pool_detach(s);
  if (s->pf_started) pthread_join(s->pf_thread, NULL);
  s->pf_started = 0;
  return 0;
}

/*
 * Starts the prefetch pass over `count` block indices of `block` bytes (copied; validated by JS
 * against the memory size). Once per engine, after sbx_serve_start.
 */
int64_t sbx_serve_prefetch(int64_t h, const uint32_t *blocks, uint64_t count, uint64_t block) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  if (s->pf_started || !atomic_load(&s->running)) return -EALREADY;
  if (block < UNIT || (block & (block - 1))) return -EINVAL;
  for (uint64_t i = 0; i < count; i++)
    if ((uint64_t)blocks[i] * block >= s->src_size) return -EINVAL;
  s->pf_blocks = malloc((count ? count : 1) * sizeof(uint32_t));
  if (!s->pf_blocks) return -ENOMEM;
  memcpy(s->pf_blocks, blocks, count * sizeof(uint32_t));
  s->pf_count = count;
  s->pf_block = block;
  int r = pthread_create(&s->pf_thread, NULL, prefetch_thread, s);
  if (r != 0) return -r;
  s->pf_started = 1;
  return 0;
}

/* Ends recording (the sandbox is up, or the bound passed); what was recorded is kept. */
int64_t sbx_serve_stop_recording(int64_t h) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  pthread_mutex_lock(&s->lock);
  atomic_store(&s->recording, 0);
  pthread_mutex_unlock(&s->lock);
  return 0;
}

/* Copies up to `cap` recorded block indices into out; returns how many were recorded in all. */
int64_t sbx_serve_recorded(int64_t h, uint32_t *out, uint64_t cap) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  pthread_mutex_lock(&s->lock);
  uint64_t n = s->rec_count;
  if (out && cap) memcpy(out, s->rec_order, (n < cap ? n : cap) * sizeof(uint32_t));
  pthread_mutex_unlock(&s->lock);
  return (int64_t)n;
}

int64_t sbx_serve_destroy(int64_t h) {
  struct serve *s = (struct serve *)(uintptr_t)h;
  sbx_serve_stop(h);
  free_serve(s);
  return 0;
}
