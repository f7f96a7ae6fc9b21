/*
 * ring_core.h - the data plane of xsockd: one link (a pair of shared rings between two
 * domains) multiplexing many byte streams, pumped by a C thread with the GIL released.
 *
 * Shared memory of one link (granted by the link's initiator to its acceptor):
 *
 *   control page (one page, its own grant):
 *     0x000  uint8_t  live[2]       live[0] written by the initiator, live[1] by the acceptor:
 *                                   1 attached, 0 gone.  Each side's unmap notification clears
 *                                   its own byte when its process dies.
 *     0x008  uint32_t early[2]      early[0] written by the initiator, early[1] by the
 *                                   acceptor, before its live byte: how many DATA bytes of a
 *                                   stream it takes before it answers the OPEN (0: none).
 *     0x040  struct xsk_ring_shr    ring 0 indices: initiator -> acceptor
 *     0x0c0  struct xsk_ring_shr    ring 1 indices: acceptor -> initiator
 *   ring 0 data (ring_size bytes, ring_size / 4096 grants), then ring 1 data (same size).
 *
 * Ring indices are free-running uint32_t byte counts: fill = prod - cons, offset = index & mask.
 * Everything in a ring is a sequence of frames, each a 16-byte header and a payload padded to
 * 16 bytes; headers are 16-byte aligned and so never wrap, payloads may.  See docs/PROTOCOL.md.
 *
 * Public functions are prefixed xsk_, return 0 or a value >= 0 on success and -errno on
 * failure.  C never logs, never calls back into Python; it reports through an event queue
 * whose eventfd Python polls.
 */
#ifndef XSOCK_RING_CORE_H
#define XSOCK_RING_CORE_H

#include <stdint.h>

/* CDEF BEGIN */
#define XSK_PAGE_SIZE 4096
#define XSK_FRAME_HDR 16
#define XSK_NAME_MAX 64            /* service name bytes, [A-Za-z0-9_.-] */

/* Limits of a link: the one source of truth, exported by ring.py (MIN_RING_SIZE, ...). */
#define XSK_MIN_RING_SIZE 4096     /* ring bytes per direction, a power of two */
#define XSK_MAX_RING_SIZE 4194304  /* 4 MiB */
#define XSK_MIN_WINDOW 4096        /* per-stream window, a power of two */
#define XSK_MAX_WINDOW 16777216    /* 16 MiB */
#define XSK_MAX_STREAMS 65536
#define XSK_OFF_LIVE 0
#define XSK_OFF_EARLY 8
#define XSK_EARLY_WINDOW 65536     /* early DATA a side takes per stream before its ACCEPT */
#define XSK_OFF_RING0 64
#define XSK_OFF_RING1 192

/* Frame types. */
#define XSK_F_OPEN 1       /* payload: service name (may be empty); arg: window granted to peer */
#define XSK_F_ACCEPT 2     /* arg: window granted to the opener */
#define XSK_F_DATA 3       /* payload: stream bytes */
#define XSK_F_CREDIT 4     /* arg: bytes the receiver delivered since its last CREDIT */
#define XSK_F_FIN 5        /* the sender will send no more data on this stream */
#define XSK_F_RESET 6      /* the stream is aborted; arg: reason */
#define XSK_F_GOODBYE 7    /* stream 0: the sender is detaching from the link */

/* Frame flags (docs/PROTOCOL.md "Early data"); other bits are ignored. */
#define XSK_FL_EARLY 1     /* OPEN: DATA and FIN may follow within the peer's early credit */
#define XSK_FL_WANT 1      /* DATA before ACCEPT: it used up the early credit; wake me with it */

/* Reset reasons (RESET arg, CLOSED event arg). */
#define XSK_R_DONE 0       /* closed normally: both sides sent FIN */
#define XSK_R_REFUSED 1    /* peer's policy refused the stream */
#define XSK_R_NO_SERVICE 2 /* the service could not be reached */
#define XSK_R_TOO_MANY 3   /* stream limit of the link reached */
#define XSK_R_ABORTED 4    /* an application socket failed or closed before the data was delivered */
#define XSK_R_CLOSED 5     /* closed by an administrator */
#define XSK_R_LINK_DOWN 6  /* the link went away under the stream */

/* Event types, reported to Python. */
#define XSK_EV_PEER_UP 1       /* the peer attached (saw its live byte) */
#define XSK_EV_OPEN_REQUEST 2  /* stream: new id opened by the peer; name: service */
#define XSK_EV_OPENED 3        /* a stream we opened was accepted */
#define XSK_EV_CLOSED 4        /* arg: reason (XSK_R_*); fd closed; bytes final.  Exactly one
                                  for every stream reported by OPEN_REQUEST or opened by
                                  xsk_link_open_stream, whatever ends it; none for others */
#define XSK_EV_LINK_DOWN 5     /* arg: -errno (-EPROTO peer broke the protocol, -ECONNRESET peer
                                  died, -ESHUTDOWN peer said goodbye); the pump has stopped */
#define XSK_EV_ACCEPTED 6      /* stream: new id opened by the peer that the pump admitted from
                                  the admission table, connected and accepted by itself; name:
                                  service.  Ends with one CLOSED, as an OPEN_REQUEST does */

#define XSK_EV_LOCAL_OPEN 7    /* stream: the pump accepted a local application's connection on a
                                  listener handed to it (xsk_link_listen) and opened this stream
                                  for it; name: service.  Ends with one CLOSED (OPENED first if
                                  the peer accepts), as a stream xsk_link_open_stream opened */
#define XSK_EV_LISTEN_FAILED 8 /* arg: -errno of accept (EMFILE...); name: the listener's
                                  service; the pump tries again in XSK_LISTEN_RETRY_MS */
#define XSK_LISTEN_MAX 1024        /* listeners one link's pump may hold */
#define XSK_LISTEN_RETRY_MS 100    /* after an accept failed for want of descriptors or memory */

/* The admission table (xsk_link_set_admission): services a peer's OPEN may reach without
 * asking Python.  An OPEN for a name not in it, or one whose connect does not succeed at
 * once, is reported as OPEN_REQUEST and decided by Python as before. */
#define XSK_ADMIT_MAX 1024         /* entries in one link's table */
#define XSK_ADMIT_PATH 108         /* sun_path: the socket path and its NUL */
#define XSK_ADMIT_HEADER 160       /* bytes sent to the service before the caller's */

#define XSK_EVTCHN_EVENTFD 1
#define XSK_EVTCHN_XEN 2

#define XSK_ROLE_INITIATOR 0
#define XSK_ROLE_ACCEPTOR 1

struct xsk_link_params {
    void *control;          /* the control page */
    void *ring0;            /* initiator -> acceptor data, ring_size bytes */
    void *ring1;            /* acceptor -> initiator data, ring_size bytes */
    uint32_t ring_size;     /* power of two, XSK_MIN_RING_SIZE .. XSK_MAX_RING_SIZE */
    uint32_t role;          /* XSK_ROLE_* */
    uint32_t evtchn_kind;   /* XSK_EVTCHN_* */
    int evtchn_fd;          /* pollable; see backend.EventChannel */
    int evtchn_notify_fd;   /* eventfd kind: the peer's eventfd */
    uint32_t evtchn_port;   /* xen kind: our local port */
    uint32_t stream_window; /* bytes each stream may have in flight per direction */
    uint32_t max_streams;   /* streams open at once on this link */
};

struct xsk_event {
    uint32_t type;
    uint32_t stream;
    int32_t arg;
    uint32_t pad;
    uint64_t serial;        /* the stream's serial (0 for link events): ids are reused by the
                               peer, serials never (per link; 64 bits cannot wrap) */
    uint64_t bytes_in;      /* received from the peer and delivered to the application */
    uint64_t bytes_out;     /* read from the application and sent to the peer */
    char name[65];
};

struct xsk_link_stats {
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t frames_in;
    uint64_t frames_out;
    uint64_t notify_sent;
    uint64_t wakeups;
    uint32_t streams;
    uint32_t peer_live;
};

/* Stream states (xsk_stream_info.state). */
#define XSK_ST_OPENING 1   /* we sent OPEN: waiting for ACCEPT or RESET (early DATA may flow) */
#define XSK_ST_ACCEPTING 2 /* the peer sent OPEN: the control plane decides */
#define XSK_ST_OPEN 3
#define XSK_ST_HALF 4      /* one direction finished */
#define XSK_ST_ZOMBIE 5    /* closing: socket closed, a RESET still to be sent */

struct xsk_stream_info {
    uint32_t id;
    uint32_t state;         /* XSK_ST_* */
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint32_t tx_credit;
    uint32_t rx_buffered;
    uint64_t serial;
};

/* Bytes a link still holds, for a daemon that stops only once in-flight data has drained. */
struct xsk_link_held {
    uint64_t app_unread;    /* written by local applications, not yet read into the ring */
    uint64_t unacked;       /* sent to the peer, not yet credited back (the peer may still
                               hold them for its application) */
    uint64_t undelivered;   /* received from the peer, not yet written to the application */
    uint32_t tx_ring;       /* bytes in our tx ring that the peer has not consumed */
    uint32_t rx_ring;       /* bytes in the peer's ring that we have not consumed */
    uint32_t streams;       /* streams in the table */
    uint32_t pad;
};

struct xsk_admit_entry {
    char name[65];                  /* service name; "" is the default service */
    char path[XSK_ADMIT_PATH];      /* its Unix socket, NUL-terminated */
    char header[XSK_ADMIT_HEADER];  /* the caller header, header_len bytes (0: none) */
    uint32_t header_len;
};

struct xsk_link;
struct xsk_budget;

int xsk_link_pages(uint32_t ring_size);
int xsk_valid_service_name(const char *name, uint32_t len);
int xsk_link_new(const struct xsk_link_params *p, struct xsk_link **out);
int xsk_link_start(struct xsk_link *l);
int xsk_link_event_fd(struct xsk_link *l);
int xsk_link_open_stream(struct xsk_link *l, int fd, const char *service, uint32_t *id_out,
                         uint64_t *serial_out);
int xsk_link_accept_stream(struct xsk_link *l, uint32_t id, uint64_t serial, int fd);
int xsk_link_reject_stream(struct xsk_link *l, uint32_t id, uint64_t serial, uint32_t reason);
int xsk_link_close_stream(struct xsk_link *l, uint32_t id, uint64_t serial);
int xsk_link_events(struct xsk_link *l, struct xsk_event *out, int max);
int xsk_link_stats(struct xsk_link *l, struct xsk_link_stats *out);
int xsk_link_streams(struct xsk_link *l, struct xsk_stream_info *out, int max);
int xsk_link_held(struct xsk_link *l, struct xsk_link_held *out);
int xsk_link_stop(struct xsk_link *l, int goodbye);
int xsk_link_listen(struct xsk_link *l, int fd, const char *service);
int xsk_link_unlisten(struct xsk_link *l, const char *service);
int xsk_link_set_admission(struct xsk_link *l, const struct xsk_admit_entry *entries, int n,
                           struct xsk_budget *budget);
int xsk_budget_new(double rate, double burst, struct xsk_budget **out);
void xsk_budget_set(struct xsk_budget *b, double rate, double burst);
void xsk_budget_charge(struct xsk_budget *b);
double xsk_budget_tokens(struct xsk_budget *b);
void xsk_budget_unref(struct xsk_budget *b);
void xsk_link_free(struct xsk_link *l);
/* CDEF END */

#endif
