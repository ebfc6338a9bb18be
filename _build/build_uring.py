"""cffi build script for ``proactor._uring_cffi`` (out-of-line API mode).

liburing's ``io_uring_prep_*`` helpers are ``static inline``, so ABI mode cannot reach
them: this module compiles a small C layer against liburing's headers and links Debian's
``liburing.a`` statically, so an installed package needs no liburing at run time.

The C layer (``px_*``) owns everything that happens once per completion:

* the submission side: one ``io_uring_enter`` per loop turn (``px_reap``);
* the connection table: multishot accept, multishot recv into the provided-buffer ring
  (the memory pool for socket buffers), the per-socket send queue (one send in flight,
  short sends continued, queued chunks gathered into one ``sendmsg``), close after the
  last in-flight operation has completed;
* the generic-operation table for file and socket operations submitted from Python,
  with their optional linked timeouts.

Python is handed only the completions a user must see, as an array of ``px_event``
records, once per batch. liburing 2.3 lacks ``io_uring_setup_buf_ring``: the buffer ring
is mapped here and registered with ``io_uring_register_buf_ring``.

``PROACTOR_SANITIZE=1`` in the environment builds the extension with AddressSanitizer and
UndefinedBehaviorSanitizer (``-fsanitize=address,undefined``; any report aborts the
process), without optimisations that hide bugs, for ``make sanitize``, which builds it
into ``build/sanitize/`` and never over the normal build. Python is not built with ASan,
so a process loading that build needs the ASan runtime first: ``LD_PRELOAD`` of
``libasan.so`` (the Makefile does it).
"""
from __future__ import annotations

import os

from cffi import FFI

CDEF = r"""
/* ---- events handed to Python, one record per user-visible completion ---- */
struct px_event { int64_t type; int64_t id; int64_t res; int64_t aux; };

#define PX_EV_ACCEPT ...   /* id=listener slot, res=new fd or -errno             */
#define PX_EV_DATA ...     /* id=conn slot, res=nbytes, aux=offset in the pool   */
#define PX_EV_EOF ...      /* id=conn slot, res=0 (peer closed) or -errno (recv)  */
#define PX_EV_CLOSED ...   /* id=slot, res=0 or first -errno, aux=op kind of it   */
#define PX_EV_OP ...       /* id=op index, res=cqe res, aux=cqe flags             */
#define PX_EV_WAKE ...     /* the wakeup pipe was written to                     */
#define PX_EV_DRAINED ...  /* id=conn slot: its send queue became empty          */

#define PX_K_ACCEPT ...
#define PX_K_RECV ...
#define PX_K_SEND ...
#define PX_K_OP ...

struct px_stats {
    uint64_t submitted; uint64_t completed; int64_t inflight;
    uint64_t bytes_in; uint64_t bytes_out;
    int64_t bufs_out; int64_t conns; int64_t send_queued;
    int64_t ops; uint64_t cq_overflow; uint64_t enobufs; uint64_t sqe_full; uint64_t ev_lost;
};

struct px_ring;

int px_setup(struct px_ring **out, unsigned entries, unsigned cq_entries, unsigned flags,
             unsigned *used_flags, unsigned *features);
int px_setup_bufring(struct px_ring *r, char *base, unsigned nbufs, unsigned bufsize);
int px_set_wakeup(struct px_ring *r, int fd);
int px_stop_wakeup(struct px_ring *r);
void px_destroy(struct px_ring *r);
int px_inflight(struct px_ring *r);
struct px_stats *px_get_stats(struct px_ring *r);
int px_max_events(struct px_ring *r);
struct px_event *px_events(struct px_ring *r);
int px_reap(struct px_ring *r, unsigned wait_nr, int64_t timeout_ns);
int px_opcode_supported(struct px_ring *r, int op);

/* connections and listeners */
int px_listen(struct px_ring *r, int fd);
int px_conn_new(struct px_ring *r, int fd, int read);
uint32_t px_conn_gen(struct px_ring *r, int slot);
int px_conn_fd(struct px_ring *r, int slot);
int px_conn_state(struct px_ring *r, int slot, int *inflight);
int px_send(struct px_ring *r, int slot, uint32_t gen, const char *data, size_t len);
int px_sendfile(struct px_ring *r, int slot, uint32_t gen, int fd, uint64_t off, uint64_t count);
int px_close(struct px_ring *r, int slot, uint32_t gen, int how);
#define PX_CLOSE_RESET ...
#define PX_CLOSE_DRAIN ...
int px_pause_reading(struct px_ring *r, int slot, uint32_t gen);
int px_resume_reading(struct px_ring *r, int slot, uint32_t gen);
int64_t px_send_queued(struct px_ring *r, int slot, uint32_t gen);
int px_want_drain(struct px_ring *r, int slot, uint32_t gen);
int px_rearm_accept(struct px_ring *r, int slot);

/* generic operations: allocate a record, prep into it, final CQE frees it */
int px_op_read(struct px_ring *r, int fd, char *buf, unsigned len, uint64_t off, int64_t tmo_ns);
int px_op_write(struct px_ring *r, int fd, const char *buf, unsigned len, uint64_t off,
                int64_t tmo_ns);
int px_op_read_fixed(struct px_ring *r, int fd, int index, size_t buf_off, unsigned len,
                     uint64_t off, int64_t tmo_ns);
int px_op_write_fixed(struct px_ring *r, int fd, int index, size_t buf_off, unsigned len,
                      uint64_t off, int64_t tmo_ns);
int px_op_send(struct px_ring *r, int fd, const char *buf, unsigned len, int flags,
               int64_t tmo_ns);
int px_op_recv(struct px_ring *r, int fd, char *buf, unsigned len, int flags, int64_t tmo_ns);
int px_op_writev(struct px_ring *r, int fd, char **bufs, size_t *lens, int n, uint64_t off,
                 int64_t tmo_ns);
int px_op_sendmsg(struct px_ring *r, int fd, char **bufs, size_t *lens, int n, int flags,
                  int64_t tmo_ns);
int px_op_connect(struct px_ring *r, int fd, const char *addr, unsigned addrlen, int64_t tmo_ns);
int px_op_accept(struct px_ring *r, int fd, int64_t tmo_ns);
int px_op_openat(struct px_ring *r, int dfd, const char *path, int flags, unsigned mode,
                 int64_t tmo_ns);
int px_op_close(struct px_ring *r, int fd);
int px_op_timeout(struct px_ring *r, int64_t ns);
int px_op_poll(struct px_ring *r, int fd, unsigned mask, int64_t tmo_ns);
int px_op_nop(struct px_ring *r);
int px_op_cancel(struct px_ring *r, int index);
int px_cancel_fd(struct px_ring *r, int fd);
int px_register_buffers(struct px_ring *r, char **bufs, size_t *lens, int n);
int px_unregister_buffers(struct px_ring *r);
"""

SOURCE = r"""
/*
 * The GIL. cffi releases it around every call into C. Our calls are short (a few
 * hundred ns), and releasing there is harmful: a busy Python thread (a worker) takes the
 * GIL and keeps it for a whole switch interval (5 ms) before this thread may go on, for
 * every call - the convoy effect. So the generated wrappers keep the GIL, and px_reap
 * releases it itself around the one call that blocks: the wait in io_uring_enter.
 */
#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#define Py_END_ALLOW_THREADS }

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/*
 * user_data layout: kind in the top 8 bits, the slot or op index in the low 32.
 * Every SQE we submit counts in `inflight` until its final CQE (for multishot
 * requests: the CQE without IORING_CQE_F_MORE) has been seen.
 */
#define PX_K_ACCEPT 1
#define PX_K_RECV 2
#define PX_K_SEND 3
#define PX_K_OP 4
#define PX_K_LINK 5     /* linked timeout attached to an op */
#define PX_K_CANCEL 6   /* our own cancel requests */
#define PX_K_WAKE 7     /* read on the wakeup pipe */
#define PX_K_FREAD 8    /* read of a file queued by px_sendfile */
#define UD(kind, idx) (((uint64_t)(kind) << 56) | (uint32_t)(idx))
#define UD_KIND(ud) ((int)((ud) >> 56))
#define UD_IDX(ud) ((int)(uint32_t)(ud))

#define PX_EV_ACCEPT 1
#define PX_EV_DATA 2
#define PX_EV_EOF 3
#define PX_EV_CLOSED 4
#define PX_EV_OP 5
#define PX_EV_WAKE 6
#define PX_EV_DRAINED 7

#define PX_BGID 0
#define PX_IOV_MAX 64
#define PX_MSHOT_LOOPS 32                  /* the kernel's MULTISHOT_MAX_RETRY */
#define PX_MAX_EVENTS 4096
#define PX_SEND_MAX ((size_t)1 << 30)          /* bytes per send request */
#define PX_FILE_WINDOW ((size_t)128 << 10)      /* bytes of a queued file held at once */
#define PX_CONN_BLOCK 1024
#define PX_CONN_BLOCKS 1024                /* at most 1M connections per ring */
#define PX_OP_BLOCK 256
#define PX_OP_BLOCKS 4096                  /* at most 1M ops in flight per ring */
#define OP(r, idx) (&(r)->op_blocks[(idx) / PX_OP_BLOCK][(idx) % PX_OP_BLOCK])
#define CONN(r, slot) (&(r)->blocks[(slot) / PX_CONN_BLOCK][(slot) % PX_CONN_BLOCK])

struct px_event { int64_t type; int64_t id; int64_t res; int64_t aux; };

struct px_stats {
    uint64_t submitted; uint64_t completed; int64_t inflight;
    uint64_t bytes_in; uint64_t bytes_out;
    int64_t bufs_out; int64_t conns; int64_t send_queued;
    int64_t ops; uint64_t cq_overflow; uint64_t enobufs; uint64_t sqe_full; uint64_t ev_lost;
};

/* One queued send: the bytes are copied in, so the caller's object is free at once;
 * the chunk itself is freed only after the send CQE that covered its last byte.
 *
 * A file chunk (px_sendfile: ffd >= 0) gets a window of `cap` bytes (p, allocated
 * when first needed) that is filled from the file when the chunk reaches the head of
 * the queue (or the gather of a sendmsg): `fleft` bytes of the file are still to be
 * read at `foff`. p[off:len] is what is loaded and not yet sent; off == len with
 * fleft > 0 means "load the next window". A bytes chunk has p == data. */
struct px_chunk {
    struct px_chunk *next; size_t len; size_t off;
    char *p;
    int ffd; size_t cap; uint64_t foff; uint64_t fleft;
    char data[];
};

enum {
    C_USED = 1, C_LISTENER = 2, C_READ = 4,     /* C_READ: recv wanted (not paused) */
    C_RECV_ARMED = 8, C_SENDING = 16, C_CLOSING = 32, C_ABORT = 64, C_EOF = 128,
    C_REARM = 256, C_DRAIN = 512, C_CANCEL_SENT = 1024,
    C_FINISH = 2048,      /* queued to be finished at the next px_reap */
    C_RETRY = 4096,       /* an SQE could not be had: send/cancel/accept again next turn */
    C_SEND_SOON = 8192,   /* on the list of sends to issue at the next px_reap */
    C_RESET = 16384,      /* aborted with a reset: the close sends RST, not FIN */
    C_NOBUFS = 32768,     /* on the list of recvs waiting for buffers (ENOBUFS) */
    C_BUFWAIT = 65536,    /* its recv was re-armed off that list and has had no data yet */
    C_DRAIN_IN = 131072,  /* failed: reading what the kernel holds, then it closes */
};

/* By a connection's flags: it failed, and what the kernel still holds for it must reach
 * Python before it closes (C_DRAIN_IN), until its recv has seen the end (C_EOF). */
static inline int draining(uint32_t f)
{
    return (f & (C_DRAIN_IN | C_EOF)) == C_DRAIN_IN;
}

/* Reading is wanted: not paused (C_READ), or draining. */
static inline int wants_read(uint32_t f)
{
    return (f & C_READ) || draining(f);
}

struct px_conn {
    int fd;
    uint32_t gen;          /* bumped each time the slot is reused */
    uint32_t flags;
    int inflight;          /* this slot's requests still in the kernel */
    int err; int err_kind; /* first error seen, reported with PX_EV_CLOSED */
    struct px_chunk *head, *tail;
    size_t queued;         /* bytes queued, including the part in flight */
    int nsend;             /* chunks covered by the send in flight */
    int next_free;
    int next_send;         /* the list of sends to issue at the next px_reap */
    int wait_prev, wait_next;   /* the list of recvs waiting for buffers */
    int nrecv;             /* completions of the multishot recv armed last */
    struct iovec iov[PX_IOV_MAX];
    struct msghdr msg;
};

struct px_op {
    uint32_t gen;
    int pending;           /* CQEs still expected: 1, or 2 with a linked timeout */
    int res; uint32_t cflags;  /* the op's own CQE, kept until the last CQE is in */
    int timed_out;         /* its linked timeout fired (-ETIME) */
    int next_free;
    int cancelled;
    struct __kernel_timespec ts, lts;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    struct msghdr msg;
    struct iovec *iov;
    struct iovec iov1;
};

struct px_ring {
    struct io_uring ring;
    struct px_stats st;
    /* provided-buffer ring */
    struct io_uring_buf_ring *br;
    size_t br_size;
    char *pool; unsigned nbufs, bufsize;
    uint16_t *ret; unsigned nret;       /* buffers handed out this batch, returned next */
    int *rearm; unsigned nrearm;        /* SQE not had: re-arm/send/cancel next batch */
    int wait_head, wait_tail;           /* recvs stopped by ENOBUFS, oldest first (FIFO) */
    int wait_front;                     /* the last one put back at the front this turn */
    int *dead; unsigned ndead;          /* closed slots, reusable once Python saw it */
    int *finish; unsigned nfinish;      /* slots to finish (close) at the next reap */
    int send_soon;                      /* first slot of the C_SEND_SOON list, or -1 */
    int in_reap;                        /* inside px_reap: events have reserved room */
    int wake_retry;                     /* the wakeup read could not be armed */
    unsigned ndead_seen;                /* the first ndead_seen were in a returned batch */
    /* connection table */
    /* Connection slots live in fixed blocks that never move, so another thread may
     * read a slot's counters (px_send_queued) while this one adds blocks. */
    struct px_conn *blocks[PX_CONN_BLOCKS]; int nconns; int conn_free;
    /* op table */
    /* Op records in fixed blocks too: an SQE points into its record (timespec,
     * sockaddr, msghdr) until it is submitted, so records must never move. */
    struct px_op *op_blocks[PX_OP_BLOCKS]; int nops; int op_free;
    int *op_dead; unsigned nop_dead;    /* finished ops, reusable from the next batch */
    struct iovec *fixed; int nfixed;    /* registered buffers */
    /* wakeup pipe */
    int wake_fd; char wake_buf[64];
    /* events for Python */
    struct px_event ev[PX_MAX_EVENTS]; int nev;
    int nev_taken;                      /* events returned by the last px_reap */
    struct io_uring_probe *probe;
};

/* ------------------------------------------------------------------ helpers */

/* Get an SQE; when the SQ is full, submit what is there to make room. */
static struct io_uring_sqe *px_sqe(struct px_ring *r)
{
    struct io_uring_sqe *s = io_uring_get_sqe(&r->ring);
    if (!s) {
        io_uring_submit(&r->ring);
        s = io_uring_get_sqe(&r->ring);
    }
    if (s) { r->st.submitted++; r->st.inflight++; }
    else r->st.sqe_full++;
    return s;
}

/* Drop the first `n` of the `*len` ints in `a`. memmove must get valid pointers even for
 * a length of 0 (C11 7.1.4, 7.24.1), and `a` is NULL until the first connection block
 * exists: no call, and no NULL + 0, when nothing is left to move. */
static void ints_drop_front(int *a, unsigned *len, unsigned n)
{
    *len -= n;
    if (n && *len) memmove(a, a + n, (size_t)*len * sizeof *a);
}

static void px_emit(struct px_ring *r, int type, int64_t id, int64_t res, int64_t aux)
{
    /* Callers reserve room (px_handle, the finish list); this only guards memory. */
    if (r->nev >= PX_MAX_EVENTS) { r->st.ev_lost++; return; }
    struct px_event *e = &r->ev[r->nev++];
    e->type = type; e->id = id; e->res = res; e->aux = aux;
}

/* ------------------------------------------------------------------ ring setup */

int px_setup(struct px_ring **out, unsigned entries, unsigned cq_entries, unsigned flags,
             unsigned *used_flags, unsigned *features)
{
    struct px_ring *r = calloc(1, sizeof *r);
    if (!r) return -ENOMEM;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = flags | IORING_SETUP_CQSIZE;
    p.cq_entries = cq_entries;
    int ret = io_uring_queue_init_params(entries, &r->ring, &p);
    if (ret < 0) { free(r); return ret; }
    *used_flags = p.flags;
    *features = p.features;
    io_uring_register_ring_fd(&r->ring);   /* optional: saves an fd lookup per enter */
    r->probe = io_uring_get_probe_ring(&r->ring);
    r->conn_free = -1; r->op_free = -1; r->wake_fd = -1; r->send_soon = -1;
    r->wait_head = r->wait_tail = r->wait_front = -1;
    *out = r;
    return 0;
}

int px_opcode_supported(struct px_ring *r, int op)
{
    return r->probe ? io_uring_opcode_supported(r->probe, op) : 0;
}

/* Register `nbufs` buffers of `bufsize` bytes at `base` (memory the caller keeps
 * alive for the ring's lifetime) as provided-buffer group PX_BGID. */
int px_setup_bufring(struct px_ring *r, char *base, unsigned nbufs, unsigned bufsize)
{
    if (nbufs == 0 || (nbufs & (nbufs - 1)) || nbufs > 32768) return -EINVAL;
    size_t size = (size_t)nbufs * sizeof(struct io_uring_buf);
    void *br = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (br == MAP_FAILED) return -errno;
    io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = (unsigned long)br;
    reg.ring_entries = nbufs;
    reg.bgid = PX_BGID;
    int ret = io_uring_register_buf_ring(&r->ring, &reg, 0);
    if (ret < 0) { munmap(br, size); return ret; }
    r->ret = calloc(nbufs, sizeof *r->ret);
    r->rearm = NULL;
    if (!r->ret) {
        io_uring_unregister_buf_ring(&r->ring, PX_BGID);
        munmap(br, size);
        return -ENOMEM;
    }
    r->br = br; r->br_size = size; r->pool = base; r->nbufs = nbufs; r->bufsize = bufsize;
    int mask = io_uring_buf_ring_mask(nbufs);
    for (unsigned i = 0; i < nbufs; i++)
        io_uring_buf_ring_add(br, base + (size_t)i * bufsize, bufsize, i, mask, i);
    io_uring_buf_ring_advance(br, nbufs);
    return 0;
}

/* Keep a read armed on `fd` (the read end of a non-blocking pipe): writing a byte to
 * the other end from any thread or a signal handler ends the ring's wait. */
static void px_arm_wake(struct px_ring *r)
{
    struct io_uring_sqe *s = px_sqe(r);
    r->wake_retry = !s;
    if (!s) return;
    io_uring_prep_read(s, r->wake_fd, r->wake_buf, sizeof r->wake_buf, 0);
    io_uring_sqe_set_data64(s, UD(PX_K_WAKE, 0));
}

/* Stop re-arming the wakeup read and cancel the one in flight (at shutdown). */
int px_stop_wakeup(struct px_ring *r)
{
    if (r->wake_fd < 0) return 0;
    struct io_uring_sqe *s = px_sqe(r);
    if (!s) return -EBUSY;              /* Python asks again next turn */
    r->wake_fd = -1;
    r->wake_retry = 0;
    io_uring_prep_cancel64(s, UD(PX_K_WAKE, 0), 0);
    io_uring_sqe_set_data64(s, UD(PX_K_CANCEL, 0xffffffffu));
    return 0;
}

int px_set_wakeup(struct px_ring *r, int fd)
{
    r->wake_fd = fd;
    px_arm_wake(r);
    return 0;
}

static void chunks_free(struct px_chunk *ch);

/* Free what the ring owns. Must only be called once px_inflight() is 0: a buffer or
 * op record still referenced by the kernel is never freed (the caller leaks instead). */
void px_destroy(struct px_ring *r)
{
    io_uring_queue_exit(&r->ring);
    if (r->br) munmap(r->br, r->br_size);
    for (int i = 0; i < r->nconns; i++) {
        chunks_free(CONN(r, i)->head);
    }
    for (int i = 0; i < r->nops; i++) free(OP(r, i)->iov);
    for (int b = 0; b < r->nops / PX_OP_BLOCK; b++) free(r->op_blocks[b]);
    if (r->probe) io_uring_free_probe(r->probe);
    for (int b = 0; b < r->nconns / PX_CONN_BLOCK; b++) free(r->blocks[b]);
    free(r->fixed); free(r->ret); free(r->rearm); free(r->dead); free(r->finish);
    free(r->op_dead); free(r);
}

int px_inflight(struct px_ring *r) { return (int)r->st.inflight; }
struct px_stats *px_get_stats(struct px_ring *r) { return &r->st; }
int px_max_events(struct px_ring *r) { (void)r; return PX_MAX_EVENTS; }
struct px_event *px_events(struct px_ring *r) { return r->ev; }

/* ------------------------------------------------------------------ connections */

static int conn_alloc(struct px_ring *r, int fd, uint32_t flags)
{
    if (r->conn_free < 0) {
        int old = r->nconns, n = old + PX_CONN_BLOCK;
        if (old / PX_CONN_BLOCK >= PX_CONN_BLOCKS) return -EMFILE;
        /* the side arrays first: they must hold every slot before a slot exists */
        int *re = realloc(r->rearm, (size_t)n * sizeof(int));
        if (!re) return -ENOMEM;
        r->rearm = re;
        int *de = realloc(r->dead, (size_t)n * sizeof(int));
        if (!de) return -ENOMEM;
        r->dead = de;
        int *fi = realloc(r->finish, (size_t)n * sizeof(int));
        if (!fi) return -ENOMEM;
        r->finish = fi;
        struct px_conn *blk = calloc(PX_CONN_BLOCK, sizeof *blk);
        if (!blk) return -ENOMEM;
        r->blocks[old / PX_CONN_BLOCK] = blk;
        r->nconns = n;
        for (int i = n - 1; i >= old; i--) {
            CONN(r, i)->next_free = r->conn_free;
            r->conn_free = i;
        }
    }
    int slot = r->conn_free;
    struct px_conn *c = CONN(r, slot);
    r->conn_free = c->next_free;
    uint32_t gen = c->gen + 1;
    memset(c, 0, sizeof *c);
    c->gen = gen; c->fd = fd; c->flags = C_USED | flags;
    r->st.conns++;
    return slot;
}

static struct px_conn *conn_get(struct px_ring *r, int slot, uint32_t gen)
{
    if (slot < 0 || slot >= r->nconns) return NULL;
    struct px_conn *c = CONN(r, slot);
    if (!(c->flags & C_USED) || c->gen != gen) return NULL;
    return c;
}

uint32_t px_conn_gen(struct px_ring *r, int slot) { return CONN(r, slot)->gen; }
int px_conn_fd(struct px_ring *r, int slot) { return CONN(r, slot)->fd; }

/* The slot's flags, and its requests in flight (for tests and debugging). */
int px_conn_state(struct px_ring *r, int slot, int *inflight)
{
    if (slot < 0 || slot >= r->nconns) return -EINVAL;
    *inflight = CONN(r, slot)->inflight;
    return (int)CONN(r, slot)->flags;
}

/* An SQE for this slot could not be had (SQ full and the submit refused): put the slot
 * on the list px_reap works through first next turn. */
static void retry_later(struct px_ring *r, int slot, uint32_t flag)
{
    struct px_conn *c = CONN(r, slot);
    if (!(c->flags & (C_REARM | C_RETRY))) r->rearm[r->nrearm++] = slot;
    c->flags |= flag;
}

static void arm_recv(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    struct io_uring_sqe *s = px_sqe(r);
    if (!s) { retry_later(r, slot, C_REARM); return; }
    io_uring_prep_recv_multishot(s, c->fd, NULL, 0, 0);
    s->flags |= IOSQE_BUFFER_SELECT;
    s->buf_group = PX_BGID;
    io_uring_sqe_set_data64(s, UD(PX_K_RECV, slot));
    c->flags |= C_RECV_ARMED;
    c->inflight++;
    c->nrecv = 0;
}

/*
 * Recvs waiting for buffers. A multishot recv ends with ENOBUFS when it finds the pool
 * empty (the bytes stay in the socket). Buffers come back to the ring at the start of
 * the next loop turn (px_return_buffers), and only as many recvs as there are buffers
 * can get one: re-arming every waiting connection at every turn made one submission and
 * one failed completion per waiting connection per turn (with 2 buffers and 64 busy
 * connections, ~17 submissions per buffer filled; 64 with 256). So a recv stopped by
 * ENOBUFS goes on this list (oldest first), and each turn, once the buffers are back,
 * at most as many waiters as the ring holds buffers are re-armed, from the front; the
 * loop does not sleep while some are left. A waiter re-armed that finds the pool empty
 * again before any data (other recvs took the buffers first) goes back to the front, in
 * order, so none is passed over for good. A paused or closing connection taken off the
 * list is not re-armed (a resume re-arms it).
 */
static void wait_insert(struct px_ring *r, int slot, int after)
{
    struct px_conn *c = CONN(r, slot);
    int next = after < 0 ? r->wait_head : CONN(r, after)->wait_next;
    c->wait_prev = after;
    c->wait_next = next;
    if (after < 0) r->wait_head = slot; else CONN(r, after)->wait_next = slot;
    if (next < 0) r->wait_tail = slot; else CONN(r, next)->wait_prev = slot;
    c->flags |= C_NOBUFS;
}

static void wait_remove(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    if (!(c->flags & C_NOBUFS)) return;
    if (c->wait_prev < 0) r->wait_head = c->wait_next;
    else CONN(r, c->wait_prev)->wait_next = c->wait_next;
    if (c->wait_next < 0) r->wait_tail = c->wait_prev;
    else CONN(r, c->wait_next)->wait_prev = c->wait_prev;
    if (r->wait_front == slot) r->wait_front = c->wait_prev;
    c->flags &= ~C_NOBUFS;
}

/* The recv of `slot` ended with ENOBUFS: wait for buffers. `again`: it had been re-armed
 * off the list and got no data, so it keeps its place at the front. */
static void wait_for_buffers(struct px_ring *r, int slot, int again)
{
    if (CONN(r, slot)->flags & C_NOBUFS) return;
    if (again) {
        wait_insert(r, slot, r->wait_front);
        r->wait_front = slot;
    } else {
        wait_insert(r, slot, r->wait_tail);
    }
}

/* Re-arm waiters, oldest first, at most one per buffer in the ring (all of them are,
 * once px_return_buffers has given back what the last batch handed out). */
static void rearm_waiters(struct px_ring *r)
{
    int64_t budget = (int64_t)r->nbufs - r->st.bufs_out;
    r->wait_front = -1;
    while (r->wait_head >= 0 && budget > 0) {
        int slot = r->wait_head;
        struct px_conn *c = CONN(r, slot);
        wait_remove(r, slot);
        if (!wants_read(c->flags) || (c->flags & (C_RECV_ARMED | C_REARM)))
            continue;                       /* paused, closing, or armed meanwhile */
        arm_recv(r, slot);
        if (!(c->flags & C_RECV_ARMED)) break;  /* no SQE: on the retry list, stop here */
        c->flags |= C_BUFWAIT;
        budget--;
    }
}

static void arm_accept(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    struct io_uring_sqe *s = px_sqe(r);
    if (!s) { retry_later(r, slot, C_REARM); return; }
    io_uring_prep_multishot_accept(s, c->fd, NULL, NULL, SOCK_CLOEXEC);
    io_uring_sqe_set_data64(s, UD(PX_K_ACCEPT, slot));
    c->flags |= C_RECV_ARMED;
    c->inflight++;
}

static void cancel_recv(struct px_ring *r, int slot);

/* Ask the kernel to cancel every request on this connection's fd. Completions still
 * arrive (with -ECANCELED or their real result); the slot closes after the last one. */
static void cancel_conn(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    if (c->flags & C_CANCEL_SENT) return;
    struct io_uring_sqe *s = px_sqe(r);
    if (!s) { retry_later(r, slot, C_RETRY); return; }
    io_uring_prep_cancel_fd(s, c->fd, IORING_ASYNC_CANCEL_ALL);
    io_uring_sqe_set_data64(s, UD(PX_K_CANCEL, slot));
    c->flags |= C_CANCEL_SENT;
    c->inflight++;
}

int px_listen(struct px_ring *r, int fd)
{
    int slot = conn_alloc(r, fd, C_LISTENER | C_READ);
    if (slot >= 0) arm_accept(r, slot);
    return slot;
}

int px_rearm_accept(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    if ((c->flags & (C_CLOSING | C_RECV_ARMED)) || !(c->flags & C_LISTENER)) return 0;
    arm_accept(r, slot);
    return 1;
}

/* Register an accepted or connected socket; with `read`, its multishot recv is armed. */
int px_conn_new(struct px_ring *r, int fd, int read)
{
    int slot = conn_alloc(r, fd, read ? C_READ : 0);
    if (slot >= 0 && read) arm_recv(r, slot);
    return slot;
}

static void chunk_free(struct px_chunk *ch)
{
    if (ch->ffd >= 0) { close(ch->ffd); free(ch->p); }
    free(ch);
}

static void chunks_free(struct px_chunk *ch)
{
    while (ch) { struct px_chunk *n = ch->next; chunk_free(ch); ch = n; }
}

/* The last request of a closing slot has completed: close the fd, free what is
 * queued, report PX_EV_CLOSED and put the slot back on the free list. */
static void conn_finish(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    if (!(c->flags & (C_ABORT | C_LISTENER))) {
        /* Graceful: send our FIN after the data, and read what the peer has sent
         * meanwhile: closing a socket with unread data makes the kernel answer with
         * RST, which can destroy the reply we just sent before the peer reads it. (A
         * full lingering close would also wait for the peer's FIN; not done.) */
        char sink[16384];
        shutdown(c->fd, SHUT_WR);
        for (int i = 0; i < 64 && recv(c->fd, sink, sizeof sink, MSG_DONTWAIT) > 0; i++)
            ;
    } else if (c->flags & C_RESET) {
        /* The connection is reset (RST, not FIN): the peer must not take a stream cut
         * short for a whole one (a body that ends at the close). */
        struct linger lg = { 1, 0 };
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(c->fd);
    wait_remove(r, slot);
    chunks_free(c->head);
    r->st.send_queued -= (int64_t)c->queued;
    px_emit(r, PX_EV_CLOSED, slot, c->err, c->err_kind);
    c->head = c->tail = NULL; c->queued = 0;
    c->flags = 0; c->fd = -1;
    /* Not reusable before the next batch: Python may still see events of this batch
     * that mention the slot, and must not confuse a new connection with this one. */
    r->dead[r->ndead++] = slot;
    r->st.conns--;
}

/* Move a closing connection forward: when nothing more is to be sent (or it is an
 * abort), cancel what is in flight; once nothing is in flight, finish it. */
static void conn_progress_close(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    if (!(c->flags & C_CLOSING)) return;
    if (!(c->flags & C_ABORT) && c->head) return;      /* still flushing */
    if (draining(c->flags)) {
        /* Reading what the kernel holds: the recv ends by itself (SHUT_RD). A send or
         * file read in flight is cancelled (the recv too, and re-armed after it). */
        if (c->flags & C_SENDING) cancel_conn(r, slot);
        return;
    }
    if (c->inflight == 0) {
        if (r->in_reap) { conn_finish(r, slot); return; }   /* room is reserved */
        /* Called from Python between reaps (px_close): finish at the next reap, whose
         * event array has room for it, never past the batch Python is reading. */
        if (!(c->flags & C_FINISH)) { c->flags |= C_FINISH; r->finish[r->nfinish++] = slot; }
        return;
    }
    cancel_conn(r, slot);
}

static void record_err(struct px_conn *c, int res, int kind);

/* Read what the kernel still holds for a connection that is to close, before it closes:
 * its read side is shut down (Linux keeps the bytes queued, and a recv returns 0 once
 * they are read: no waiting for more), and a recv is armed if none is, paused or not.
 * conn_progress_close waits for that recv to end. Not for a listener, nor once the recv
 * has seen the end. */
static void conn_drain_input(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    c->flags &= ~C_READ;
    if (c->flags & (C_EOF | C_LISTENER)) return;
    c->flags |= C_DRAIN_IN;
    shutdown(c->fd, SHUT_RD);
    if (!(c->flags & (C_RECV_ARMED | C_REARM | C_NOBUFS))) arm_recv(r, slot);
}

/* The connection failed (a send, a queued file's read): `err` is reported, sending
 * stops, the connection closes (with a reset if `reset`). What the peer sent before
 * still reaches Python first, unless the connection was already closing: then Python
 * asked for the close and wants no more data. */
static void conn_failed(struct px_ring *r, int slot, int err, int kind, int reset)
{
    struct px_conn *c = CONN(r, slot);
    record_err(c, err, kind);
    if (!(c->flags & C_CLOSING)) conn_drain_input(r, slot);
    c->flags |= C_CLOSING | C_ABORT | (reset ? C_RESET : 0);
    c->flags &= ~C_READ;
    conn_progress_close(r, slot);
}

/* A file chunk must be (re)loaded before it can be sent. */
#define CHUNK_NEEDS_LOAD(ch) ((ch)->ffd >= 0 && (ch)->off == (ch)->len)

/* Load the next window of a file chunk from the page cache, without blocking
 * (RWF_NOWAIT): bytes loaded, or -EAGAIN when the ring must read it (the data is not
 * cached, or the file system cannot say without blocking), or -errno; -ENODATA if the
 * file ended before the promised count. */
static int chunk_load_nowait(struct px_chunk *ch)
{
    size_t want = ch->fleft < ch->cap ? (size_t)ch->fleft : ch->cap;
    if (!ch->p && !(ch->p = malloc(ch->cap))) return -ENOMEM;
    struct iovec v = { ch->p, want };
    ssize_t n = preadv2(ch->ffd, &v, 1, (off_t)ch->foff, RWF_NOWAIT);
    if (n > 0) {
        ch->len = (size_t)n; ch->off = 0;
        ch->foff += (uint64_t)n; ch->fleft -= (uint64_t)n;
        return (int)n;
    }
    if (n == 0) return -ENODATA;
    if (errno == EAGAIN || errno == EOPNOTSUPP || errno == EINTR) return -EAGAIN;
    return -errno;
}

/* A queued file could not be read: the peer cannot get the bytes promised to it, so
 * the connection fails (abort), reported with the error. */
static void file_failed(struct px_ring *r, int slot, int err)
{
    conn_failed(r, slot, err, PX_K_FREAD, 1);      /* a reset: the body is cut short */
}

/* The head is a file chunk not in the page cache: let the ring read its next window;
 * sending continues from on_fread. */
static void issue_fread(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    struct px_chunk *ch = c->head;
    if (!ch->p && !(ch->p = malloc(ch->cap))) { file_failed(r, slot, -ENOMEM); return; }
    struct io_uring_sqe *s = px_sqe(r);
    if (!s) { retry_later(r, slot, C_RETRY); return; }
    size_t want = ch->fleft < ch->cap ? (size_t)ch->fleft : ch->cap;
    io_uring_prep_read(s, ch->ffd, ch->p, (unsigned)want, ch->foff);
    io_uring_sqe_set_data64(s, UD(PX_K_FREAD, slot));
    c->flags |= C_SENDING;                 /* nothing else goes out meanwhile */
    c->inflight++;
}

/* Issue one send for the head of the queue: one chunk with send(), several gathered
 * into one sendmsg() (at most PX_IOV_MAX). File chunks are loaded first: the head's
 * from the page cache or by the ring; later ones only if cached (else the gather stops
 * before them), and a file with more to load ends the gather. */
static void issue_send(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    struct px_chunk *ch = c->head;
    if (CHUNK_NEEDS_LOAD(ch)) {
        int n = chunk_load_nowait(ch);
        if (n == -EAGAIN) { issue_fread(r, slot); return; }
        if (n < 0) { file_failed(r, slot, n); return; }
    }
    struct io_uring_sqe *s = px_sqe(r);
    if (!s) { retry_later(r, slot, C_RETRY); return; }
    /* at most PX_SEND_MAX per send: the SQE's length is 32 bits (a short send follows) */
    if (!ch->next || (ch->ffd >= 0 && ch->fleft)) {
        size_t len = ch->len - ch->off;
        io_uring_prep_send(s, c->fd, ch->p + ch->off, len < PX_SEND_MAX ? len : PX_SEND_MAX,
                           MSG_NOSIGNAL);
        c->nsend = 1;
    } else {
        int n = 0;
        size_t total = 0;
        for (; ch && n < PX_IOV_MAX && total < PX_SEND_MAX; ch = ch->next) {
            /* a file further back is loaded only if cached and while the gather is
             * small: at most about two windows of file data are held per connection */
            if (CHUNK_NEEDS_LOAD(ch) && (total >= PX_FILE_WINDOW || chunk_load_nowait(ch) <= 0))
                break;                      /* loaded when it is the head */
            size_t len = ch->len - ch->off;
            if (len > PX_SEND_MAX - total) len = PX_SEND_MAX - total;
            c->iov[n].iov_base = ch->p + ch->off;
            c->iov[n].iov_len = len;
            total += len;
            n++;
            if (ch->ffd >= 0 && ch->fleft) break;   /* its next window comes first */
        }
        memset(&c->msg, 0, sizeof c->msg);
        c->msg.msg_iov = c->iov;
        c->msg.msg_iovlen = n;
        io_uring_prep_sendmsg(s, c->fd, &c->msg, MSG_NOSIGNAL);
        c->nsend = n;
    }
    io_uring_sqe_set_data64(s, UD(PX_K_SEND, slot));
    c->flags |= C_SENDING;
    c->inflight++;
}

/* Bytes were queued from Python: the send is issued at the next px_reap (just before the
 * submit), so that what a handler queues in one go (a response head and its file, a
 * batch of pipelined replies) leaves in one sendmsg. */
static void send_soon(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    if (c->flags & (C_SENDING | C_SEND_SOON)) return;
    c->flags |= C_SEND_SOON;
    c->next_send = r->send_soon;
    r->send_soon = slot;
}

static void issue_sends_soon(struct px_ring *r)
{
    int slot = r->send_soon;
    r->send_soon = -1;
    while (slot >= 0) {
        struct px_conn *c = CONN(r, slot);
        int next = c->next_send;
        c->flags &= ~C_SEND_SOON;
        if ((c->flags & C_USED) && c->head && !(c->flags & (C_SENDING | C_ABORT)))
            issue_send(r, slot);
        slot = next;
    }
}

/* Queue `len` bytes (copied) for sending; sends start in order, one at a time.
 * Returns the bytes now queued on the connection (or -errno). */
int px_send(struct px_ring *r, int slot, uint32_t gen, const char *data, size_t len)
{
    struct px_conn *c = conn_get(r, slot, gen);
    if (!c) return -EBADF;
    if (c->flags & C_CLOSING) return -EPIPE;
    if (c->err) return c->err;
    if (len == 0) return c->queued > INT_MAX ? INT_MAX : (int)c->queued;
    struct px_chunk *ch = malloc(sizeof *ch + len);
    if (!ch) return -ENOMEM;
    memcpy(ch->data, data, len);
    ch->len = len; ch->off = 0; ch->next = NULL;
    ch->p = ch->data; ch->ffd = -1; ch->cap = len; ch->foff = ch->fleft = 0;
    if (c->tail) c->tail->next = ch; else c->head = ch;
    c->tail = ch;
    c->queued += len;
    r->st.send_queued += (int64_t)len;
    send_soon(r, slot);
    return c->queued > INT_MAX ? INT_MAX : (int)c->queued;   /* for flow control */
}

/* Queue `count` bytes of the file `fd` from `off`, to go out after what was queued
 * before. The fd is taken over (closed once sent or dropped) unless this fails. The
 * file is read a window at a time as the queue reaches it, into memory owned here, and
 * sent from there: the bytes never become Python objects, and at most PX_FILE_WINDOW of
 * the file is held per queued file. Returns the bytes now queued on the connection, or
 * -errno (the fd is then still the caller's). */
int px_sendfile(struct px_ring *r, int slot, uint32_t gen, int fd, uint64_t off, uint64_t count)
{
    struct px_conn *c = conn_get(r, slot, gen);
    if (!c) return -EBADF;
    if (c->flags & C_CLOSING) return -EPIPE;
    if (c->err) return c->err;
    if (count == 0) return c->queued > INT_MAX ? INT_MAX : (int)c->queued;
    size_t cap = count < PX_FILE_WINDOW ? (size_t)count : PX_FILE_WINDOW;
    struct px_chunk *ch = malloc(sizeof *ch);
    if (!ch) return -ENOMEM;
    ch->p = NULL;                           /* the window: allocated when first loaded */
    ch->ffd = fd;
    ch->len = ch->off = 0; ch->cap = cap; ch->foff = off; ch->fleft = count; ch->next = NULL;
    if (c->tail) c->tail->next = ch; else c->head = ch;
    c->tail = ch;
    c->queued += count;
    r->st.send_queued += (int64_t)count;
    send_soon(r, slot);
    return c->queued > INT_MAX ? INT_MAX : (int)c->queued;
}

int64_t px_send_queued(struct px_ring *r, int slot, uint32_t gen)
{
    struct px_conn *c = conn_get(r, slot, gen);
    return c ? (int64_t)c->queued : -EBADF;
}

/* Report PX_EV_DRAINED once the send queue is next empty (now, if it is). */
int px_want_drain(struct px_ring *r, int slot, uint32_t gen)
{
    struct px_conn *c = conn_get(r, slot, gen);
    if (!c) return -EBADF;
    if (!c->head) return 1;
    c->flags |= C_DRAIN;
    return 0;
}

/* px_close's ``abort``: 0 after the queued data, 1 now (a FIN), PX_CLOSE_RESET now with
 * a reset (RST). proactor._common's GRACEFUL, ABORT and RESET. An abort may add
 * PX_CLOSE_DRAIN: what the kernel holds is still read and reported first (the handler
 * is owed what was received before the connection failed). */
#define PX_CLOSE_RESET 2
#define PX_CLOSE_DRAIN 4

/* Close: graceful (queued bytes are sent first) or abort (in-flight requests are
 * cancelled, unsent bytes dropped). Either way the fd is closed only after the final
 * completion of every request on it, and PX_EV_CLOSED follows. */
int px_close(struct px_ring *r, int slot, uint32_t gen, int how)
{
    struct px_conn *c = conn_get(r, slot, gen);
    int abort = how & ~PX_CLOSE_DRAIN;
    if (!c) return -EBADF;
    if (!(c->flags & C_CLOSING)) {
        /* A listener stops listening now, not when its accept's cancel completes: a
         * client connecting after close() is refused. */
        if (c->flags & C_LISTENER) shutdown(c->fd, SHUT_RDWR);
        if (abort && (how & PX_CLOSE_DRAIN))
            conn_drain_input(r, slot);
        else if (c->flags & C_READ)
            cancel_recv(r, slot);                       /* stop reading now */
        c->flags |= C_CLOSING;
        c->flags &= ~C_READ;
    } else if (abort && !(how & PX_CLOSE_DRAIN) && (c->flags & C_DRAIN_IN)) {
        /* Draining, and now an abort that wants nothing more (the handler's abort(),
         * the stop's deadline): the drain ends here. */
        c->flags &= ~C_DRAIN_IN;
        wait_remove(r, slot);
        cancel_recv(r, slot);
    }
    if (abort) c->flags |= C_ABORT;
    if (abort == PX_CLOSE_RESET && !(c->flags & C_LISTENER)) c->flags |= C_RESET;
    conn_progress_close(r, slot);
    return 0;
}

/* Cancel the connection's multishot recv (or accept), if one is armed. */
static void cancel_recv(struct px_ring *r, int slot)
{
    struct px_conn *c = CONN(r, slot);
    if (!(c->flags & C_RECV_ARMED)) return;
    struct io_uring_sqe *s = px_sqe(r);
    if (!s) { retry_later(r, slot, C_RETRY); return; }
    int kind = (c->flags & C_LISTENER) ? PX_K_ACCEPT : PX_K_RECV;
    io_uring_prep_cancel64(s, UD(kind, slot), 0);
    io_uring_sqe_set_data64(s, UD(PX_K_CANCEL, slot));
    c->inflight++;
}

int px_pause_reading(struct px_ring *r, int slot, uint32_t gen)
{
    struct px_conn *c = conn_get(r, slot, gen);
    if (!c) return -EBADF;
    if (!(c->flags & C_READ)) return 0;
    cancel_recv(r, slot);
    c->flags &= ~C_READ;
    return 1;
}

int px_resume_reading(struct px_ring *r, int slot, uint32_t gen)
{
    struct px_conn *c = conn_get(r, slot, gen);
    if (!c) return -EBADF;
    if ((c->flags & (C_READ | C_CLOSING | C_EOF | C_LISTENER))) return 0;
    c->flags |= C_READ;
    /* still waiting for buffers: re-armed in its turn */
    if (!(c->flags & (C_RECV_ARMED | C_REARM | C_NOBUFS))) arm_recv(r, slot);
    return 1;
}

/* ------------------------------------------------------------------ completions */

static void record_err(struct px_conn *c, int res, int kind)
{
    if (!c->err) { c->err = res; c->err_kind = kind; }
}

static void on_accept(struct px_ring *r, int slot, struct io_uring_cqe *cqe)
{
    struct px_conn *c = CONN(r, slot);
    int more = cqe->flags & IORING_CQE_F_MORE;
    if (!more) { c->flags &= ~C_RECV_ARMED; c->inflight--; }
    if (cqe->res >= 0) {
        if (c->flags & C_CLOSING) {
            close(cqe->res);           /* raced with the listener's close */
        } else {
            int one = 1;
            setsockopt(cqe->res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            px_emit(r, PX_EV_ACCEPT, slot, cqe->res, 0);
        }
        if (!more && !(c->flags & C_CLOSING)) arm_accept(r, slot);
    } else if (cqe->res == -ECANCELED) {
        if (!more && !(c->flags & C_CLOSING)) arm_accept(r, slot);   /* not our cancel */
    } else if (!(c->flags & C_CLOSING)) {
        /* EMFILE and the like: Python decides when to re-arm (px_rearm_accept). */
        px_emit(r, PX_EV_ACCEPT, slot, cqe->res, 0);
    }
    if ((c->flags & C_CLOSING) && !more) conn_progress_close(r, slot);
}

static void on_recv(struct px_ring *r, int slot, struct io_uring_cqe *cqe)
{
    struct px_conn *c = CONN(r, slot);
    int more = cqe->flags & IORING_CQE_F_MORE;
    int res = cqe->res;
    int again = (c->flags & C_BUFWAIT) && res == -ENOBUFS;   /* re-armed, and no data */
    if (!more) { c->flags &= ~(C_RECV_ARMED | C_BUFWAIT); c->inflight--; }
    if (res > 0) c->flags &= ~C_BUFWAIT;
    if (more && res > 0 && ++c->nrecv >= PX_MSHOT_LOOPS
            && !(cqe->flags & IORING_CQE_F_SOCK_NONEMPTY)) {
        /* A multishot recv that has read a backlog of PX_MSHOT_LOOPS buffers or more,
         * down to the end, may go back to waiting for a wakeup that a reset received
         * meanwhile has already given: it would never see the reset (kernel 6.18, with
         * the kernel's 32-loop retry limit). A new recv checks at once: cancel it, and
         * on_recv arms another. */
        c->nrecv = 0;
        cancel_recv(r, slot);
    }
    if (cqe->flags & IORING_CQE_F_BUFFER) {
        unsigned bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
        /* The buffer goes back to the ring at the start of the next px_reap, after
         * Python has copied the bytes out; a zero-length completion returns it too. */
        r->ret[r->nret++] = (uint16_t)bid;
        r->st.bufs_out++;
        if (res > 0) {
            r->st.bytes_in += (uint64_t)res;
            px_emit(r, PX_EV_DATA, slot, res, (int64_t)bid * r->bufsize);
        }
    }
    if (res == -ENOBUFS) {
        /* The pool ran dry; the data stays in the socket. Re-armed once buffers are back
         * (rearm_waiters). */
        r->st.enobufs++;
        if (!more && wants_read(c->flags))
            wait_for_buffers(r, slot, again);
        if ((c->flags & C_CLOSING) && !more) conn_progress_close(r, slot);
        return;
    }
    if (res <= 0 && res != -ECANCELED && !(c->flags & C_EOF)) {
        /* 0: orderly shutdown by the peer (or the end of a drain); <0: the connection
         * failed. Not news once it is closing. */
        c->flags |= C_EOF;
        c->flags &= ~C_READ;
        if (res < 0) record_err(c, res, PX_K_RECV);
        if (!(c->flags & C_CLOSING)) px_emit(r, PX_EV_EOF, slot, res, 0);
    }
    /* A multishot recv ends after data too, or on our cancel (pause, close): arm a new
     * one if reading is still wanted, e.g. resumed while the cancel was in flight. */
    if (!more && wants_read(c->flags) && !(c->flags & (C_RECV_ARMED | C_REARM | C_NOBUFS)))
        arm_recv(r, slot);
    if ((c->flags & C_CLOSING) && !more) conn_progress_close(r, slot);
}

static void on_send(struct px_ring *r, int slot, struct io_uring_cqe *cqe)
{
    struct px_conn *c = CONN(r, slot);
    int res = cqe->res;
    c->inflight--;
    c->flags &= ~C_SENDING;
    if (res < 0) {
        if (res == -EINTR || res == -EAGAIN) { issue_send(r, slot); return; }
        if (res != -ECANCELED) {        /* the peer is gone: drop the rest, close */
            conn_failed(r, slot, res, PX_K_SEND, 0);
            return;
        }
        c->flags |= C_CLOSING | C_ABORT;    /* we aborted */
        c->flags &= ~C_READ;
        conn_progress_close(r, slot);
        return;
    }
    if (res == 0) {                     /* a send of >0 bytes never returns 0 */
        conn_failed(r, slot, -EIO, PX_K_SEND, 0);
        return;
    }
    r->st.bytes_out += (uint64_t)res;
    c->queued -= (size_t)res;
    r->st.send_queued -= res;
    size_t left = (size_t)res;
    while (left && c->head) {               /* consume fully sent chunks */
        struct px_chunk *ch = c->head;
        size_t avail = ch->len - ch->off;
        if (left < avail) { ch->off += left; left = 0; break; }
        left -= avail;
        if (ch->ffd >= 0 && ch->fleft) { ch->off = ch->len; break; }  /* load the next */
        c->head = ch->next;
        if (!c->head) c->tail = NULL;
        chunk_free(ch);
    }
    if (c->head && !(c->flags & C_ABORT)) {
        issue_send(r, slot);                /* short send or more queued: continue */
        return;
    }
    if (!c->head && (c->flags & C_DRAIN)) {
        c->flags &= ~C_DRAIN;
        px_emit(r, PX_EV_DRAINED, slot, 0, 0);
    }
    conn_progress_close(r, slot);
}

/* The ring read the next window of the file at the head of the queue. */
static void on_fread(struct px_ring *r, int slot, struct io_uring_cqe *cqe)
{
    struct px_conn *c = CONN(r, slot);
    int res = cqe->res;
    c->inflight--;
    c->flags &= ~C_SENDING;
    if (c->flags & C_ABORT) { conn_progress_close(r, slot); return; }
    if (res == -EINTR || res == -EAGAIN) { issue_fread(r, slot); return; }
    if (res <= 0) { file_failed(r, slot, res ? res : -ENODATA); return; }
    struct px_chunk *ch = c->head;
    ch->len = (size_t)res; ch->off = 0;
    ch->foff += (uint64_t)res; ch->fleft -= (uint64_t)res;
    issue_send(r, slot);
}

/* Put a finished op record on the list of those reusable from the next batch. */
static void op_free(struct px_ring *r, int idx)
{
    struct px_op *o = OP(r, idx);
    free(o->iov); o->iov = NULL;
    /* Not reusable before the next batch: a callback run for this batch may submit a
     * new op, which must not take an index that a later CQE of the batch names. */
    r->op_dead[r->nop_dead++] = idx;
    r->st.ops--;
}

/* One CQE of a generic op: its own, or its linked timeout's. The op is reported once
 * both have arrived (its final completion), as ETIMEDOUT if the timeout cancelled it. */
static void op_cqe(struct px_ring *r, int idx, struct io_uring_cqe *cqe, int is_link)
{
    struct px_op *o = OP(r, idx);
    if (is_link) {
        if (cqe->res == -ETIME) o->timed_out = 1;
    } else {
        o->res = cqe->res;
        o->cflags = cqe->flags;
    }
    if (--o->pending > 0) return;
    int res = o->res;
    if (res == -ECANCELED && o->timed_out) res = -ETIMEDOUT;
    px_emit(r, PX_EV_OP, idx, res, o->cflags);
    op_free(r, idx);
}

/* Handle one CQE. Returns 0, or -1 when the event array is full (CQE left unseen). */
static int px_handle(struct px_ring *r, struct io_uring_cqe *cqe)
{
    uint64_t ud = cqe->user_data;
    int kind = UD_KIND(ud), idx = UD_IDX(ud);
    /* worst case one CQE emits two events (data + eof/closed, or accept) */
    if (r->nev + 3 > PX_MAX_EVENTS) return -1;
    if (!(cqe->flags & IORING_CQE_F_MORE)) {     /* a request's final completion */
        r->st.completed++;
        r->st.inflight--;
    }
    switch (kind) {
    case PX_K_RECV: on_recv(r, idx, cqe); break;
    case PX_K_SEND: on_send(r, idx, cqe); break;
    case PX_K_FREAD: on_fread(r, idx, cqe); break;
    case PX_K_ACCEPT: on_accept(r, idx, cqe); break;
    case PX_K_OP: op_cqe(r, idx, cqe, 0); break;
    case PX_K_LINK: op_cqe(r, idx, cqe, 1); break;
    case PX_K_CANCEL:
        if (idx >= 0 && (uint32_t)idx != 0xffffffffu && idx < r->nconns) {
            struct px_conn *c = CONN(r, idx);
            c->inflight--;
            if (c->flags & C_CLOSING) conn_progress_close(r, idx);
        }
        break;
    case PX_K_WAKE:
        px_emit(r, PX_EV_WAKE, 0, cqe->res, 0);
        if (r->wake_fd >= 0 && cqe->res > 0) px_arm_wake(r);
        break;
    default: break;
    }
    return 0;
}

/* Give back the buffers Python has copied out of, free the slots closed last batch,
 * retry what could not get an SQE, and re-arm recvs that hit ENOBUFS as far as there
 * are buffers for them. */
static void px_return_buffers(struct px_ring *r)
{
    if (r->nret) {
        int mask = io_uring_buf_ring_mask(r->nbufs);
        for (unsigned i = 0; i < r->nret; i++) {
            unsigned bid = r->ret[i];
            io_uring_buf_ring_add(r->br, r->pool + (size_t)bid * r->bufsize, r->bufsize,
                                  bid, mask, i);
        }
        io_uring_buf_ring_advance(r->br, r->nret);
        r->st.bufs_out -= r->nret;
        r->nret = 0;
    }
    for (unsigned i = 0; i < r->ndead_seen; i++) {
        CONN(r, r->dead[i])->next_free = r->conn_free;
        r->conn_free = r->dead[i];
    }
    for (unsigned i = 0; i < r->nop_dead; i++) {
        OP(r, r->op_dead[i])->next_free = r->op_free;
        r->op_free = r->op_dead[i];
    }
    r->nop_dead = 0;
    ints_drop_front(r->dead, &r->ndead, r->ndead_seen);
    r->ndead_seen = 0;
    unsigned n = r->nrearm;
    r->nrearm = 0;
    for (unsigned i = 0; i < n; i++) {
        int slot = r->rearm[i];
        struct px_conn *c = CONN(r, slot);
        uint32_t f = c->flags;
        c->flags &= ~(C_REARM | C_RETRY);
        if (!(f & C_USED)) continue;
        if (f & C_LISTENER) {
            if ((f & C_REARM) && !(f & (C_CLOSING | C_RECV_ARMED))) arm_accept(r, slot);
        } else if ((f & C_REARM) && wants_read(f) && !(f & C_RECV_ARMED)) {
            arm_recv(r, slot);
        }
        if (f & C_RETRY) {
            if ((f & C_CLOSING) && !(f & C_READ) && (f & C_RECV_ARMED)) cancel_recv(r, slot);
            if (c->head && !(c->flags & (C_SENDING | C_ABORT))) issue_send(r, slot);
            conn_progress_close(r, slot);
        }
    }
    rearm_waiters(r);
    if (r->wake_retry && r->wake_fd >= 0) px_arm_wake(r);
}

/* One loop turn: return last batch's buffers, submit everything queued with a single
 * io_uring_enter (waiting for `wait_nr` completions, at most `timeout_ns` if >= 0),
 * then harvest completions into the event array. Returns the number of events, or
 * -errno for a failure of io_uring_enter other than EINTR/ETIME/EBUSY. */
int px_reap(struct px_ring *r, unsigned wait_nr, int64_t timeout_ns)
{
    int ret;
    px_return_buffers(r);
    issue_sends_soon(r);
    /* Events emitted between two reaps (a px_close that finished at once) were not in
     * the last batch: keep them, first in this one, and do not sleep on them. */
    r->nev -= r->nev_taken;
    if (r->nev) memmove(r->ev, r->ev + r->nev_taken, (size_t)r->nev * sizeof *r->ev);
    r->nev_taken = 0;
    /* Connections closed between reaps with nothing in flight: finish them now, as far
     * as the event array has room (the rest next time). */
    unsigned nf = 0;
    r->in_reap = 1;
    while (nf < r->nfinish && r->nev < PX_MAX_EVENTS) {
        int slot = r->finish[nf++];
        CONN(r, slot)->flags &= ~C_FINISH;
        conn_finish(r, slot);
    }
    ints_drop_front(r->finish, &r->nfinish, nf);
    /* Waiters left over (more than buffers): the ones re-armed may find no data and
     * take no buffer, so nothing would wake us for the rest. */
    if (r->nev || r->nfinish || r->wait_head >= 0 || io_uring_cq_ready(&r->ring)) wait_nr = 0;
    if (wait_nr == 0) {
        ret = io_uring_submit_and_get_events(&r->ring);
    } else {
        PyThreadState *ts_save = PyEval_SaveThread();     /* we may sleep: let go */
        if (timeout_ns >= 0) {
            struct __kernel_timespec ts;
            struct io_uring_cqe *cqe;
            ts.tv_sec = timeout_ns / 1000000000;
            ts.tv_nsec = timeout_ns % 1000000000;
            ret = io_uring_submit_and_wait_timeout(&r->ring, &cqe, wait_nr, &ts, NULL);
        } else {
            ret = io_uring_submit_and_wait(&r->ring, wait_nr);
        }
        PyEval_RestoreThread(ts_save);
    }
    if (ret < 0 && ret != -EINTR && ret != -ETIME && ret != -EBUSY && ret != -EAGAIN) {
        r->in_reap = 0;
        return ret;
    }
    if (*r->ring.cq.koverflow) r->st.cq_overflow = *r->ring.cq.koverflow;
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&r->ring, head, cqe) {
        if (px_handle(r, cqe) < 0) break;
        /* Seen at once, not at the end of the batch: the CQ then has room for what
         * the kernel kept back on overflow, so a submission made by a later CQE's
         * handling is not refused with EBUSY. */
        io_uring_cq_advance(&r->ring, 1);
        seen++;
    }
    r->in_reap = 0;
    r->nev_taken = r->nev;
    r->ndead_seen = r->ndead;
    return r->nev;
}

/* ------------------------------------------------------------------ generic ops */

static int op_alloc(struct px_ring *r)
{
    if (r->op_free < 0) {
        int old = r->nops;
        if (old / PX_OP_BLOCK >= PX_OP_BLOCKS) return -EBUSY;
        struct px_op *blk = calloc(PX_OP_BLOCK, sizeof *blk);
        int *dead = realloc(r->op_dead, (size_t)(old + PX_OP_BLOCK) * sizeof(int));
        if (!blk || !dead) { free(blk); if (dead) r->op_dead = dead; return -ENOMEM; }
        r->op_dead = dead;
        r->op_blocks[old / PX_OP_BLOCK] = blk;
        r->nops = old + PX_OP_BLOCK;
        for (int i = r->nops - 1; i >= old; i--) {
            OP(r, i)->next_free = r->op_free;
            r->op_free = i;
        }
    }
    int idx = r->op_free;
    struct px_op *o = OP(r, idx);
    r->op_free = o->next_free;
    o->gen++;
    o->pending = 1;
    o->cancelled = 0;
    o->timed_out = 0;
    o->res = 0; o->cflags = 0;
    o->iov = NULL;
    r->st.ops++;
    return idx;
}

/* Finish preparing an op's SQE: tag it, and attach a linked timeout if asked (op_sqe
 * made room for both). */
static int op_submit(struct px_ring *r, int idx, struct io_uring_sqe *s, int64_t tmo_ns)
{
    struct px_op *o = OP(r, idx);
    io_uring_sqe_set_data64(s, UD(PX_K_OP, idx));
    if (tmo_ns >= 0) {
        s->flags |= IOSQE_IO_LINK;
        struct io_uring_sqe *t = px_sqe(r);     /* cannot fail: op_sqe saw room for 2 */
        o->lts.tv_sec = tmo_ns / 1000000000;
        o->lts.tv_nsec = tmo_ns % 1000000000;
        io_uring_prep_link_timeout(t, &o->lts, 0);
        io_uring_sqe_set_data64(t, UD(PX_K_LINK, idx));
        o->pending = 2;
    }
    return idx;
}

/* Get an SQE for an op, with room for its linked timeout when one is wanted; NULL when
 * the SQ has no room even after a submit (the op then fails with EBUSY). */
static struct io_uring_sqe *op_sqe(struct px_ring *r, int64_t tmo_ns)
{
    unsigned need = tmo_ns >= 0 ? 2 : 1;
    if (io_uring_sq_space_left(&r->ring) < need) {
        io_uring_submit(&r->ring);
        if (io_uring_sq_space_left(&r->ring) < need) { r->st.sqe_full++; return NULL; }
    }
    return px_sqe(r);
}

/* The op's record could not be completed (no memory): turn its SQE into an untracked
 * NOP, free the record, and fail the call. */
static int op_abandon(struct px_ring *r, int idx, struct io_uring_sqe *s, int err)
{
    io_uring_prep_nop(s);
    io_uring_sqe_set_data64(s, UD(PX_K_CANCEL, 0xffffffffu));
    op_free(r, idx);
    return err;
}

#define OP_BEGIN(tmo)                                   \
    int idx = op_alloc(r);                              \
    if (idx < 0) return idx;                            \
    struct px_op *o = OP(r, idx); (void)o;            \
    struct io_uring_sqe *s = op_sqe(r, tmo);            \
    if (!s) { op_free(r, idx); return -EBUSY; }

int px_op_read(struct px_ring *r, int fd, char *buf, unsigned len, uint64_t off, int64_t tmo_ns)
{
    OP_BEGIN(tmo_ns)
    io_uring_prep_read(s, fd, buf, len, off);
    return op_submit(r, idx, s, tmo_ns);
}

int px_op_write(struct px_ring *r, int fd, const char *buf, unsigned len, uint64_t off,
                int64_t tmo_ns)
{
    OP_BEGIN(tmo_ns)
    io_uring_prep_write(s, fd, buf, len, off);
    return op_submit(r, idx, s, tmo_ns);
}

/* Address of [buf_off, buf_off+len) inside registered buffer `index`, or NULL. */
static char *fixed_ptr(struct px_ring *r, int index, size_t buf_off, unsigned len)
{
    if (index < 0 || index >= r->nfixed) return NULL;
    struct iovec *v = &r->fixed[index];
    if (buf_off > v->iov_len || len > v->iov_len - buf_off) return NULL;
    return (char *)v->iov_base + buf_off;
}

int px_op_read_fixed(struct px_ring *r, int fd, int index, size_t buf_off, unsigned len,
                     uint64_t off, int64_t tmo_ns)
{
    char *buf = fixed_ptr(r, index, buf_off, len);
    if (!buf) return -EINVAL;
    OP_BEGIN(tmo_ns)
    io_uring_prep_read_fixed(s, fd, buf, len, off, index);
    return op_submit(r, idx, s, tmo_ns);
}

int px_op_write_fixed(struct px_ring *r, int fd, int index, size_t buf_off, unsigned len,
                      uint64_t off, int64_t tmo_ns)
{
    char *buf = fixed_ptr(r, index, buf_off, len);
    if (!buf) return -EINVAL;
    OP_BEGIN(tmo_ns)
    io_uring_prep_write_fixed(s, fd, buf, len, off, index);
    return op_submit(r, idx, s, tmo_ns);
}

int px_op_send(struct px_ring *r, int fd, const char *buf, unsigned len, int flags,
               int64_t tmo_ns)
{
    OP_BEGIN(tmo_ns)
    io_uring_prep_send(s, fd, buf, len, flags | MSG_NOSIGNAL);
    return op_submit(r, idx, s, tmo_ns);
}

int px_op_recv(struct px_ring *r, int fd, char *buf, unsigned len, int flags, int64_t tmo_ns)
{
    OP_BEGIN(tmo_ns)
    io_uring_prep_recv(s, fd, buf, len, flags);
    return op_submit(r, idx, s, tmo_ns);
}

static int op_fill_iov(struct px_op *o, char **bufs, size_t *lens, int n)
{
    o->iov = malloc((size_t)n * sizeof *o->iov);
    if (!o->iov) return -ENOMEM;
    for (int i = 0; i < n; i++) { o->iov[i].iov_base = bufs[i]; o->iov[i].iov_len = lens[i]; }
    return 0;
}

int px_op_writev(struct px_ring *r, int fd, char **bufs, size_t *lens, int n, uint64_t off,
                 int64_t tmo_ns)
{
    if (n <= 0 || n > IOV_MAX) return -EINVAL;
    OP_BEGIN(tmo_ns)
    if (op_fill_iov(o, bufs, lens, n)) return op_abandon(r, idx, s, -ENOMEM);
    io_uring_prep_writev(s, fd, o->iov, n, off);
    return op_submit(r, idx, s, tmo_ns);
}

int px_op_sendmsg(struct px_ring *r, int fd, char **bufs, size_t *lens, int n, int flags,
                  int64_t tmo_ns)
{
    if (n <= 0 || n > IOV_MAX) return -EINVAL;
    OP_BEGIN(tmo_ns)
    if (op_fill_iov(o, bufs, lens, n)) return op_abandon(r, idx, s, -ENOMEM);
    memset(&o->msg, 0, sizeof o->msg);
    o->msg.msg_iov = o->iov;
    o->msg.msg_iovlen = n;
    io_uring_prep_sendmsg(s, fd, &o->msg, flags | MSG_NOSIGNAL);
    return op_submit(r, idx, s, tmo_ns);
}

int px_op_connect(struct px_ring *r, int fd, const char *addr, unsigned addrlen, int64_t tmo_ns)
{
    if (addrlen > sizeof(struct sockaddr_storage)) return -EINVAL;
    OP_BEGIN(tmo_ns)
    memcpy(&o->addr, addr, addrlen);
    o->addrlen = addrlen;
    io_uring_prep_connect(s, fd, (struct sockaddr *)&o->addr, o->addrlen);
    return op_submit(r, idx, s, tmo_ns);
}

int px_op_accept(struct px_ring *r, int fd, int64_t tmo_ns)
{
    OP_BEGIN(tmo_ns)
    io_uring_prep_accept(s, fd, NULL, NULL, SOCK_CLOEXEC);
    return op_submit(r, idx, s, tmo_ns);
}

int px_op_openat(struct px_ring *r, int dfd, const char *path, int flags, unsigned mode,
                 int64_t tmo_ns)
{
    OP_BEGIN(tmo_ns)
    /* the path is read by the kernel at submission (prep), which is before the
     * caller's object can go away only if we copy it: keep a copy in the op. */
    size_t n = strlen(path) + 1;
    o->iov = malloc(sizeof(struct iovec) + n);
    if (!o->iov) return op_abandon(r, idx, s, -ENOMEM);
    char *copy = (char *)(o->iov + 1);
    memcpy(copy, path, n);
    io_uring_prep_openat(s, dfd, copy, flags | O_CLOEXEC, mode);
    return op_submit(r, idx, s, tmo_ns);
}

int px_op_close(struct px_ring *r, int fd)
{
    OP_BEGIN(-1)
    io_uring_prep_close(s, fd);
    return op_submit(r, idx, s, -1);
}

int px_op_timeout(struct px_ring *r, int64_t ns)
{
    OP_BEGIN(-1)
    o->ts.tv_sec = ns / 1000000000;
    o->ts.tv_nsec = ns % 1000000000;
    io_uring_prep_timeout(s, &o->ts, 0, 0);
    return op_submit(r, idx, s, -1);
}

int px_op_poll(struct px_ring *r, int fd, unsigned mask, int64_t tmo_ns)
{
    OP_BEGIN(tmo_ns)
    io_uring_prep_poll_add(s, fd, mask);
    return op_submit(r, idx, s, tmo_ns);
}

int px_op_nop(struct px_ring *r)
{
    OP_BEGIN(-1)
    io_uring_prep_nop(s);
    return op_submit(r, idx, s, -1);
}

/* Request cancellation of op `index`; its own completion still follows. */
int px_op_cancel(struct px_ring *r, int index)
{
    if (index < 0 || index >= r->nops) return -EINVAL;
    struct px_op *o = OP(r, index);
    if (o->cancelled) return 0;
    struct io_uring_sqe *s = px_sqe(r);
    if (!s) return -EBUSY;
    o->cancelled = 1;
    io_uring_prep_cancel64(s, UD(PX_K_OP, index), 0);
    io_uring_sqe_set_data64(s, UD(PX_K_CANCEL, 0xffffffffu));
    return 0;
}

/* Cancel every request on `fd` that was submitted as a generic op. */
int px_cancel_fd(struct px_ring *r, int fd)
{
    struct io_uring_sqe *s = px_sqe(r);
    if (!s) return -EBUSY;
    io_uring_prep_cancel_fd(s, fd, IORING_ASYNC_CANCEL_ALL);
    io_uring_sqe_set_data64(s, UD(PX_K_CANCEL, 0xffffffffu));
    return 0;
}

int px_register_buffers(struct px_ring *r, char **bufs, size_t *lens, int n)
{
    struct iovec *iov = malloc((size_t)n * sizeof *iov);
    if (!iov) return -ENOMEM;
    for (int i = 0; i < n; i++) { iov[i].iov_base = bufs[i]; iov[i].iov_len = lens[i]; }
    int ret = io_uring_register_buffers(&r->ring, iov, n);
    if (ret < 0) { free(iov); return ret; }
    free(r->fixed);
    r->fixed = iov;             /* kept: fixed ops find their addresses here */
    r->nfixed = n;
    return ret;
}

int px_unregister_buffers(struct px_ring *r)
{
    int ret = io_uring_unregister_buffers(&r->ring);
    if (ret == 0) { free(r->fixed); r->fixed = NULL; r->nfixed = 0; }
    return ret;
}
"""

LIBURING_A = os.environ.get("PROACTOR_LIBURING_A", "")


def _liburing_archive() -> str:
    """Path of liburing.a (Debian's liburing-dev); linked in statically."""
    if LIBURING_A:
        return LIBURING_A
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
              "/usr/lib", "/usr/local/lib"):
        p = os.path.join(d, "liburing.a")
        if os.path.exists(p):
            return p
    raise RuntimeError("liburing.a not found: install liburing-dev (apt-get install liburing-dev)")


#: Compiler flags of the normal build: -Wall -Wextra are clean with gcc 12 (not -Werror
#: here: a newer compiler's new warning must not stop an install; the sanitizer build has
#: it). -Wno-unused-function: liburing's static inline helpers that the C layer does not use.
COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-function"]
LINK_ARGS: list[str] = []

#: ``PROACTOR_SANITIZE=1``: the sanitizer build (see the module docstring). -O1 -g and
#: frame pointers for exact reports; -fno-sanitize-recover: undefined behaviour aborts
#: instead of printing and going on; -fno-wrapv undoes Python's -fwrapv, which would make
#: signed overflow defined and so unchecked; -Werror: the build itself must be clean.
SANITIZE = os.environ.get("PROACTOR_SANITIZE", "") not in ("", "0")
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer"]
if SANITIZE:
    COMPILE_ARGS = ["-O1", "-g", "-fno-wrapv", "-Werror", *COMPILE_ARGS[1:], *SANITIZE_FLAGS]
    LINK_ARGS = list(SANITIZE_FLAGS)

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "proactor._uring_cffi",
    SOURCE,
    extra_objects=[_liburing_archive()],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=LINK_ARGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
