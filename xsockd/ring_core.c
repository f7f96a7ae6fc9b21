/*
 * ring_core.c - xsockd's data plane.  See ring_core.h for the shared-memory layout and
 * docs/PROTOCOL.md for the protocol.
 *
 * One pump thread per link moves bytes between the application sockets of the link's streams
 * and the two shared rings, reading from a socket straight into ring memory and writing to a
 * socket straight out of it.  Python only sends commands (open/accept/reject/close a stream,
 * stop) through a locked queue and an eventfd, and collects events (stream opened/closed, link
 * down) from another queue whose eventfd it polls.
 *
 * The peer is untrusted.  Every index and frame header it writes is read once into a local,
 * checked, and only the local is used; a violation stops this link with -EPROTO.  Payload
 * bytes are opaque: they are copied between sockets and the ring but never steer the code.
 */
#define _GNU_SOURCE
#include "ring_core.h"
#include "xsk_atomic.h"
#include "xsk_evtchn.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* Barriers (load_acquire, store_release, full_fence, relaxed_*): xsk_atomic.h. */

/* ---- shared layout ---------------------------------------------------------------------- */

/* Indices of one ring, in the control page.  Producer and consumer halves sit on separate
 * cache lines so that the two sides do not write the same line. */
struct xsk_ring_shr {
    uint32_t prod;       /* written by the producer only: bytes ever produced */
    uint32_t prod_wants; /* set to 1 by the producer when it waits for space; the consumer
                            swaps it to 0 and notifies after freeing space */
    uint8_t pad0[56];
    uint32_t cons;       /* written by the consumer only: bytes ever consumed */
    uint32_t cons_wants; /* set to 1 by the consumer when it waits for data; the producer
                            swaps it to 0 and notifies after producing */
    uint8_t pad1[56];
};

_Static_assert(sizeof(struct xsk_ring_shr) == 128, "ring indices take two cache lines");
_Static_assert(XSK_OFF_RING1 == XSK_OFF_RING0 + 128, "ring 1 follows ring 0");

struct xsk_frame {
    uint32_t stream;
    uint16_t type;
    uint16_t flags; /* XSK_FL_*; other bits ignored */
    uint32_t len;   /* payload bytes following the header */
    uint32_t arg;
};

_Static_assert(sizeof(struct xsk_frame) == XSK_FRAME_HDR, "frame header is 16 bytes");

#define ALIGN16(n) (((n) + 15u) & ~15u)
#define MAX_EVENTS_QUEUED 65536
#define HOLD_SCAN_MAX 64
#define ORPHAN_RESETS 64
#define SAFETY_TIMEOUT_MS 1000
#define ACCEPT_LOOK_MS 5
#define BUSY_RUNS_PER_POLL 4
/* Events that only tell Python what already happened (a stream accepted, opened or closed)
 * wait up to EV_BATCH_MS, or until EV_BATCH_MAX of them or an event Python must act on is
 * queued, before its eventfd is signalled: the loop then wakes once for a batch of streams
 * instead of once per event, and on two cores its wake-ups cost the pumps CPU. */
#define EV_BATCH_MS 2
#define EV_BATCH_MAX 256
/* At most this many accept4 calls per listener per readiness report: other work runs between
 * batches of a long burst. */
#define ACCEPT_BATCH_MAX 64

/* Where a fresh link's indices start: 0 on the wire.  The sanitizer test build starts them
 * just below 2^32 so that every test crosses the index wrap early. */
#ifndef XSK_TEST_INDEX_BASE
#define XSK_TEST_INDEX_BASE 0u
#endif

/* ---- private state ------------------------------------------------------------------- */

struct ring {
    struct xsk_ring_shr *shr;  /* indices in shared memory */
    uint8_t *data_shr;         /* ring bytes in shared memory */
    uint32_t size, mask;       /* cached at attach; never read from shared memory */
    uint32_t pvt;              /* our own index: prod of the tx ring, cons of the rx ring */
};

enum stream_state { /* ring_core.h's, which Python reads in xsk_stream_info */
    ST_OPENING = XSK_ST_OPENING,
    ST_ACCEPTING = XSK_ST_ACCEPTING,
    ST_OPEN = XSK_ST_OPEN,
    ST_HALF = XSK_ST_HALF,
    ST_ZOMBIE = XSK_ST_ZOMBIE,
};

struct stream {
    uint32_t id;
    uint64_t serial;        /* link-unique, never reused: commands and events name id AND it */
    int fd;
    uint32_t state;         /* written with set_state: read by Python's threads too */
    unsigned readable : 1, rd_eof : 1, fin_sent : 1, peer_fin : 1, wr_shut : 1, wr_dead : 1;
    unsigned on_ready : 1, on_ctl : 1, hol : 1;
    unsigned rd_hup : 1;      /* epoll said the application's writing side is closed */
    unsigned ctl_open : 1, ctl_accept : 1, ctl_credit : 1, ctl_fin : 1, ctl_reset : 1;
    unsigned credit_lazy : 1; /* the queued CREDIT is an idle one: it wakes no sleeping peer */
    unsigned early : 1;       /* opener: our OPEN said EARLY; acceptor: the peer's did */
    unsigned accept_wanted : 1; /* acceptor: the opener used up its early credit */
    uint32_t reset_reason;
    uint32_t tx_credit;     /* bytes we may still send */
    uint32_t peer_window;   /* the window the peer granted us (caps tx_credit) */
    uint32_t rx_inflight;   /* bytes the peer sent that we have not credited back */
    uint32_t rx_uncredited; /* of those, delivered to the application */
    uint8_t *pend;          /* bytes for the application that its socket did not take */
    uint32_t pend_off, pend_len;
    uint64_t bytes_in, bytes_out; /* relaxed atomics: read by xsk_link_streams */
    char name[XSK_NAME_MAX + 1];
    struct stream *ready_prev, *ready_next, *ctl_next;
};

enum cmd_type { CMD_OPEN = 1, CMD_ACCEPT, CMD_REJECT, CMD_CLOSE, CMD_STOP, CMD_LISTEN,
                CMD_UNLISTEN };

/* A local listener whose connections the pump accepts and opens streams for itself. */
struct listener {
    int fd;                 /* -1: a free slot */
    int armed;              /* in the epoll set for EPOLLIN (level-triggered) */
    uint64_t retry_ns;      /* disarmed after a failed accept: when to look again */
    uint32_t batch;         /* accepts per readiness report, 1 up to ACCEPT_BATCH_MAX */
    uint64_t used_up_at;    /* the l->polls of the last report that used up its batch */
    char name[XSK_NAME_MAX + 1];
};

struct cmd {
    enum cmd_type type;
    uint32_t id;
    uint64_t serial;
    int fd;
    uint32_t arg;
    char name[XSK_NAME_MAX + 1];
    struct cmd *next;
};

struct xsk_link {
    uint8_t *live_shr;         /* live[2] in the control page */
    uint32_t *early_shr;       /* early[2] in the control page */
    uint32_t early_own;        /* early DATA we take per stream before our ACCEPT */
    uint32_t early_peer;       /* the peer's, read once when it came up (0 until then) */
    struct ring tx, rx;
    uint32_t role;
    uint32_t evtchn_kind;
    int evtchn_fd, evtchn_notify_fd;
    uint32_t evtchn_port;
    uint32_t window, max_streams;
    uint32_t ctl_reserve;      /* tx bytes kept free of DATA for control frames */
    int no_sndbuf_force;       /* SO_SNDBUFFORCE said EPERM once: the plain option only */

    int epfd, cmd_fd, ev_fd;
    pthread_t thread;
    int started, stopped;

    /* stream table: linear probing, backward-shift deletion; written by the pump only,
     * under table_lock so that xsk_link_streams can read it. */
    pthread_mutex_t table_lock;
    struct stream **table;
    uint32_t table_mask, nstreams;
    uint32_t next_id;          /* our next stream id (odd for the initiator, even otherwise) */
    uint64_t next_serial;      /* next stream serial, from 1; atomic: Python's threads take
                                  serials for the streams they open */

    struct stream ready_head;  /* streams with readable data, credit and no pending control */
    struct stream *ctl_head, *ctl_tail;
    struct { uint32_t id, reason; } orphan[ORPHAN_RESETS];
    uint32_t norphan;

    /* the rx frame at the head of the ring, copied once from shared memory */
    struct { int valid, first; struct xsk_frame hdr; uint32_t done; } head;
    uint32_t rx_seen_prod;     /* the peer's prod as of our last rx_consume */

    int peer_up;
    int want_notify_tx, want_notify_rx;
    uint32_t early_opening;    /* our streams opening with early DATA: their ACCEPT is lazy */
    int spin_off;              /* XSOCKD_RING_SPIN=off: no spin_for_reply */

    pthread_mutex_t cmd_lock;
    struct cmd *cmd_head, *cmd_tail;
    int stop_asked;             /* a stop without a command (no memory for one) */

    pthread_mutex_t ev_lock;
    struct xsk_event *events;
    uint32_t ev_head, ev_count, ev_cap;
    int ev_overflow;
    uint32_t ev_unsignalled;    /* lazy events queued since Python was last signalled */
    uint64_t ev_lazy_since;     /* when the first of them was queued (ns) */
    int idle_credit;            /* a stream holds credit below a quarter: return it when idle */

    struct xsk_link_stats stats; /* relaxed atomics */

    /* Listeners handed over by Python (xsk_link_listen): the pump's own, slots reused. */
    struct listener *lsn;
    uint32_t nlsn, lsn_cap, lsn_disarmed;
    uint64_t polls;             /* epoll_waits that reported something (handle_epoll runs) */

    /* The admission table, sorted by name, and the peer's open budget: set by Python
     * (xsk_link_set_admission), read by the pump under adm_lock. */
    pthread_mutex_t adm_lock;
    struct xsk_admit_entry *adm;
    int nadm;
    struct xsk_budget *budget;
};

/* A token bucket of stream opens, one per peer, shared by the peer's links (a peer may have
 * one in each direction).  Python charges it for the opens it admits itself, so that the
 * pump's fast admissions and Python's together stay within the peer's open_rate. */
struct xsk_budget {
    pthread_mutex_t lock;
    int refs;
    double rate, burst, tokens;
    uint64_t at_ns;
};

/* ---- small helpers ------------------------------------------------------------------- */

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    return 0;
}

static uint8_t *peer_live(struct xsk_link *l) { return &l->live_shr[l->role ^ 1]; }
static uint8_t *own_live(struct xsk_link *l) { return &l->live_shr[l->role]; }

static int is_peer_id(struct xsk_link *l, uint32_t id)
{
    /* The initiator opens odd ids, the acceptor even ones; 0 is the link itself. */
    return id != 0 && (id & 1u) == (l->role == XSK_ROLE_INITIATOR ? 0u : 1u);
}

static void evtchn_notify(struct xsk_link *l)
{
    relaxed_add(&l->stats.notify_sent, 1);
    xsk_evtchn_notify(l->evtchn_kind, l->evtchn_fd, l->evtchn_notify_fd, l->evtchn_port);
}

static void evtchn_clear(struct xsk_link *l)
{
    xsk_evtchn_clear(l->evtchn_kind, l->evtchn_fd);
}

/* ---- events to Python ------------------------------------------------------------------ */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}


/* s (may be NULL) gives the counters and name; id and serial name the stream (0 for the link). */
static void push_event(struct xsk_link *l, uint32_t type, const struct stream *s, uint32_t id,
                       uint64_t serial, int32_t arg)
{
    /* Python relies on one CLOSED per stream (and on LINK_DOWN) to empty its tables, so those
     * are queued past the cap: they are bounded by the streams in the table, as the pump stops
     * once the cap is reached.  Any other event past it is dropped. */
    int must = type == XSK_EV_CLOSED || type == XSK_EV_LINK_DOWN;
    pthread_mutex_lock(&l->ev_lock);
    if (l->ev_count >= MAX_EVENTS_QUEUED) {
        l->ev_overflow = 1; /* Python stopped draining: the pump gives up on the link */
        if (!must) {
            pthread_mutex_unlock(&l->ev_lock);
            return;
        }
    }
    if (l->ev_count == l->ev_cap) {
        uint32_t ncap = l->ev_cap ? l->ev_cap * 2 : 64;
        struct xsk_event *ne = malloc((size_t)ncap * sizeof(*ne));
        if (!ne) {
            l->ev_overflow = 1;
            pthread_mutex_unlock(&l->ev_lock);
            return;
        }
        for (uint32_t i = 0; i < l->ev_count; i++)
            ne[i] = l->events[(l->ev_head + i) % l->ev_cap];
        free(l->events);
        l->events = ne;
        l->ev_head = 0;
        l->ev_cap = ncap;
    }
    struct xsk_event *e = &l->events[(l->ev_head + l->ev_count) % l->ev_cap];
    memset(e, 0, sizeof(*e));
    e->type = type;
    e->stream = id;
    e->serial = serial;
    e->arg = arg;
    if (s) {
        e->bytes_in = relaxed_load(&s->bytes_in);
        e->bytes_out = relaxed_load(&s->bytes_out);
        memcpy(e->name, s->name, sizeof(e->name));
    }
    l->ev_count++;
    int lazy = type == XSK_EV_ACCEPTED || type == XSK_EV_LOCAL_OPEN || type == XSK_EV_OPENED ||
               type == XSK_EV_CLOSED;
    if (lazy && l->ev_unsignalled < EV_BATCH_MAX) {
        if (l->ev_unsignalled++ == 0)
            l->ev_lazy_since = now_ns();
        pthread_mutex_unlock(&l->ev_lock);
        return; /* signalled by events_flush_due or the next urgent event */
    }
    l->ev_unsignalled = 0;
    pthread_mutex_unlock(&l->ev_lock);
    uint64_t one = 1;
    ssize_t r = write(l->ev_fd, &one, sizeof(one));
    (void)r;
}

/* Signals Python if lazy events have waited EV_BATCH_MS (or force); returns the ms until
 * they will have, or -1 if none wait. */
static int events_flush_due(struct xsk_link *l, int force)
{
    int wait = -1;
    pthread_mutex_lock(&l->ev_lock);
    if (l->ev_unsignalled) {
        uint64_t age = now_ns() - l->ev_lazy_since;
        if (force || age >= (uint64_t)EV_BATCH_MS * 1000000u) {
            l->ev_unsignalled = 0;
            uint64_t one = 1;
            ssize_t r = write(l->ev_fd, &one, sizeof(one));
            (void)r;
        } else {
            wait = (int)(((uint64_t)EV_BATCH_MS * 1000000u - age) / 1000000u) + 1;
        }
    }
    pthread_mutex_unlock(&l->ev_lock);
    return wait;
}

/* ---- stream table ---------------------------------------------------------------------- */

static uint32_t slot_of(struct xsk_link *l, uint32_t id)
{
    return (id * 2654435761u) & l->table_mask;
}

static struct stream *lookup(struct xsk_link *l, uint32_t id)
{
    for (uint32_t i = slot_of(l, id);; i = (i + 1) & l->table_mask) {
        struct stream *s = l->table[i];
        if (!s || s->id == id)
            return s;
    }
}

static void table_insert(struct xsk_link *l, struct stream *s)
{
    pthread_mutex_lock(&l->table_lock);
    uint32_t i = slot_of(l, s->id);
    while (l->table[i])
        i = (i + 1) & l->table_mask;
    l->table[i] = s;
    l->nstreams++;
    pthread_mutex_unlock(&l->table_lock);
}

static void table_remove(struct xsk_link *l, struct stream *s)
{
    pthread_mutex_lock(&l->table_lock);
    uint32_t i = slot_of(l, s->id);
    while (l->table[i] != s)
        i = (i + 1) & l->table_mask;
    l->table[i] = NULL;
    /* Backward-shift: move later entries of the probe run into the hole. */
    for (uint32_t j = (i + 1) & l->table_mask; l->table[j]; j = (j + 1) & l->table_mask) {
        uint32_t home = slot_of(l, l->table[j]->id);
        if (((j - home) & l->table_mask) >= ((j - i) & l->table_mask)) {
            l->table[i] = l->table[j];
            l->table[j] = NULL;
            i = j;
        }
    }
    l->nstreams--;
    pthread_mutex_unlock(&l->table_lock);
}

/* ---- stream lists ---------------------------------------------------------------------- */

static int can_send_data(struct stream *s)
{
    /* An opening stream may send the peer's early credit once its OPEN is in the ring. */
    int state_ok = s->state == ST_OPEN || s->state == ST_HALF ||
                   (s->state == ST_OPENING && !s->ctl_open);
    return state_ok && s->fd >= 0 && !s->rd_eof && s->tx_credit > 0 && !s->ctl_accept &&
           !s->ctl_reset;
}

static void ready_update(struct xsk_link *l, struct stream *s)
{
    int want = s->readable && can_send_data(s);
    if (want && !s->on_ready) {
        s->ready_prev = l->ready_head.ready_prev;
        s->ready_next = &l->ready_head;
        l->ready_head.ready_prev->ready_next = s;
        l->ready_head.ready_prev = s;
        s->on_ready = 1;
    } else if (!want && s->on_ready) {
        s->ready_prev->ready_next = s->ready_next;
        s->ready_next->ready_prev = s->ready_prev;
        s->on_ready = 0;
    }
}

static void set_state(struct xsk_link *l, struct stream *s, uint32_t state)
{
    if (s->state == ST_OPENING && s->early && state != ST_OPENING)
        l->early_opening--;
    __atomic_store_n(&s->state, state, __ATOMIC_RELAXED);
}

static void ctl_queue(struct xsk_link *l, struct stream *s)
{
    if (s->on_ctl)
        return;
    s->on_ctl = 1;
    s->ctl_next = NULL;
    if (l->ctl_tail)
        l->ctl_tail->ctl_next = s;
    else
        l->ctl_head = s;
    l->ctl_tail = s;
}

static struct stream *stream_new(struct xsk_link *l, uint32_t id, uint64_t serial, int fd,
                                 const char *name, uint32_t state)
{
    struct stream *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->id = id;
    s->serial = serial;
    s->fd = fd;
    s->state = state;
    if (name)
        memcpy(s->name, name, strnlen(name, XSK_NAME_MAX)); /* calloc'ed: stays terminated */
    table_insert(l, s);
    return s;
}

static void stream_free(struct xsk_link *l, struct stream *s)
{
    s->readable = 0;
    ready_update(l, s);
    table_remove(l, s);
    free(s->pend);
    free(s);
}

static void close_fd(struct xsk_link *l, struct stream *s)
{
    if (s->fd >= 0) {
        /* No EPOLL_CTL_DEL: closing the last descriptor of a file takes it out of the epoll
         * set, and a stream's socket has no other (Python detaches the ones it hands over;
         * accept4 and socket made the others, close-on-exec).  Were a copy left somewhere, the
         * stale entry would be harmless: its events name a stream id that is gone or whose
         * fd is -1, and handle_epoll skips those. */
        /* Under table_lock: xsk_link_held asks the socket how much it holds. */
        pthread_mutex_lock(&l->table_lock);
        close(s->fd);
        __atomic_store_n(&s->fd, -1, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&l->table_lock);
    }
    s->readable = 0;
    ready_update(l, s);
}

/* Ends a stream locally with a reason; tells the peer with RESET when send_reset.  A stream
 * that is not yet a zombie was reported to Python (or opened by it) and not yet closed: this
 * is its one CLOSED event. */
static void stream_end(struct xsk_link *l, struct stream *s, uint32_t reason, int send_reset)
{
    close_fd(l, s);
    if (s->state != ST_ZOMBIE) {
        /* Zombie before the event: a command Python sends after seeing CLOSED finds it gone
         * (ev_lock orders this store before Python's read of the event). */
        set_state(l, s, ST_ZOMBIE);
        push_event(l, XSK_EV_CLOSED, s, s->id, s->serial, (int32_t)reason);
    }
    if (send_reset) {
        s->ctl_reset = 1;
        s->reset_reason = reason;
        ctl_queue(l, s);
    } else if (!s->on_ctl) {
        stream_free(l, s);
    } /* else freed once its queued control frames are out */
}

static void check_done(struct xsk_link *l, struct stream *s)
{
    if (s->fin_sent && s->wr_shut && s->fd >= 0)
        stream_end(l, s, XSK_R_DONE, 0);
    else if ((s->fin_sent || s->wr_shut) && s->state == ST_OPEN)
        set_state(l, s, ST_HALF);
}

/* Takes s's socket into the epoll set.  nonblocking: the pump made it itself with
 * SOCK_NONBLOCK (accept4, socket), so the two fcntl calls that set O_NONBLOCK are skipped; a
 * socket Python hands over may be blocking (its accept() leaves the flag off). */
static int stream_watch(struct xsk_link *l, struct stream *s, int nonblocking)
{
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                              .data.u64 = ((uint64_t)3 << 32) | s->id };
    int rc = nonblocking ? 0 : set_nonblock(s->fd);
    if (rc < 0)
        return rc;
    /* A send buffer of a window lets one sendmsg hand over a whole frame; FORCE where we may
     * exceed wmem_max (root), the plain option otherwise.  Best effort.  Without the
     * privilege FORCE is not tried again: a failed call per stream for nothing. */
    int sndbuf = (int)l->window;
    if (l->no_sndbuf_force ||
        setsockopt(s->fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) < 0) {
        if (!l->no_sndbuf_force && errno == EPERM)
            l->no_sndbuf_force = 1;
        (void)setsockopt(s->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    }
    if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0)
        return -errno;
    /* A service's socket (the stream accepted: ST_OPEN already) is not readable until epoll
     * says so: EPOLL_CTL_ADD queues an event at once if it holds bytes or an EOF already
     * (edge-triggered or not), so nothing queued before is missed, and a service that speaks
     * second, as most do, costs no recvmsg that says EAGAIN.  An application that has just
     * connected has usually written already: its socket is read as soon as the stream may
     * send, without waiting for that event. */
    s->readable = s->state == ST_OPENING;
    return 0;
}

/* ---- delivery to the application ------------------------------------------------------ */

/* Queues one CREDIT for what the stream has delivered; returns 1 if it was not queued yet. */
static int queue_credit(struct xsk_link *l, struct stream *s)
{
    if (!s->rx_uncredited || s->ctl_credit)
        return 0;
    s->ctl_credit = 1;
    ctl_queue(l, s);
    return 1;
}

static void delivered(struct xsk_link *l, struct stream *s, uint32_t n)
{
    relaxed_add(&s->bytes_in, n);
    relaxed_add(&l->stats.bytes_in, n);
    s->rx_uncredited += n;
    /* Credit back in quarters of the window: few CREDIT frames, and the sender never waits
     * for more than a quarter of its window to come back. */
    if (s->rx_uncredited >= l->window / 4) {
        queue_credit(l, s);
        s->credit_lazy = 0; /* the sender may be waiting for it: notify */
    } else
        l->idle_credit = 1;
}

/* The pump is about to sleep: return the credit of every stream whose bytes all reached its
 * application, so that a sender (and a graceful stop) knows nothing is held here any more.
 * Runs only when the link goes idle after a delivery, never per chunk.  Returns how many.
 *
 * These CREDIT frames are lazy: written to the ring without waking a sleeping peer.  No
 * sender waits for them (below a quarter of the window uncredited, it still holds three
 * quarters; a sender that used its whole window gets an urgent CREDIT from delivered()), and
 * waking the peer for each would cost a request/response exchange two extra thread wake-ups:
 * one per direction, on a machine whose cores the data path needs.  The peer reads them with
 * its next frame, or when its daemon asks how much it holds (xsk_link_held kicks the pump). */
static int credit_idle_streams(struct xsk_link *l)
{
    int n = 0;
    l->idle_credit = 0;
    for (uint32_t i = 0; i <= l->table_mask; i++) {
        struct stream *s = l->table[i];
        if (s && s->pend_len == 0 && (s->state == ST_OPEN || s->state == ST_HALF) &&
            queue_credit(l, s)) {
            s->credit_lazy = 1;
            n++;
        }
    }
    return n;
}

/* Returns bytes written (>= 0), -EAGAIN when the socket is full, or another -errno. */
static ssize_t send_iov(int fd, struct iovec *iov, int n)
{
    struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
    ssize_t r = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    return r;
}

static void app_write_failed(struct xsk_link *l, struct stream *s)
{
    /* The application no longer reads: drop what is in flight to it and abort the stream. */
    s->wr_dead = 1;
    free(s->pend);
    s->pend = NULL;
    s->pend_len = s->pend_off = 0;
    stream_end(l, s, XSK_R_ABORTED, 1);
}

/* Writes buffered bytes to the application; finishes a pending half-close. */
static void flush_pending(struct xsk_link *l, struct stream *s)
{
    while (s->pend_len && s->fd >= 0) {
        struct iovec iov = { s->pend + s->pend_off, s->pend_len };
        ssize_t n = send_iov(s->fd, &iov, 1);
        if (n == -EAGAIN)
            return;
        if (n < 0) {
            app_write_failed(l, s);
            return;
        }
        s->pend_off += (uint32_t)n;
        s->pend_len -= (uint32_t)n;
        delivered(l, s, (uint32_t)n);
    }
    if (s->fd >= 0 && s->pend_len == 0) {
        free(s->pend); /* a stalled reader's buffer is released once drained */
        s->pend = NULL;
        s->pend_off = 0;
        if (s->peer_fin && !s->wr_shut) {
            /* Our FIN out too: check_done closes the socket just below, and the application
             * reads the same EOF after the same bytes from a close as from a shutdown.  A
             * half-close (the application still writing) needs the shutdown. */
            if (!s->fin_sent)
                shutdown(s->fd, SHUT_WR);
            s->wr_shut = 1;
            /* Everything the peer sent is delivered: credit the last part of a quarter too,
             * so that the sender knows nothing of this stream is held here any more. */
            queue_credit(l, s);
            check_done(l, s);
        }
    }
}

static int append_pending(struct xsk_link *l, struct stream *s, const uint8_t *a, uint32_t alen,
                          const uint8_t *b, uint32_t blen)
{
    /* Bounded: pending bytes are part of rx_inflight, which never exceeds the window. */
    if (!s->pend) {
        s->pend = malloc(l->window);
        if (!s->pend)
            return -ENOMEM;
        s->pend_off = s->pend_len = 0;
    }
    if (s->pend_off + s->pend_len + alen + blen > l->window) {
        memmove(s->pend, s->pend + s->pend_off, s->pend_len);
        s->pend_off = 0;
    }
    if (s->pend_off + s->pend_len + alen + blen > l->window)
        return -EPROTO;
    /* b is NULL when the payload does not wrap: memcpy from NULL is undefined even for 0. */
    if (alen)
        memcpy(s->pend + s->pend_off + s->pend_len, a, alen);
    if (blen)
        memcpy(s->pend + s->pend_off + s->pend_len + alen, b, blen);
    s->pend_len += alen + blen;
    return 0;
}

/* ---- the rx ring: frames from the peer ------------------------------------------------- */

/* Splits payload bytes [from, from+len) of the frame at index idx into up to two pieces. */
static int payload_iov(struct ring *r, uint32_t idx, uint32_t from, uint32_t len,
                       struct iovec iov[2])
{
    uint32_t off = (idx + XSK_FRAME_HDR + from) & r->mask;
    uint32_t first = r->size - off;
    if (first >= len) {
        iov[0] = (struct iovec){ r->data_shr + off, len };
        return 1;
    }
    iov[0] = (struct iovec){ r->data_shr + off, first };
    iov[1] = (struct iovec){ r->data_shr, len - first };
    return 2;
}

/* Returns 1 if every frame after the head up to prod is DATA of stream id: holding the head
 * in the ring then blocks nobody else.  A hint only: frames are validated when consumed. */
static int only_stream_behind(struct xsk_link *l, uint32_t prod, uint32_t id)
{
    struct ring *r = &l->rx;
    uint32_t idx = r->pvt + XSK_FRAME_HDR + ALIGN16(l->head.hdr.len);
    for (int i = 0; i < HOLD_SCAN_MAX; i++) {
        if (idx == prod)
            return 1;
        struct xsk_frame f;
        memcpy(&f, r->data_shr + (idx & r->mask), sizeof(f));
        if (f.type != XSK_F_DATA || f.stream != id || f.len > r->size)
            return 0;
        uint32_t step = XSK_FRAME_HDR + ALIGN16(f.len);
        if (step > prod - idx)
            return 0;
        idx += step;
    }
    return 0;
}

/* Returns 1 when the head frame is consumed, 0 when it must stay (its reader is full), or
 * -errno when the peer broke the protocol. */
static int rx_data(struct xsk_link *l, uint32_t prod)
{
    struct xsk_frame *h = &l->head.hdr;
    struct stream *s = lookup(l, h->stream);
    if (!s || s->state == ST_ZOMBIE || s->wr_dead)
        return 1; /* in flight when we reset the stream: discard */
    int accepting = s->state == ST_ACCEPTING; /* early DATA, before our ACCEPT */
    if (s->state == ST_OPENING || s->peer_fin || (accepting && !s->early))
        return -EPROTO;
    if (l->head.first) {
        /* Before our ACCEPT the opener may use the early credit we advertised; after it, the
         * window we granted (which counts the early bytes too). */
        uint32_t granted = accepting ? l->early_own : l->window;
        if (h->len == 0)
            return -EPROTO; /* DATA carries 1 .. ring_size - 16 bytes */
        if (h->len > granted - s->rx_inflight)
            return -EPROTO; /* more than the credit we granted */
        s->rx_inflight += h->len;
        l->head.first = 0;
        if (s->early && (h->flags & XSK_FL_WANT)) {
            /* The opener waits for our ACCEPT: it goes out signalled, or, if it went out
             * lazily already, a signal follows it. */
            s->accept_wanted = 1;
            if (!accepting && !s->ctl_accept)
                l->want_notify_tx = 1;
        }
    }
    uint32_t left = h->len - l->head.done;
    if ((s->fd < 0 && !accepting) || left == 0)
        return 1;
    struct iovec iov[2];
    if (s->pend_len == 0 && !accepting) {
        int n = payload_iov(&l->rx, l->rx.pvt, l->head.done, left, iov);
        ssize_t w = send_iov(s->fd, iov, n);
        if (w < 0 && w != -EAGAIN) {
            app_write_failed(l, s);
            return 1;
        }
        if (w > 0) {
            l->head.done += (uint32_t)w;
            delivered(l, s, (uint32_t)w);
            left -= (uint32_t)w;
        }
        if (left == 0)
            return 1;
        /* Wait for EPOLLOUT with the bytes still in the ring (no copy) only while nobody
         * else is queued behind them and they fill at most half the ring, so that the
         * other streams always have room to send. */
        if (prod - l->rx.pvt <= l->rx.size / 2 && only_stream_behind(l, prod, s->id)) {
            s->hol = 1;
            return 0;
        }
    }
    /* Copy the blocked stream's bytes out (at most its window) so that others proceed; early
     * bytes wait there for the control plane's decision (at most early_own of them). */
    int n = payload_iov(&l->rx, l->rx.pvt, l->head.done, left, iov);
    int rc = append_pending(l, s, iov[0].iov_base, (uint32_t)iov[0].iov_len,
                            n == 2 ? iov[1].iov_base : NULL, n == 2 ? (uint32_t)iov[1].iov_len : 0);
    s->hol = 0;
    return rc < 0 ? rc : 1;
}

/* The one rule for service names; the wire also allows the empty name (default service). */
int xsk_valid_service_name(const char *p, uint32_t len)
{
    /* A name becomes a file name (<rundir>/<peer>/<name>.sock): no leading '.' or '-'. */
    if (len == 0 || len > XSK_NAME_MAX || p[0] == '.' || p[0] == '-' || p[0] == '_')
        return 0;
    for (uint32_t i = 0; i < len; i++) {
        char c = p[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.'))
            return 0;
    }
    return 1;
}

static void orphan_reset(struct xsk_link *l, uint32_t id, uint32_t reason)
{
    if (l->norphan < ORPHAN_RESETS) {
        l->orphan[l->norphan].id = id;
        l->orphan[l->norphan].reason = reason;
        l->norphan++;
    } /* else: the peer floods us with opens; it gets no answer for these */
}

/* ---- admission without Python ------------------------------------------------------- */

/* Adds the tokens earned since the last look; under b->lock. */
static void budget_refill(struct xsk_budget *b)
{
    uint64_t now = now_ns();
    b->tokens += (double)(now - b->at_ns) * 1e-9 * b->rate;
    if (b->tokens > b->burst)
        b->tokens = b->burst;
    b->at_ns = now;
}

/* Returns 1 and takes a token if one is there. */
static int budget_take(struct xsk_budget *b)
{
    pthread_mutex_lock(&b->lock);
    budget_refill(b);
    int ok = b->tokens >= 1.0;
    if (ok)
        b->tokens -= 1.0;
    pthread_mutex_unlock(&b->lock);
    return ok;
}

/* Gives back a token taken for an open that was not made after all. */
static void budget_refund(struct xsk_budget *b)
{
    pthread_mutex_lock(&b->lock);
    b->tokens = b->tokens + 1.0 > b->burst ? b->burst : b->tokens + 1.0;
    pthread_mutex_unlock(&b->lock);
}

/* Returns the entry for name in the sorted table, or NULL: O(log n), n <= XSK_ADMIT_MAX. */
static const struct xsk_admit_entry *admit_find(struct xsk_link *l, const char *name)
{
    int lo = 0, hi = l->nadm;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(name, l->adm[mid].name);
        if (c == 0)
            return &l->adm[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

/* Returns a connected socket to the service, its caller header written, or -errno.  Never
 * blocks: a Unix socket's non-blocking connect either completes at once or fails (EAGAIN
 * when its backlog is full); the header is a few bytes into an empty socket buffer. */
static int connect_service(const struct xsk_admit_entry *e)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    memcpy(sa.sun_path, e->path, sizeof(sa.sun_path));
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int rc = 0;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        rc = -errno;
    else if (e->header_len) {
        ssize_t w = send(fd, e->header, e->header_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w != (ssize_t)e->header_len)
            rc = w < 0 ? -errno : -EAGAIN;
    }
    if (rc < 0) {
        close(fd);
        return rc;
    }
    return fd;
}

/* Returns 1 if the frames after the head, up to prod, hold a RESET of stream id: a peer that
 * opens and at once resets a stream must not cost us a connection to the service (Python,
 * seeing both in one batch, connects nothing).  A hint only, bounded to HOLD_SCAN_MAX frames;
 * frames are validated when consumed. */
static int reset_follows(struct xsk_link *l, uint32_t prod, uint32_t id)
{
    struct ring *r = &l->rx;
    uint32_t idx = r->pvt + XSK_FRAME_HDR + ALIGN16(l->head.hdr.len);
    for (int i = 0; i < HOLD_SCAN_MAX && idx != prod; i++) {
        struct xsk_frame f;
        memcpy(&f, r->data_shr + (idx & r->mask), sizeof(f));
        if (f.type == XSK_F_RESET && f.stream == id)
            return 1;
        if (f.len > r->size || XSK_FRAME_HDR + ALIGN16(f.len) > prod - idx)
            return 0;
        idx += XSK_FRAME_HDR + ALIGN16(f.len);
    }
    return 0;
}

/* Accepts the peer's new stream s at once if its service is in the admission table, the
 * peer's budget has a token and the service takes the connection now.  Returns 1 if so (the
 * ACCEPTED event is queued), 0 to leave the decision to Python (OPEN_REQUEST), as every case
 * that needs a refusal, a retry or patience does. */
static int fast_accept(struct xsk_link *l, struct stream *s)
{
    int fd = -1;
    pthread_mutex_lock(&l->adm_lock);
    const struct xsk_admit_entry *e = l->budget ? admit_find(l, s->name) : NULL;
    if (e && budget_take(l->budget)) {
        fd = connect_service(e);
        if (fd < 0)
            budget_refund(l->budget);
    }
    pthread_mutex_unlock(&l->adm_lock);
    if (fd < 0)
        return 0;
    s->fd = fd;
    set_state(l, s, ST_OPEN);
    s->ctl_accept = 1;
    ctl_queue(l, s);
    push_event(l, XSK_EV_ACCEPTED, s, s->id, s->serial, 0);
    if (stream_watch(l, s, 1) < 0) /* connect_service's socket is non-blocking */
        stream_end(l, s, XSK_R_NO_SERVICE, 1); /* its CLOSED follows the ACCEPTED */
    return 1;
}

static int rx_frame(struct xsk_link *l, uint32_t prod)
{
    struct xsk_frame *h = &l->head.hdr;
    struct stream *s;
    if (h->type != XSK_F_DATA && h->type != XSK_F_OPEN && h->len != 0)
        return -EPROTO;
    switch (h->type) {
    case XSK_F_DATA:
        return rx_data(l, prod);
    case XSK_F_OPEN: {
        char name[XSK_NAME_MAX + 1];
        struct iovec iov[2];
        if (!is_peer_id(l, h->stream) || lookup(l, h->stream) || h->len > XSK_NAME_MAX ||
            h->arg == 0 || h->arg > XSK_MAX_WINDOW)
            return -EPROTO;
        if (l->nstreams >= l->max_streams && l->norphan == ORPHAN_RESETS)
            return 0; /* send the RESETs owed first; this OPEN waits in the ring meanwhile */
        int n = payload_iov(&l->rx, l->rx.pvt, 0, h->len, iov);
        memcpy(name, iov[0].iov_base, iov[0].iov_len);
        if (n == 2)
            memcpy(name + iov[0].iov_len, iov[1].iov_base, iov[1].iov_len);
        name[h->len] = 0;
        if (h->len && !xsk_valid_service_name(name, h->len))
            return -EPROTO;
        if (l->nstreams >= l->max_streams) {
            orphan_reset(l, h->stream, XSK_R_TOO_MANY); /* never reported: no CLOSED either */
            return 1;
        }
        s = stream_new(l, h->stream, __atomic_fetch_add(&l->next_serial, 1, __ATOMIC_RELAXED),
                       -1, name, ST_ACCEPTING);
        if (!s)
            return -ENOMEM;
        s->peer_window = s->tx_credit = h->arg;
        s->early = (h->flags & XSK_FL_EARLY) != 0;
        if (reset_follows(l, prod, s->id) || !fast_accept(l, s))
            push_event(l, XSK_EV_OPEN_REQUEST, s, s->id, s->serial, 0);
        return 1;
    }
    case XSK_F_ACCEPT:
        s = lookup(l, h->stream);
        if (!s || is_peer_id(l, h->stream))
            return -EPROTO;
        if (s->state == ST_ZOMBIE)
            return 1; /* we closed it meanwhile; our RESET is on its way */
        if (s->state != ST_OPENING || h->arg == 0 || h->arg > XSK_MAX_WINDOW)
            return -EPROTO;
        /* The window counts the early bytes already sent (no CREDIT can precede ACCEPT). */
        uint32_t sent = s->peer_window - s->tx_credit;
        if (h->arg < sent)
            return -EPROTO;
        set_state(l, s, ST_OPEN);
        s->peer_window = h->arg;
        s->tx_credit = h->arg - sent;
        push_event(l, XSK_EV_OPENED, s, s->id, s->serial, 0);
        ready_update(l, s);
        check_done(l, s); /* half-closed already if an early FIN went out */
        return 1;
    case XSK_F_CREDIT:
        s = lookup(l, h->stream);
        if (!s || s->state == ST_ZOMBIE)
            return 1;
        if (s->state == ST_OPENING || s->state == ST_ACCEPTING ||
            h->arg > s->peer_window - s->tx_credit)
            return -EPROTO; /* more credit than data we sent */
        s->tx_credit += h->arg;
        ready_update(l, s);
        return 1;
    case XSK_F_FIN:
        s = lookup(l, h->stream);
        if (!s || s->state == ST_ZOMBIE || s->wr_dead)
            return 1;
        if (s->state == ST_OPENING || s->peer_fin ||
            (s->state == ST_ACCEPTING && !s->early))
            return -EPROTO;
        s->peer_fin = 1;
        flush_pending(l, s); /* half-closes the socket once its buffer is drained (or, while
                              * accepting, once the control plane handed one over) */
        return 1;
    case XSK_F_RESET:
        s = lookup(l, h->stream);
        if (!s)
            return 1;
        if (s->state == ST_ZOMBIE) {
            s->ctl_reset = 0; /* both sides reset: nothing more to say */
            if (!s->on_ctl)
                stream_free(l, s);
            return 1;
        }
        stream_end(l, s, h->arg <= XSK_R_LINK_DOWN ? h->arg : XSK_R_ABORTED, 0);
        return 1;
    case XSK_F_GOODBYE:
        return h->stream == 0 ? -ESHUTDOWN : -EPROTO;
    default:
        return -EPROTO;
    }
}

/* Consumes frames from the rx ring.  Returns >0 on progress, 0 if none, -errno to stop. */
static int rx_consume(struct xsk_link *l)
{
    struct ring *r = &l->rx;
    uint32_t prod = load_acquire(&r->shr->prod); /* pairs with the peer's store_release */
    uint32_t fill = prod - r->pvt;
    int progress = 0;
    if (fill > r->size || (fill & 15u))
        return -EPROTO;
    l->rx_seen_prod = prod;
    while (r->pvt != prod) {
        if (l->ev_overflow)
            return -ENOBUFS; /* Python stopped draining: no more frames, no more events */
        if (!l->head.valid) {
            /* Copy the header once; from here on only the copy is used. */
            memcpy(&l->head.hdr, r->data_shr + (r->pvt & r->mask), sizeof(l->head.hdr));
            uint32_t len = l->head.hdr.len;
            if (len > r->size - XSK_FRAME_HDR || XSK_FRAME_HDR + ALIGN16(len) > prod - r->pvt)
                return -EPROTO;
            l->head.valid = 1;
            l->head.first = 1;
            l->head.done = 0;
            relaxed_add(&l->stats.frames_in, 1);
        }
        int rc = rx_frame(l, prod);
        if (rc < 0)
            return rc;
        if (rc == 0)
            break;
        r->pvt += XSK_FRAME_HDR + ALIGN16(l->head.hdr.len);
        l->head.valid = 0;
        /* Our reads of the frame happen before the producer may reuse its space. */
        store_release(&r->shr->cons, r->pvt);
        l->want_notify_rx = 1;
        progress = 1;
    }
    return progress;
}

/* ---- the tx ring: frames to the peer --------------------------------------------------- */

/* Returns free bytes in the tx ring, or -EPROTO if the peer's cons is impossible. */
static int64_t tx_free(struct xsk_link *l)
{
    struct ring *r = &l->tx;
    uint32_t cons = load_acquire(&r->shr->cons); /* the peer finished reading before this */
    uint32_t used = r->pvt - cons;
    /* Our prod is 16-aligned, so a misaligned cons shows as a misaligned fill: it would have
     * the peer free part of a frame, and make our free space not a multiple of 16. */
    if (used > r->size || (used & 15u))
        return -EPROTO;
    return (int64_t)(r->size - used);
}

static void tx_put_flags(struct xsk_link *l, uint32_t id, uint16_t type, uint16_t flags,
                         uint32_t arg, const char *payload, uint32_t len)
{
    struct ring *r = &l->tx;
    struct xsk_frame f = { .stream = id, .type = type, .flags = flags, .len = len, .arg = arg };
    memcpy(r->data_shr + (r->pvt & r->mask), &f, sizeof(f));
    if (len) {
        struct iovec iov[2];
        int n = payload_iov(r, r->pvt, 0, len, iov);
        memcpy(iov[0].iov_base, payload, iov[0].iov_len);
        if (n == 2)
            memcpy(iov[1].iov_base, payload + iov[0].iov_len, iov[1].iov_len);
    }
    r->pvt += XSK_FRAME_HDR + ALIGN16(len);
    store_release(&r->shr->prod, r->pvt); /* frame bytes before prod */
    relaxed_add(&l->stats.frames_out, 1);
    l->want_notify_tx = 1;
}

static void tx_put(struct xsk_link *l, uint32_t id, uint16_t type, uint32_t arg,
                   const char *payload, uint32_t len)
{
    tx_put_flags(l, id, type, 0, arg, payload, len);
}

/* Writes a control frame without a payload; a lazy one wakes no sleeping peer (it reads it
 * with our next signalled frame), unless the ring is then half full: a peer asleep must never
 * leave our ring full of frames it was not told about. */
static void tx_put_maybe_lazy(struct xsk_link *l, uint32_t id, uint16_t type, uint32_t arg,
                              int lazy)
{
    int notify = l->want_notify_tx;
    tx_put(l, id, type, arg, NULL, 0);
    if (lazy && tx_free(l) >= (int64_t)(l->tx.size / 2))
        l->want_notify_tx = notify;
}

/* Sends queued control frames.  Returns >0 on progress, 0 if none or blocked, -errno. */
static int tx_control(struct xsk_link *l)
{
    int progress = 0;
    int64_t fr = tx_free(l);
    if (fr < 0)
        return (int)fr;
    while (l->norphan && fr >= XSK_FRAME_HDR) {
        l->norphan--;
        tx_put(l, l->orphan[l->norphan].id, XSK_F_RESET, l->orphan[l->norphan].reason, NULL, 0);
        fr -= XSK_FRAME_HDR;
        progress = 1;
    }
    while (l->ctl_head) {
        struct stream *s = l->ctl_head;
        uint32_t need = XSK_FRAME_HDR * 4 + ALIGN16(XSK_NAME_MAX);
        if (fr < need)
            break;
        if (s->ctl_open) {
            uint32_t nl = (uint32_t)strlen(s->name);
            /* The first bytes (and FIN) follow at once, within the peer's early credit,
             * instead of waiting a round trip for its ACCEPT. */
            s->early = l->early_peer > 0;
            l->early_opening += s->early;
            tx_put_flags(l, s->id, XSK_F_OPEN, s->early ? XSK_FL_EARLY : 0, l->window, s->name,
                         nl);
            s->ctl_open = 0;
            s->peer_window = s->tx_credit = l->early_peer;
        }
        if (s->ctl_accept) {
            /* An opener that sent early needs our ACCEPT only for more credit: unless it
             * asked (WANT), it reads it with our next frame rather than waking for it alone
             * (one wake-up less per stream opened). */
            tx_put_maybe_lazy(l, s->id, XSK_F_ACCEPT, l->window, s->early && !s->accept_wanted);
            s->ctl_accept = 0;
        }
        if (s->ctl_credit) {
            /* Lazy when idle (see credit_idle_streams). */
            tx_put_maybe_lazy(l, s->id, XSK_F_CREDIT, s->rx_uncredited, s->credit_lazy);
            s->credit_lazy = 0;
            s->rx_inflight -= s->rx_uncredited;
            s->rx_uncredited = 0;
            s->ctl_credit = 0;
        }
        if (s->ctl_fin) {
            tx_put(l, s->id, XSK_F_FIN, 0, NULL, 0);
            s->ctl_fin = 0;
            s->fin_sent = 1;
        }
        if (s->ctl_reset) {
            tx_put(l, s->id, XSK_F_RESET, s->reset_reason, NULL, 0);
            s->ctl_reset = 0;
        }
        l->ctl_head = s->ctl_next;
        if (!l->ctl_head)
            l->ctl_tail = NULL;
        s->on_ctl = 0;
        progress = 1;
        fr = tx_free(l);
        if (fr < 0)
            return (int)fr;
        if (s->state == ST_ZOMBIE)
            stream_free(l, s);
        else {
            ready_update(l, s);
            check_done(l, s);
        }
    }
    return progress;
}

/* Reads from ready application sockets straight into the tx ring. */
static int tx_data(struct xsk_link *l)
{
    struct ring *r = &l->tx;
    int progress = 0;
    while (l->ready_head.ready_next != &l->ready_head) {
        struct stream *s = l->ready_head.ready_next;
        int64_t fr = tx_free(l);
        if (fr < 0)
            return (int)fr;
        /* DATA may not use the control reserve; small frames are not worth the header. */
        int64_t room = fr - (int64_t)l->ctl_reserve - XSK_FRAME_HDR;
        uint32_t want = s->tx_credit;
        if (want > r->size / 2)
            want = r->size / 2; /* two frames in the ring: the peer drains one while we fill */
        if (room < (int64_t)(want < 1024 ? want : 1024))
            break; /* wait for space */
        uint32_t max = (uint32_t)room & ~15u;
        if (max > want)
            max = want;
        if (max == 0)
            break; /* a zero-length read would return 0, which must only ever mean EOF */
        struct iovec iov[2];
        int n = payload_iov(r, r->pvt, 0, max, iov);
        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t got = recvmsg(s->fd, &mh, MSG_DONTWAIT);
        /* Round-robin: the stream goes to the back of the ready list. */
        s->readable = 0;
        ready_update(l, s);
        if (got > 0) {
            /* Early bytes that use up the peer's early credit ask for its ACCEPT. */
            uint16_t fl = s->state == ST_OPENING && (uint32_t)got == s->tx_credit ? XSK_FL_WANT : 0;
            struct xsk_frame f = { .stream = s->id, .type = XSK_F_DATA, .flags = fl,
                                   .len = (uint32_t)got };
            memcpy(r->data_shr + (r->pvt & r->mask), &f, sizeof(f));
            r->pvt += XSK_FRAME_HDR + ALIGN16((uint32_t)got);
            store_release(&r->shr->prod, r->pvt); /* payload and header before prod */
            l->want_notify_tx = 1;
            s->tx_credit -= (uint32_t)got;
            relaxed_add(&s->bytes_out, (uint64_t)got);
            relaxed_add(&l->stats.bytes_out, (uint64_t)got);
            relaxed_add(&l->stats.frames_out, 1);
            /* A short read emptied the socket: the next bytes raise an edge of their own, so
             * no read to hear EAGAIN (one system call per message).  Once the application
             * closed, no edge follows: read on until its EOF. */
            s->readable = (uint32_t)got == max || s->rd_hup;
            progress = 1;
        } else if (got == 0) {
            s->rd_eof = 1;
            s->ctl_fin = 1;
            ctl_queue(l, s);
            progress = 1;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            /* edge-triggered: EPOLLIN sets readable again */
        } else if (errno != EINTR) {
            stream_end(l, s, XSK_R_ABORTED, 1);
            progress = 1;
            continue;
        } else {
            s->readable = 1;
        }
        ready_update(l, s);
    }
    return progress;
}

/* ---- commands from Python ------------------------------------------------------------- */

static int enqueue(struct xsk_link *l, struct cmd *c)
{
    pthread_mutex_lock(&l->cmd_lock);
    if (l->stopped) {
        pthread_mutex_unlock(&l->cmd_lock);
        free(c);
        return -ESHUTDOWN;
    }
    c->next = NULL;
    if (l->cmd_tail)
        l->cmd_tail->next = c;
    else
        l->cmd_head = c;
    l->cmd_tail = c;
    pthread_mutex_unlock(&l->cmd_lock);
    uint64_t one = 1;
    ssize_t r = write(l->cmd_fd, &one, sizeof(one));
    (void)r;
    return 0;
}

/* The CLOSED event of a stream Python opened that never entered the table. */
static void open_cmd_closed(struct xsk_link *l, const struct cmd *c, uint32_t reason)
{
    struct stream tmp = { .id = c->id, .serial = c->serial };
    memcpy(tmp.name, c->name, sizeof(tmp.name));
    push_event(l, XSK_EV_CLOSED, &tmp, c->id, c->serial, (int32_t)reason);
    close(c->fd);
}

/* Returns the stream with this id and serial if it is in the table and not yet ended. */
static struct stream *lookup_serial(struct xsk_link *l, uint32_t id, uint64_t serial)
{
    struct stream *s = lookup(l, id);
    return s && s->serial == serial && s->state != ST_ZOMBIE ? s : NULL;
}

/* Opens stream id on the local application socket fd (the link's from now on) and queues its
 * OPEN.  report: Python did not open it (the pump accepted fd on a listener), so it hears of
 * it first by LOCAL_OPEN.  Either way one CLOSED ends it, even if it never enters the table. */
static void open_local(struct xsk_link *l, uint32_t id, uint64_t serial, int fd,
                       const char *name, int report)
{
    struct stream *s = NULL;
    uint32_t reason = XSK_R_TOO_MANY;
    if (l->nstreams < l->max_streams) {
        s = stream_new(l, id, serial, fd, name, ST_OPENING);
        reason = XSK_R_ABORTED;
    }
    if (!s) {
        struct stream tmp = { .id = id, .serial = serial };
        memcpy(tmp.name, name, strnlen(name, XSK_NAME_MAX));
        if (report)
            push_event(l, XSK_EV_LOCAL_OPEN, &tmp, id, serial, 0);
        push_event(l, XSK_EV_CLOSED, &tmp, id, serial, (int32_t)reason);
        close(fd);
        return;
    }
    if (report)
        push_event(l, XSK_EV_LOCAL_OPEN, s, id, serial, 0);
    s->ctl_open = 1;
    ctl_queue(l, s);
    if (stream_watch(l, s, report) < 0) /* accept_local's accept4 made it non-blocking */
        stream_end(l, s, XSK_R_ABORTED, 1);
}

/* ---- listeners the pump accepts on ---------------------------------------------------- */

static int listener_arm(struct xsk_link *l, uint32_t i, int on)
{
    struct epoll_event ev = { .events = on ? EPOLLIN : 0, .data.u64 = ((uint64_t)4 << 32) | i };
    if (epoll_ctl(l->epfd, EPOLL_CTL_MOD, l->lsn[i].fd, &ev) < 0)
        return -errno;
    if (on && !l->lsn[i].armed)
        l->lsn_disarmed--;
    else if (!on && l->lsn[i].armed)
        l->lsn_disarmed++;
    l->lsn[i].armed = on;
    return 0;
}

static void listen_failed(struct xsk_link *l, const char *name, int err)
{
    struct stream tmp = { .id = 0 };
    memcpy(tmp.name, name, strnlen(name, XSK_NAME_MAX));
    push_event(l, XSK_EV_LISTEN_FAILED, &tmp, 0, 0, -err);
}

/* Takes the listener fd into a free slot and the epoll set (level-triggered: connections
 * queued already are seen at once).  On failure fd is closed and Python told. */
static void listener_add(struct xsk_link *l, int fd, const char *name)
{
    uint32_t i = 0;
    while (i < l->nlsn && l->lsn[i].fd >= 0)
        i++;
    if (i == l->lsn_cap) {
        uint32_t ncap = l->lsn_cap ? l->lsn_cap * 2 : 4;
        struct listener *n = ncap <= XSK_LISTEN_MAX ?
                             realloc(l->lsn, ncap * sizeof(*n)) : NULL;
        if (!n) {
            close(fd);
            listen_failed(l, name, ncap <= XSK_LISTEN_MAX ? ENOMEM : ENOSPC);
            return;
        }
        l->lsn = n;
        l->lsn_cap = ncap;
    }
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = ((uint64_t)4 << 32) | i };
    int rc = set_nonblock(fd);
    if (rc == 0 && epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        rc = -errno;
    if (rc < 0) {
        close(fd);
        listen_failed(l, name, -rc);
        return;
    }
    struct listener *L = &l->lsn[i];
    memset(L, 0, sizeof(*L));
    L->fd = fd;
    L->armed = 1;
    L->batch = 1;
    memcpy(L->name, name, strnlen(name, XSK_NAME_MAX));
    if (i == l->nlsn)
        l->nlsn++;
}

static void listener_close(struct xsk_link *l, uint32_t i)
{
    struct listener *L = &l->lsn[i];
    epoll_ctl(l->epfd, EPOLL_CTL_DEL, L->fd, NULL);
    close(L->fd);
    L->fd = -1;
    if (!L->armed)
        l->lsn_disarmed--;
    L->armed = 0;
}

/* Accepts up to a batch of what listener i holds and opens a stream for each connection.
 * The listener is level-triggered: connections left queued are reported again by the next
 * epoll_wait (at once: the accepts were progress).  The batch adapts so that accept4 is
 * rarely called only to say EAGAIN: it doubles when the listener is reported again right
 * after a report that used it up (a burst), and falls to what one report found when the
 * queue ran dry, down to one, which is what connections arriving one at a time need (an
 * accept4 each, where draining cost a second one saying EAGAIN).  Running out of descriptors
 * or memory leaves the connection queued and the listener readable: it is taken out of the
 * epoll set for a while instead of making the pump spin on it. */
static int accept_local(struct xsk_link *l, uint32_t i)
{
    struct listener *L = &l->lsn[i];
    uint32_t got = 0;
    if (L->used_up_at + 1 == l->polls && L->batch < ACCEPT_BATCH_MAX)
        L->batch *= 2;
    for (int tries = 0; tries < ACCEPT_BATCH_MAX && got < L->batch; tries++) {
        int fd = accept4(L->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            open_local(l, __atomic_fetch_add(&l->next_id, 2, __ATOMIC_RELAXED),
                       __atomic_fetch_add(&l->next_serial, 1, __ATOMIC_RELAXED), fd, L->name, 1);
            got++;
            continue;
        }
        int err = errno;
        if (err == EINTR || err == ECONNABORTED)
            continue;
        if (err == EAGAIN || err == EWOULDBLOCK) {
            L->batch = got ? got : 1;
            return got > 0;
        }
        listen_failed(l, L->name, err);
        if (listener_arm(l, i, 0) == 0)
            L->retry_ns = now_ns() + (uint64_t)XSK_LISTEN_RETRY_MS * 1000000u;
        return got > 0;
    }
    if (got == L->batch)
        L->used_up_at = l->polls; /* more may be queued: reported again at once if so */
    return got > 0;
}

/* Puts back the listeners whose pause is over; returns ms until the next one's (or -1). */
static int rearm_listeners(struct xsk_link *l)
{
    int wait = -1;
    uint64_t now = now_ns();
    for (uint32_t i = 0; i < l->nlsn && l->lsn_disarmed; i++) {
        struct listener *L = &l->lsn[i];
        if (L->fd < 0 || L->armed)
            continue;
        if (now >= L->retry_ns) {
            (void)listener_arm(l, i, 1);
        } else {
            int ms = (int)((L->retry_ns - now) / 1000000u) + 1;
            if (wait < 0 || ms < wait)
                wait = ms;
        }
    }
    return wait;
}

/* Returns 1 if a stop was requested (and whether to say goodbye in *goodbye). */
static int run_commands(struct xsk_link *l, int *goodbye)
{
    pthread_mutex_lock(&l->cmd_lock);
    struct cmd *c = l->cmd_head;
    l->cmd_head = l->cmd_tail = NULL;
    int stop = l->stop_asked;
    pthread_mutex_unlock(&l->cmd_lock);
    while (c) {
        struct cmd *next = c->next;
        struct stream *s;
        switch (c->type) {
        case CMD_OPEN:
            open_local(l, c->id, c->serial, c->fd, c->name, 0);
            break;
        case CMD_ACCEPT:
            s = lookup_serial(l, c->id, c->serial);
            if (!s || s->state != ST_ACCEPTING) {
                /* The peer reset it while Python connected the service (which may take a
                 * while): its CLOSED event is already queued, so only the socket is left. */
                close(c->fd);
                break;
            }
            s->fd = c->fd;
            set_state(l, s, ST_OPEN);
            s->ctl_accept = 1;
            ctl_queue(l, s);
            if (stream_watch(l, s, 0) < 0)
                stream_end(l, s, XSK_R_NO_SERVICE, 1);
            else
                flush_pending(l, s); /* the early bytes that came while Python decided */
            break;
        case CMD_REJECT:
            s = lookup_serial(l, c->id, c->serial);
            if (s && s->state == ST_ACCEPTING)
                stream_end(l, s, c->arg, 1);
            break;
        case CMD_CLOSE:
            s = lookup_serial(l, c->id, c->serial);
            if (s)
                stream_end(l, s, XSK_R_CLOSED, 1);
            break;
        case CMD_STOP:
            stop = 1;
            *goodbye = (int)c->arg;
            break;
        case CMD_LISTEN:
            listener_add(l, c->fd, c->name);
            break;
        case CMD_UNLISTEN:
            for (uint32_t i = 0; i < l->nlsn; i++)
                if (l->lsn[i].fd >= 0 && strcmp(l->lsn[i].name, c->name) == 0)
                    listener_close(l, i);
            break;
        }
        free(c);
        c = next;
    }
    return stop;
}

/* ---- the pump ------------------------------------------------------------------------- */

static void handle_epoll(struct xsk_link *l, struct epoll_event *evs, int n)
{
    l->polls++;
    for (int i = 0; i < n; i++) {
        uint32_t tag = (uint32_t)(evs[i].data.u64 >> 32);
        uint32_t id = (uint32_t)evs[i].data.u64;
        if (tag == 1) {
            evtchn_clear(l);
        } else if (tag == 2) {
            uint64_t v;
            ssize_t r = read(l->cmd_fd, &v, sizeof(v));
            (void)r;
        } else if (tag == 4) {
            if (id < l->nlsn && l->lsn[id].fd >= 0 && l->lsn[id].armed)
                accept_local(l, id);
        } else if (tag == 3) {
            struct stream *s = lookup(l, id);
            if (!s || s->fd < 0)
                continue; /* closed since epoll reported it */
            if (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                s->readable = 1;
                if (evs[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                    s->rd_hup = 1; /* no edge will follow: read on to the EOF */
                ready_update(l, s);
            }
            if (evs[i].events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) {
                s->hol = 0; /* the head frame is retried by rx_consume */
                flush_pending(l, s);
            }
        }
    }
}

static void notify_peer_if_waiting(struct xsk_link *l)
{
    /* Our index updates (store_release above) must be visible before we read the flags. */
    full_fence();
    int notify = 0;
    if (l->want_notify_tx && __atomic_exchange_n(&l->tx.shr->cons_wants, 0, __ATOMIC_SEQ_CST))
        notify = 1;
    if (l->want_notify_rx && __atomic_exchange_n(&l->rx.shr->prod_wants, 0, __ATOMIC_SEQ_CST))
        notify = 1;
    l->want_notify_tx = l->want_notify_rx = 0;
    if (notify)
        evtchn_notify(l);
}

static void close_all(struct xsk_link *l, uint32_t reason)
{
    for (uint32_t i = 0; i <= l->table_mask; i++) {
        struct stream *s;
        while ((s = l->table[i]) != NULL) {
            if (s->state != ST_ZOMBIE) { /* zombies had their CLOSED */
                set_state(l, s, ST_ZOMBIE);
                push_event(l, XSK_EV_CLOSED, s, s->id, s->serial, (int32_t)reason);
            }
            close_fd(l, s);
            s->on_ctl = 0;
            stream_free(l, s);
        }
    }
    l->ctl_head = l->ctl_tail = NULL;
}

/* ---- waiting for a reply on the rx ring -------------------------------------------------- */

/* After the pump sent DATA (a request, most likely), the next thing to happen is often the
 * peer's reply in the rx ring.  Instead of sleeping on the event channel at once, the pump
 * watches the ring's prod in shared memory for a bounded, adaptive time: our cons_wants
 * stays 0 meanwhile, so that a reply in time costs the peer no signal and us no wake-up.
 * It gives its CPU away every SPIN_YIELD_NS, since on two CPUs the threads the reply comes
 * through (the peer's pump, the service) may need this one; without that the spin held them
 * off and measured no gain.  Measured: docs/PERFORMANCE.md ("What was tried").
 * XSOCKD_RING_SPIN=off in the daemon's environment turns it off. */
#define SPIN_START_NS 65536u  /* the budget of a first wait, and of a probe */
#define SPIN_MAX_NS 131072u   /* doubling on a hit stops here */
#define SPIN_MIN_NS 2048u     /* halving on a miss below this stops spinning ... */
#define SPIN_PROBE 64u        /* ... until this many requests went by */
#define SPIN_CHECK 32u        /* ring looks between clock reads (vDSO, no system call) */
#define SPIN_YIELD_NS 2048u   /* sched_yield this often */
#define SPIN_REQUEST_MAX 16384u /* more DATA out since the last sleep is a stream, not a request */

struct spin {
    uint32_t budget_ns;       /* 0: not spinning, probing again after SPIN_PROBE requests */
    uint32_t skipped;
    uint64_t out_seen, in_seen; /* stats.bytes_out and bytes_in at our last look */
    uint64_t deadline;        /* when we stop waiting for the reply; 0: none awaited */
};

static inline void cpu_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause(); /* tells the core (and an SMT sibling) that this is a spin */
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* Called when the pump found nothing to do.  Returns 1 if frames arrived in the rx ring
 * while it spun (the pump then runs again without sleeping), 0 if it should sleep. */
static int spin_for_reply(struct xsk_link *l, struct spin *sp, int tx_waiting)
{
    uint64_t out = relaxed_load(&l->stats.bytes_out), in = relaxed_load(&l->stats.bytes_in);
    if (in != sp->in_seen && sp->deadline) { /* the reply came while we waited */
        sp->budget_ns = sp->budget_ns * 2 > SPIN_MAX_NS ? SPIN_MAX_NS : sp->budget_ns * 2;
        sp->deadline = 0;
    }
    /* A request left: wait for its reply.  A writer streaming in one direction sends more
     * between sleeps; its next move is on its socket, which a spinning pump does not see. */
    if (out != sp->out_seen) {
        sp->deadline = 0;
        if (out - sp->out_seen <= SPIN_REQUEST_MAX && !l->spin_off) {
            if (sp->budget_ns == 0 && ++sp->skipped >= SPIN_PROBE) {
                sp->skipped = 0;
                sp->budget_ns = SPIN_START_NS;
            }
            if (sp->budget_ns)
                sp->deadline = now_ns() + sp->budget_ns;
        }
    }
    sp->in_seen = in;
    sp->out_seen = out;
    /* Frames the application did not take yet, or streams waiting for ring space: the next
     * event is theirs, not a reply.  After a delivery (no request out) the next move is the
     * application's, on its socket. */
    if (!sp->deadline || tx_waiting || l->rx.pvt != l->rx_seen_prod) {
        sp->deadline = 0;
        return 0;
    }
    /* A flag left at 1 from our last sleep would have the peer signal a pump that is awake;
     * the sleep path sets it again (fence, recheck) before any sleep. */
    __atomic_store_n(&l->rx.shr->cons_wants, 0, __ATOMIC_SEQ_CST);
    uint64_t yield_at = now_ns() + SPIN_YIELD_NS;
    for (uint32_t i = 1;; i++) {
        /* Any frame ends the spin, even an idle CREDIT: the pump reads it and, if the reply
         * is still to come, spins again until the same deadline. */
        if (load_acquire(&l->rx.shr->prod) != l->rx_seen_prod)
            return 1;
        cpu_pause();
        if (i % SPIN_CHECK)
            continue;
        uint64_t t = now_ns();
        if (t >= sp->deadline)
            break;
        if (t >= yield_at) {
            sched_yield();
            yield_at = now_ns() + SPIN_YIELD_NS;
        }
    }
    sp->budget_ns /= 2; /* a miss */
    if (sp->budget_ns < SPIN_MIN_NS)
        sp->budget_ns = 0;
    sp->deadline = 0;
    return 0;
}

static void *pump(void *arg)
{
    struct xsk_link *l = arg;
    struct epoll_event evs[64];
    int goodbye = 0, err = 0, busy_runs = 0;
    struct spin spin = { .budget_ns = SPIN_START_NS };

    /* Our early credit is in place before the peer can see us live. */
    __atomic_store_n(&l->early_shr[l->role], l->early_own, __ATOMIC_RELAXED);
    store_release(own_live(l), 1);
    evtchn_notify(l);
    for (;;) {
        if (run_commands(l, &goodbye))
            break;
        uint8_t pl = load_acquire(peer_live(l));
        if (pl == 1 && !l->peer_up) {
            l->peer_up = 1;
            /* Read once, after the live byte (acquire), and bounded: an older peer leaves 0. */
            uint32_t e = __atomic_load_n(&l->early_shr[l->role ^ 1], __ATOMIC_RELAXED);
            l->early_peer = e < XSK_EARLY_WINDOW ? e : XSK_EARLY_WINDOW;
            push_event(l, XSK_EV_PEER_UP, NULL, 0, 0, 0);
        } else if (pl != 1 && l->peer_up) {
            /* The peer left (its unmap notification cleared its live byte): deliver what it
             * wrote before going, and tell a goodbye from a crash. */
            err = rx_consume(l) == -ESHUTDOWN ? -ESHUTDOWN : -ECONNRESET;
            break;
        }
        int progress = 0, rc;
        if ((rc = rx_consume(l)) < 0) { err = rc; break; }
        progress |= rc;
        if ((rc = tx_control(l)) < 0) { err = rc; break; }
        progress |= rc;
        if ((rc = tx_data(l)) < 0) { err = rc; break; }
        progress |= rc;
        notify_peer_if_waiting(l);
        if (l->ev_overflow) { err = -ENOBUFS; break; }

        if (!progress && l->idle_credit && credit_idle_streams(l))
            continue; /* send those CREDIT frames before sleeping */
        /* After progress, look at the ring and the sockets known readable again before asking
         * epoll: a request or a reply is usually done in one run, and the wait before sleeping
         * asks epoll anyway (one system call less per run).  Every few runs epoll is asked,
         * so that a busy link still hears of sockets that became readable meanwhile. */
        if (progress && ++busy_runs < BUSY_RUNS_PER_POLL)
            continue;
        busy_runs = 0;
        int timeout = 0;
        int tx_waiting = l->ready_head.ready_next != &l->ready_head || l->ctl_head ||
                         l->norphan;
        if (!progress && !spin_for_reply(l, &spin, tx_waiting)) {
            /* About to sleep: ask the peer to notify us, then look once more, so that an
             * update made between our last look and the flag is not missed. */
            __atomic_store_n(&l->rx.shr->cons_wants, 1, __ATOMIC_SEQ_CST);
            if (tx_waiting)
                __atomic_store_n(&l->tx.shr->prod_wants, 1, __ATOMIC_SEQ_CST);
            full_fence();
            int more = load_acquire(&l->rx.shr->prod) != l->rx_seen_prod;
            int64_t fr = tx_free(l);
            if (tx_waiting && fr >= (int64_t)(l->ctl_reserve + XSK_FRAME_HDR + 1024))
                more = 1;
            timeout = more ? 0 : SAFETY_TIMEOUT_MS;
            /* The peer's ACCEPT of an early open comes without a signal: look for it soon,
             * so that the control plane does not show the stream opening for long. */
            if (l->early_opening && timeout > ACCEPT_LOOK_MS)
                timeout = ACCEPT_LOOK_MS;
            relaxed_add(&l->stats.wakeups, 1);
        }
        if (l->lsn_disarmed) {
            int wait = rearm_listeners(l);
            if (wait >= 0 && wait < timeout)
                timeout = wait;
        }
        int due = events_flush_due(l, 0);
        if (due >= 0 && due < timeout)
            timeout = due;
        int n = epoll_wait(l->epfd, evs, 64, timeout);
        if (n > 0)
            handle_epoll(l, evs, n);
    }

    if (goodbye && err == 0) {
        int64_t fr = tx_free(l);
        if (fr >= XSK_FRAME_HDR)
            tx_put(l, 0, XSK_F_GOODBYE, 0, NULL, 0);
    }
    store_release(own_live(l), 0);
    evtchn_notify(l);
    for (uint32_t i = 0; i < l->nlsn; i++) /* queued connections stay for Python to take */
        if (l->lsn[i].fd >= 0)
            listener_close(l, i);
    close_all(l, XSK_R_LINK_DOWN);
    pthread_mutex_lock(&l->cmd_lock);
    l->stopped = 1;
    struct cmd *c = l->cmd_head;
    l->cmd_head = l->cmd_tail = NULL;
    pthread_mutex_unlock(&l->cmd_lock);
    while (c) { /* fds handed over after the end: close them */
        struct cmd *next = c->next;
        if (c->type == CMD_OPEN)
            open_cmd_closed(l, c, XSK_R_LINK_DOWN); /* Python holds its id and serial */
        else if (c->type == CMD_ACCEPT || c->type == CMD_LISTEN)
            close(c->fd); /* close_all reported the stream; a listener is Python's again */
        free(c);
        c = next;
    }
    if (err)
        push_event(l, XSK_EV_LINK_DOWN, NULL, 0, 0, err);
    events_flush_due(l, 1); /* the CLOSED events of a stopped link */
    return NULL;
}

/* ---- public API ----------------------------------------------------------------------- */

/* Returns the number of pages a link with this ring size shares (control page + 2 rings). */
int xsk_link_pages(uint32_t ring_size)
{
    if (ring_size < XSK_MIN_RING_SIZE || ring_size > XSK_MAX_RING_SIZE ||
        (ring_size & (ring_size - 1)))
        return -EINVAL;
    return 1 + 2 * (int)(ring_size / XSK_PAGE_SIZE);
}

/* Returns 0 and a new link in *out; the pump is not running until xsk_link_start. */
int xsk_link_new(const struct xsk_link_params *p, struct xsk_link **out)
{
    if (xsk_link_pages(p->ring_size) < 0 || p->role > 1 || !p->control || !p->ring0 ||
        !p->ring1 || p->stream_window < XSK_MIN_WINDOW || p->stream_window > XSK_MAX_WINDOW ||
        (p->stream_window & (p->stream_window - 1)) || p->max_streams == 0 ||
        p->max_streams > XSK_MAX_STREAMS ||
        (p->evtchn_kind != XSK_EVTCHN_EVENTFD && p->evtchn_kind != XSK_EVTCHN_XEN))
        return -EINVAL;
    struct xsk_link *l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    uint8_t *ctl = p->control;
    l->live_shr = ctl + XSK_OFF_LIVE;
    l->early_shr = (uint32_t *)(void *)(ctl + XSK_OFF_EARLY);
    struct xsk_ring_shr *r0 = (void *)(ctl + XSK_OFF_RING0), *r1 = (void *)(ctl + XSK_OFF_RING1);
    int init = p->role == XSK_ROLE_INITIATOR;
    l->tx = (struct ring){ init ? r0 : r1, init ? p->ring0 : p->ring1, p->ring_size,
                           p->ring_size - 1, 0 };
    l->rx = (struct ring){ init ? r1 : r0, init ? p->ring1 : p->ring0, p->ring_size,
                           p->ring_size - 1, 0 };
    /* Indices start where the shared page says (0 for a fresh link); read once. */
    l->tx.pvt = load_acquire(&l->tx.shr->prod);
    l->rx.pvt = load_acquire(&l->rx.shr->cons);
    if (l->tx.pvt != XSK_TEST_INDEX_BASE || l->rx.pvt != XSK_TEST_INDEX_BASE) {
        free(l);
        return -EPROTO; /* our own indices start at 0 on a new link; else stale or forged */
    }
    l->rx_seen_prod = l->rx.pvt;
    l->role = p->role;
    l->evtchn_kind = p->evtchn_kind;
    l->evtchn_fd = p->evtchn_fd;
    l->evtchn_notify_fd = p->evtchn_notify_fd;
    l->evtchn_port = p->evtchn_port;
    l->window = p->stream_window;
    l->early_own = p->stream_window < XSK_EARLY_WINDOW ? p->stream_window : XSK_EARLY_WINDOW;
    l->max_streams = p->max_streams;
    l->ctl_reserve = p->ring_size / 16 > 256 ? p->ring_size / 16 : 256;
    l->next_id = init ? 1 : 2;
    l->next_serial = 1;
    l->ready_head.ready_next = l->ready_head.ready_prev = &l->ready_head;
    uint32_t cap = 16;
    while (cap < 2 * (p->max_streams + ORPHAN_RESETS))
        cap <<= 1;
    l->table = calloc(cap, sizeof(*l->table));
    l->table_mask = cap - 1;
    l->epfd = epoll_create1(EPOLL_CLOEXEC);
    l->cmd_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    l->ev_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_mutex_init(&l->table_lock, NULL);
    pthread_mutex_init(&l->cmd_lock, NULL);
    pthread_mutex_init(&l->ev_lock, NULL);
    pthread_mutex_init(&l->adm_lock, NULL);
    int rc = 0;
    if (!l->table || l->epfd < 0 || l->cmd_fd < 0 || l->ev_fd < 0)
        rc = -ENOMEM;
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = (uint64_t)1 << 32 };
    if (!rc && epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->evtchn_fd, &ev) < 0)
        rc = -errno;
    ev.data.u64 = (uint64_t)2 << 32;
    if (!rc && epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->cmd_fd, &ev) < 0)
        rc = -errno;
    if (rc) {
        xsk_link_free(l);
        return rc;
    }
    *out = l;
    return 0;
}

/* Returns 0 once the pump thread runs; it sets our live byte and notifies the peer. */
int xsk_link_start(struct xsk_link *l)
{
    if (l->started)
        return -EALREADY;
    if (l->stopped)
        return -ESHUTDOWN; /* the shared indices are past their start: no second pump */
    /* Read here, by the caller's thread: getenv in the pump could race a setenv. */
    const char *spin = getenv("XSOCKD_RING_SPIN");
    l->spin_off = spin && !strcmp(spin, "off");
    int rc = pthread_create(&l->thread, NULL, pump, l);
    if (rc)
        return -rc;
    l->started = 1;
    return 0;
}

/* Returns the eventfd that is readable when xsk_link_events has something. */
int xsk_link_event_fd(struct xsk_link *l) { return l->ev_fd; }

/* Returns 0 and the new stream's id and serial; the link owns fd from now on, even on
 * failure.  A CLOSED event with that serial ends the stream, whatever happens to it. */
/* A command carrying fd and a service name (NULL or "" the default service), or NULL with
 * *err set and fd closed: the caller owns fd only through the command. */
static struct cmd *named_cmd(enum cmd_type type, int fd, const char *service, int *err)
{
    size_t nl = service ? strnlen(service, XSK_NAME_MAX + 1) : 0;
    if (nl && !xsk_valid_service_name(service, (uint32_t)nl)) {
        close(fd);
        *err = -EINVAL;
        return NULL;
    }
    struct cmd *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        *err = -ENOMEM;
        return NULL;
    }
    c->type = type;
    c->fd = fd;
    if (nl)
        memcpy(c->name, service, nl);
    return c;
}

int xsk_link_open_stream(struct xsk_link *l, int fd, const char *service, uint32_t *id_out,
                         uint64_t *serial_out)
{
    int rc;
    struct cmd *c = named_cmd(CMD_OPEN, fd, service, &rc);
    if (!c)
        return rc;
    c->id = __atomic_fetch_add(&l->next_id, 2, __ATOMIC_RELAXED);
    c->serial = __atomic_fetch_add(&l->next_serial, 1, __ATOMIC_RELAXED);
    *id_out = c->id;
    *serial_out = c->serial;
    rc = enqueue(l, c);
    if (rc < 0)
        close(fd);
    return rc;
}

/* Returns 1 if the stream (id, serial) is in the table, not ended, and (if want_state) in
 * that state.  Lets a command on a stream that is gone fail at once instead of in the pump;
 * a stream that ends after this check is reported by its CLOSED event all the same. */
static int stream_present(struct xsk_link *l, uint32_t id, uint64_t serial, uint32_t want_state)
{
    pthread_mutex_lock(&l->table_lock); /* the pump inserts and frees under it */
    struct stream *s = lookup(l, id);
    int ok = s && s->serial == serial;
    if (ok) {
        uint32_t st = relaxed_load(&s->state);
        ok = st != ST_ZOMBIE && (!want_state || st == want_state);
    }
    pthread_mutex_unlock(&l->table_lock);
    return ok;
}

static int stream_cmd(struct xsk_link *l, enum cmd_type t, uint32_t id, uint64_t serial,
                      uint32_t arg, int fd)
{
    struct cmd *c = NULL;
    int rc = 0;
    if (!stream_present(l, id, serial, t == CMD_CLOSE ? 0 : ST_ACCEPTING))
        rc = -ENOENT;
    else if (!(c = calloc(1, sizeof(*c))))
        rc = -ENOMEM;
    if (rc < 0) {
        if (fd >= 0)
            close(fd);
        return rc;
    }
    c->type = t;
    c->id = id;
    c->serial = serial;
    c->arg = arg;
    c->fd = fd;
    rc = enqueue(l, c); /* frees c on failure */
    if (rc < 0 && fd >= 0)
        close(fd);
    return rc;
}

/* Returns 0, -ENOENT if the stream (id, serial) is gone or no longer waits for an answer
 * (its CLOSED event is queued or on its way), or -ESHUTDOWN once the pump has ended.  The
 * link owns fd from now on and closes it in every case but 0. */
int xsk_link_accept_stream(struct xsk_link *l, uint32_t id, uint64_t serial, int fd)
{
    return stream_cmd(l, CMD_ACCEPT, id, serial, 0, fd);
}

/* Returns 0 once the pump has the listener fd (a dup of Python's socket; the link owns it
 * from now on, even on failure) to accept connections on for service ("" the default), each
 * opened as a stream and reported by LOCAL_OPEN; -EINVAL for a bad name, -ESHUTDOWN once the
 * pump has ended.  The pump closes its fd on xsk_link_unlisten or when it stops; connections
 * still queued then are the other holder's to take. */
int xsk_link_listen(struct xsk_link *l, int fd, const char *service)
{
    int rc;
    struct cmd *c = named_cmd(CMD_LISTEN, fd, service, &rc);
    if (!c)
        return rc;
    rc = enqueue(l, c);
    if (rc < 0)
        close(fd);
    return rc;
}

/* Returns 0 once the pump is asked to close its listener for service; -ESHUTDOWN once the
 * pump has ended (it closed every listener then). */
int xsk_link_unlisten(struct xsk_link *l, const char *service)
{
    size_t nl = strnlen(service, XSK_NAME_MAX + 1);
    if (nl > XSK_NAME_MAX)
        return -EINVAL;
    struct cmd *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->type = CMD_UNLISTEN;
    c->fd = -1;
    memcpy(c->name, service, nl);
    return enqueue(l, c);
}

/* Returns 0 (the peer's request is answered with RESET(reason), CLOSED follows), -ENOENT
 * or -ESHUTDOWN as xsk_link_accept_stream. */
int xsk_link_reject_stream(struct xsk_link *l, uint32_t id, uint64_t serial, uint32_t reason)
{
    return stream_cmd(l, CMD_REJECT, id, serial, reason, -1);
}

/* Returns 0 (the stream is aborted on both sides, CLOSED follows), -ENOENT or -ESHUTDOWN as
 * xsk_link_accept_stream. */
int xsk_link_close_stream(struct xsk_link *l, uint32_t id, uint64_t serial)
{
    return stream_cmd(l, CMD_CLOSE, id, serial, 0, -1);
}

/* Returns the number of events copied into out (at most max), without blocking. */
int xsk_link_events(struct xsk_link *l, struct xsk_event *out, int max)
{
    uint64_t v;
    ssize_t r = read(l->ev_fd, &v, sizeof(v));
    (void)r;
    pthread_mutex_lock(&l->ev_lock);
    int n = 0;
    while (n < max && l->ev_count) {
        out[n++] = l->events[l->ev_head];
        l->ev_head = (l->ev_head + 1) % l->ev_cap;
        l->ev_count--;
    }
    if (l->ev_count) {
        uint64_t one = 1;
        r = write(l->ev_fd, &one, sizeof(one)); /* more to collect */
    }
    pthread_mutex_unlock(&l->ev_lock);
    return n;
}

/* Returns 0 with the link's counters in *out. */
int xsk_link_stats(struct xsk_link *l, struct xsk_link_stats *out)
{
    out->bytes_in = relaxed_load(&l->stats.bytes_in);
    out->bytes_out = relaxed_load(&l->stats.bytes_out);
    out->frames_in = relaxed_load(&l->stats.frames_in);
    out->frames_out = relaxed_load(&l->stats.frames_out);
    out->notify_sent = relaxed_load(&l->stats.notify_sent);
    out->wakeups = relaxed_load(&l->stats.wakeups);
    pthread_mutex_lock(&l->table_lock);
    out->streams = l->nstreams;
    pthread_mutex_unlock(&l->table_lock);
    out->peer_live = load_acquire(peer_live(l)) == 1;
    return 0;
}

/* Returns the number of streams described in out (at most max). */
int xsk_link_streams(struct xsk_link *l, struct xsk_stream_info *out, int max)
{
    int n = 0;
    pthread_mutex_lock(&l->table_lock);
    for (uint32_t i = 0; i <= l->table_mask && n < max; i++) {
        struct stream *s = l->table[i];
        if (!s)
            continue;
        out[n].id = s->id;
        out[n].serial = s->serial;
        out[n].state = relaxed_load(&s->state);
        out[n].bytes_in = relaxed_load(&s->bytes_in);
        out[n].bytes_out = relaxed_load(&s->bytes_out);
        out[n].tx_credit = relaxed_load(&s->tx_credit);
        out[n].rx_buffered = relaxed_load(&s->pend_len);
        n++;
    }
    pthread_mutex_unlock(&l->table_lock);
    return n;
}

/* Returns 0 with what the link still holds in *out: bytes on their way in either direction.
 * Reads the pump's counters without stopping it, so a busy link's figures are a snapshot. */
int xsk_link_held(struct xsk_link *l, struct xsk_link_held *out)
{
    memset(out, 0, sizeof(*out));
    /* Our own tx prod and rx cons; the peer's tx cons and rx prod, read once and bounded. */
    uint32_t tx_used = relaxed_load(&l->tx.shr->prod) - load_acquire(&l->tx.shr->cons);
    uint32_t rx_used = load_acquire(&l->rx.shr->prod) - relaxed_load(&l->rx.shr->cons);
    out->tx_ring = tx_used > l->tx.size ? l->tx.size : tx_used;
    out->rx_ring = rx_used > l->rx.size ? l->rx.size : rx_used;
    /* Wake our pump: it reads the peer's lazy CREDIT frames (credit_idle_streams), so that
     * the next look of a draining daemon finds what the peer holds no more. */
    uint64_t one = 1;
    ssize_t w = write(l->cmd_fd, &one, sizeof(one));
    (void)w;
    pthread_mutex_lock(&l->table_lock);
    for (uint32_t i = 0; i <= l->table_mask; i++) {
        struct stream *s = l->table[i];
        if (!s)
            continue;
        out->streams++;
        int fd = __atomic_load_n(&s->fd, __ATOMIC_RELAXED); /* closed only under this lock */
        int unread = 0;
        if (fd >= 0 && ioctl(fd, FIONREAD, &unread) == 0 && unread > 0)
            out->app_unread += (uint64_t)unread;
        uint32_t state = relaxed_load(&s->state);
        if (state == ST_OPEN || state == ST_HALF || state == ST_OPENING) { /* + early DATA */
            uint32_t window = relaxed_load(&s->peer_window), credit = relaxed_load(&s->tx_credit);
            out->unacked += window > credit ? window - credit : 0;
        }
        out->undelivered += relaxed_load(&s->pend_len);
    }
    pthread_mutex_unlock(&l->table_lock);
    return 0;
}

/* Returns 0 once the pump has stopped and closed every stream's socket (blocks; called
 * without the GIL).  goodbye: tell the peer we are leaving on purpose. */
int xsk_link_stop(struct xsk_link *l, int goodbye)
{
    if (!l->started)
        return 0;
    struct cmd *c = calloc(1, sizeof(*c));
    if (c) {
        c->type = CMD_STOP;
        c->fd = -1;
        c->arg = (uint32_t)goodbye;
        (void)enqueue(l, c); /* -ESHUTDOWN: the pump already ended by itself */
    } else {
        pthread_mutex_lock(&l->cmd_lock); /* no memory for the command: stop all the same */
        l->stop_asked = 1;
        pthread_mutex_unlock(&l->cmd_lock);
        uint64_t one = 1;
        ssize_t r = write(l->cmd_fd, &one, sizeof(one));
        (void)r;
    }
    pthread_join(l->thread, NULL);
    l->started = 0;
    return 0;
}

/* Frees the link; stops the pump first if it still runs.  The shared memory is not ours. */
void xsk_link_free(struct xsk_link *l)
{
    if (!l)
        return;
    xsk_link_stop(l, 0);
    if (l->table)
        close_all(l, XSK_R_LINK_DOWN);
    struct cmd *c = l->cmd_head;
    while (c) {
        struct cmd *next = c->next;
        if (c->type == CMD_OPEN || c->type == CMD_ACCEPT || c->type == CMD_LISTEN)
            close(c->fd);
        free(c);
        c = next;
    }
    if (l->epfd >= 0)
        close(l->epfd);
    if (l->cmd_fd >= 0)
        close(l->cmd_fd);
    if (l->ev_fd >= 0)
        close(l->ev_fd);
    free(l->table);
    free(l->events);
    free(l->adm);
    free(l->lsn);
    if (l->budget)
        xsk_budget_unref(l->budget);
    pthread_mutex_destroy(&l->adm_lock);
    pthread_mutex_destroy(&l->table_lock);
    pthread_mutex_destroy(&l->cmd_lock);
    pthread_mutex_destroy(&l->ev_lock);
    free(l);
}

/* Returns 0 once the link's admission table is entries[0..n) (sorted by name, strictly) and
 * its peer's budget is budget (the link holds a reference); n == 0 or budget NULL: every
 * OPEN goes to Python.  -EINVAL for a table out of order, too long or with a bad entry (the
 * old table stays), -ENOMEM.  Takes effect for the next OPEN the pump reads. */
int xsk_link_set_admission(struct xsk_link *l, const struct xsk_admit_entry *entries, int n,
                           struct xsk_budget *budget)
{
    if (n < 0 || n > XSK_ADMIT_MAX)
        return -EINVAL;
    struct xsk_admit_entry *copy = NULL;
    if (n) {
        copy = malloc((size_t)n * sizeof(*copy));
        if (!copy)
            return -ENOMEM;
        memcpy(copy, entries, (size_t)n * sizeof(*copy));
    }
    for (int i = 0; i < n; i++) {
        struct xsk_admit_entry *e = &copy[i];
        size_t nl = strnlen(e->name, sizeof(e->name));
        size_t pl = strnlen(e->path, sizeof(e->path));
        if (nl == sizeof(e->name) || (nl && !xsk_valid_service_name(e->name, (uint32_t)nl)) ||
            pl == 0 || pl == sizeof(e->path) || e->header_len > sizeof(e->header) ||
            (i && strcmp(copy[i - 1].name, e->name) >= 0)) {
            free(copy);
            return -EINVAL;
        }
    }
    if (budget) {
        pthread_mutex_lock(&budget->lock);
        budget->refs++;
        pthread_mutex_unlock(&budget->lock);
    }
    pthread_mutex_lock(&l->adm_lock);
    struct xsk_admit_entry *old = l->adm;
    struct xsk_budget *old_budget = l->budget;
    l->adm = copy;
    l->nadm = n;
    l->budget = budget;
    pthread_mutex_unlock(&l->adm_lock);
    free(old);
    if (old_budget)
        xsk_budget_unref(old_budget);
    return 0;
}

/* Returns 0 and a budget of rate opens a second holding at most burst (full), one reference
 * held by the caller. */
int xsk_budget_new(double rate, double burst, struct xsk_budget **out)
{
    if (!(rate >= 0) || !(burst >= 0))
        return -EINVAL;
    struct xsk_budget *b = calloc(1, sizeof(*b));
    if (!b)
        return -ENOMEM;
    pthread_mutex_init(&b->lock, NULL);
    b->refs = 1;
    b->rate = rate;
    b->burst = b->tokens = burst;
    b->at_ns = now_ns();
    *out = b;
    return 0;
}

/* Switches to a new rate and burst (a reload), keeping the tokens earned so far. */
void xsk_budget_set(struct xsk_budget *b, double rate, double burst)
{
    pthread_mutex_lock(&b->lock);
    budget_refill(b);
    b->rate = rate >= 0 ? rate : 0;
    b->burst = burst >= 0 ? burst : 0;
    if (b->tokens > b->burst)
        b->tokens = b->burst;
    pthread_mutex_unlock(&b->lock);
}

/* Counts an open Python admitted: a token, even one not there yet (down to -burst), so that
 * the pump admits no more until the peer's rate has paid for it. */
void xsk_budget_charge(struct xsk_budget *b)
{
    pthread_mutex_lock(&b->lock);
    budget_refill(b);
    b->tokens -= 1.0;
    if (b->tokens < -b->burst)
        b->tokens = -b->burst;
    pthread_mutex_unlock(&b->lock);
}

/* Returns the tokens there now (for tests and statistics). */
double xsk_budget_tokens(struct xsk_budget *b)
{
    pthread_mutex_lock(&b->lock);
    budget_refill(b);
    double t = b->tokens;
    pthread_mutex_unlock(&b->lock);
    return t;
}

/* Drops one reference; the last frees the budget. */
void xsk_budget_unref(struct xsk_budget *b)
{
    pthread_mutex_lock(&b->lock);
    int last = --b->refs == 0;
    pthread_mutex_unlock(&b->lock);
    if (last) {
        pthread_mutex_destroy(&b->lock);
        free(b);
    }
}
