/*
 * vchan_core.h - one endpoint of a libxenvchan byte stream, on memory the caller mapped:
 * the wire format of Xen's libxenvchan (xen/include/public/io/libxenvchan.h), so that xsockd
 * can talk to domains that run only Xen's vchan tools.  See docs/VCHAN.md.
 *
 * Shared page (one page, granted by the server to the client; offsets in bytes):
 *   0   uint32_t left.cons    left ring (client -> server): written by the server
 *   4   uint32_t left.prod                                  written by the client
 *   8   uint32_t right.cons   right ring (server -> client): written by the client
 *   12  uint32_t right.prod                                 written by the server
 *   16  uint16_t left_order   log2 of the left ring's bytes, 10..20; server, never changes
 *   18  uint16_t right_order  the same for the right ring
 *   20  uint8_t  cli_live     client: 2 not yet connected (server's initial value), 1 connected,
 *                             0 gone (its unmap notification clears it when it dies)
 *   21  uint8_t  srv_live     server: 1 serving, 0 gone (the same through its notification)
 *   22  uint8_t  cli_notify   bits the client must honour: set by the server to ask for a
 *                             notification, cleared by the client when it sends it
 *   23  uint8_t  srv_notify   bits the server must honour: set by the client, cleared by it
 *   24  uint32_t grants[]     grant references of the left ring's pages, then the right's;
 *                             server, never change
 * A ring of order 10 lives in the shared page at offset 1024, of order 11 at offset 2048
 * (at most one ring of each), of order 12 or more in 2^(order-12) pages of its own.
 *
 * Indices are free-running uint32_t byte counts: fill = prod - cons, offset = index & (size-1).
 * Payload bytes carry no framing: a vchan is one byte stream each way.
 *
 * Public functions are prefixed xsk_vchan_, return 0 or a count >= 0 on success and -errno
 * on failure (-EPROTO: the peer broke the protocol; the endpoint is broken for good).
 */
#ifndef XSOCK_VCHAN_CORE_H
#define XSOCK_VCHAN_CORE_H

#include <stdint.h>

/* CDEF BEGIN */
#define XSK_VCHAN_MIN_ORDER 10
#define XSK_VCHAN_MAX_ORDER 20           /* 1 MiB: libxenvchan's largest ring */
#define XSK_VCHAN_PAGE_ORDER 12          /* orders below live inside the shared page */
#define XSK_VCHAN_SMALL_OFFSET 1024      /* an order-10 ring in the shared page */
#define XSK_VCHAN_LARGE_OFFSET 2048      /* an order-11 ring in the shared page */

#define XSK_VCHAN_OFF_LEFT_CONS 0
#define XSK_VCHAN_OFF_LEFT_PROD 4
#define XSK_VCHAN_OFF_RIGHT_CONS 8
#define XSK_VCHAN_OFF_RIGHT_PROD 12
#define XSK_VCHAN_OFF_LEFT_ORDER 16
#define XSK_VCHAN_OFF_RIGHT_ORDER 18
#define XSK_VCHAN_OFF_CLI_LIVE 20
#define XSK_VCHAN_OFF_SRV_LIVE 21
#define XSK_VCHAN_OFF_CLI_NOTIFY 22
#define XSK_VCHAN_OFF_SRV_NOTIFY 23
#define XSK_VCHAN_OFF_GRANTS 24

/* Notification bits (cli_notify, srv_notify). */
#define XSK_VCHAN_NOTIFY_WRITE 1         /* notify me when you have produced data */
#define XSK_VCHAN_NOTIFY_READ 2          /* notify me when you have consumed data */

/* Live byte values. */
#define XSK_VCHAN_GONE 0
#define XSK_VCHAN_CONNECTED 1
#define XSK_VCHAN_WAITING 2              /* cli_live only: no client has attached yet */

#define XSK_VCHAN_CLIENT 0               /* writes left, reads right */
#define XSK_VCHAN_SERVER 1               /* writes right, reads left; owns the pages */

/* Where a pair of ring orders puts the rings; from xsk_vchan_layout or client_probe. */
struct xsk_vchan_layout {
    uint32_t left_order, right_order;
    uint32_t left_offset, right_offset;  /* in-page ring's offset; 0: the ring has pages */
    uint32_t left_pages, right_pages;    /* pages (grants) of a ring; 0: in the page */
    uint32_t grants_end;                 /* the grant list's end in the shared page */
};

struct xsk_vchan_params {
    void *page;                          /* the shared page */
    void *left;                          /* the left ring's pages, or NULL if in the page */
    void *right;                         /* the right ring's pages, or NULL if in the page */
    uint32_t role;                       /* XSK_VCHAN_CLIENT or XSK_VCHAN_SERVER */
    uint32_t left_order, right_order;    /* checked ones, never re-read from the page */
};

struct xsk_vchan_status {
    uint64_t bytes_in;                   /* read from the peer */
    uint64_t bytes_out;                  /* written for the peer */
    uint32_t rx_ready;                   /* bytes waiting in the rx ring (0 once broken) */
    uint32_t tx_space;                   /* free bytes in the tx ring (0 once broken) */
    uint32_t tx_size, rx_size;
    int32_t peer_live;                   /* XSK_VCHAN_GONE.. or -EPROTO */
    int32_t broken;                      /* 0, or the -errno that ended the endpoint */
};

struct xsk_vchan;

int xsk_vchan_layout(uint32_t left_order, uint32_t right_order, struct xsk_vchan_layout *out);
int xsk_vchan_server_init(void *page, uint32_t left_order, uint32_t right_order,
                          const uint32_t *grants, uint32_t ngrants);
int xsk_vchan_client_probe(const void *page, struct xsk_vchan_layout *out, uint32_t *grants,
                           uint32_t max_grants);
int xsk_vchan_attach(const struct xsk_vchan_params *p, struct xsk_vchan **out);
int xsk_vchan_write(struct xsk_vchan *v, const void *buf, uint32_t len, int *notify);
int xsk_vchan_read(struct xsk_vchan *v, void *buf, uint32_t len, int *notify);
int xsk_vchan_arm(struct xsk_vchan *v, int for_data, int for_space);
int xsk_vchan_peer_live(struct xsk_vchan *v);
int xsk_vchan_status(struct xsk_vchan *v, struct xsk_vchan_status *out);
int xsk_vchan_close(struct xsk_vchan *v);
void xsk_vchan_free(struct xsk_vchan *v);
/* CDEF END */

/* For a pump in C (vchan_pump.c): the rings' free space and data in place, for readv/writev
 * straight into and out of ring memory.  See vchan_core.c. */
#include <sys/uio.h>
int xsk_vchan_tx_reserve(struct xsk_vchan *v, struct iovec iov[2]);
int xsk_vchan_tx_commit(struct xsk_vchan *v, uint32_t n, int *notify);
int xsk_vchan_rx_peek(struct xsk_vchan *v, struct iovec iov[2]);
int xsk_vchan_rx_consume(struct xsk_vchan *v, uint32_t n, int *notify);
int xsk_vchan_tx_unconsumed(struct xsk_vchan *v);

#endif
