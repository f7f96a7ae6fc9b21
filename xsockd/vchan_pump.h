/*
 * vchan_pump.h - a C thread splicing one local stream socket into one vchan endpoint
 * (vchan_core.h), with the GIL released: bytes go from the socket straight into ring memory
 * and out of it.  Python hears of the end only, through an eventfd.  See docs/VCHAN.md for
 * what each end means, vchan having no half-close.
 */
#ifndef XSOCK_VCHAN_PUMP_H
#define XSOCK_VCHAN_PUMP_H

#include <stdint.h>

/* CDEF BEGIN */
/* Why a pump ended (xsk_vchan_pump_result.reason). */
#define XSK_VCHAN_END_PEER 1     /* the peer left; everything it wrote reached the socket */
#define XSK_VCHAN_END_LOCAL 2    /* the socket's EOF; the peer consumed everything it wrote */
#define XSK_VCHAN_END_LINGER 3   /* the socket's EOF (or its writer gone, its data queued);
                                    the peer did not consume it all in time */
#define XSK_VCHAN_END_PROTO 4    /* the peer broke the protocol (err: EPROTO) */
#define XSK_VCHAN_END_SOCKET 5   /* the socket failed (err: its errno) */
#define XSK_VCHAN_END_STOPPED 6  /* xsk_vchan_pump_stop */
#define XSK_VCHAN_END_UNDELIVERED 7 /* the peer left; the socket took none of what it wrote
                                       for linger_ms: the rest is dropped */

struct xsk_vchan_pump_params {
    struct xsk_vchan *vchan;     /* attached; driven by the pump alone until it has ended */
    int fd;                      /* the local stream socket; the pump closes it */
    uint32_t evtchn_kind;        /* XSK_EVTCHN_*, as for a link */
    int evtchn_fd;
    int evtchn_notify_fd;
    uint32_t evtchn_port;
    uint32_t linger_ms;          /* after the socket's EOF, how long the peer may take to
                                    consume what we wrote before we leave regardless (once
                                    the socket's writer is gone, before its EOF is read: how
                                    long the peer may make no room); after the peer left, how
                                    long the socket may take nothing */
};

struct xsk_vchan_pump_result {
    int32_t reason;              /* XSK_VCHAN_END_*, 0 while running */
    int32_t err;                 /* an errno for PROTO and SOCKET, else 0 */
    uint64_t bytes_in;           /* from the peer, written to the socket */
    uint64_t bytes_out;          /* from the socket, written into the ring for the peer */
};

struct xsk_vchan_pump;

int xsk_vchan_pump_start(const struct xsk_vchan_pump_params *p, struct xsk_vchan_pump **out);
int xsk_vchan_pump_event_fd(struct xsk_vchan_pump *p);
int xsk_vchan_pump_result(struct xsk_vchan_pump *p, struct xsk_vchan_pump_result *out);
int xsk_vchan_pump_stop(struct xsk_vchan_pump *p);
void xsk_vchan_pump_free(struct xsk_vchan_pump *p);
/* CDEF END */

#endif
