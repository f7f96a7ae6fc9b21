/*
 * xsk_atomic.h - the one barrier header of xsockd's C code, on C11 atomics (GCC builtins).
 *
 * Shared by ring_core.c (xsockd's own links) and vchan_core.c (libxenvchan's rings), whose
 * peers run in other domains on other CPUs.  Every use is commented where it is made with
 * what it orders and what it pairs with.
 */
#ifndef XSOCK_XSK_ATOMIC_H
#define XSOCK_XSK_ATOMIC_H

/* Acquire: what the peer wrote before publishing this index is visible after reading it. */
#define load_acquire(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
/* Release: everything we wrote (data, or our reads of consumed data) is ordered before the
 * peer can observe this index. */
#define store_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
/* Full fence between "publish index" and "read the peer's wants-notify flag" (and between
 * "set our flag" and "re-read the index") so that neither side can miss the other's update. */
#define full_fence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define relaxed_add(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
#define relaxed_load(p) __atomic_load_n((p), __ATOMIC_RELAXED)

#endif
