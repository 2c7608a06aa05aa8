/*
 * The proxy's HTTP/1.1 fast path (issue 16): native epoll threads inside the proxy process that
 * carry the common, well-formed keep-alive exchange end to end (client head parsed and routed,
 * head rewritten as apps/proxy/src/forward-headers.ts does, bodies and the response passed through
 * byte for byte, upstream connections pooled per thread), and hand a client connection back to
 * the TypeScript path, at a request boundary and with every unforwarded byte, whenever they meet
 * anything else. The TypeScript path stays the authority on errors, resume, h2c, upgrades and odd
 * input: this code never writes a response of its own, and it accepts strictly less than the TS
 * parser does (native-head-diff.test.ts checks that whatever it accepts, TS accepts the same way).
 *
 * Layout: one epoll per thread, edge-triggered (each fd registered once; `can_read`/`can_write`
 * remember readiness until a short read or write, so no epoll_ctl per request). A client and the
 * upstream it uses belong to one thread, so connection state takes no lock. Adopted fds and
 * "drop idle upstreams of this IP" commands reach a thread through a locked queue and its eventfd;
 * handoffs reach JS through one locked queue and the notify eventfd. Routes sit behind a rwlock.
 * Timers are FIFO lists, one per fixed duration (deadlines in a list are then in order).
 * Buffers (client in, forwarded head, upstream in) are one block per active connection, taken
 * from a per-thread free list and given back while the connection is idle between requests.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include "sbx_native.h"

#define MAX_THREADS 16
#define UIN_CAP (64 * 1024)
#define READ_AHEAD (64 * 1024)
#define MAX_IDLE_PER_BUCKET 128 /* the TS pool's maxIdleUpstreamSockets default, per port */
#define POOL_BUCKETS 256
#define ROUTE_BUCKETS 1024
#define MAX_TOKEN 4096
#define MAX_MASK 1024
#define LINGER_MS 2000
#define PUMP_ROUNDS 32
#define FREE_BUFS 64
/* Chunk-size lines and trailers are scanned, never kept; bounded like body-framing.ts. */
#define MAX_LINE 8192
#define MAX_SIZE_DIGITS 12

/* Handoff reasons (out[2] of sbx_relay_next_handoff); the binding names them. */
enum {
  R_H2_PREFACE = 1,  /* PRI * HTTP/2.0 */
  R_BAD_HEAD,        /* request line or header syntax the strict parser refuses */
  R_HEAD_TOO_LARGE,  /* no head end within maxHeadBytes */
  R_VERSION,         /* not HTTP/1.1 */
  R_TARGET,          /* not origin-form, or CONNECT */
  R_HOST,            /* Host missing, repeated, or not {port}-{id}.{domain} */
  R_ROUTE_HEADERS,   /* e2b-sandbox-id / e2b-sandbox-port */
  R_FRAMING,         /* Content-Length/Transfer-Encoding other than one CL or TE: chunked */
  R_UPGRADE,         /* Upgrade header */
  R_CONNECTION,      /* a Connection token other than close/keep-alive */
  R_EXPECT,          /* Expect header */
  R_NO_ROUTE,        /* the sandbox is not in the running table */
  R_TOKEN,           /* access token missing, wrong or repeated */
  R_CONNECT_FAILED,  /* upstream connect failed before a request byte was sent */
  R_CONNECT_TIMEOUT, /* upstream connect timed out before a request byte was sent */
  R_SLOTS = 16
};

/* Stats slots (order documented in native/src/http-relay.ts). */
enum {
  ST_ADOPTED,
  ST_OPEN,
  ST_REQUESTS,
  ST_1XX,
  ST_2XX,
  ST_3XX,
  ST_4XX,
  ST_5XX,
  ST_BYTES_UP,
  ST_BYTES_DOWN,
  ST_UP_CONNECTS,
  ST_UP_CONNECT_FAILS,
  ST_POOL_REUSES,
  ST_HANDOFFS,
  ST_HANDOFF_REASON, /* R_SLOTS slots, reason r at ST_HANDOFF_REASON + r - 1 */
  ST_IDLE_CLOSES = ST_HANDOFF_REASON + R_SLOTS,
  ST_UP_ERRORS,
  ST_RETRIES,
  ST_FRAMING_ERRORS, /* broken chunked framing from a client: both sides closed */
  ST_UP_OPEN,
  ST_UP_IDLE,
  ST_COUNT
};

enum { K_CLIENT = 1, K_UPSTREAM, K_WAKE };
enum { F_NONE, F_LENGTH, F_CHUNKED, F_UNTIL_CLOSE };
enum { CK_SIZE, CK_EXT, CK_SIZE_LF, CK_DATA, CK_DATA_CR, CK_DATA_LF, CK_TR_START, CK_TR, CK_TR_LF, CK_END_LF, CK_DONE };
/* Request side: RQ_HEAD = between exchanges. RQ_DISCARD: the answer came first; the body is dropped. */
enum { RQ_HEAD, RQ_CONNECT, RQ_SEND, RQ_SENT, RQ_DISCARD };
enum { RS_NONE, RS_HEAD, RS_BODY };
enum { UP_CONNECTING, UP_ACTIVE, UP_IDLE };
enum { CMD_ADOPT, CMD_DROP_IP };

#define container_of(p, T, m) ((T *)((char *)(p) - offsetof(T, m)))

struct dlink {
  struct dlink *prev, *next;
};
static void dl_init(struct dlink *l) { l->prev = l->next = l; }
static int dl_empty(const struct dlink *l) { return l->next == l; }
static int dl_on(const struct dlink *n) { return n->next != NULL; }
static void dl_del(struct dlink *n) {
  if (!n->next) return;
  n->prev->next = n->next;
  n->next->prev = n->prev;
  n->next = n->prev = NULL;
}
static void dl_push_back(struct dlink *h, struct dlink *n) {
  n->prev = h->prev;
  n->next = h;
  h->prev->next = n;
  h->prev = n;
}
static void dl_push_front(struct dlink *h, struct dlink *n) {
  n->next = h->next;
  n->prev = h;
  h->next->prev = n;
  h->next = n;
}

struct timer {
  struct dlink link;
  uint64_t deadline;
};

struct framing {
  int mode, state, digits;
  uint64_t remaining;
  uint32_t line;
};

struct route {
  struct route *next;
  char id[64]; /* lower-cased */
  uint32_t idlen, ip;
  uint64_t gen;
  char *token, *mask;
  uint32_t toklen, masklen;
  /* A token with bytes outside visible ASCII and space: the TS path decodes header bytes as
   * latin1 and the token as UTF-8, so only it can judge; every request is handed off. */
  int opaque_token;
};

struct handoff {
  struct handoff *next;
  int fd, reason;
  uint64_t len;
  uint8_t bytes[];
};

struct cmd {
  int kind, fd;
  uint32_t ip;
};

struct relay;
struct client;

struct thread {
  int kind; /* K_WAKE: the epoll tag of wake_fd */
  struct relay *r;
  pthread_t th;
  int started, ep, wake_fd;
  pthread_mutex_t qlock;
  struct cmd *q;
  size_t qn, qcap;
  struct dlink clients, upstreams, again, dead_clients, dead_ups;
  struct dlink t_idle, t_linger, t_connect, t_pool, t_resp;
  struct dlink pool[POOL_BUCKETS];
  uint32_t pool_n[POOL_BUCKETS];
  void *free_bufs[FREE_BUFS];
  int nfree;
  uint64_t now;
  uint8_t drain[4096];
  _Atomic uint64_t st[ST_COUNT];
};

struct upstream {
  int kind;
  int fd;
  struct thread *t;
  struct dlink all, pool_link;
  struct timer tm; /* connect or pool idle */
  uint32_t ip;
  uint16_t port;
  uint64_t gen;
  int state;
  /* hup: the peer's FIN (or an error) was signalled; with edge triggering no further edge comes,
   * so a short read no longer means "drained": reading goes on until it returns 0. */
  uint8_t can_read, can_write, eof, dead, hup;
  struct client *owner;
};

struct client {
  int kind;
  int fd;
  struct thread *t;
  struct dlink all, again_link;
  struct timer tm;      /* idle between requests, or linger */
  struct timer resp_tm; /* upstream response timeout */
  int rq, rs;
  uint8_t can_read, can_write, eof, dead, linger, in_pump, hup; /* hup: as in struct upstream */
  uint8_t bodiless, head_method, close_after, reusable, retried, reused_up, resp_started, counted;
  void *bufs;
  uint8_t *cin, *hout, *uin;
  uint32_t cstart, cend, head_len, scan;
  uint32_t hout_len, hout_off;
  uint32_t ustart, uend, uscan, usearch;
  struct framing rqf, rsf;
  struct upstream *up;
  uint32_t ip;
  uint16_t port;
  uint64_t gen;
  char caddr[16];
  uint32_t caddr_len;
};

struct relay {
  int nthreads;
  uint64_t idle_ms, connect_ms, up_idle_ms, resp_ms;
  uint32_t max_head, cin_cap, hout_cap;
  atomic_int stop;
  atomic_uint rr;
  struct thread threads[MAX_THREADS];
  pthread_rwlock_t rt_lock;
  struct route *routes[ROUTE_BUCKETS];
  uint64_t rt_gen;
  pthread_mutex_t hq_lock;
  struct handoff *hq_head, *hq_tail;
  int notify_fd;
};

/* ---------- character classes ---------- */

static uint8_t TOKEN_CH[256], VALUE_CH[256], VCHAR[256];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void init_tables(void) {
  const char *tok = "!#$%&'*+-.^_`|~";
  for (int c = 0; c < 256; c++) {
    int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    TOKEN_CH[c] = alnum || (c && strchr(tok, c) != NULL);
    /* http1-head.ts HEADER_BLOCK: a value is anything but controls other than HTAB, and DEL. */
    VALUE_CH[c] = c == '\t' || (c >= 0x20 && c != 0x7f);
    VCHAR[c] = c >= 0x21 && c <= 0x7e;
  }
}

static int lower(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

static int name_is(const uint8_t *p, size_t n, const char *lc) {
  size_t l = strlen(lc);
  if (n != l) return 0;
  for (size_t i = 0; i < n; i++)
    if (lower(p[i]) != lc[i]) return 0;
  return 1;
}

enum {
  H_OTHER,
  H_HOST,
  H_CL,
  H_TE,
  H_CONNECTION,
  H_UPGRADE,
  H_EXPECT,
  H_ROUTE,
  H_TOKEN,
  H_XFF,
  H_HOP /* keep-alive, proxy-connection, te, trailer: dropped */
};

static int header_kind(const uint8_t *p, size_t n) {
  switch (n) {
  case 2: return name_is(p, n, "te") ? H_HOP : H_OTHER;
  case 4: return name_is(p, n, "host") ? H_HOST : H_OTHER;
  case 6: return name_is(p, n, "expect") ? H_EXPECT : H_OTHER;
  case 7:
    if (name_is(p, n, "upgrade")) return H_UPGRADE;
    return name_is(p, n, "trailer") ? H_HOP : H_OTHER;
  case 10:
    if (name_is(p, n, "connection")) return H_CONNECTION;
    return name_is(p, n, "keep-alive") ? H_HOP : H_OTHER;
  case 14:
    if (name_is(p, n, "content-length")) return H_CL;
    return name_is(p, n, "e2b-sandbox-id") ? H_ROUTE : H_OTHER;
  case 15: return name_is(p, n, "x-forwarded-for") ? H_XFF : H_OTHER;
  case 16:
    if (name_is(p, n, "proxy-connection")) return H_HOP;
    return name_is(p, n, "e2b-sandbox-port") ? H_ROUTE : H_OTHER;
  case 17: return name_is(p, n, "transfer-encoding") ? H_TE : H_OTHER;
  case 24: return name_is(p, n, "e2b-traffic-access-token") ? H_TOKEN : H_OTHER;
  default: return H_OTHER;
  }
}

static void trim(const uint8_t *p, size_t *a, size_t *b) {
  while (*a < *b && (p[*a] == ' ' || p[*a] == '\t')) (*a)++;
  while (*b > *a && (p[*b - 1] == ' ' || p[*b - 1] == '\t')) (*b)--;
}

/* http1-head.ts decimal(): OWS, 1-15 digits, OWS; else -1. */
static int64_t decimal(const uint8_t *p, size_t a, size_t b) {
  trim(p, &a, &b);
  if (a == b || b - a > 15) return -1;
  int64_t v = 0;
  for (size_t i = a; i < b; i++) {
    if (p[i] < '0' || p[i] > '9') return -1;
    v = v * 10 + (p[i] - '0');
  }
  return v;
}

static int ieq(const uint8_t *p, size_t n, const char *lc) { return name_is(p, n, lc); }

/* ---------- request head ---------- */

struct req_head {
  uint32_t len;        /* through the blank line */
  uint32_t line_len;   /* request line with its CRLF */
  uint32_t toff, tlen; /* target */
  uint32_t hoff, hlen; /* Host value, trimmed */
  uint32_t idoff, idlen;
  uint32_t tokoff, toklen;
  int has_token, body, port, close, head_method, nxff;
  int64_t clen;
};

/*
 * Parses the request head at p[0..n) (leading blank lines already skipped). Returns 1 when it is
 * accepted, 0 when more bytes are needed, -reason when the connection goes to the TS path.
 */
static int parse_request(const uint8_t *p, size_t n, size_t maxh, struct req_head *h) {
  size_t lim = n < maxh ? n : maxh;
  const uint8_t *e = memmem(p, lim, "\r\n\r\n", 4);
  if (!e) return n >= maxh ? -R_HEAD_TOO_LARGE : 0;
  size_t end = (size_t)(e - p) + 4;
  memset(h, 0, sizeof(*h));
  h->len = (uint32_t)end;
  size_t i = 0;
  while (TOKEN_CH[p[i]]) i++;
  size_t mlen = i;
  if (!mlen || p[i] != ' ') return -R_BAD_HEAD;
  i++;
  h->toff = (uint32_t)i;
  while (VCHAR[p[i]]) i++;
  h->tlen = (uint32_t)(i - h->toff);
  if (!h->tlen || p[i] != ' ') return -R_BAD_HEAD;
  i++;
  if (end - i < 10 || memcmp(p + i, "HTTP/1.1\r\n", 10) != 0) {
    if (end - i >= 10 && mlen == 3 && memcmp(p, "PRI", 3) == 0 && h->tlen == 1 && p[h->toff] == '*' &&
        memcmp(p + i, "HTTP/2.0\r\n", 10) == 0)
      return -R_H2_PREFACE;
    return end - i >= 5 && memcmp(p + i, "HTTP/", 5) == 0 ? -R_VERSION : -R_BAD_HEAD;
  }
  i += 10;
  h->line_len = (uint32_t)i;
  if (p[h->toff] != '/' || (mlen == 7 && memcmp(p, "CONNECT", 7) == 0)) return -R_TARGET;
  h->head_method = mlen == 4 && memcmp(p, "HEAD", 4) == 0;
  size_t stop = end - 2;
  int hosts = 0, cls = 0, tes = 0, toks = 0, named = 0;
  while (i < stop) {
    size_t ns = i;
    while (TOKEN_CH[p[i]]) i++;
    size_t nl = i - ns;
    if (!nl || p[i] != ':') return -R_BAD_HEAD;
    size_t vs = ++i;
    while (VALUE_CH[p[i]]) i++;
    if (p[i] != '\r' || p[i + 1] != '\n') return -R_BAD_HEAD;
    size_t ve = i;
    i += 2;
    switch (header_kind(p + ns, nl)) {
    case H_HOST: {
      hosts++;
      size_t a = vs, b = ve;
      trim(p, &a, &b);
      h->hoff = (uint32_t)a;
      h->hlen = (uint32_t)(b - a);
      break;
    }
    case H_CL:
      cls++;
      h->clen = decimal(p, vs, ve);
      if (h->clen < 0) return -R_FRAMING;
      break;
    case H_TE: {
      tes++;
      size_t a = vs, b = ve;
      trim(p, &a, &b);
      if (!ieq(p + a, b - a, "chunked")) return -R_FRAMING;
      break;
    }
    case H_CONNECTION: {
      size_t a = vs;
      while (a <= ve) {
        size_t b = a;
        while (b < ve && p[b] != ',') b++;
        size_t ta = a, tb = b;
        trim(p, &ta, &tb);
        if (ieq(p + ta, tb - ta, "close")) h->close = 1;
        else if (tb > ta && !ieq(p + ta, tb - ta, "keep-alive")) named = 1;
        a = b + 1;
      }
      break;
    }
    case H_UPGRADE: return -R_UPGRADE;
    case H_EXPECT: return -R_EXPECT;
    case H_ROUTE: return -R_ROUTE_HEADERS;
    case H_TOKEN: {
      toks++;
      size_t a = vs, b = ve;
      trim(p, &a, &b);
      h->has_token = 1;
      h->tokoff = (uint32_t)a;
      h->toklen = (uint32_t)(b - a);
      break;
    }
    case H_XFF: h->nxff++; break;
    default: break;
    }
  }
  /* Connection naming other fields (Upgrade above, or its own): the TS path drops them. */
  if (named) return -R_CONNECTION;
  if (hosts != 1) return -R_HOST;
  if (toks > 1) return -R_TOKEN;
  if (cls > 1 || tes > 1 || (cls && tes)) return -R_FRAMING;
  h->body = tes ? 2 : (cls && h->clen > 0 ? 1 : 0);
  /* route-target.ts: Host `{port}-{sandboxId}.{anything}[:port]` (visible ASCII only here). */
  const uint8_t *hp = p + h->hoff;
  size_t hl = h->hlen;
  if (!hl || hp[0] == '[') return -R_HOST;
  for (size_t k = 0; k < hl; k++)
    if (!VCHAR[hp[k]]) return -R_HOST;
  size_t nameLen = hl;
  for (size_t k = hl; k > 0; k--) {
    if (hp[k - 1] == ':') {
      nameLen = k - 1;
      break;
    }
    if (hp[k - 1] < '0' || hp[k - 1] > '9') break;
  }
  size_t label = 0;
  while (label < nameLen && hp[label] != '.') label++;
  size_t d = 0;
  while (d < label && hp[d] >= '0' && hp[d] <= '9') d++;
  if (d < 1 || d > 5 || d >= label || hp[d] != '-') return -R_HOST;
  int port = 0;
  for (size_t k = 0; k < d; k++) port = port * 10 + (hp[k] - '0');
  if (port < 1 || port > 65535) return -R_HOST;
  size_t ida = d + 1, idl = label - ida;
  if (idl < 1 || idl > 63) return -R_HOST;
  for (size_t k = ida; k < label; k++) {
    int c = hp[k];
    int ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
             (k > ida && (c == '_' || c == '-'));
    if (!ok) return -R_HOST;
  }
  h->port = port;
  h->idoff = (uint32_t)(h->hoff + ida);
  h->idlen = (uint32_t)idl;
  return 1;
}

struct out {
  uint8_t *p;
  size_t n, cap;
  int overflow;
};
static void put(struct out *o, const void *s, size_t n) {
  if (o->n + n > o->cap) {
    o->overflow = 1;
    return;
  }
  memcpy(o->p + o->n, s, n);
  o->n += n;
}
static void puts_(struct out *o, const char *s) { put(o, s, strlen(s)); }

/*
 * The head sent upstream, byte for byte what forward-headers.ts forwardRequestHead builds with
 * upgrade=false for a head this parser accepted. Returns its length, or 0 if it does not fit.
 */
static size_t build_forward(const uint8_t *p, const struct req_head *h, const char *mask, size_t masklen,
                            const char *caddr, size_t calen, uint8_t *dst, size_t cap) {
  struct out o = {dst, 0, cap, 0};
  put(&o, p, h->line_len);
  puts_(&o, "Host: ");
  if (masklen) put(&o, mask, masklen);
  else put(&o, p + h->hoff, h->hlen);
  puts_(&o, "\r\n");
  size_t stop = h->len - 2;
  for (int pass = 0; pass < (h->nxff ? 2 : 1); pass++) {
    size_t i = h->line_len;
    size_t ff_at = 0;
    int ff_seen = 0;
    if (pass == 1) {
      puts_(&o, "X-Forwarded-For: ");
      ff_at = o.n;
    }
    while (i < stop) {
      size_t ns = i;
      const uint8_t *colon = memchr(p + i, ':', stop - i);
      size_t nl = (size_t)(colon - (p + ns));
      const uint8_t *cr = memchr(colon, '\r', (size_t)(p + stop - colon));
      size_t ve = (size_t)(cr - p);
      i = ve + 2;
      int k = header_kind(p + ns, nl);
      if (pass == 0) {
        if (k == H_OTHER || k == H_CL || k == H_TE || k == H_EXPECT) put(&o, p + ns, i - ns);
      } else if (k == H_XFF) {
        size_t a = ns + nl + 1, b = ve;
        trim(p, &a, &b);
        if (ff_seen) puts_(&o, ", ");
        ff_seen = 1;
        put(&o, p + a, b - a);
      }
    }
    if (pass == 1) {
      /* `forwardedFor && client ? ff, client : ff || client`: an empty chain is no header. */
      if (o.n > ff_at) {
        if (calen) {
          puts_(&o, ", ");
          put(&o, caddr, calen);
        }
        puts_(&o, "\r\n");
      } else if (calen) {
        put(&o, caddr, calen);
        puts_(&o, "\r\n");
      } else {
        o.n = ff_at - strlen("X-Forwarded-For: ");
      }
    }
  }
  if (!h->nxff && calen) {
    puts_(&o, "X-Forwarded-For: ");
    put(&o, caddr, calen);
    puts_(&o, "\r\n");
  }
  puts_(&o, "X-Forwarded-Host: ");
  put(&o, p + h->hoff, h->hlen);
  puts_(&o, "\r\nX-Forwarded-Proto: http\r\n");
  if (h->close) puts_(&o, "Connection: close\r\n");
  puts_(&o, "\r\n");
  return o.overflow ? 0 : o.n;
}

/* ---------- response head ---------- */

struct resp_head {
  uint32_t len;
  int status, mode, persistent;
  int64_t clen;
};

/* http1-head.ts parseResponseHead + the framing choice of http1-connection.ts. 1 ok, 0 more, -1 bad. */
static int parse_response(const uint8_t *p, size_t n, size_t maxh, int head_method, struct resp_head *r) {
  size_t lim = n < maxh ? n : maxh;
  const uint8_t *e = memmem(p, lim, "\r\n\r\n", 4);
  if (!e) return n >= maxh ? -1 : 0;
  size_t end = (size_t)(e - p) + 4;
  r->len = (uint32_t)end;
  if (end < 14 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '0' && p[7] != '1') || p[8] != ' ') return -1;
  int minor = p[7] - '0';
  for (int k = 9; k < 12; k++)
    if (p[k] < '0' || p[k] > '9') return -1;
  r->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
  size_t i = 12;
  if (p[i] == ' ') {
    while (p[i] != '\r' && p[i] != '\n') i++;
  }
  if (p[i] != '\r' || p[i + 1] != '\n') return -1;
  i += 2;
  size_t stop = end - 2;
  int64_t clen = -1;
  int te = 0, te_chunked_last = 0, te_chunked_early = 0, conn_close = 0, conn_keep = 0;
  while (i < stop) {
    size_t ns = i;
    while (TOKEN_CH[p[i]]) i++;
    size_t nl = i - ns;
    if (!nl || p[i] != ':') return -1;
    size_t vs = ++i;
    while (VALUE_CH[p[i]]) i++;
    if (p[i] != '\r' || p[i + 1] != '\n') return -1;
    size_t ve = i;
    i += 2;
    int k = header_kind(p + ns, nl);
    if (k == H_CL) {
      int64_t v = decimal(p, vs, ve);
      if (v < 0 || (clen >= 0 && clen != v)) return -1;
      clen = v;
    } else if (k == H_TE || k == H_CONNECTION) {
      size_t a = vs;
      while (a <= ve) {
        size_t b = a;
        while (b < ve && p[b] != ',') b++;
        size_t ta = a, tb = b;
        trim(p, &ta, &tb);
        for (size_t q = ta; q < tb; q++)
          if (p[q] >= 0x80) return -1; /* JS trim() would see whitespace there: refuse, not guess */
        if (k == H_TE) {
          /* codings in order across every TE line; only the last may be chunked */
          if (te_chunked_last) te_chunked_early = 1;
          te = 1;
          te_chunked_last = ieq(p + ta, tb - ta, "chunked");
        } else if (ieq(p + ta, tb - ta, "close")) conn_close = 1;
        else if (ieq(p + ta, tb - ta, "keep-alive")) conn_keep = 1;
        a = b + 1;
      }
    }
  }
  if (te && clen >= 0) return -1;
  if (te && te_chunked_last && te_chunked_early) return -1;
  r->persistent = !conn_close && (minor == 1 || conn_keep);
  r->clen = clen;
  if (head_method || r->status == 204 || r->status == 304) r->mode = F_NONE;
  else if (te && te_chunked_last) r->mode = F_CHUNKED;
  else if (te || clen < 0) r->mode = F_UNTIL_CLOSE;
  else r->mode = clen > 0 ? F_LENGTH : F_NONE;
  return 1;
}

/* ---------- body framing (body-framing.ts) ---------- */

static void fr_start(struct framing *f, int mode, uint64_t len) {
  f->mode = mode == F_LENGTH && len == 0 ? F_NONE : mode;
  f->remaining = mode == F_LENGTH ? len : 0;
  f->state = CK_SIZE;
  f->digits = 0;
  f->line = 0;
}

static int fr_done(const struct framing *f) {
  if (f->mode == F_LENGTH) return f->remaining == 0;
  if (f->mode == F_CHUNKED) return f->state == CK_DONE;
  return f->mode == F_NONE;
}

static int hexv(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Consumes body bytes p[from..n); returns the index after the body's last byte here, -1 if broken. */
static int64_t fr_advance(struct framing *f, const uint8_t *p, size_t from, size_t n) {
  if (f->mode == F_NONE) return (int64_t)from;
  if (f->mode == F_UNTIL_CLOSE) return (int64_t)n;
  if (f->mode == F_LENGTH) {
    uint64_t take = n - from < f->remaining ? n - from : f->remaining;
    f->remaining -= take;
    return (int64_t)(from + take);
  }
  size_t i = from;
  while (i < n) {
    int c = p[i];
    switch (f->state) {
    case CK_SIZE: {
      int v = hexv(c);
      if (v >= 0) {
        if (++f->digits > MAX_SIZE_DIGITS) return -1;
        f->remaining = f->remaining * 16 + (uint64_t)v;
        i++;
        break;
      }
      if (!f->digits) return -1;
      if (c == '\r') f->state = CK_SIZE_LF;
      else if (c == ';' || c == ' ' || c == '\t') f->state = CK_EXT;
      else return -1;
      f->line = (uint32_t)f->digits;
      i++;
      break;
    }
    case CK_EXT:
      if (c == '\r') f->state = CK_SIZE_LF;
      else if (c == '\n' || (c < 32 && c != '\t') || c == 127) return -1;
      else if (++f->line > MAX_LINE) return -1;
      i++;
      break;
    case CK_SIZE_LF:
      if (c != '\n') return -1;
      i++;
      f->digits = 0;
      f->state = f->remaining == 0 ? CK_TR_START : CK_DATA;
      break;
    case CK_DATA: {
      uint64_t take = n - i < f->remaining ? n - i : f->remaining;
      f->remaining -= take;
      i += take;
      if (!f->remaining) f->state = CK_DATA_CR;
      break;
    }
    case CK_DATA_CR:
      if (c != '\r') return -1;
      f->state = CK_DATA_LF;
      i++;
      break;
    case CK_DATA_LF:
      if (c != '\n') return -1;
      f->state = CK_SIZE;
      i++;
      break;
    case CK_TR_START:
      f->line = 0;
      if (c == '\r') f->state = CK_END_LF;
      else if (c == '\n') return -1;
      else f->state = CK_TR;
      i++;
      break;
    case CK_TR:
      if (c == '\r') f->state = CK_TR_LF;
      else if (c == '\n' || (c < 32 && c != '\t') || c == 127) return -1;
      else if (++f->line > MAX_LINE) return -1;
      i++;
      break;
    case CK_TR_LF:
      if (c != '\n') return -1;
      f->state = CK_TR_START;
      i++;
      break;
    case CK_END_LF:
      if (c != '\n') return -1;
      f->state = CK_DONE;
      return (int64_t)(i + 1);
    case CK_DONE: return (int64_t)i;
    }
  }
  return (int64_t)i;
}

/* ---------- small pieces ---------- */

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void st_add(struct thread *t, int slot, uint64_t v) {
  atomic_store_explicit(&t->st[slot], atomic_load_explicit(&t->st[slot], memory_order_relaxed) + v,
                        memory_order_relaxed);
}
static void st_sub(struct thread *t, int slot, uint64_t v) {
  atomic_store_explicit(&t->st[slot], atomic_load_explicit(&t->st[slot], memory_order_relaxed) - v,
                        memory_order_relaxed);
}

static void timer_set(struct dlink *list, struct timer *tm, uint64_t deadline) {
  dl_del(&tm->link);
  tm->deadline = deadline;
  dl_push_back(list, &tm->link);
}
static void timer_clear(struct timer *tm) { dl_del(&tm->link); }

static uint32_t route_hash(const char *id, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)lower(id[i])) * 16777619u;
  return h % ROUTE_BUCKETS;
}

/* Caller holds rt_lock. */
static struct route *route_find(struct relay *r, const char *id, size_t n) {
  for (struct route *x = r->routes[route_hash(id, n)]; x; x = x->next) {
    if (x->idlen != n) continue;
    size_t i = 0;
    while (i < n && lower(id[i]) == x->id[i]) i++;
    if (i == n) return x;
  }
  return NULL;
}

/* Constant time in the given token's content: the work depends only on the expected length. */
static int token_ok(const struct route *x, const uint8_t *given, size_t glen) {
  unsigned diff = (unsigned)(glen != x->toklen);
  for (size_t i = 0; i < x->toklen; i++) diff |= (uint8_t)x->token[i] ^ (i < glen ? given[i] : 0u);
  return diff == 0;
}

static int epoll_add(struct thread *t, int fd, void *tag) {
  struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = tag};
  return epoll_ctl(t->ep, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

static void *buf_get(struct thread *t) {
  if (t->nfree) return t->free_bufs[--t->nfree];
  return malloc((size_t)t->r->cin_cap + t->r->hout_cap + UIN_CAP);
}
static void buf_put(struct thread *t, void *b) {
  if (t->nfree < FREE_BUFS) t->free_bufs[t->nfree++] = b;
  else free(b);
}

static int client_bufs(struct client *c) {
  if (c->bufs) return 1;
  c->bufs = buf_get(c->t);
  if (!c->bufs) return 0;
  c->cin = c->bufs;
  c->hout = c->cin + c->t->r->cin_cap;
  c->uin = c->hout + c->t->r->hout_cap;
  c->cstart = c->cend = c->scan = c->head_len = 0;
  c->ustart = c->uend = c->uscan = c->usearch = 0;
  return 1;
}

static void client_bufs_release(struct client *c) {
  if (!c->bufs) return;
  buf_put(c->t, c->bufs);
  c->bufs = NULL;
  c->cin = c->hout = c->uin = NULL;
}

/* ---------- upstreams ---------- */

static uint32_t pool_bucket(uint32_t ip, uint16_t port) { return ((ip * 2654435761u) ^ port) % POOL_BUCKETS; }

static void upstream_close(struct upstream *u) {
  if (u->dead) return;
  struct thread *t = u->t;
  if (u->state == UP_IDLE) {
    dl_del(&u->pool_link);
    t->pool_n[pool_bucket(u->ip, u->port)]--;
    st_sub(t, ST_UP_IDLE, 1);
  }
  timer_clear(&u->tm);
  close(u->fd);
  u->fd = -1;
  u->dead = 1;
  u->owner = NULL;
  dl_del(&u->all);
  dl_push_back(&t->dead_ups, &u->all);
  st_sub(t, ST_UP_OPEN, 1);
}

static struct upstream *pool_take(struct thread *t, uint32_t ip, uint16_t port, uint64_t gen) {
  struct dlink *b = &t->pool[pool_bucket(ip, port)];
  for (struct dlink *n = b->next; n != b; n = n->next) {
    struct upstream *u = container_of(n, struct upstream, pool_link);
    if (u->ip != ip || u->port != port || u->gen != gen) continue;
    dl_del(&u->pool_link);
    t->pool_n[pool_bucket(ip, port)]--;
    st_sub(t, ST_UP_IDLE, 1);
    timer_clear(&u->tm);
    u->state = UP_ACTIVE;
    return u;
  }
  return NULL;
}

static void pool_put(struct upstream *u) {
  struct thread *t = u->t;
  u->owner = NULL;
  uint32_t bi = pool_bucket(u->ip, u->port);
  if (u->eof || t->pool_n[bi] >= MAX_IDLE_PER_BUCKET || t->r->up_idle_ms == 0) {
    upstream_close(u);
    return;
  }
  if (u->can_read) {
    /* Readiness not drained yet: bytes or a FIN an idle connection cannot explain are not pooled. */
    uint8_t b;
    ssize_t n = recv(u->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
      upstream_close(u);
      return;
    }
    u->can_read = 0;
  }
  u->state = UP_IDLE;
  dl_push_front(&t->pool[bi], &u->pool_link);
  t->pool_n[bi]++;
  st_add(t, ST_UP_IDLE, 1);
  timer_set(&t->t_pool, &u->tm, t->now + t->r->up_idle_ms);
}

/* Opens a connection for c's exchange; 0 when started, -errno when it failed at once. */
static int upstream_open(struct client *c) {
  struct thread *t = c->t;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(c->port), .sin_addr.s_addr = htonl(c->ip)};
  st_add(t, ST_UP_CONNECTS, 1);
  int rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
  if (rc < 0 && errno != EINPROGRESS) {
    int e = errno;
    close(fd);
    st_add(t, ST_UP_CONNECT_FAILS, 1);
    return -e;
  }
  struct upstream *u = calloc(1, sizeof(*u));
  if (!u) {
    close(fd);
    return -ENOMEM;
  }
  u->kind = K_UPSTREAM;
  u->fd = fd;
  u->t = t;
  u->ip = c->ip;
  u->port = c->port;
  u->gen = c->gen;
  u->owner = c;
  u->state = rc == 0 ? UP_ACTIVE : UP_CONNECTING;
  u->can_write = rc == 0;
  int ae = epoll_add(t, fd, u);
  if (ae < 0) {
    close(fd);
    free(u);
    st_add(t, ST_UP_CONNECT_FAILS, 1);
    return ae;
  }
  dl_push_back(&t->upstreams, &u->all);
  st_add(t, ST_UP_OPEN, 1);
  if (rc != 0) timer_set(&t->t_connect, &u->tm, t->now + t->r->connect_ms);
  c->up = u;
  c->reused_up = 0;
  c->rq = rc == 0 ? RQ_SEND : RQ_CONNECT;
  return 0;
}

/* ---------- clients ---------- */

static void client_free_later(struct client *c) {
  c->dead = 1;
  timer_clear(&c->tm);
  timer_clear(&c->resp_tm);
  dl_del(&c->again_link);
  dl_del(&c->all);
  dl_push_back(&c->t->dead_clients, &c->all);
  client_bufs_release(c);
  st_sub(c->t, ST_OPEN, 1);
}

/* Closes the client and its upstream now (an error, a cut, an idle timeout). */
static void client_close(struct client *c) {
  if (c->dead) return;
  if (c->up) upstream_close(c->up);
  c->up = NULL;
  close(c->fd);
  c->fd = -1;
  client_free_later(c);
}

/* Ends the connection after everything was written: FIN, then read and drop until the peer's FIN. */
static void client_finish(struct client *c) {
  if (c->up) upstream_close(c->up);
  c->up = NULL;
  if (c->eof) {
    client_close(c);
    return;
  }
  shutdown(c->fd, SHUT_WR);
  c->linger = 1;
  client_bufs_release(c);
  timer_clear(&c->resp_tm);
  timer_set(&c->t->t_linger, &c->tm, c->t->now + LINGER_MS);
  c->can_read = 1;
}

static void handoff(struct client *c, int reason) {
  struct thread *t = c->t;
  struct relay *r = t->r;
  if (c->up) upstream_close(c->up);
  c->up = NULL;
  uint64_t len = c->bufs ? c->cend - c->cstart : 0;
  struct handoff *ho = malloc(sizeof(*ho) + len);
  if (!ho) {
    client_close(c);
    return;
  }
  epoll_ctl(t->ep, EPOLL_CTL_DEL, c->fd, NULL);
  ho->next = NULL;
  ho->fd = c->fd;
  ho->reason = reason;
  ho->len = len;
  if (len) memcpy(ho->bytes, c->cin + c->cstart, len);
  c->fd = -1;
  st_add(t, ST_HANDOFFS, 1);
  st_add(t, ST_HANDOFF_REASON + reason - 1, 1);
  client_free_later(c);
  pthread_mutex_lock(&r->hq_lock);
  if (r->hq_tail) r->hq_tail->next = ho;
  else r->hq_head = ho;
  r->hq_tail = ho;
  pthread_mutex_unlock(&r->hq_lock);
  uint64_t one = 1;
  ssize_t w = write(r->notify_fd, &one, sizeof(one));
  (void)w;
}

/* An upstream failure: a bodiless request on a reused connection goes once more, else the client is cut. */
static void upstream_failed(struct client *c, int err) {
  if (!c->resp_started && c->reused_up && !c->retried && c->bodiless &&
      (err == 0 || err == ECONNRESET || err == EPIPE)) {
    upstream_close(c->up);
    c->up = NULL;
    c->retried = 1;
    c->hout_off = 0;
    st_add(c->t, ST_RETRIES, 1);
    if (upstream_open(c) < 0) handoff(c, R_CONNECT_FAILED);
    return;
  }
  st_add(c->t, ST_UP_ERRORS, 1);
  client_close(c);
}

static void compact_cin(struct client *c) {
  if (c->cstart == c->cend) {
    c->cstart = c->cend = c->scan = 0;
    return;
  }
  if (c->cstart == 0) return;
  uint32_t d = c->cstart;
  memmove(c->cin, c->cin + d, c->cend - d);
  c->cend -= d;
  c->scan -= d;
  c->cstart = 0;
}

static int client_read(struct client *c) {
  if (!c->can_read || c->eof) return 0;
  if (c->linger) {
    ssize_t n = read(c->fd, c->t->drain, sizeof(c->t->drain));
    if (n > 0) return 1;
    if (n < 0 && errno == EINTR) return 1;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      c->can_read = 0;
      return 0;
    }
    client_close(c);
    return 0;
  }
  if (!client_bufs(c)) return 0;
  uint32_t cap = c->t->r->cin_cap;
  /* Read ahead of the exchange in progress is bounded like the TS path's (64 KiB). */
  if (c->rq != RQ_HEAD && c->rq != RQ_SEND && c->rq != RQ_DISCARD && c->cend - c->cstart >= READ_AHEAD) return 0;
  if (c->cend == cap) compact_cin(c);
  if (c->cend == cap) return 0;
  size_t space = cap - c->cend;
  ssize_t n = read(c->fd, c->cin + c->cend, space);
  if (n > 0) {
    c->cend += (uint32_t)n;
    if ((size_t)n < space && !c->hup) c->can_read = 0;
    if (c->rq == RQ_HEAD) timer_set(&c->t->t_idle, &c->tm, c->t->now + c->t->r->idle_ms);
    return 1;
  }
  if (n == 0) {
    c->eof = 1;
    c->can_read = 0;
    return 1;
  }
  if (errno == EINTR) return 1;
  if (errno == EAGAIN || errno == EWOULDBLOCK) {
    c->can_read = 0;
    return 0;
  }
  client_close(c);
  return 0;
}

/* Between exchanges: parse the next head and start forwarding it, or hand the connection off. */
static int start_request(struct client *c) {
  struct relay *r = c->t->r;
  if (!c->bufs) {
    if (c->eof) client_close(c);
    return 0;
  }
  while (c->cstart + 1 < c->cend && c->cin[c->cstart] == '\r' && c->cin[c->cstart + 1] == '\n') c->cstart += 2;
  if (c->cstart == c->cend) {
    if (c->eof) client_close(c);
    return 0;
  }
  struct req_head h;
  const uint8_t *p = c->cin + c->cstart;
  int pr = parse_request(p, c->cend - c->cstart, r->max_head, &h);
  if (pr == 0) {
    /* A head cut by the client's FIN: closed, as the TS path does. */
    if (c->eof) client_close(c);
    return 0;
  }
  if (pr < 0) {
    handoff(c, -pr);
    return 0;
  }
  pthread_rwlock_rdlock(&r->rt_lock);
  struct route *x = route_find(r, (const char *)p + h.idoff, h.idlen);
  int reason = 0;
  if (!x) reason = R_NO_ROUTE;
  else if (x->opaque_token || (x->toklen && (!h.has_token || !token_ok(x, p + h.tokoff, h.toklen))))
    reason = R_TOKEN;
  if (!reason) {
    c->hout_len = (uint32_t)build_forward(p, &h, x->mask, x->masklen, c->caddr, c->caddr_len, c->hout, r->hout_cap);
    c->ip = x->ip;
    c->gen = x->gen;
    if (!c->hout_len) reason = R_HEAD_TOO_LARGE;
  }
  pthread_rwlock_unlock(&r->rt_lock);
  if (reason) {
    handoff(c, reason);
    return 0;
  }
  c->port = (uint16_t)h.port;
  c->head_len = h.len;
  c->scan = c->cstart + h.len;
  c->hout_off = 0;
  c->bodiless = h.body == 0;
  c->head_method = (uint8_t)h.head_method;
  c->close_after = (uint8_t)h.close;
  c->retried = c->resp_started = c->counted = 0;
  c->reusable = 0;
  fr_start(&c->rqf, h.body == 2 ? F_CHUNKED : h.body == 1 ? F_LENGTH : F_NONE, (uint64_t)(h.clen > 0 ? h.clen : 0));
  c->rs = RS_HEAD;
  c->ustart = c->uend = c->uscan = c->usearch = 0;
  timer_clear(&c->tm);
  struct upstream *u = pool_take(c->t, c->ip, c->port, c->gen);
  if (u) {
    u->owner = c;
    c->up = u;
    c->reused_up = 1;
    c->rq = RQ_SEND;
    st_add(c->t, ST_POOL_REUSES, 1);
    return 1;
  }
  if (upstream_open(c) < 0) {
    c->rs = RS_NONE;
    handoff(c, R_CONNECT_FAILED);
    return 0;
  }
  return 1;
}

/* Forwards the head and the body bytes read so far (or drops them after an early answer). */
static int request_send(struct client *c) {
  if (!fr_done(&c->rqf) && c->scan < c->cend) {
    int64_t e = fr_advance(&c->rqf, c->cin, c->scan, c->cend);
    if (e < 0) {
      st_add(c->t, ST_FRAMING_ERRORS, 1);
      client_close(c);
      return 0;
    }
    c->scan = (uint32_t)e;
  }
  if (c->rq == RQ_DISCARD) {
    int moved = c->cstart != c->scan;
    c->cstart = c->scan;
    if (fr_done(&c->rqf)) {
      c->rq = RQ_SENT;
      return 1;
    }
    if (c->eof) client_close(c);
    return moved;
  }
  struct upstream *u = c->up;
  if (!u || u->state != UP_ACTIVE || !u->can_write) return 0;
  struct iovec iov[2];
  int n = 0;
  size_t hrem = c->hout_len - c->hout_off;
  if (hrem) iov[n++] = (struct iovec){c->hout + c->hout_off, hrem};
  uint32_t body_at = c->cstart + c->head_len;
  size_t brem = c->scan - body_at;
  if (brem) iov[n++] = (struct iovec){c->cin + body_at, brem};
  if (n) {
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
    ssize_t w = sendmsg(u->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) return 1;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        u->can_write = 0;
        return 0;
      }
      if (c->resp_started) {
        /* The answer is on its way (an early 413, say): the rest of the body is dropped. */
        c->rq = RQ_DISCARD;
        c->reusable = 0;
        if (c->head_len) c->cstart += c->head_len, c->head_len = 0;
        return 1;
      }
      upstream_failed(c, errno);
      return 0;
    }
    if ((size_t)w < hrem + brem) u->can_write = 0;
    st_add(c->t, ST_BYTES_UP, (uint64_t)w);
    size_t hw = (size_t)w < hrem ? (size_t)w : hrem;
    c->hout_off += (uint32_t)hw;
    if (hrem && c->hout_off == c->hout_len) {
      if (!c->counted) st_add(c->t, ST_REQUESTS, 1);
      c->counted = 1;
      /* A bodiless head stays in cin until the answer starts: a reset pooled connection re-sends
       * it, or hands it off if the fresh connect fails. A head with a body is committed now. */
      if (!c->bodiless) c->cstart += c->head_len, c->head_len = 0;
    }
    c->cstart += (uint32_t)((size_t)w - hw);
  }
  if (c->hout_off == c->hout_len && fr_done(&c->rqf) && c->cstart + c->head_len == c->scan) {
    c->rq = RQ_SENT;
    if (c->t->r->resp_ms && !c->resp_started) timer_set(&c->t->t_resp, &c->resp_tm, c->t->now + c->t->r->resp_ms);
    return 1;
  }
  if (c->eof && c->scan == c->cend && !fr_done(&c->rqf)) {
    /* The body was cut short: the request cannot complete. */
    client_close(c);
    return 0;
  }
  return n > 0;
}

static void count_status(struct thread *t, int status) {
  int cls = status / 100;
  if (cls >= 1 && cls <= 5) st_add(t, ST_1XX + cls - 1, 1);
}

/* Classifies response bytes uin[uscan, uend): heads (1xx passed on) and body, up to its end. */
static void response_bytes(struct client *c) {
  struct relay *r = c->t->r;
  for (;;) {
    if (c->rs == RS_HEAD) {
      if (c->uscan == c->uend) return;
      struct resp_head rh;
      int pr = parse_response(c->uin + c->uscan, c->uend - c->uscan, r->max_head, c->head_method, &rh);
      if (pr == 0) return;
      if (pr < 0 || rh.status == 101) {
        st_add(c->t, ST_UP_ERRORS, 1);
        client_close(c);
        return;
      }
      count_status(c->t, rh.status);
      c->uscan += rh.len;
      if (rh.status >= 100 && rh.status < 200) continue; /* 100 Continue and the like: passed on */
      c->reusable = (uint8_t)(rh.persistent && rh.mode != F_UNTIL_CLOSE);
      if (!rh.persistent || rh.mode == F_UNTIL_CLOSE) c->close_after = 1;
      fr_start(&c->rsf, rh.mode, (uint64_t)(rh.clen > 0 ? rh.clen : 0));
      c->rs = RS_BODY;
    }
    if (!fr_done(&c->rsf) && c->uscan < c->uend) {
      int64_t e = fr_advance(&c->rsf, c->uin, c->uscan, c->uend);
      if (e < 0) {
        st_add(c->t, ST_UP_ERRORS, 1);
        client_close(c);
        return;
      }
      c->uscan = (uint32_t)e;
    }
    if (fr_done(&c->rsf) && c->uscan < c->uend) {
      /* Bytes after a complete response: the guest broke framing; not reused, the bytes dropped. */
      c->reusable = 0;
      c->uend = c->uscan;
    }
    return;
  }
}

static int upstream_read(struct client *c) {
  struct upstream *u = c->up;
  if (!u || u->state != UP_ACTIVE || !u->can_read || u->eof) return 0;
  if (c->rs == RS_BODY && fr_done(&c->rsf)) return 0;
  if (c->ustart == c->uend) c->ustart = c->uend = c->uscan = 0;
  if (c->uend == UIN_CAP && c->ustart > 0) {
    uint32_t d = c->ustart;
    memmove(c->uin, c->uin + d, c->uend - d);
    c->uend -= d;
    c->uscan -= d;
    c->ustart = 0;
  }
  if (c->uend == UIN_CAP) {
    if (c->rs == RS_HEAD && c->uscan == c->ustart) {
      /* A response head larger than the buffer: nothing can be passed on. */
      st_add(c->t, ST_UP_ERRORS, 1);
      client_close(c);
    }
    return 0;
  }
  size_t space = UIN_CAP - c->uend;
  ssize_t n = read(u->fd, c->uin + c->uend, space);
  if (n > 0) {
    if ((size_t)n < space && !u->hup) u->can_read = 0;
    c->uend += (uint32_t)n;
    if (!c->resp_started) {
      c->resp_started = 1;
      timer_clear(&c->resp_tm);
      if (c->head_len) c->cstart += c->head_len, c->head_len = 0;
    }
    response_bytes(c);
    return 1;
  }
  if (n < 0 && errno == EINTR) return 1;
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
    u->can_read = 0;
    return 0;
  }
  int err = n == 0 ? 0 : errno;
  u->eof = 1;
  u->can_read = 0;
  if (n == 0 && c->rs == RS_BODY && c->rsf.mode == F_UNTIL_CLOSE) {
    /* The body that ends at close has ended. */
    c->rsf.mode = F_NONE;
    c->reusable = 0;
    c->close_after = 1;
    return 1;
  }
  upstream_failed(c, err);
  return 0;
}

static int client_write(struct client *c) {
  if (!c->bufs || c->ustart == c->uscan || !c->can_write) return 0;
  size_t len = c->uscan - c->ustart;
  ssize_t w = send(c->fd, c->uin + c->ustart, len, MSG_NOSIGNAL | MSG_DONTWAIT);
  if (w < 0) {
    if (errno == EINTR) return 1;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      c->can_write = 0;
      return 0;
    }
    client_close(c);
    return 0;
  }
  if ((size_t)w < len) c->can_write = 0;
  c->ustart += (uint32_t)w;
  st_add(c->t, ST_BYTES_DOWN, (uint64_t)w);
  return 1;
}

/* The exchange ends when the whole response reached the client and the request is sent or dropped. */
static int exchange_check(struct client *c) {
  if (c->rs != RS_BODY || !fr_done(&c->rsf) || c->ustart != c->uscan) return 0;
  if (c->rq != RQ_SENT) {
    if (c->rq == RQ_DISCARD) return 0;
    /* Answered before the whole body came: the rest is read and dropped; the upstream, which saw
     * only part of the request, is closed. */
    if (c->up) upstream_close(c->up);
    c->up = NULL;
    if (c->head_len) c->cstart += c->head_len, c->head_len = 0;
    c->rq = RQ_DISCARD;
    return 1;
  }
  struct upstream *u = c->up;
  c->up = NULL;
  if (u) {
    if (c->reusable) pool_put(u);
    else upstream_close(u);
  }
  timer_clear(&c->resp_tm);
  c->rs = RS_NONE;
  c->rq = RQ_HEAD;
  c->ustart = c->uend = c->uscan = 0;
  if (c->close_after || c->eof) {
    client_finish(c);
    return 0;
  }
  timer_set(&c->t->t_idle, &c->tm, c->t->now + c->t->r->idle_ms);
  return 1;
}

static void pump(struct client *c) {
  if (c->dead || c->in_pump) return;
  c->in_pump = 1;
  int rounds = 0;
  for (;;) {
    int progress = client_read(c);
    if (c->dead) break;
    if (!c->linger) {
      if (c->rq == RQ_HEAD && c->rs == RS_NONE) {
        progress |= start_request(c);
        if (c->dead) break;
      }
      if (c->rq == RQ_SEND || c->rq == RQ_DISCARD) {
        progress |= request_send(c);
        if (c->dead) break;
      }
      if (c->rs != RS_NONE) {
        progress |= upstream_read(c);
        if (c->dead) break;
        progress |= client_write(c);
        if (c->dead) break;
        progress |= exchange_check(c);
        if (c->dead) break;
        if (c->linger) progress = 1; /* drain what the client still sends, then close */
      }
    }
    if (!progress) break;
    if (++rounds == PUMP_ROUNDS) {
      /* Others wait too: go on after this batch of events. */
      if (!dl_on(&c->again_link)) dl_push_back(&c->t->again, &c->again_link);
      break;
    }
  }
  c->in_pump = 0;
  if (!c->dead && !c->linger && c->rq == RQ_HEAD && c->rs == RS_NONE && c->bufs && c->cstart == c->cend)
    client_bufs_release(c);
}

static void client_adopt(struct thread *t, int fd, uint32_t ip) {
  struct client *c = calloc(1, sizeof(*c));
  if (!c) {
    close(fd);
    return;
  }
  c->kind = K_CLIENT;
  c->fd = fd;
  c->t = t;
  if (ip) {
    c->caddr_len = (uint32_t)snprintf(c->caddr, sizeof(c->caddr), "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 255,
                                      (ip >> 8) & 255, ip & 255);
  }
  if (epoll_add(t, fd, c) < 0) {
    close(fd);
    free(c);
    return;
  }
  dl_push_back(&t->clients, &c->all);
  st_add(t, ST_ADOPTED, 1);
  st_add(t, ST_OPEN, 1);
  timer_set(&t->t_idle, &c->tm, t->now + t->r->idle_ms);
}

/* ---------- thread loop ---------- */

static void drop_ip(struct thread *t, uint32_t ip) {
  for (int b = 0; b < POOL_BUCKETS; b++) {
    struct dlink *h = &t->pool[b];
    for (struct dlink *n = h->next; n != h;) {
      struct upstream *u = container_of(n, struct upstream, pool_link);
      n = n->next;
      if (u->ip == ip) upstream_close(u);
    }
  }
}

static void run_commands(struct thread *t) {
  uint64_t v;
  ssize_t rd = read(t->wake_fd, &v, sizeof(v));
  (void)rd;
  /* The whole queue at once (an accept burst is thousands of fds); the array is kept for reuse. */
  pthread_mutex_lock(&t->qlock);
  struct cmd *q = t->q;
  size_t n = t->qn, cap = t->qcap;
  t->q = NULL;
  t->qn = t->qcap = 0;
  pthread_mutex_unlock(&t->qlock);
  for (size_t i = 0; i < n; i++) {
    if (q[i].kind == CMD_ADOPT) client_adopt(t, q[i].fd, q[i].ip);
    else drop_ip(t, q[i].ip);
  }
  pthread_mutex_lock(&t->qlock);
  if (!t->q && q) {
    t->q = q;
    t->qcap = cap;
    q = NULL;
  }
  pthread_mutex_unlock(&t->qlock);
  free(q);
}

static void upstream_event(struct upstream *u, uint32_t ev) {
  if (u->dead) return;
  if (ev & EPOLLOUT) u->can_write = 1;
  if (u->state == UP_IDLE) {
    /* Bytes, a FIN or an error on an idle connection: it cannot serve the next request. */
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) upstream_close(u);
    return;
  }
  struct client *c = u->owner;
  if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) u->hup = 1;
  if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) u->can_read = 1;
  if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) u->can_write = 1;
  if (u->state == UP_CONNECTING) {
    if (!(ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))) return;
    int err = 0;
    socklen_t sl = sizeof(err);
    if (getsockopt(u->fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0) err = errno;
    if (err) {
      st_add(u->t, ST_UP_CONNECT_FAILS, 1);
      upstream_close(u);
      c->up = NULL;
      c->rs = RS_NONE;
      handoff(c, R_CONNECT_FAILED);
      return;
    }
    timer_clear(&u->tm);
    u->state = UP_ACTIVE;
    c->rq = RQ_SEND;
  }
  if (c) pump(c);
}

static void client_event(struct client *c, uint32_t ev) {
  if (c->dead) return;
  if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) c->hup = 1;
  if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) c->can_read = 1;
  if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) c->can_write = 1;
  pump(c);
}

/* The first timer of a deadline-ordered list if it is due, else NULL. */
static struct timer *due(struct dlink *l, uint64_t now) {
  if (dl_empty(l)) return NULL;
  struct timer *tm = container_of(l->next, struct timer, link);
  return tm->deadline <= now ? tm : NULL;
}

static void expire(struct thread *t) {
  uint64_t now = t->now;
  struct timer *tm;
  while ((tm = due(&t->t_idle, now))) {
    struct client *c = container_of(tm, struct client, tm);
    timer_clear(&c->tm);
    st_add(t, ST_IDLE_CLOSES, 1);
    client_close(c);
  }
  while ((tm = due(&t->t_linger, now))) client_close(container_of(tm, struct client, tm));
  while ((tm = due(&t->t_resp, now))) {
    struct client *c = container_of(tm, struct client, resp_tm);
    timer_clear(&c->resp_tm);
    st_add(t, ST_UP_ERRORS, 1);
    client_close(c);
  }
  while ((tm = due(&t->t_pool, now))) upstream_close(container_of(tm, struct upstream, tm));
  while ((tm = due(&t->t_connect, now))) {
    struct upstream *u = container_of(tm, struct upstream, tm);
    struct client *c = u->owner;
    st_add(t, ST_UP_CONNECT_FAILS, 1);
    upstream_close(u);
    if (c) {
      c->up = NULL;
      c->rs = RS_NONE;
      handoff(c, R_CONNECT_TIMEOUT);
    }
  }
}

static int next_timeout(struct thread *t) {
  if (!dl_empty(&t->again)) return 0;
  uint64_t best = UINT64_MAX;
  struct dlink *lists[] = {&t->t_idle, &t->t_linger, &t->t_resp, &t->t_pool, &t->t_connect};
  for (size_t i = 0; i < sizeof(lists) / sizeof(lists[0]); i++) {
    if (dl_empty(lists[i])) continue;
    uint64_t d = container_of(lists[i]->next, struct timer, link)->deadline;
    if (d < best) best = d;
  }
  if (best == UINT64_MAX) return -1;
  /* Coarse clock: wake a little after the deadline rather than spin before it. */
  return best <= t->now ? 0 : (int)(best - t->now + 5 > 600000 ? 600000 : best - t->now + 5);
}

static void reap(struct thread *t) {
  while (!dl_empty(&t->dead_clients)) {
    struct dlink *n = t->dead_clients.next;
    dl_del(n);
    free(container_of(n, struct client, all));
  }
  while (!dl_empty(&t->dead_ups)) {
    struct dlink *n = t->dead_ups.next;
    dl_del(n);
    free(container_of(n, struct upstream, all));
  }
}

static void *thread_main(void *arg) {
  struct thread *t = arg;
  struct epoll_event evs[64];
  while (!atomic_load(&t->r->stop)) {
    t->now = now_ms();
    int n = epoll_wait(t->ep, evs, 64, next_timeout(t));
    t->now = now_ms();
    for (int i = 0; i < n; i++) {
      int kind = *(int *)evs[i].data.ptr;
      if (kind == K_CLIENT) client_event(evs[i].data.ptr, evs[i].events);
      else if (kind == K_UPSTREAM) upstream_event(evs[i].data.ptr, evs[i].events);
      else run_commands(t);
    }
    if (!dl_empty(&t->again)) {
      /* Moved to a local list first: a client pumped here may queue itself for the next round. */
      struct dlink again = {.prev = t->again.prev, .next = t->again.next};
      again.next->prev = &again;
      again.prev->next = &again;
      dl_init(&t->again);
      while (!dl_empty(&again)) {
        struct client *c = container_of(again.next, struct client, again_link);
        dl_del(&c->again_link);
        pump(c);
      }
    }
    expire(t);
    reap(t);
  }
  return NULL;
}

/* ---------- API ---------- */

static void thread_free(struct thread *t) {
  while (!dl_empty(&t->clients)) {
    struct client *c = container_of(t->clients.next, struct client, all);
    if (c->up) upstream_close(c->up);
    c->up = NULL;
    close(c->fd);
    client_free_later(c);
  }
  while (!dl_empty(&t->upstreams)) upstream_close(container_of(t->upstreams.next, struct upstream, all));
  reap(t);
  for (size_t i = 0; i < t->qn; i++)
    if (t->q[i].kind == CMD_ADOPT) close(t->q[i].fd);
  free(t->q);
  while (t->nfree) free(t->free_bufs[--t->nfree]);
  if (t->ep >= 0) close(t->ep);
  if (t->wake_fd >= 0) close(t->wake_fd);
  pthread_mutex_destroy(&t->qlock);
}

static void relay_free(struct relay *r) {
  for (int i = 0; i < r->nthreads; i++) thread_free(&r->threads[i]);
  for (int b = 0; b < ROUTE_BUCKETS; b++) {
    for (struct route *x = r->routes[b]; x;) {
      struct route *nx = x->next;
      free(x->token);
      free(x->mask);
      free(x);
      x = nx;
    }
  }
  for (struct handoff *ho = r->hq_head; ho;) {
    struct handoff *nx = ho->next;
    close(ho->fd);
    free(ho);
    ho = nx;
  }
  if (r->notify_fd >= 0) close(r->notify_fd);
  pthread_rwlock_destroy(&r->rt_lock);
  pthread_mutex_destroy(&r->hq_lock);
  free(r);
}

static void stop_threads(struct relay *r) {
  atomic_store(&r->stop, 1);
  for (int i = 0; i < r->nthreads; i++) {
    struct thread *t = &r->threads[i];
    if (!t->started) continue;
    uint64_t one = 1;
    ssize_t w = write(t->wake_fd, &one, sizeof(one));
    (void)w;
    pthread_join(t->th, NULL);
    t->started = 0;
  }
}

int64_t sbx_relay_create(const int64_t *params) {
  pthread_once(&tables_once, init_tables);
  int64_t nthreads = params[0];
  if (nthreads < 1 || nthreads > MAX_THREADS || params[1] <= 0 || params[2] <= 0 || params[3] < 0 ||
      params[4] < 1024 || params[4] > 1024 * 1024 || params[5] < 0)
    return -EINVAL;
  struct relay *r = calloc(1, sizeof(*r));
  if (!r) return -ENOMEM;
  r->nthreads = (int)nthreads;
  r->idle_ms = (uint64_t)params[1];
  r->connect_ms = (uint64_t)params[2];
  r->up_idle_ms = (uint64_t)params[3];
  r->max_head = (uint32_t)params[4];
  r->resp_ms = (uint64_t)params[5];
  r->cin_cap = r->max_head + READ_AHEAD;
  r->hout_cap = 2 * r->max_head + MAX_MASK + 256;
  pthread_rwlock_init(&r->rt_lock, NULL);
  pthread_mutex_init(&r->hq_lock, NULL);
  r->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  int err = r->notify_fd < 0 ? -errno : 0;
  for (int i = 0; i < r->nthreads; i++) {
    struct thread *t = &r->threads[i];
    t->kind = K_WAKE;
    t->r = r;
    pthread_mutex_init(&t->qlock, NULL);
    dl_init(&t->clients);
    dl_init(&t->upstreams);
    dl_init(&t->again);
    dl_init(&t->dead_clients);
    dl_init(&t->dead_ups);
    dl_init(&t->t_idle);
    dl_init(&t->t_linger);
    dl_init(&t->t_connect);
    dl_init(&t->t_pool);
    dl_init(&t->t_resp);
    for (int b = 0; b < POOL_BUCKETS; b++) dl_init(&t->pool[b]);
    t->ep = epoll_create1(EPOLL_CLOEXEC);
    t->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (t->ep < 0 || t->wake_fd < 0) {
      if (!err) err = -errno;
      continue;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = t};
    if (epoll_ctl(t->ep, EPOLL_CTL_ADD, t->wake_fd, &ev) < 0 && !err) err = -errno;
  }
  for (int i = 0; i < r->nthreads && !err; i++) {
    struct thread *t = &r->threads[i];
    int e = pthread_create(&t->th, NULL, thread_main, t);
    if (e) err = -e;
    else t->started = 1;
  }
  if (err) {
    stop_threads(r);
    relay_free(r);
    return err;
  }
  return (int64_t)(uintptr_t)r;
}

int64_t sbx_relay_notify_fd(int64_t h) { return ((struct relay *)(uintptr_t)h)->notify_fd; }

static int valid_id(const char *id, size_t n) {
  if (n < 1 || n > 63) return 0;
  for (size_t k = 0; k < n; k++) {
    int c = (uint8_t)id[k];
    int ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
             (k > 0 && (c == '_' || c == '-'));
    if (!ok) return 0;
  }
  return 1;
}

static void broadcast_drop(struct relay *r, uint32_t ip) {
  for (int i = 0; i < r->nthreads; i++) {
    struct thread *t = &r->threads[i];
    pthread_mutex_lock(&t->qlock);
    if (t->qn == t->qcap) {
      size_t cap = t->qcap ? t->qcap * 2 : 16;
      struct cmd *q = realloc(t->q, cap * sizeof(*q));
      if (!q) {
        pthread_mutex_unlock(&t->qlock);
        continue; /* idle ones expire anyway, and a changed route never matches them (gen) */
      }
      t->q = q;
      t->qcap = cap;
    }
    t->q[t->qn++] = (struct cmd){CMD_DROP_IP, -1, ip};
    pthread_mutex_unlock(&t->qlock);
    uint64_t one = 1;
    ssize_t w = write(t->wake_fd, &one, sizeof(one));
    (void)w;
  }
}

int64_t sbx_relay_route_set(int64_t h, const char *sandbox_id, uint32_t ip, const char *token, const char *mask) {
  struct relay *r = (struct relay *)(uintptr_t)h;
  size_t n = strlen(sandbox_id), tl = token ? strlen(token) : 0, ml = mask ? strlen(mask) : 0;
  if (!valid_id(sandbox_id, n) || tl > MAX_TOKEN || ml > MAX_MASK || ip == 0) return -EINVAL;
  /* The mask goes into a header line: visible ASCII only. */
  for (size_t k = 0; k < ml; k++)
    if (!VCHAR[(uint8_t)mask[k]]) return -EINVAL;
  char *tok = tl ? malloc(tl) : NULL, *msk = ml ? malloc(ml) : NULL;
  if ((tl && !tok) || (ml && !msk)) {
    free(tok);
    free(msk);
    return -ENOMEM;
  }
  if (tl) memcpy(tok, token, tl);
  if (ml) memcpy(msk, mask, ml);
  pthread_rwlock_wrlock(&r->rt_lock);
  struct route *x = route_find(r, sandbox_id, n);
  uint32_t old_ip = 0;
  if (!x) {
    x = calloc(1, sizeof(*x));
    if (!x) {
      pthread_rwlock_unlock(&r->rt_lock);
      free(tok);
      free(msk);
      return -ENOMEM;
    }
    for (size_t k = 0; k < n; k++) x->id[k] = (char)lower((uint8_t)sandbox_id[k]);
    x->idlen = (uint32_t)n;
    uint32_t b = route_hash(sandbox_id, n);
    x->next = r->routes[b];
    r->routes[b] = x;
    x->gen = ++r->rt_gen;
  } else if (x->ip != ip) {
    old_ip = x->ip;
    x->gen = ++r->rt_gen;
  }
  x->ip = ip;
  free(x->token);
  free(x->mask);
  x->token = tok;
  x->toklen = (uint32_t)tl;
  x->opaque_token = 0;
  for (size_t k = 0; k < tl; k++)
    if ((uint8_t)tok[k] < 0x20 || (uint8_t)tok[k] > 0x7e) x->opaque_token = 1;
  x->mask = msk;
  x->masklen = (uint32_t)ml;
  pthread_rwlock_unlock(&r->rt_lock);
  if (old_ip) broadcast_drop(r, old_ip);
  return 0;
}

int64_t sbx_relay_route_delete(int64_t h, const char *sandbox_id) {
  struct relay *r = (struct relay *)(uintptr_t)h;
  size_t n = strlen(sandbox_id);
  pthread_rwlock_wrlock(&r->rt_lock);
  uint32_t b = route_hash(sandbox_id, n);
  struct route **pp = &r->routes[b], *x = NULL;
  while (*pp) {
    struct route *y = *pp;
    size_t i = 0;
    if (y->idlen == n)
      while (i < n && lower((uint8_t)sandbox_id[i]) == y->id[i]) i++;
    if (y->idlen == n && i == n) {
      x = y;
      *pp = y->next;
      break;
    }
    pp = &y->next;
  }
  pthread_rwlock_unlock(&r->rt_lock);
  if (!x) return -ENOENT;
  uint32_t ip = x->ip;
  free(x->token);
  free(x->mask);
  free(x);
  broadcast_drop(r, ip);
  return 0;
}

int64_t sbx_relay_adopt(int64_t h, int fd, uint32_t client_ip) {
  struct relay *r = (struct relay *)(uintptr_t)h;
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) return -errno;
  if (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -errno;
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0) return -errno;
  struct thread *t = &r->threads[atomic_fetch_add(&r->rr, 1) % (unsigned)r->nthreads];
  pthread_mutex_lock(&t->qlock);
  if (t->qn == t->qcap) {
    size_t cap = t->qcap ? t->qcap * 2 : 16;
    struct cmd *q = realloc(t->q, cap * sizeof(*q));
    if (!q) {
      pthread_mutex_unlock(&t->qlock);
      return -ENOMEM;
    }
    t->q = q;
    t->qcap = cap;
  }
  t->q[t->qn++] = (struct cmd){CMD_ADOPT, fd, client_ip};
  pthread_mutex_unlock(&t->qlock);
  uint64_t one64 = 1;
  ssize_t w = write(t->wake_fd, &one64, sizeof(one64));
  (void)w;
  return 0;
}

int64_t sbx_relay_next_handoff(int64_t h, int64_t *out, uint8_t *buf, uint64_t cap) {
  struct relay *r = (struct relay *)(uintptr_t)h;
  pthread_mutex_lock(&r->hq_lock);
  struct handoff *ho = r->hq_head;
  if (!ho) {
    /* Empty: clear the eventfd (under the lock, so a push after this read signals it again). */
    uint64_t v;
    ssize_t rd = read(r->notify_fd, &v, sizeof(v));
    (void)rd;
    pthread_mutex_unlock(&r->hq_lock);
    return 0;
  }
  if (ho->len > cap) {
    pthread_mutex_unlock(&r->hq_lock);
    return -ENOSPC;
  }
  r->hq_head = ho->next;
  if (!r->hq_head) r->hq_tail = NULL;
  pthread_mutex_unlock(&r->hq_lock);
  out[0] = ho->fd;
  out[1] = (int64_t)ho->len;
  out[2] = ho->reason;
  if (ho->len) memcpy(buf, ho->bytes, ho->len);
  free(ho);
  return 1;
}

int64_t sbx_relay_stats(int64_t h, uint64_t *out, uint64_t n) {
  struct relay *r = (struct relay *)(uintptr_t)h;
  for (uint64_t i = 0; i < n; i++) out[i] = 0;
  for (int k = 0; k < r->nthreads; k++)
    for (uint64_t i = 0; i < n && i < ST_COUNT; i++)
      out[i] += atomic_load_explicit(&r->threads[k].st[i], memory_order_relaxed);
  return ST_COUNT;
}

int64_t sbx_relay_destroy(int64_t h) {
  struct relay *r = (struct relay *)(uintptr_t)h;
  stop_threads(r);
  relay_free(r);
  return 0;
}

/*
 * The request-head parser alone (the differential test): leading blank lines are skipped as the
 * connection does. 1 = accepted: out = [head end (from buf[0]), body 0/1/2, content length, port,
 * minor, keep-alive, head start]; text = sandbox id. 0 = more bytes needed. 2 = handed off:
 * out[0] = reason.
 */
int64_t sbx_relay_parse_head(const uint8_t *buf, uint64_t len, int64_t *out, uint8_t *text, uint64_t cap) {
  pthread_once(&tables_once, init_tables);
  if (!buf || !len) return 0; /* koffi passes an empty buffer as NULL */
  size_t s = 0;
  while (s + 1 < len && buf[s] == '\r' && buf[s + 1] == '\n') s += 2;
  struct req_head h;
  int pr = parse_request(buf + s, len - s, 16384, &h);
  if (pr == 0) return 0;
  if (pr < 0) {
    out[0] = -pr;
    return 2;
  }
  out[0] = (int64_t)(s + h.len);
  out[1] = h.body;
  out[2] = h.clen < 0 ? -1 : h.clen;
  out[3] = h.port;
  out[4] = 1;
  out[5] = !h.close;
  out[6] = (int64_t)s;
  size_t n = h.idlen < cap ? h.idlen : cap;
  memcpy(text, buf + s + h.idoff, n);
  return 1;
}

/*
 * The forwarded head for an accepted request head at buf (no leading blank lines), as the
 * connection would send it: its length in `dst`, 0 when not accepted or it does not fit.
 */
int64_t sbx_relay_forward_head(const uint8_t *buf, uint64_t len, const char *mask, uint32_t client_ip, uint8_t *dst,
                               uint64_t cap) {
  pthread_once(&tables_once, init_tables);
  struct req_head h;
  if (!buf || !len || parse_request(buf, len, 16384, &h) != 1) return 0;
  char caddr[16];
  int calen = 0;
  if (client_ip)
    calen = snprintf(caddr, sizeof(caddr), "%u.%u.%u.%u", client_ip >> 24, (client_ip >> 16) & 255,
                     (client_ip >> 8) & 255, client_ip & 255);
  return (int64_t)build_forward(buf, &h, mask, mask ? strlen(mask) : 0, caddr, (size_t)calen, dst, cap);
}

/*
 * The response-head parser alone (the differential test): 1 = accepted, out = [head length,
 * status, framing 0 none/1 length/2 chunked/3 until close, content length, persistent];
 * 0 = more bytes needed; -1 = refused (the client connection would be cut).
 */
int64_t sbx_relay_parse_response(const uint8_t *buf, uint64_t len, int head_method, int64_t *out) {
  pthread_once(&tables_once, init_tables);
  if (!buf || !len) return 0;
  struct resp_head r;
  int pr = parse_response(buf, len, 16384, head_method, &r);
  if (pr <= 0) return pr;
  out[0] = r.len;
  out[1] = r.status;
  out[2] = r.mode;
  out[3] = r.clen;
  out[4] = r.persistent;
  return 1;
}
