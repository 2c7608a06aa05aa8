/*
 * A byte tunnel engine (net-agent's egress proxy): once a guest connection has been judged and
 * its upstream dialed, the rest is plain bytes both ways. Copying them through Node's event loop
 * costs the agent its loop; here native epoll threads move them with splice(2) through one pipe
 * per direction (socket -> pipe -> socket, no copy to user space), or with read/write through a
 * buffer per direction (mode 1: the comparison the bench makes).
 *
 * A tunnel owns two connected sockets, A and B. Each direction runs on its own: a FIN read from
 * one side is passed on as shutdown(SHUT_WR) of the other once the bytes before it are out, and
 * the other direction keeps flowing (the JS pipe's allowHalfOpen behaviour). Nothing more is read
 * from a side while its pipe holds bytes the other side has not taken (backpressure: the sender's
 * TCP window closes). Both directions finished: both sockets closed, event DONE. An error on
 * either side (reset, EPIPE...): both sockets closed with a reset (SO_LINGER 0), event RESET.
 * sbx_tunnel_close(id): the same reset, event CLOSED.
 *
 * Layout as sbx_http_relay.c: one epoll per thread, edge-triggered, each fd registered once with
 * readiness remembered until EAGAIN. Adopted tunnels and close commands reach a thread through a
 * locked queue and its eventfd; ended tunnels reach JS through one locked queue and the notify
 * eventfd. A tunnel belongs to one thread, so its state takes no lock. A direction moves at most
 * BUDGET bytes per turn, then waits for the next turn (other tunnels of the thread get theirs).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "sbx_native.h"

#define T_MAX_THREADS 16
#define BUDGET (1024 * 1024)
#define EVENTS 64

enum { END_DONE = 1, END_RESET = 2, END_CLOSED = 3 };
enum { MODE_SPLICE = 0, MODE_COPY = 1 };

struct tunnel;

/* What an epoll event points at: a side of a tunnel, or the thread's wake eventfd (t == NULL). */
struct side {
  struct tunnel *t;
  int idx;
};

struct tunnel {
  int64_t id;
  int fd[2];
  /* Direction d carries bytes read from fd[d] to fd[1 - d]. */
  int pipe[2][2];      /* splice mode: [d][0] read end, [d][1] write end */
  uint8_t *buf[2];     /* copy mode */
  size_t off[2];       /* copy mode: first unsent byte of buf[d] */
  size_t held[2];      /* bytes in pipe / buf of direction d */
  uint8_t *first;      /* bytes already read from A, sent to B before anything else */
  size_t first_len, first_off;
  int can_read[2], can_write[2];
  int eof[2];          /* FIN read on fd[d] */
  int shut[2];         /* ... and passed on: shutdown(fd[1 - d], SHUT_WR) */
  uint64_t bytes[2];   /* delivered in direction d */
  int ended;
  int queued_again;
  struct side sides[2];
  struct tunnel *prev, *next;       /* the thread's tunnels */
  struct tunnel *again_next;        /* turns left over */
};

struct cmd {
  int kind; /* 1 adopt, 2 close */
  struct tunnel *t;
  int64_t id;
};

struct tthread {
  struct engine *e;
  pthread_t th;
  int started;
  int ep, wake_fd;
  pthread_mutex_t qlock;
  struct cmd *q;
  size_t qn, qcap;
  struct tunnel *head; /* list of live tunnels */
  struct tunnel *again;
};

struct ended {
  int64_t id, bytes_ab, bytes_ba, reason, err;
};

struct engine {
  int nthreads;
  int mode;
  size_t pipe_size;
  atomic_int stop;
  atomic_int_fast64_t next_id;
  atomic_uint next_thread;
  int notify_fd;
  pthread_mutex_t eq_lock;
  struct ended *eq;
  size_t eqn, eqcap, eqhead;
  atomic_uint_fast64_t st_adopted, st_open, st_ab, st_ba, st_done, st_reset, st_closed;
  struct tthread threads[T_MAX_THREADS];
};

static void wake(int fd) {
  uint64_t one = 1;
  ssize_t w = write(fd, &one, sizeof(one));
  (void)w;
}

static void push_ended(struct engine *e, struct tunnel *t, int reason, int err) {
  pthread_mutex_lock(&e->eq_lock);
  if (e->eqhead > 0 && e->eqhead == e->eqn) e->eqhead = e->eqn = 0;
  if (e->eqn == e->eqcap) {
    if (e->eqhead > 0) {
      memmove(e->eq, e->eq + e->eqhead, (e->eqn - e->eqhead) * sizeof(*e->eq));
      e->eqn -= e->eqhead;
      e->eqhead = 0;
    }
    if (e->eqn == e->eqcap) {
      size_t cap = e->eqcap ? e->eqcap * 2 : 64;
      struct ended *q = realloc(e->eq, cap * sizeof(*q));
      if (!q) { /* the event is lost; the tunnel itself is closed all the same */
        pthread_mutex_unlock(&e->eq_lock);
        return;
      }
      e->eq = q;
      e->eqcap = cap;
    }
  }
  e->eq[e->eqn++] = (struct ended){t->id, (int64_t)t->bytes[0], (int64_t)t->bytes[1], reason, err};
  pthread_mutex_unlock(&e->eq_lock);
  wake(e->notify_fd);
}

static void abortive_close(int fd) {
  struct linger l = {1, 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  close(fd);
}

static void tunnel_free_fds(struct tunnel *t, int reset) {
  for (int s = 0; s < 2; s++) {
    if (t->fd[s] >= 0) {
      if (reset) abortive_close(t->fd[s]);
      else close(t->fd[s]);
      t->fd[s] = -1;
    }
    for (int k = 0; k < 2; k++)
      if (t->pipe[s][k] >= 0) {
        close(t->pipe[s][k]);
        t->pipe[s][k] = -1;
      }
    free(t->buf[s]);
    t->buf[s] = NULL;
  }
  free(t->first);
  t->first = NULL;
}

/* Ends a tunnel on its thread: fds closed, event queued; freed at the end of the turn (dead list). */
static void tunnel_end(struct tthread *th, struct tunnel *t, int reason, int err) {
  if (t->ended) return;
  t->ended = 1;
  struct engine *e = th->e;
  for (int s = 0; s < 2; s++)
    if (t->fd[s] >= 0) epoll_ctl(th->ep, EPOLL_CTL_DEL, t->fd[s], NULL);
  tunnel_free_fds(t, reason != END_DONE);
  if (t->prev) t->prev->next = t->next;
  else th->head = t->next;
  if (t->next) t->next->prev = t->prev;
  t->prev = t->next = NULL;
  atomic_fetch_add(&e->st_ab, t->bytes[0]);
  atomic_fetch_add(&e->st_ba, t->bytes[1]);
  atomic_fetch_sub(&e->st_open, 1);
  if (reason == END_DONE) atomic_fetch_add(&e->st_done, 1);
  else if (reason == END_RESET) atomic_fetch_add(&e->st_reset, 1);
  else atomic_fetch_add(&e->st_closed, 1);
  push_ended(e, t, reason, err);
}

/* Errors that end a direction's socket: anything but "not now". */
static int hard(int err) { return err != EAGAIN && err != EWOULDBLOCK && err != EINTR; }

/*
 * Moves bytes of direction d until blocked or out of budget. Returns 0 (blocked or finished),
 * 1 (budget spent, more to do), or -errno (the tunnel must be reset).
 */
static int pump(struct engine *e, struct tunnel *t, int d) {
  int src = t->fd[d], dst = t->fd[1 - d];
  size_t moved = 0;
  for (;;) {
    if (moved >= BUDGET) return 1;
    if (d == 0 && t->first_off < t->first_len) {
      if (!t->can_write[1]) return 0;
      ssize_t n = send(dst, t->first + t->first_off, t->first_len - t->first_off, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) {
        if (hard(errno)) return -errno;
        t->can_write[1] = 0;
        return 0;
      }
      t->first_off += (size_t)n;
      t->bytes[0] += (uint64_t)n;
      moved += (size_t)n;
      continue;
    }
    if (t->held[d] > 0) {
      if (!t->can_write[1 - d]) return 0;
      ssize_t n;
      if (e->mode == MODE_SPLICE)
        n = splice(t->pipe[d][0], NULL, dst, NULL, t->held[d], SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      else
        n = send(dst, t->buf[d] + t->off[d], t->held[d], MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) {
        if (hard(errno)) return -errno;
        t->can_write[1 - d] = 0;
        return 0;
      }
      t->held[d] -= (size_t)n;
      t->off[d] = t->held[d] ? t->off[d] + (size_t)n : 0;
      t->bytes[d] += (uint64_t)n;
      moved += (size_t)n;
      continue;
    }
    if (t->eof[d]) {
      if (!t->shut[d]) {
        t->shut[d] = 1;
        /* ENOTCONN: the other side is already gone; its own direction reports that. */
        if (shutdown(dst, SHUT_WR) < 0 && errno != ENOTCONN) return -errno;
      }
      return 0;
    }
    if (!t->can_read[d]) return 0;
    ssize_t n;
    if (e->mode == MODE_SPLICE)
      n = splice(src, NULL, t->pipe[d][1], NULL, e->pipe_size, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    else
      n = recv(src, t->buf[d], e->pipe_size, MSG_DONTWAIT);
    if (n < 0) {
      if (hard(errno)) return -errno;
      /*
       * With an empty pipe EAGAIN means the socket has nothing (wait for EPOLLIN). With bytes in
       * it, the pipe may be out of slots instead: send them first, then read again.
       */
      if (t->held[d] == 0) t->can_read[d] = 0;
      return 0;
    }
    if (n == 0) {
      t->eof[d] = 1;
      continue;
    }
    t->held[d] += (size_t)n;
  }
}

/* One turn of a tunnel: both directions; ends it when both are finished or one failed. */
static void run(struct tthread *th, struct tunnel *t) {
  if (t->ended) return;
  int more = 0;
  for (int d = 0; d < 2; d++) {
    int r = pump(th->e, t, d);
    if (r < 0) {
      tunnel_end(th, t, END_RESET, -r);
      return;
    }
    if (r > 0) more = 1;
  }
  if (t->shut[0] && t->shut[1]) {
    tunnel_end(th, t, END_DONE, 0);
    return;
  }
  if (more && !t->queued_again) {
    t->queued_again = 1;
    t->again_next = th->again;
    th->again = t;
  }
}

static void take_commands(struct tthread *th, struct tunnel **dead) {
  uint64_t v;
  ssize_t rd = read(th->wake_fd, &v, sizeof(v));
  (void)rd;
  pthread_mutex_lock(&th->qlock);
  struct cmd *q = th->q;
  size_t n = th->qn;
  th->q = NULL;
  th->qn = th->qcap = 0;
  pthread_mutex_unlock(&th->qlock);
  for (size_t i = 0; i < n; i++) {
    if (q[i].kind == 1) {
      struct tunnel *t = q[i].t;
      t->next = th->head;
      if (th->head) th->head->prev = t;
      th->head = t;
      int err = 0;
      for (int s = 0; s < 2 && !err; s++) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &t->sides[s]};
        if (epoll_ctl(th->ep, EPOLL_CTL_ADD, t->fd[s], &ev) < 0) err = errno;
      }
      if (err) {
        tunnel_end(th, t, END_RESET, err);
        t->again_next = *dead;
        *dead = t;
        continue;
      }
      run(th, t);
      if (t->ended) {
        t->again_next = *dead;
        *dead = t;
      }
    } else {
      for (struct tunnel *t = th->head; t; t = t->next)
        if (t->id == q[i].id) {
          tunnel_end(th, t, END_CLOSED, 0);
          if (!t->queued_again) {
            t->again_next = *dead;
            *dead = t;
          }
          break;
        }
    }
  }
  free(q);
}

static void *thread_main(void *arg) {
  struct tthread *th = arg;
  struct engine *e = th->e;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);
  struct epoll_event evs[EVENTS];
  while (!atomic_load(&e->stop)) {
    int n = epoll_wait(th->ep, evs, EVENTS, th->again ? 0 : -1);
    if (n < 0 && errno != EINTR) break;
    struct tunnel *dead = NULL;
    /* Turns left over from the last round first (they were waiting while others ran). */
    struct tunnel *again = th->again;
    th->again = NULL;
    for (int i = 0; i < n; i++) {
      struct side *s = evs[i].data.ptr;
      if (!s) {
        take_commands(th, &dead);
        continue;
      }
      struct tunnel *t = s->t;
      if (t->ended) continue;
      uint32_t ev = evs[i].events;
      if (ev & EPOLLERR) {
        /* A reset or other error on a side neither direction is using now (its FIN already
           read, nothing to send to it) would otherwise wait for the other side to act. */
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(t->fd[s->idx], SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err) {
          tunnel_end(th, t, END_RESET, err);
          if (!t->queued_again) {
            t->again_next = dead;
            dead = t;
          }
          continue;
        }
      }
      if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) t->can_read[s->idx] = 1;
      if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) t->can_write[s->idx] = 1;
      run(th, t);
      if (t->ended && !t->queued_again) {
        t->again_next = dead;
        dead = t;
      }
    }
    while (again) {
      struct tunnel *t = again;
      again = t->again_next;
      t->queued_again = 0;
      if (!t->ended) run(th, t);
      if (t->ended && !t->queued_again) {
        t->again_next = dead;
        dead = t;
      }
    }
    while (dead) {
      struct tunnel *t = dead;
      dead = t->again_next;
      free(t);
    }
  }
  /* Ended tunnels still waiting for a turn are off the live list: engine_free would miss them. */
  while (th->again) {
    struct tunnel *t = th->again;
    th->again = t->again_next;
    t->queued_again = 0;
    if (t->ended) free(t);
  }
  return NULL;
}

static void stop_threads(struct engine *e) {
  atomic_store(&e->stop, 1);
  for (int i = 0; i < e->nthreads; i++) {
    struct tthread *th = &e->threads[i];
    if (!th->started) continue;
    wake(th->wake_fd);
    pthread_join(th->th, NULL);
    th->started = 0;
  }
}

static void engine_free(struct engine *e) {
  for (int i = 0; i < e->nthreads; i++) {
    struct tthread *th = &e->threads[i];
    for (struct tunnel *t = th->head; t;) {
      struct tunnel *next = t->next;
      tunnel_free_fds(t, 1);
      free(t);
      t = next;
    }
    for (size_t k = 0; k < th->qn; k++)
      if (th->q[k].kind == 1) {
        tunnel_free_fds(th->q[k].t, 1);
        free(th->q[k].t);
      }
    free(th->q);
    if (th->ep >= 0) close(th->ep);
    if (th->wake_fd >= 0) close(th->wake_fd);
    pthread_mutex_destroy(&th->qlock);
  }
  if (e->notify_fd >= 0) close(e->notify_fd);
  free(e->eq);
  pthread_mutex_destroy(&e->eq_lock);
  free(e);
}

/* params: [threads, mode (0 splice, 1 read/write), pipe size in bytes (0: 256 KiB)]. */
int64_t sbx_tunnel_create(const int64_t *params) {
  int64_t nthreads = params[0], mode = params[1], pipe_size = params[2] ? params[2] : 256 * 1024;
  if (nthreads < 1 || nthreads > T_MAX_THREADS || (mode != MODE_SPLICE && mode != MODE_COPY) ||
      pipe_size < 4096 || pipe_size > 1024 * 1024)
    return -EINVAL;
  struct engine *e = calloc(1, sizeof(*e));
  if (!e) return -ENOMEM;
  e->nthreads = (int)nthreads;
  e->mode = (int)mode;
  e->pipe_size = (size_t)pipe_size;
  atomic_store(&e->next_id, 1);
  pthread_mutex_init(&e->eq_lock, NULL);
  e->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  int err = e->notify_fd < 0 ? -errno : 0;
  for (int i = 0; i < e->nthreads; i++) {
    struct tthread *th = &e->threads[i];
    th->e = e;
    pthread_mutex_init(&th->qlock, NULL);
    th->ep = epoll_create1(EPOLL_CLOEXEC);
    th->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (th->ep < 0 || th->wake_fd < 0) {
      if (!err) err = -errno;
      continue;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(th->ep, EPOLL_CTL_ADD, th->wake_fd, &ev) < 0 && !err) err = -errno;
  }
  for (int i = 0; i < e->nthreads && !err; i++) {
    struct tthread *th = &e->threads[i];
    int rc = pthread_create(&th->th, NULL, thread_main, th);
    if (rc) err = -rc;
    else th->started = 1;
  }
  if (err) {
    stop_threads(e);
    engine_free(e);
    return err;
  }
  return (int64_t)(uintptr_t)e;
}

int64_t sbx_tunnel_notify_fd(int64_t h) { return ((struct engine *)(uintptr_t)h)->notify_fd; }

static int push_cmd(struct tthread *th, struct cmd c) {
  pthread_mutex_lock(&th->qlock);
  if (th->qn == th->qcap) {
    size_t cap = th->qcap ? th->qcap * 2 : 16;
    struct cmd *q = realloc(th->q, cap * sizeof(*q));
    if (!q) {
      pthread_mutex_unlock(&th->qlock);
      return -ENOMEM;
    }
    th->q = q;
    th->qcap = cap;
  }
  th->q[th->qn++] = c;
  pthread_mutex_unlock(&th->qlock);
  wake(th->wake_fd);
  return 0;
}

static int is_stream_socket(int fd) {
  int type = 0;
  socklen_t len = sizeof(type);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0) return -errno;
  return type == SOCK_STREAM ? 0 : -ENOTSOCK;
}

/*
 * Takes ownership of two connected stream sockets (on success only: on an error neither is
 * taken). `first` (may be NULL/0): bytes already read from A, sent to B before anything else.
 * Returns the tunnel id (> 0) or -errno.
 */
int64_t sbx_tunnel_adopt(int64_t h, int fd_a, int fd_b, const uint8_t *first, uint64_t first_len) {
  struct engine *e = (struct engine *)(uintptr_t)h;
  if (fd_a < 0 || fd_b < 0 || fd_a == fd_b) return -EBADF;
  int rc = is_stream_socket(fd_a);
  if (!rc) rc = is_stream_socket(fd_b);
  if (rc) return rc;
  struct tunnel *t = calloc(1, sizeof(*t));
  if (!t) return -ENOMEM;
  t->fd[0] = t->fd[1] = -1;
  for (int d = 0; d < 2; d++) t->pipe[d][0] = t->pipe[d][1] = -1;
  int err = 0;
  if (first && first_len) {
    t->first = malloc(first_len);
    if (!t->first) err = -ENOMEM;
    else memcpy(t->first, first, first_len);
    t->first_len = first_len;
  }
  for (int d = 0; d < 2 && !err; d++) {
    if (e->mode == MODE_SPLICE) {
      if (pipe2(t->pipe[d], O_CLOEXEC | O_NONBLOCK) < 0) err = -errno;
      /* A bigger pipe: fewer splice calls per byte. Refused (limits): the default 64 KiB serves. */
      else fcntl(t->pipe[d][1], F_SETPIPE_SZ, (int)e->pipe_size);
    } else if (!(t->buf[d] = malloc(e->pipe_size))) {
      err = -ENOMEM;
    }
  }
  int fl;
  if (!err && ((fl = fcntl(fd_a, F_GETFL)) < 0 || fcntl(fd_a, F_SETFL, fl | O_NONBLOCK) < 0)) err = -errno;
  if (!err && ((fl = fcntl(fd_b, F_GETFL)) < 0 || fcntl(fd_b, F_SETFL, fl | O_NONBLOCK) < 0)) err = -errno;
  if (err) {
    tunnel_free_fds(t, 0);
    free(t);
    return err;
  }
  t->fd[0] = fd_a;
  t->fd[1] = fd_b;
  for (int s = 0; s < 2; s++) {
    t->sides[s] = (struct side){t, s};
    t->can_read[s] = t->can_write[s] = 1;
  }
  t->id = atomic_fetch_add(&e->next_id, 1);
  /* Close commands find the thread from the id alone. */
  unsigned k = (unsigned)(t->id % e->nthreads);
  atomic_fetch_add(&e->st_adopted, 1);
  atomic_fetch_add(&e->st_open, 1);
  err = push_cmd(&e->threads[k], (struct cmd){1, t, t->id});
  if (err) {
    atomic_fetch_sub(&e->st_adopted, 1);
    atomic_fetch_sub(&e->st_open, 1);
    t->fd[0] = t->fd[1] = -1; /* not taken */
    tunnel_free_fds(t, 0);
    free(t);
    return err;
  }
  return t->id;
}

/* Resets both sockets of a tunnel (event CLOSED). Unknown or already ended ids are ignored. */
int64_t sbx_tunnel_close(int64_t h, int64_t id) {
  struct engine *e = (struct engine *)(uintptr_t)h;
  if (id < 1) return -EINVAL;
  return push_cmd(&e->threads[id % e->nthreads], (struct cmd){2, NULL, id});
}

/*
 * One ended tunnel: out = [id, bytes A->B, bytes B->A, reason (1 done, 2 reset, 3 closed),
 * errno]. Returns 1, or 0 when none is queued (the notify eventfd is then cleared).
 */
int64_t sbx_tunnel_next_event(int64_t h, int64_t *out) {
  struct engine *e = (struct engine *)(uintptr_t)h;
  pthread_mutex_lock(&e->eq_lock);
  if (e->eqhead == e->eqn) {
    /* Cleared under the lock, so a push after this read signals it again. */
    uint64_t v;
    ssize_t rd = read(e->notify_fd, &v, sizeof(v));
    (void)rd;
    pthread_mutex_unlock(&e->eq_lock);
    return 0;
  }
  struct ended *ev = &e->eq[e->eqhead++];
  out[0] = ev->id;
  out[1] = ev->bytes_ab;
  out[2] = ev->bytes_ba;
  out[3] = ev->reason;
  out[4] = ev->err;
  pthread_mutex_unlock(&e->eq_lock);
  return 1;
}

/* [adopted, open, bytes A->B of ended tunnels, bytes B->A of ended, done, reset, closed]. */
int64_t sbx_tunnel_stats(int64_t h, uint64_t *out, uint64_t n) {
  struct engine *e = (struct engine *)(uintptr_t)h;
  uint64_t v[7] = {atomic_load(&e->st_adopted), atomic_load(&e->st_open), atomic_load(&e->st_ab),
                   atomic_load(&e->st_ba),      atomic_load(&e->st_done), atomic_load(&e->st_reset),
                   atomic_load(&e->st_closed)};
  for (uint64_t i = 0; i < n && i < 7; i++) out[i] = v[i];
  return 0;
}

/* Stops the threads and closes every fd the engine owns (open tunnels are reset, no events). */
int64_t sbx_tunnel_destroy(int64_t h) {
  struct engine *e = (struct engine *)(uintptr_t)h;
  stop_threads(e);
  engine_free(e);
  return 0;
}
