/* An optional pthread pool for xbitc_exec, in caller memory. A decode step hands out ~200 matrix products of
 * tens of microseconds each, so workers spin a while on the generation counter before sleeping on the condition
 * variable: waking a sleeping thread costs as much as a small product. parallel_for returns only after every worker
 * has checked in for its generation, so no worker can still be inside work() when the next job is published. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>

#include "xbitc.h"

#define SPINS 200000

/* A spin-wait hint: lets the sibling hyperthread run and saves power while polling. */
static void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

struct xbitc_pool {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    atomic_long generation;
    atomic_long next, done;
    atomic_int stop;
    xbitc_task task;
    void *arg;
    int64_t n;
    int32_t threads, started;
    atomic_long *left; /* per worker: the last generation it finished */
    pthread_t tid[];
};

typedef struct worker_arg {
    struct xbitc_pool *pool;
    int32_t index;
} worker_arg;

static void work(struct xbitc_pool *p) {
    int64_t i, finished = 0;
    while ((i = atomic_fetch_add(&p->next, 1)) < p->n) {
        p->task(p->arg, i);
        finished++;
    }
    if (finished)
        atomic_fetch_add(&p->done, finished);
}

static void *worker(void *arg) {
    struct xbitc_pool *p = ((worker_arg *)arg)->pool;
    atomic_long *left = &p->left[((worker_arg *)arg)->index];
    long seen = 0;
    for (;;) {
        long g;
        int spins = 0;
        while ((g = atomic_load(&p->generation)) == seen && !atomic_load(&p->stop) && spins++ < SPINS)
            relax();
        if (g == seen && !atomic_load(&p->stop)) {
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load(&p->generation)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->wake, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop))
            return NULL;
        seen = g;
        work(p);
        atomic_store(left, g);
    }
}

static void parallel_for(void *ctx, xbitc_task task, void *arg, int64_t n) {
    struct xbitc_pool *p = ctx;
    p->task = task;
    p->arg = arg;
    p->n = n;
    atomic_store(&p->done, 0);
    atomic_store(&p->next, 0);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->generation, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    work(p);
    long g = atomic_load(&p->generation);
    for (long spins = 0; atomic_load(&p->done) < n; spins++) /* the other tasks finish within microseconds */
        if (spins < SPINS)
            relax();
        else
            sched_yield();
    for (int32_t k = 0; k < p->started; k++)
        for (long spins = 0; atomic_load(&p->left[k]) < g; spins++)
            if (spins < SPINS)
                relax();
            else
                sched_yield();
}

uint64_t xbitc_pool_bytes(int32_t threads) {
    uint64_t workers = (uint64_t)(threads > 1 ? threads - 1 : 0);
    return sizeof(struct xbitc_pool) + workers * (sizeof(pthread_t) + sizeof(atomic_long) + sizeof(worker_arg));
}

int32_t xbitc_pool_start(int32_t threads, void *mem, uint64_t mem_bytes, xbitc_pool **pool) {
    if (!mem || !pool || threads < 1 || threads > 1024)
        return XBITC_E_ARGUMENT;
    if (mem_bytes < xbitc_pool_bytes(threads) || ((uintptr_t)mem & 63))
        return XBITC_E_MEMORY;
    struct xbitc_pool *p = mem;
    memset(p, 0, sizeof *p);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    p->threads = threads;
    int32_t workers = threads - 1;
    p->left = (atomic_long *)(p->tid + workers);
    worker_arg *args = (worker_arg *)(p->left + workers);
    *pool = p;
    for (int32_t k = 0; k < workers; k++) {
        atomic_init(&p->left[k], 0);
        args[k] = (worker_arg){p, k};
        if (pthread_create(&p->tid[k], NULL, worker, &args[k])) {
            xbitc_pool_stop(p);
            *pool = NULL;
            return XBITC_E_THREADS;
        }
        p->started++;
    }
    return XBITC_OK;
}

xbitc_exec xbitc_pool_exec(xbitc_pool *pool) {
    xbitc_exec e = {pool && pool->threads > 1 ? parallel_for : NULL, pool, pool ? pool->threads : 1};
    return e;
}

void xbitc_pool_stop(xbitc_pool *p) {
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int32_t k = 0; k < p->started; k++)
        pthread_join(p->tid[k], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
}
