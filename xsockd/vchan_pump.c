/*
 * vchan_pump.c - one thread per vchan moving bytes between a local stream socket and a vchan
 * endpoint.  See vchan_pump.h; docs/VCHAN.md for the end rules.
 *
 * The endpoint does every check of what the peer writes; the pump only reacts to its results
 * (-EPROTO ends the vchan, -EPIPE is the peer gone).  Nothing is buffered outside the rings: a
 * full tx ring stops reading the socket (back-pressure reaches the application's writes), a
 * socket that takes nothing stops consuming the rx ring.
 */
#define _GNU_SOURCE
#include "vchan_pump.h"
#include "vchan_core.h"
#include "xsk_atomic.h"
#include "xsk_evtchn.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define SAFETY_TIMEOUT_MS 1000 /* wake regardless: a peer that clears our requests only delays */
/* While our bytes wait in the ring and the peer says nothing, we notify it again after 10 ms,
 * then 20, 40 .. up to SAFETY_TIMEOUT_MS.  Found on real Xen: vchan-socket-proxy -m server
 * takes the wake of our attach (cli_live 1) outside its data loop; when our first write's
 * notification reached it together with that one, it waited in select() for an event that
 * never came, our bytes in its ring, while we waited for it to consume them. */
#define KICK_FIRST_MS 10

struct xsk_vchan_pump {
    struct xsk_vchan *v;
    int fd;
    uint32_t evtchn_kind;
    int evtchn_fd, evtchn_notify_fd;
    uint32_t evtchn_port;
    uint32_t linger_ms;
    int epfd, stop_fd, ev_fd;
    pthread_t thread;
    int started, joined;
    int stop;                   /* atomic: asked to stop */
    int err;                    /* the pump thread's: errno of a failed socket call */
    struct xsk_vchan_pump_result result; /* written by the pump before ev_fd, under lock */
    pthread_mutex_t lock;
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void notify_peer(struct xsk_vchan_pump *p)
{
    xsk_evtchn_notify(p->evtchn_kind, p->evtchn_fd, p->evtchn_notify_fd, p->evtchn_port);
}

/* Ring -> socket.  Returns 1 on progress, 0 if nothing could move, <0 an end (-reason). */
static int to_socket(struct xsk_vchan_pump *p, int *sock_wr, int *want_data, int *notify)
{
    struct iovec iov[2];
    int ready = xsk_vchan_rx_peek(p->v, iov);
    if (ready == -EPIPE)
        return -XSK_VCHAN_END_PEER; /* gone, and everything it wrote is delivered */
    if (ready < 0)
        return -XSK_VCHAN_END_PROTO;
    if (!ready) {
        *want_data = 1;
        return 0;
    }
    if (!*sock_wr)
        return 0;
    /* sendmsg, not writev: MSG_NOSIGNAL, a closed reader must not raise SIGPIPE. */
    struct msghdr msg = { .msg_iov = iov, .msg_iovlen = iov[1].iov_len ? 2 : 1 };
    ssize_t n = sendmsg(p->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            *sock_wr = 0;
            return 0;
        }
        if (errno == EINTR)
            return 0;
        p->err = errno;
        return -XSK_VCHAN_END_SOCKET;
    }
    xsk_vchan_rx_consume(p->v, (uint32_t)n, notify);
    return n > 0;
}

/* Socket -> ring.  Returns 1 on progress, 0 if nothing could move, <0 an end (-reason). */
static int from_socket(struct xsk_vchan_pump *p, int *sock_rd, int *rd_eof, int *want_space,
                       int *notify)
{
    struct iovec iov[2];
    int space = xsk_vchan_tx_reserve(p->v, iov);
    if (space == -EPIPE)
        return 0; /* the peer is gone: to_socket finishes the stream */
    if (space < 0)
        return -XSK_VCHAN_END_PROTO;
    if (!space) {
        *want_space = 1;
        return 0;
    }
    if (!*sock_rd) {
        xsk_vchan_tx_commit(p->v, 0, notify);
        return 0;
    }
    ssize_t n = readv(p->fd, iov, iov[1].iov_len ? 2 : 1);
    if (n < 0) {
        xsk_vchan_tx_commit(p->v, 0, notify);
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            *sock_rd = 0;
            return 0;
        }
        if (errno == EINTR)
            return 0;
        p->err = errno;
        return -XSK_VCHAN_END_SOCKET;
    }
    xsk_vchan_tx_commit(p->v, (uint32_t)n, notify);
    if (!n)
        *rd_eof = 1;
    return 1;
}

static void *pump(void *arg)
{
    struct xsk_vchan_pump *p = arg;
    int sock_rd = 1, sock_wr = 1, rd_eof = 0, end = 0, rechecked = 0;
    int kick_ms = KICK_FIRST_MS; /* the next silence after which we notify again */
    int64_t linger_end = 0;
    int64_t gone_end = 0;       /* the peer gone: when we stop waiting for the socket to take
                                   what it wrote (reset by every progress) */
    int hup = 0;                /* the socket's writer is gone; its EOF waits behind its data */
    int64_t hup_end = 0;        /* then: when we stop waiting for the peer to make room for
                                   that data (reset by every progress) */
    struct epoll_event evs[8];

    while (!end) {
        if (__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) {
            end = XSK_VCHAN_END_STOPPED;
            break;
        }
        int want_data = 0, want_space = 0, notify = 0, progress = 0, rc;
        rc = to_socket(p, &sock_wr, &want_data, &notify);
        if (rc < 0) {
            end = -rc;
        } else {
            progress |= rc;
            if (!rd_eof) {
                rc = from_socket(p, &sock_rd, &rd_eof, &want_space, &notify);
                if (rc < 0)
                    end = -rc;
                progress |= rc > 0;
                if (rd_eof)
                    linger_end = now_ms() + p->linger_ms;
            }
        }
        if (!end && rd_eof) {
            /* No half-close on the wire: we leave once the peer has consumed every byte
             * (a libxenvchan peer discards what is left in the ring when it sees us go). */
            int left = xsk_vchan_tx_unconsumed(p->v);
            if (left < 0)
                end = XSK_VCHAN_END_PROTO;
            else if (!left)
                end = XSK_VCHAN_END_LOCAL;
            else if (now_ms() >= linger_end)
                end = XSK_VCHAN_END_LINGER;
            want_space = 1;
        }
        if (!end && hup && !rd_eof) {
            /* The application left with bytes still queued in the socket: we would read its
             * EOF only once the peer made room for them.  A peer that consumes nothing must
             * not hold the vchan forever: linger bounds each stall, as after the EOF. */
            if (progress || !hup_end)
                hup_end = now_ms() + p->linger_ms;
            else if (now_ms() >= hup_end)
                end = XSK_VCHAN_END_LINGER;
        }
        if (!end && xsk_vchan_peer_live(p->v) == XSK_VCHAN_GONE) {
            /* A socket that takes nothing (its reader waits for a reply the gone peer will
             * never read) must not hold the vchan forever: linger bounds each stall. */
            if (progress || !gone_end)
                gone_end = now_ms() + p->linger_ms;
            else if (now_ms() >= gone_end)
                end = XSK_VCHAN_END_UNDELIVERED;
        }
        if (notify)
            notify_peer(p);
        if (end)
            continue;
        if (progress) {
            rechecked = 0;
            kick_ms = KICK_FIRST_MS;
            continue;
        }
        /* About to sleep: ask the peer for what we wait on, then look once more, so that an
         * update made before our request was seen is not missed.  arm also says yes for a
         * peer that is gone, or space short of all consumed: look once, then sleep (the
         * socket or the linger wakes us). */
        rc = xsk_vchan_arm(p->v, want_data && sock_wr, want_space);
        if (rc < 0) {
            end = XSK_VCHAN_END_PROTO;
            continue;
        }
        if (rc > 0 && !rechecked) {
            rechecked = 1;
            continue;
        }
        rechecked = 0;
        int unconsumed = xsk_vchan_tx_unconsumed(p->v) > 0;
        int timeout = unconsumed ? kick_ms : SAFETY_TIMEOUT_MS;
        int64_t until = rd_eof ? linger_end : 0;
        if (gone_end && (!until || gone_end < until))
            until = gone_end;
        if (hup_end && !rd_eof && (!until || hup_end < until))
            until = hup_end;
        if (until) {
            int64_t left = until - now_ms();
            timeout = left < 0 ? 0 : left < timeout ? (int)left : timeout;
        }
        int n = epoll_wait(p->epfd, evs, 8, timeout);
        if (n == 0 && unconsumed) { /* silence with our bytes in the ring: notify again */
            notify_peer(p);
            kick_ms = kick_ms * 2 > SAFETY_TIMEOUT_MS ? SAFETY_TIMEOUT_MS : kick_ms * 2;
        }
        for (int i = 0; i < n; i++) {
            uint32_t e = evs[i].events;
            switch (evs[i].data.u32) {
            case 0: /* the event channel */
                xsk_evtchn_clear(p->evtchn_kind, p->evtchn_fd);
                break;
            case 1: /* the socket (edge-triggered) */
                if (e & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))
                    sock_rd = 1;
                if (e & (EPOLLHUP | EPOLLRDHUP))
                    hup = 1;
                if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR))
                    sock_wr = 1;
                break;
            default: /* stop: read at the top of the loop */
                break;
            }
        }
    }

    int err = end == XSK_VCHAN_END_PROTO ? EPROTO : end == XSK_VCHAN_END_SOCKET ? p->err : 0;
    if (end == XSK_VCHAN_END_PEER)
        shutdown(p->fd, SHUT_WR); /* everything delivered: the application reads EOF */
    close(p->fd);
    p->fd = -1;
    if (xsk_vchan_close(p->v))
        notify_peer(p); /* our live byte is 0: the peer sees us gone */
    struct xsk_vchan_status st;
    xsk_vchan_status(p->v, &st);
    pthread_mutex_lock(&p->lock);
    p->result.reason = end;
    p->result.err = err;
    p->result.bytes_in = st.bytes_in;
    p->result.bytes_out = st.bytes_out;
    pthread_mutex_unlock(&p->lock);
    uint64_t one = 1;
    ssize_t w = write(p->ev_fd, &one, sizeof(one));
    (void)w;
    return NULL;
}

/* Returns 0 and a running pump in *out; it owns fd from then on (closes it even on failure),
 * and drives the endpoint alone until it has ended.  -EINVAL for bad parameters. */
int xsk_vchan_pump_start(const struct xsk_vchan_pump_params *params, struct xsk_vchan_pump **out)
{
    if (!params->vchan || params->fd < 0 ||
        (params->evtchn_kind != XSK_EVTCHN_EVENTFD && params->evtchn_kind != XSK_EVTCHN_XEN)) {
        if (params->fd >= 0)
            close(params->fd);
        return -EINVAL;
    }
    struct xsk_vchan_pump *p = calloc(1, sizeof(*p));
    if (!p) {
        close(params->fd);
        return -ENOMEM;
    }
    p->v = params->vchan;
    p->fd = params->fd;
    p->evtchn_kind = params->evtchn_kind;
    p->evtchn_fd = params->evtchn_fd;
    p->evtchn_notify_fd = params->evtchn_notify_fd;
    p->evtchn_port = params->evtchn_port;
    p->linger_ms = params->linger_ms;
    pthread_mutex_init(&p->lock, NULL);
    /* Non-blocking: the pump must never sleep anywhere but in epoll_wait. */
    int fl = fcntl(p->fd, F_GETFL);
    int rc = fl < 0 || fcntl(p->fd, F_SETFL, fl | O_NONBLOCK) < 0 ? -errno : 0;
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p->ev_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!rc && (p->epfd < 0 || p->stop_fd < 0 || p->ev_fd < 0))
        rc = -ENOMEM;
    struct epoll_event ev = { .events = EPOLLIN, .data.u32 = 0 };
    if (!rc && epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->evtchn_fd, &ev) < 0)
        rc = -errno;
    ev = (struct epoll_event){ .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                               .data.u32 = 1 };
    if (!rc && epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->fd, &ev) < 0)
        rc = -errno;
    ev = (struct epoll_event){ .events = EPOLLIN, .data.u32 = 2 };
    if (!rc && epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->stop_fd, &ev) < 0)
        rc = -errno;
    if (!rc) {
        rc = -pthread_create(&p->thread, NULL, pump, p);
        p->started = rc == 0;
    }
    if (rc) {
        xsk_vchan_pump_free(p);
        return rc;
    }
    *out = p;
    return 0;
}

/* Returns the eventfd that becomes readable once the pump has ended. */
int xsk_vchan_pump_event_fd(struct xsk_vchan_pump *p) { return p->ev_fd; }

/* Returns 0 with the end in *out once the pump has ended; -EAGAIN while it runs. */
int xsk_vchan_pump_result(struct xsk_vchan_pump *p, struct xsk_vchan_pump_result *out)
{
    pthread_mutex_lock(&p->lock);
    *out = p->result;
    pthread_mutex_unlock(&p->lock);
    return out->reason ? 0 : -EAGAIN;
}

/* Returns 0 once the pump has ended (asking it to, if it still runs) and its thread is
 * joined; blocks (called without the GIL). */
int xsk_vchan_pump_stop(struct xsk_vchan_pump *p)
{
    if (!p->started || p->joined)
        return 0;
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    ssize_t w = write(p->stop_fd, &one, sizeof(one));
    (void)w;
    pthread_join(p->thread, NULL);
    p->joined = 1;
    return 0;
}

/* Frees the pump, stopping it first if it runs.  The endpoint is not the pump's. */
void xsk_vchan_pump_free(struct xsk_vchan_pump *p)
{
    if (!p)
        return;
    xsk_vchan_pump_stop(p);
    if (p->fd >= 0)
        close(p->fd); /* never started */
    if (p->epfd >= 0)
        close(p->epfd);
    if (p->stop_fd >= 0)
        close(p->stop_fd);
    if (p->ev_fd >= 0)
        close(p->ev_fd);
    pthread_mutex_destroy(&p->lock);
    free(p);
}
