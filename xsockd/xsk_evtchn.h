/*
 * xsk_evtchn.h - signalling and clearing an event channel from C, for the pumps of
 * ring_core.c and vchan_core.c.  The kinds (XSK_EVTCHN_*) are backend.EventChannel's:
 *   eventfd (sim): fd becomes readable when the peer notifies; notify by writing notify_fd.
 *   xen: fd is a /dev/xen/evtchn handle bound to port only; notify with an ioctl on port.
 */
#ifndef XSOCK_XSK_EVTCHN_H
#define XSOCK_XSK_EVTCHN_H

#include "ring_core.h" /* XSK_EVTCHN_* */

#include <stdint.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* Linux uapi xen/evtchn.h: IOCTL_EVTCHN_NOTIFY = _IOC(_IOC_NONE, 'E', 4, sizeof(struct)) */
struct xsk_ioctl_evtchn_notify {
    unsigned int port;
};
#define XSK_IOCTL_EVTCHN_NOTIFY 0x00044504u

/* Signals the remote end of the channel. */
static inline void xsk_evtchn_notify(uint32_t kind, int fd, int notify_fd, uint32_t port)
{
    if (kind == XSK_EVTCHN_EVENTFD) {
        uint64_t one = 1;
        ssize_t r = write(notify_fd, &one, sizeof(one));
        (void)r; /* EAGAIN: the counter is saturated, the peer is already signalled */
    } else {
        struct xsk_ioctl_evtchn_notify n = { port };
        (void)ioctl(fd, XSK_IOCTL_EVTCHN_NOTIFY, &n);
    }
}

/* Consumes pending notifications so that fd stops being readable. */
static inline void xsk_evtchn_clear(uint32_t kind, int fd)
{
    if (kind == XSK_EVTCHN_EVENTFD) {
        uint64_t v;
        ssize_t r = read(fd, &v, sizeof(v));
        (void)r;
    } else {
        /* /dev/xen/evtchn: read the fired ports, write them back to unmask them. */
        uint32_t ports[16];
        ssize_t n = read(fd, ports, sizeof(ports));
        if (n > 0) {
            ssize_t w = write(fd, ports, (size_t)n & ~(size_t)3);
            (void)w;
        }
    }
}

#endif
