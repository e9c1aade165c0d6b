/* lowbit's work pool: the kernels' threads for one call split into chunks that threads claim one at a
 * time, and the caller waits only for chunks that were claimed -- never for a thread to arrive.
 *
 * Why not an OpenMP parallel-for: its end-of-loop barrier waits until every team thread has *arrived*,
 * so a decode step (about 130 parallel loops a token) pays the scheduling latency of the slowest thread
 * at every loop, and a statically split loop runs at the speed of its most descheduled thread.  Here the
 * caller starts claiming at once; a helper that wakes late finds the chunks taken and blocks nobody, so
 * a linear never waits longer than for one chunk in flight.  On an idle machine both behave alike.
 *
 * Protocol.  A job (fn, arg, n chunks, threads) goes into slot gen & 1; then the claim word
 * (gen << 32 | next chunk) is published.  A thread claims chunk i by CAS of (gen, i) -> (gen, i + 1):
 * a CAS that succeeds proves the job is still current, so the slot it read (before the CAS) was not
 * rewritten (slot gen & 1 is rewritten only for gen + 2, after the claim word has moved past gen).
 * `done` counts finished chunks; the caller returns when done == n.  Helpers spin for LOWBIT_SPIN_NS
 * after their last job (decode ops follow each other within microseconds), then sleep on a futex.
 * One job at a time: a concurrent caller (another thread of the host) runs its job inline.
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef LOWBIT_SPIN_NS
#define LOWBIT_SPIN_NS 2000000L /* 2 ms */
#endif
#define MAX_HELPERS 255

typedef void (*lowbit_chunk_fn)(void *arg, int chunk);

struct job {
    lowbit_chunk_fn fn;
    void *arg;
    int n, threads;
};

static struct job g_slot[2];
static _Atomic uint64_t g_claim; /* gen << 32 | next chunk */
static _Atomic int g_done;
static _Atomic uint32_t g_wake;  /* futex word: low bits of gen */
static _Atomic int g_sleepers;
static _Atomic int g_busy;       /* a job is running (one caller at a time) */
static int g_helpers;            /* started helper threads */
static uint32_t g_gen;
static pthread_mutex_t g_start = PTHREAD_MUTEX_INITIALIZER;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and run chunks of job `gen` until none is left (or the job is no longer current). */
static void work(uint32_t gen, const struct job *j) {
    uint64_t v = atomic_load(&g_claim);
    for (;;) {
        if ((uint32_t)(v >> 32) != gen || (int)(uint32_t)v >= j->n) return;
        if (atomic_compare_exchange_weak(&g_claim, &v, v + 1)) {
            j->fn(j->arg, (int)(uint32_t)v);
            atomic_fetch_add(&g_done, 1);
            v = atomic_load(&g_claim);
        }
    }
}

static void *helper(void *p) {
    int id = (int)(intptr_t)p; /* 1.. : takes part in jobs with threads > id */
    uint32_t seen = (uint32_t)(atomic_load(&g_claim) >> 32);
    for (;;) {
        long t0 = now_ns();
        int spins = 0;
        uint32_t gen;
        while ((gen = (uint32_t)(atomic_load(&g_claim) >> 32)) == seen) {
            cpu_relax();
            if (++spins % 256 == 0 && now_ns() - t0 > LOWBIT_SPIN_NS) {
                atomic_fetch_add(&g_sleepers, 1);
                if ((uint32_t)(atomic_load(&g_claim) >> 32) == seen)
                    syscall(SYS_futex, &g_wake, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                atomic_fetch_sub(&g_sleepers, 1);
                t0 = now_ns();
            }
        }
        seen = gen;
        struct job j = g_slot[gen & 1]; /* validated by work()'s CAS */
        atomic_thread_fence(memory_order_seq_cst);
        if (id < j.threads) work(gen, &j);
    }
    return NULL;
}

static void after_fork_child(void) { /* the child has no helper threads */
    g_helpers = 0;
    atomic_store(&g_busy, 0);
    atomic_store(&g_sleepers, 0);
}

static int ensure_helpers(int want) {
    if (want > MAX_HELPERS) want = MAX_HELPERS;
    if (g_helpers >= want) return g_helpers;
    pthread_mutex_lock(&g_start);
    static int atfork;
    if (!atfork) atfork = !pthread_atfork(NULL, NULL, after_fork_child);
    while (g_helpers < want) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &a, helper, (void *)(intptr_t)(g_helpers + 1));
        pthread_attr_destroy(&a);
        if (rc) break;
        g_helpers++;
    }
    pthread_mutex_unlock(&g_start);
    return g_helpers;
}

/* Run fn(arg, c) for c in [0, n) on up to `threads` threads (the caller is one of them); returns when
 * every chunk has run. */
void lowbit_pool_run(lowbit_chunk_fn fn, void *arg, int n, int threads) {
    int expect = 0;
    if (threads <= 1 || n <= 1 || !atomic_compare_exchange_strong(&g_busy, &expect, 1)) {
        for (int c = 0; c < n; c++) fn(arg, c);
        return;
    }
    int h = ensure_helpers(threads - 1);
    if (h < 1) {
        atomic_store(&g_busy, 0);
        for (int c = 0; c < n; c++) fn(arg, c);
        return;
    }
    uint32_t gen = ++g_gen;
    if (gen == 0) gen = ++g_gen; /* 0: the helpers' initial "seen" */
    g_slot[gen & 1] = (struct job){fn, arg, n, threads};
    atomic_store(&g_done, 0);
    atomic_store(&g_claim, (uint64_t)gen << 32);
    atomic_store(&g_wake, gen);
    if (atomic_load(&g_sleepers) > 0) syscall(SYS_futex, &g_wake, FUTEX_WAKE_PRIVATE, MAX_HELPERS, NULL, NULL, 0);
    work(gen, &g_slot[gen & 1]);
    for (long spins = 0; atomic_load(&g_done) < n; spins++) /* only chunks already claimed are left */
        if (spins < 100000) cpu_relax();
        else sched_yield(); /* a helper was descheduled mid-chunk: let it run */
    atomic_store(&g_busy, 0);
}
