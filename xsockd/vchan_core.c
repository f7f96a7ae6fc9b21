/*
 * vchan_core.c - one endpoint of a libxenvchan byte stream.  See vchan_core.h for the shared
 * page and docs/VCHAN.md for the protocol and how xsockd uses it.
 *
 * Written from the wire format only; independent of ring_core.c but for the barrier header.
 * The peer is untrusted: each index, order, grant and live byte it can write is read once
 * into a local, checked, and only the local is used.  Our own indices live in private copies
 * that are published but never read back, so a peer scribbling on them changes nothing here.
 * A violation breaks the endpoint for good (-EPROTO from every later call); no access ever
 * leaves the ring the orders given at attach describe.
 *
 * Not thread-safe: one thread drives an endpoint (the status counters excepted).
 */
#include "vchan_core.h"
#include "xsk_atomic.h"

#include <errno.h>
#include <sys/uio.h>
#include <stdlib.h>
#include <string.h>

#define PAGE 4096u

/* Where the server's fresh indices start: 0 on the wire.  The sanitizer test build starts
 * them just below 2^32 so that every test crosses the index wrap. */
#ifndef XSK_TEST_INDEX_BASE
#define XSK_TEST_INDEX_BASE 0u
#endif

_Static_assert(XSK_VCHAN_OFF_GRANTS == 24, "the grant list follows the four notify/live bytes");

struct vring {
    uint32_t *prod_shr, *cons_shr;  /* indices in the shared page */
    uint8_t *data_shr;              /* ring bytes in shared memory */
    uint32_t size, mask;            /* from the checked orders; never read from shared memory */
    uint32_t pvt;                   /* our own index: prod of tx, cons of rx */
};

struct xsk_vchan {
    struct vring tx, rx;
    uint8_t *own_live_shr, *peer_live_shr;
    uint8_t *own_notify_shr;        /* bits we honour: the peer sets them, we clear them */
    uint8_t *peer_notify_shr;       /* bits the peer honours: we set them to ask */
    uint32_t role;
    uint8_t peer_live_max;          /* 2 for a client peer (may not have attached yet), else 1 */
    int peer_gone;                  /* latched: once gone, a peer never comes back */
    int closed;
    int broken;                     /* 0 or the -errno that ended this endpoint */
    uint32_t tx_reserved, rx_peeked; /* what the last reserve / peek allowed */
    uint64_t bytes_in, bytes_out;   /* relaxed atomics: xsk_vchan_status may run elsewhere */
};

/* Returns 0 and where orders (left, right) put the rings, or -EINVAL if libxenvchan's rules
 * forbid them: each order 10..20, at most one ring in each in-page slot, and the grant list
 * ending before the first in-page ring (or the page's end). */
int xsk_vchan_layout(uint32_t left_order, uint32_t right_order, struct xsk_vchan_layout *out)
{
    if (left_order < XSK_VCHAN_MIN_ORDER || left_order > XSK_VCHAN_MAX_ORDER ||
        right_order < XSK_VCHAN_MIN_ORDER || right_order > XSK_VCHAN_MAX_ORDER)
        return -EINVAL;
    if (left_order == right_order && left_order < XSK_VCHAN_PAGE_ORDER)
        return -EINVAL; /* both rings in one slot */
    uint32_t orders[2] = { left_order, right_order }, offsets[2], pages[2], limit = PAGE;
    for (int i = 0; i < 2; i++) {
        offsets[i] = pages[i] = 0;
        if (orders[i] >= XSK_VCHAN_PAGE_ORDER)
            pages[i] = 1u << (orders[i] - XSK_VCHAN_PAGE_ORDER);
        else
            offsets[i] = orders[i] == XSK_VCHAN_MIN_ORDER ? XSK_VCHAN_SMALL_OFFSET
                                                           : XSK_VCHAN_LARGE_OFFSET;
        if (offsets[i] && offsets[i] < limit)
            limit = offsets[i];
    }
    uint32_t end = XSK_VCHAN_OFF_GRANTS + 4 * (pages[0] + pages[1]);
    if (end > limit)
        return -EINVAL; /* the grant list would run into a ring */
    *out = (struct xsk_vchan_layout){ left_order, right_order, offsets[0], offsets[1],
                                      pages[0], pages[1], end };
    return 0;
}

/* Returns 0 once page holds a fresh server's shared page: indices at their start, the orders,
 * no client yet, a request for the client's write notifications, and the grant list (left
 * ring's pages, then the right's).  Call before the page is granted. */
int xsk_vchan_server_init(void *page, uint32_t left_order, uint32_t right_order,
                          const uint32_t *grants, uint32_t ngrants)
{
    struct xsk_vchan_layout lay;
    if (!page || xsk_vchan_layout(left_order, right_order, &lay) < 0 ||
        ngrants != lay.left_pages + lay.right_pages || (ngrants && !grants))
        return -EINVAL;
    uint8_t *pg = page;
    memset(pg, 0, PAGE);
    uint32_t base = XSK_TEST_INDEX_BASE;
    memcpy(pg + XSK_VCHAN_OFF_LEFT_CONS, &base, 4);
    memcpy(pg + XSK_VCHAN_OFF_LEFT_PROD, &base, 4);
    memcpy(pg + XSK_VCHAN_OFF_RIGHT_CONS, &base, 4);
    memcpy(pg + XSK_VCHAN_OFF_RIGHT_PROD, &base, 4);
    uint16_t lo = (uint16_t)left_order, ro = (uint16_t)right_order;
    memcpy(pg + XSK_VCHAN_OFF_LEFT_ORDER, &lo, 2);
    memcpy(pg + XSK_VCHAN_OFF_RIGHT_ORDER, &ro, 2);
    if (ngrants)
        memcpy(pg + XSK_VCHAN_OFF_GRANTS, grants, 4 * (size_t)ngrants);
    pg[XSK_VCHAN_OFF_CLI_LIVE] = XSK_VCHAN_WAITING;
    pg[XSK_VCHAN_OFF_CLI_NOTIFY] = XSK_VCHAN_NOTIFY_WRITE; /* tell us when the client writes */
    /* The page reaches the client through a grant and XenStore (system calls, full barriers);
     * releasing srv_live last orders the rest before it all the same. */
    store_release(pg + XSK_VCHAN_OFF_SRV_LIVE, (uint8_t)XSK_VCHAN_CONNECTED);
    return 0;
}

/* Returns the number of grant references copied into grants (left ring's, then right's) with
 * the layout in *out, reading the server's orders and grant list once; -EPROTO if the server
 * published orders libxenvchan forbids, -ENOSPC if max_grants is too small. */
int xsk_vchan_client_probe(const void *page, struct xsk_vchan_layout *out, uint32_t *grants,
                           uint32_t max_grants)
{
    const uint8_t *pg = page;
    uint32_t lo = relaxed_load((const uint16_t *)(pg + XSK_VCHAN_OFF_LEFT_ORDER));
    uint32_t ro = relaxed_load((const uint16_t *)(pg + XSK_VCHAN_OFF_RIGHT_ORDER));
    struct xsk_vchan_layout lay;
    if (xsk_vchan_layout(lo, ro, &lay) < 0)
        return -EPROTO;
    uint32_t n = lay.left_pages + lay.right_pages;
    if (n > max_grants)
        return -ENOSPC;
    const uint32_t *g = (const uint32_t *)(pg + XSK_VCHAN_OFF_GRANTS);
    for (uint32_t i = 0; i < n; i++)
        grants[i] = relaxed_load(&g[i]);
    *out = lay;
    return (int)n;
}

/* ---- the endpoint ----------------------------------------------------------------------- */

static int broken(struct xsk_vchan *v)
{
    v->broken = -EPROTO;
    return -EPROTO;
}

/* Returns the peer's live byte (GONE once it has been seen gone), or -EPROTO for a value the
 * protocol does not have.  Acquire: a peer that leaves clears its byte after its last index
 * update (its unmap notification runs after its process is gone), so reading the byte before
 * the indices sees every byte it produced. */
static int peer_live(struct xsk_vchan *v)
{
    if (v->peer_gone)
        return XSK_VCHAN_GONE;
    uint8_t live = load_acquire(v->peer_live_shr);
    if (live > v->peer_live_max)
        return broken(v);
    if (live == XSK_VCHAN_GONE)
        v->peer_gone = 1;
    return live;
}

/* Returns the bytes ready in the rx ring, or -EPROTO if the peer's prod is out of range. */
static int64_t rx_ready(struct xsk_vchan *v)
{
    /* Acquire on prod pairs with the peer's barrier between writing data and prod. */
    uint32_t ready = load_acquire(v->rx.prod_shr) - v->rx.pvt;
    if (ready > v->rx.size)
        return broken(v); /* prod ahead by more than a ring, or behind our cons */
    return ready;
}

/* Returns the free bytes in the tx ring, or -EPROTO if the peer's cons is out of range. */
static int64_t tx_space(struct xsk_vchan *v)
{
    /* Acquire on cons pairs with the peer's barrier between reading data and cons: we never
     * overwrite bytes it is still reading. */
    uint32_t used = v->tx.pvt - load_acquire(v->tx.cons_shr);
    if (used > v->tx.size)
        return broken(v); /* cons ahead of our prod, or behind it by more than a ring */
    return v->tx.size - used;
}

/* Returns 1 if the peer asked to be notified of `bit` (and clears its request), else 0. */
static int honour(struct xsk_vchan *v, uint8_t bit)
{
    /* Our index store before reading the peer's request; pairs with the fence in the peer's
     * arm between setting the bit and re-reading our index: one of us sees the other. */
    full_fence();
    if (!(relaxed_load(v->own_notify_shr) & bit))
        return 0;
    return (__atomic_fetch_and(v->own_notify_shr, (uint8_t)~bit, __ATOMIC_SEQ_CST) & bit) != 0;
}

static int usable(struct xsk_vchan *v)
{
    if (v->broken)
        return v->broken;
    return v->closed ? -ESHUTDOWN : 0;
}

/* Returns 0 and a new endpoint in *out on the caller's mapping of a vchan; -EINVAL for bad
 * parameters, -EPROTO if the shared indices or the client's live byte are out of range,
 * -EBUSY for a client if another client is connected.  A client attaching marks itself
 * connected and asks for the server's write notifications: the caller then notifies the
 * server.  On a page a previous client left, it skips what the server wrote for that one.
 * The memory is the caller's and must outlive the endpoint. */
int xsk_vchan_attach(const struct xsk_vchan_params *p, struct xsk_vchan **out)
{
    struct xsk_vchan_layout lay;
    if (!p->page || p->role > XSK_VCHAN_SERVER ||
        xsk_vchan_layout(p->left_order, p->right_order, &lay) < 0 ||
        !p->left != !lay.left_pages || !p->right != !lay.right_pages)
        return -EINVAL; /* a ring's pages are given exactly when it has pages */
    uint8_t *pg = p->page;
    struct vring left = {
        (uint32_t *)(pg + XSK_VCHAN_OFF_LEFT_PROD), (uint32_t *)(pg + XSK_VCHAN_OFF_LEFT_CONS),
        lay.left_pages ? p->left : pg + lay.left_offset, 1u << lay.left_order,
        (1u << lay.left_order) - 1, 0 };
    struct vring right = {
        (uint32_t *)(pg + XSK_VCHAN_OFF_RIGHT_PROD), (uint32_t *)(pg + XSK_VCHAN_OFF_RIGHT_CONS),
        lay.right_pages ? p->right : pg + lay.right_offset, 1u << lay.right_order,
        (1u << lay.right_order) - 1, 0 };
    struct xsk_vchan *v = calloc(1, sizeof(*v));
    if (!v)
        return -ENOMEM;
    int server = p->role == XSK_VCHAN_SERVER;
    v->role = p->role;
    v->tx = server ? right : left;
    v->rx = server ? left : right;
    v->own_live_shr = pg + (server ? XSK_VCHAN_OFF_SRV_LIVE : XSK_VCHAN_OFF_CLI_LIVE);
    v->peer_live_shr = pg + (server ? XSK_VCHAN_OFF_CLI_LIVE : XSK_VCHAN_OFF_SRV_LIVE);
    v->own_notify_shr = pg + (server ? XSK_VCHAN_OFF_SRV_NOTIFY : XSK_VCHAN_OFF_CLI_NOTIFY);
    v->peer_notify_shr = pg + (server ? XSK_VCHAN_OFF_CLI_NOTIFY : XSK_VCHAN_OFF_SRV_NOTIFY);
    v->peer_live_max = server ? XSK_VCHAN_WAITING : XSK_VCHAN_CONNECTED;
    /* Our own indices start where the page says, read once: a libxenvchan server keeps its
     * page for the next client, so a client may find them anywhere. */
    v->tx.pvt = load_acquire(v->tx.prod_shr);
    v->rx.pvt = load_acquire(v->rx.cons_shr);
    int64_t ready = rx_ready(v);
    if (tx_space(v) < 0 || ready < 0) {
        free(v);
        return -EPROTO;
    }
    if (!server) {
        /* Our live byte as the server (2) or a previous client (0, 1) left it, read once. */
        uint8_t was = load_acquire(v->own_live_shr);
        if (was == XSK_VCHAN_CONNECTED || was > XSK_VCHAN_WAITING) {
            free(v);
            return was == XSK_VCHAN_CONNECTED ? -EBUSY : -EPROTO; /* one client at a time */
        }
        if (was == XSK_VCHAN_GONE && ready) {
            /* A reused page: what waits in our rx ring was written for the previous client
             * (a libxenvchan server does not take it back), so it is not ours to deliver. */
            v->rx.pvt += (uint32_t)ready;
            store_release(v->rx.cons_shr, v->rx.pvt); /* pairs with the server's acquire */
        }
        /* Ask for the server's write notifications before saying we are here; release: the
         * server sees our request (and index reads) once it sees us connected. */
        __atomic_fetch_or(v->peer_notify_shr, (uint8_t)XSK_VCHAN_NOTIFY_WRITE, __ATOMIC_SEQ_CST);
        store_release(v->own_live_shr, (uint8_t)XSK_VCHAN_CONNECTED);
    }
    *out = v;
    return 0;
}

/* Returns the free bytes of the tx ring (iov[0], iov[1]: where they are in ring memory, in
 * order), 0 if it is full, -EPIPE if the peer is gone, -EPROTO if broken, -ESHUTDOWN after
 * close.  xsk_vchan_tx_commit then publishes what was written there. */
int xsk_vchan_tx_reserve(struct xsk_vchan *v, struct iovec iov[2])
{
    v->tx_reserved = 0;
    int rc = usable(v);
    if (rc < 0)
        return rc;
    int live = peer_live(v);
    if (live < 0)
        return live;
    if (live == XSK_VCHAN_GONE)
        return -EPIPE; /* nobody will ever read it */
    int64_t space = tx_space(v);
    if (space <= 0)
        return (int)space;
    uint32_t off = v->tx.pvt & v->tx.mask, first = v->tx.size - off;
    if (first > space)
        first = (uint32_t)space;
    iov[0] = (struct iovec){ v->tx.data_shr + off, first };
    iov[1] = (struct iovec){ v->tx.data_shr, (uint32_t)space - first };
    v->tx_reserved = (uint32_t)space;
    return (int)space; /* at most 1 MiB */
}

/* Returns 0 once n bytes written at the last reservation are published; -EINVAL if n is more
 * than was reserved.  Sets *notify to 1 if the peer must be notified. */
int xsk_vchan_tx_commit(struct xsk_vchan *v, uint32_t n, int *notify)
{
    if (n > v->tx_reserved)
        return -EINVAL;
    v->tx_reserved = 0;
    if (!n)
        return 0;
    v->tx.pvt += n;
    /* Release: the data before prod; pairs with the peer's read barrier after it reads prod. */
    store_release(v->tx.prod_shr, v->tx.pvt);
    relaxed_add(&v->bytes_out, n);
    if (honour(v, XSK_VCHAN_NOTIFY_WRITE))
        *notify = 1;
    return 0;
}

/* Returns the bytes ready in the rx ring (iov[0], iov[1]: where they are, in order), 0 if
 * none, -EPIPE once the peer is gone and everything it wrote has been consumed (end of
 * stream), -EPROTO if broken, -ESHUTDOWN after close.  The bytes stay the peer's to read
 * until xsk_vchan_rx_consume. */
int xsk_vchan_rx_peek(struct xsk_vchan *v, struct iovec iov[2])
{
    v->rx_peeked = 0;
    int rc = usable(v);
    if (rc < 0)
        return rc;
    int live = peer_live(v); /* before prod: see peer_live */
    if (live < 0)
        return live;
    int64_t ready = rx_ready(v);
    if (ready < 0)
        return (int)ready;
    if (!ready)
        return live == XSK_VCHAN_GONE ? -EPIPE : 0;
    uint32_t off = v->rx.pvt & v->rx.mask, first = v->rx.size - off;
    if (first > ready)
        first = (uint32_t)ready;
    iov[0] = (struct iovec){ v->rx.data_shr + off, first };
    iov[1] = (struct iovec){ v->rx.data_shr, (uint32_t)ready - first };
    v->rx_peeked = (uint32_t)ready;
    return (int)ready;
}

/* Returns 0 once n bytes of the last peek are handed back to the peer; -EINVAL if n is more
 * than was peeked.  Sets *notify to 1 if the peer must be notified. */
int xsk_vchan_rx_consume(struct xsk_vchan *v, uint32_t n, int *notify)
{
    if (n > v->rx_peeked)
        return -EINVAL;
    v->rx_peeked = 0;
    if (!n)
        return 0;
    v->rx.pvt += n;
    /* Release: our reads of the data before cons; the peer may overwrite them after. */
    store_release(v->rx.cons_shr, v->rx.pvt);
    relaxed_add(&v->bytes_in, n);
    if (honour(v, XSK_VCHAN_NOTIFY_READ))
        *notify = 1;
    return 0;
}

/* Returns the bytes we wrote that the peer has not consumed yet, or -EPROTO / -ESHUTDOWN. */
int xsk_vchan_tx_unconsumed(struct xsk_vchan *v)
{
    int rc = usable(v);
    if (rc < 0)
        return rc;
    int64_t space = tx_space(v);
    return space < 0 ? (int)space : (int)(v->tx.size - (uint32_t)space);
}

/* Copies n bytes between a buffer and the two pieces of ring memory iov describes. */
static void copy_iov(uint8_t *buf, const struct iovec iov[2], uint32_t n, int to_ring)
{
    uint32_t first = n < iov[0].iov_len ? n : (uint32_t)iov[0].iov_len;
    if (to_ring) {
        memcpy(iov[0].iov_base, buf, first);
        memcpy(iov[1].iov_base, buf + first, n - first);
    } else {
        memcpy(buf, iov[0].iov_base, first);
        memcpy(buf + first, iov[1].iov_base, n - first);
    }
}

/* Returns the bytes of buf (at most len, up to the free space) written into the tx ring: 0 if
 * it is full, -EPIPE if the peer is gone, -EPROTO if broken, -ESHUTDOWN after close.  Sets
 * *notify to 1 if the peer must be notified (it asked to hear of writes). */
int xsk_vchan_write(struct xsk_vchan *v, const void *buf, uint32_t len, int *notify)
{
    struct iovec iov[2];
    int space = xsk_vchan_tx_reserve(v, iov);
    if (space <= 0)
        return space;
    uint32_t n = len < (uint32_t)space ? len : (uint32_t)space;
    copy_iov((uint8_t *)buf, iov, n, 1);
    int rc = xsk_vchan_tx_commit(v, n, notify);
    return rc < 0 ? rc : (int)n;
}

/* Returns the bytes (at most len) read from the rx ring into buf: 0 if it is empty, -EPIPE
 * once the peer is gone and everything it wrote has been read (end of stream), -EPROTO if
 * broken, -ESHUTDOWN after close.  Sets *notify to 1 if the peer must be notified. */
int xsk_vchan_read(struct xsk_vchan *v, void *buf, uint32_t len, int *notify)
{
    if (!len) {
        int rc = usable(v);
        return rc < 0 ? rc : 0;
    }
    struct iovec iov[2];
    int ready = xsk_vchan_rx_peek(v, iov);
    if (ready <= 0)
        return ready;
    uint32_t n = len < (uint32_t)ready ? len : (uint32_t)ready;
    copy_iov(buf, iov, n, 0);
    int rc = xsk_vchan_rx_consume(v, n, notify);
    return rc < 0 ? rc : (int)n;
}

/* Returns 1 if there is something to do now (data to read if for_data, space to write if
 * for_space, or the peer is gone), 0 after asking the peer to notify us when there is, or
 * -EPROTO / -ESHUTDOWN.  Call before sleeping on the event channel. */
int xsk_vchan_arm(struct xsk_vchan *v, int for_data, int for_space)
{
    int rc = usable(v);
    if (rc < 0)
        return rc;
    uint8_t bits = (for_data ? XSK_VCHAN_NOTIFY_WRITE : 0) | (for_space ? XSK_VCHAN_NOTIFY_READ : 0);
    if (bits)
        __atomic_fetch_or(v->peer_notify_shr, bits, __ATOMIC_SEQ_CST);
    /* The request before re-reading the indices; pairs with the fence in the peer's honour
     * between its index store and reading our request. */
    full_fence();
    int live = peer_live(v);
    if (live < 0)
        return live;
    int64_t ready = rx_ready(v), space = tx_space(v);
    if (ready < 0 || space < 0)
        return -EPROTO;
    return live == XSK_VCHAN_GONE || (for_data && ready) || (for_space && space);
}

/* Returns the peer's live byte (XSK_VCHAN_GONE, _CONNECTED, _WAITING) or -EPROTO. */
int xsk_vchan_peer_live(struct xsk_vchan *v)
{
    return v->broken ? v->broken : peer_live(v);
}

/* Returns 0 with the endpoint's counters and ring fill in *out.  Safe from another thread
 * for the counters; the rest is a snapshot, and never breaks the endpoint. */
int xsk_vchan_status(struct xsk_vchan *v, struct xsk_vchan_status *out)
{
    memset(out, 0, sizeof(*out));
    out->bytes_in = relaxed_load(&v->bytes_in);
    out->bytes_out = relaxed_load(&v->bytes_out);
    out->tx_size = v->tx.size;
    out->rx_size = v->rx.size;
    out->broken = v->broken;
    uint8_t live = load_acquire(v->peer_live_shr);
    out->peer_live = v->peer_gone ? XSK_VCHAN_GONE : live > v->peer_live_max ? -EPROTO : live;
    if (!v->broken) {
        uint32_t ready = load_acquire(v->rx.prod_shr) - v->rx.pvt;
        uint32_t used = v->tx.pvt - load_acquire(v->tx.cons_shr);
        out->rx_ready = ready <= v->rx.size ? ready : 0;
        out->tx_space = used <= v->tx.size ? v->tx.size - used : 0;
    }
    return 0;
}

/* Returns 1 (notify the peer) after marking us gone in the shared page; 0 if already closed.
 * Everything written before is ordered before the peer sees us gone. */
int xsk_vchan_close(struct xsk_vchan *v)
{
    if (v->closed)
        return 0;
    v->closed = 1;
    store_release(v->own_live_shr, (uint8_t)XSK_VCHAN_GONE);
    return 1;
}

/* Frees the endpoint without touching the shared page (xsk_vchan_close says goodbye). */
void xsk_vchan_free(struct xsk_vchan *v)
{
    free(v);
}
