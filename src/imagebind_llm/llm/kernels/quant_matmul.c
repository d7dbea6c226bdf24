/* The CPU work of a decode step on GGUF block-quantised weights, without expanding them to float32, on
 * a small thread pool of our own.
 *
 * Weights W [N, K] are stored row-major in blocks of 32 consecutive inputs, as llama.cpp defines them:
 *   Q4_1: W[n, 32b + i] = d[n, b] * q + m[n, b], q in 0..15, packed two per byte: byte j of a block
 *         holds element j in its low nibble and element j + 16 in its high nibble.  (Q4_0 is Q4_1 with
 *         m = -8 d.)
 *   Q8:   W[n, 32b + i] = d[n, b] * q (+ m[n, b]), q int8: llama.cpp's Q8_0, and the 5-bit types
 *         (Q5_0 as q - 16; Q5_1 and Q5_K with offsets); or with one scale per 16 values and no
 *         offsets, d[n, 2b + i / 16] (Q6_K, whose values q - 32 fit int8).
 * Scales d, m are float32 [N, K / 32] ([N, K / 16] for 16-value groups); the caller widens llama.cpp's
 * float16 (and Q4_K's / Q6_K's products of two scales) to them exactly.
 *
 * ibl_matmul computes y_i [M, N_i] = x [M, K] @ W_i^T for up to MAX_WEIGHTS weights that share the input
 * (a layer's q/k/v or gate/up projections: one parallel region for all), optionally RMS-normalising x
 * first and combining a gate and an up projection into silu(gate) * up, in one of two ways:
 *   exact: float32 activations and accumulation, the file's weights exactly (the offsets as m times
 *          the float sums of the blocks of x); up to 8 input rows per pass over a weight row.
 *   int8:  each 32-block of an input row rounded to int8 with the scale max|x| / 127 (llama.cpp's Q8_0
 *          activations, computed once per call), integer dot products per block scaled in float32; the
 *          offsets multiply the exact float block sums.  Each product is off by at most
 *          sum |w| * max|x block| / 254 over the blocks.
 * Both have an AVX2/FMA version and, where the CPU has AVX512-VNNI, a 512-bit one (vpdpbusd for int8);
 * the weight rows are prefetched a few KB ahead.  Every output is computed from its weight row alone,
 * in an order fixed by the shapes and the instruction set, so results do not depend on the number of
 * threads or on how rows are split among them.  ibl_dequantize computes d * q + m with two roundings,
 * exactly like the reference `gguf` package.  ibl_attention does a decode step's rotary embeddings,
 * KV cache write and attention.  Built with -ffp-contract=off so that only the explicit FMAs are fused.
 *
 * Threads.  A parallel call splits its work into small chunks (output rows; query heads) that the
 * calling thread and threads - 1 pool workers claim one at a time from an atomic counter.  A worker
 * that is late, or descheduled because a busy neighbour shares its core, just claims fewer chunks: the
 * caller only ever waits for chunks already claimed (OpenMP's static split waits for every thread of
 * the team).  Idle workers wait for the next call for SPIN_NS, yielding the core between checks (so
 * that a thread sharing it, the caller's serial Python and torch work included, runs), then sleep on a
 * futex.  One call uses the pool at a time; a concurrent caller computes alone.  A forked child starts
 * with no workers and creates its own on first use.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <limits.h>
#include <math.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 32
#define MAX_ROWS 8
#define MAX_WEIGHTS 3
#define MAX_THREADS 256
#define SPIN_NS 300000      /* idle workers wait this long for the next call before sleeping */
#define WAIT_SPIN_NS 50000  /* the caller waits this long for claimed chunks before sleeping */
#define CHUNK_BYTES 16384   /* about this many weight bytes per chunk (times the input rows) */
#define GATE_TILE 4096      /* outputs of each weight per chunk of a gated product */
#define PREFETCH_BYTES 4096 /* how far ahead of use the weight rows are fetched */

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9)
#define HAVE_VNNI 1
#define VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#else
#define HAVE_VNNI 0
#endif

enum { FMT_Q4_1 = 0, FMT_Q8 = 1 };
enum { ISA_AUTO = 0, ISA_AVX2 = 1, ISA_AVX512_VNNI = 2 };

/* One weight, as the Python side describes it (ctypes.Structure of the same layout). */
typedef struct {
    int64_t fmt;    /* FMT_Q4_1 or FMT_Q8 */
    int64_t group;  /* values per scale: 32, or 16 (q8 without offsets) */
    const void *q;  /* q4_1: uint8 [N, K / 2]; q8: int8 [N, K] */
    const float *d; /* [N, K / group] */
    const float *m; /* [N, K / 32] or NULL */
    int64_t n;      /* N */
} ibl_weight;

/* ------------------------------------------------------------------------------------- thread pool */

typedef void (*task_fn)(const void *ctx, int64_t chunk);

typedef struct {
    _Atomic(task_fn) fn;
    _Atomic(const void *) ctx;
    _Atomic int64_t chunks, threads;
    _Atomic uint32_t done;    /* chunks finished; the caller's futex while it waits */
    _Atomic uint32_t waiting; /* the caller sleeps on `done` */
} job;

static struct {
    /* (generation << 32) | next unclaimed chunk: claiming a chunk with a compare-and-swap that names the
     * generation makes a worker that read an older job's fields claim nothing. */
    _Atomic uint64_t state;
    _Atomic uint32_t gen;      /* the generation alone: the workers' futex */
    _Atomic int32_t sleepers;  /* workers asleep (or about to be) on `gen` */
    job jobs[2];               /* generation g uses jobs[g & 1]; g + 2 reuses it once g is done */
    pthread_mutex_t lock;      /* held by the one call using the pool */
    int workers;
    int atfork_registered;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static long futex(_Atomic uint32_t *word, int op, uint32_t value) {
    return syscall(SYS_futex, (uint32_t *)word, op | FUTEX_PRIVATE_FLAG, value, NULL, NULL, 0);
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Run the chunks of generation `g` that are still unclaimed, as pool worker number `index`. */
static void work_on(uint32_t g, int index) {
    for (;;) {
        uint64_t s = atomic_load_explicit(&pool.state, memory_order_acquire);
        if ((uint32_t)(s >> 32) != g) return;
        job *j = &pool.jobs[g & 1];
        task_fn fn = atomic_load_explicit(&j->fn, memory_order_relaxed);
        const void *ctx = atomic_load_explicit(&j->ctx, memory_order_relaxed);
        int64_t chunks = atomic_load_explicit(&j->chunks, memory_order_relaxed);
        if (index >= atomic_load_explicit(&j->threads, memory_order_relaxed) - 1 || (int64_t)(uint32_t)s >= chunks)
            return;
        /* Success means generation g is still live, so the fields read above were g's. */
        if (!atomic_compare_exchange_weak_explicit(&pool.state, &s, s + 1, memory_order_acq_rel, memory_order_relaxed))
            continue;
        fn(ctx, (int64_t)(uint32_t)s);
        if (atomic_fetch_add(&j->done, 1) + 1 == (uint32_t)chunks && atomic_load(&j->waiting))
            futex(&j->done, FUTEX_WAKE, INT_MAX);
    }
}

/* Wait until *word differs from `value` (returned): check it in a loop of `pause`s, yielding the core
 * every 32 checks (so that a thread sharing it, such as the caller's, runs), and after `spin_ns` sleep
 * on the futex.  `sleepers` (may be NULL) counts the threads asleep, for the waker. */
static uint32_t wait_change(_Atomic uint32_t *word, uint32_t value, int64_t spin_ns, _Atomic int32_t *sleepers) {
    uint32_t now;
    const int64_t until = now_ns() + spin_ns;
    for (int i = 1;; i++) {
        if ((now = atomic_load_explicit(word, memory_order_acquire)) != value) return now;
        if (i % 32) {
            _mm_pause();
        } else if (now_ns() < until) {
            sched_yield();
        } else {
            if (sleepers) atomic_fetch_add(sleepers, 1);
            if (atomic_load(word) == value) futex(word, FUTEX_WAIT, value);
            if (sleepers) atomic_fetch_sub(sleepers, 1);
        }
    }
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t g = atomic_load(&pool.gen);
    for (;;) {
        g = wait_change(&pool.gen, g, SPIN_NS, &pool.sleepers);
        work_on(g, index);
    }
    return NULL;
}

static void after_fork_in_child(void) {
    /* The workers were not copied: start over with none (they are re-created on first use). */
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pool.lock = fresh;
    pool.workers = 0;
    atomic_store(&pool.sleepers, 0);
}

static void before_fork(void) { pthread_mutex_lock(&pool.lock); }
static void after_fork_in_parent(void) { pthread_mutex_unlock(&pool.lock); }

/* Grow the pool to `count` workers (called with the lock held); returns how many there are. */
static int ensure_workers(int count) {
    if (!pool.atfork_registered) {
        pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
        pool.atfork_registered = 1;
    }
    if (count > MAX_THREADS - 1) count = MAX_THREADS - 1;
    if (pool.workers >= count) return pool.workers;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with the interpreter's threads */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 1 << 18);
    while (pool.workers < count) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker_main, (void *)(intptr_t)pool.workers) != 0) break;
        pool.workers++;
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pool.workers;
}

/* fn(ctx, c) for every chunk c in [0, chunks), on up to `threads` threads including this one. */
static void parallel(task_fn fn, const void *ctx, int64_t chunks, int64_t threads) {
    if (threads > chunks) threads = chunks;
    if (threads <= 1 || chunks >= UINT32_MAX || pthread_mutex_trylock(&pool.lock) != 0) {
        for (int64_t c = 0; c < chunks; c++) fn(ctx, c);
        return;
    }
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const int workers = ensure_workers((int)threads - 1);
    if (workers < threads - 1) threads = workers + 1;
    if (threads <= 1) {
        pthread_mutex_unlock(&pool.lock);
        for (int64_t c = 0; c < chunks; c++) fn(ctx, c);
        return;
    }
    const uint32_t g = atomic_load(&pool.gen) + 1;
    job *j = &pool.jobs[g & 1];
    atomic_store_explicit(&j->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&j->ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&j->chunks, chunks, memory_order_relaxed);
    atomic_store_explicit(&j->threads, threads, memory_order_relaxed);
    atomic_store_explicit(&j->done, 0, memory_order_relaxed);
    atomic_store_explicit(&j->waiting, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.state, (uint64_t)g << 32, memory_order_release);
    atomic_store(&pool.gen, g);
    if (atomic_load(&pool.sleepers) > 0) futex(&pool.gen, FUTEX_WAKE, INT_MAX);

    uint32_t mine = 0;
    for (;;) {
        const uint64_t s = atomic_fetch_add(&pool.state, 1);
        if ((int64_t)(uint32_t)s >= chunks) break;
        fn(ctx, (int64_t)(uint32_t)s);
        mine++;
    }
    uint32_t done = atomic_fetch_add(&j->done, mine) + mine;
    if (done < (uint32_t)chunks) {
        /* Chunks claimed by workers are still running.  A worker that was descheduled while holding one
         * gets the core when this thread yields or sleeps. */
        atomic_store(&j->waiting, 1);
        while (done < (uint32_t)chunks) done = wait_change(&j->done, done, WAIT_SPIN_NS, NULL);
    }
    pthread_mutex_unlock(&pool.lock);
}

/* ------------------------------------------------------------------------------------ CPU features */

static int isa_choice = ISA_AUTO;

static int best_isa(void) {
#if HAVE_VNNI
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx512vnni"))
        return ISA_AVX512_VNNI;
#endif
    return ISA_AVX2;
}

/* The instruction set the products use: ISA_AVX2 or ISA_AVX512_VNNI. */
int64_t ibl_isa(void) { return isa_choice == ISA_AUTO ? best_isa() : isa_choice; }

/* Force an instruction set for the products (ISA_AUTO: the best this CPU has); returns 0 if the CPU
 * lacks it (the choice is then unchanged). */
int64_t ibl_set_isa(int64_t isa) {
    if (isa < ISA_AUTO || isa > ISA_AVX512_VNNI || (isa == ISA_AVX512_VNNI && best_isa() != ISA_AVX512_VNNI))
        return 0;
    isa_choice = (int)isa;
    return 1;
}

/* ------------------------------------------------------------------------ exact (float32) products */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 32 nibbles of one Q4_1 block as four vectors of floats, elements 0-7, 8-15, 16-23, 24-31. */
static inline void unpack_q4(const uint8_t *q, __m256 w[4]) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i bytes = _mm_loadu_si128((const __m128i *)q);
    __m128i lo = _mm_and_si128(bytes, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline void unpack_q8(const int8_t *q, __m256 w[4]) {
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i))));
}

static inline __m256 dot_block(const float *x, const __m256 w[4]) {
    __m256 t = _mm256_mul_ps(_mm256_loadu_ps(x), w[0]);
    t = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w[1], t);
    t = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16), w[2], t);
    return _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), w[3], t);
}

static inline __m256 dot_half(const float *x, __m256 w0, __m256 w1) {
    return _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w1, _mm256_mul_ps(_mm256_loadu_ps(x), w0));
}

/* sum_b m[b] * s[b] over n values, in a fixed order. */
static inline float dot_offsets(const float *m, const float *s, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= n; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(m + b), _mm256_loadu_ps(s + b), acc);
    float t = hsum(acc);
    for (; b < n; b++) t += m[b] * s[b];
    return t;
}

/* The sum of the 32 values at x, in a fixed order. */
static inline float block_sum(const float *x) {
    return hsum(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)),
                              _mm256_add_ps(_mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24))));
}

/* y[r * ldy] for `rows` input rows and one weight row (q, d, m).  m == NULL: no offset term.
 * `per` scales per 32-block: 1, or 2 for 16-value groups (d[per * b] for the first half of block b,
 * d[per * b + per - 1] for the second).  From 4 rows on, each block's values are scaled once and
 * shared by all rows (the same single rounding of d * q as the reference); fewer rows scale their
 * dot products instead.  xsum [rows, K / 32] holds the sums of the blocks of x, which the offsets m
 * multiply. */
static inline __attribute__((always_inline)) void exact_row(
        int rows, int is_q8, int per, const float *x, const float *xsum, const void *q, const float *d,
        const float *m, float *y, int64_t ldy, int64_t K) {
    const int64_t nb = K / BLOCK;
    const int shared_scale = rows >= 4;
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256 w[4];
        if (is_q8) unpack_q8((const int8_t *)q + BLOCK * b, w);
        else unpack_q4((const uint8_t *)q + BLOCK / 2 * b, w);
        const __m256 d_lo = _mm256_set1_ps(d[per * b]), d_hi = _mm256_set1_ps(d[per * b + per - 1]);
        if (shared_scale)
            for (int i = 0; i < 4; i++) w[i] = _mm256_mul_ps(i < 2 ? d_lo : d_hi, w[i]);
        for (int r = 0; r < rows; r++) {
            const float *xb = x + r * K + BLOCK * b;
            if (shared_scale) {
                for (int i = 0; i < 4; i++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * i), w[i], acc[r]);
            } else if (per == 1) {
                acc[r] = _mm256_fmadd_ps(d_lo, dot_block(xb, w), acc[r]);
            } else {
                acc[r] = _mm256_fmadd_ps(d_lo, dot_half(xb, w[0], w[1]), acc[r]);
                acc[r] = _mm256_fmadd_ps(d_hi, dot_half(xb + 16, w[2], w[3]), acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) y[r * ldy] = hsum(acc[r]) + (m ? dot_offsets(m, xsum + r * nb, nb) : 0.0f);
}

/* ------------------------------------------------------------------- int8-activation products */

/* Input rows rounded to int8 per 32-block. */
typedef struct {
    int8_t *q;        /* [M, K] */
    float *dx;        /* [M, K / 32]: q * dx approximates x */
    float *sum;       /* [M, K / 32]: exact float sums of the blocks of x (the offsets multiply them) */
    float *dx16;      /* AVX-512: [M, K / 4], each dx 8 times (one per 32-bit lane of its block) */
    int32_t *negsum;  /* AVX-512: [M, K / 4], -128 * each sum of 4 consecutive q (q8 weights are offset by 128) */
    int8_t *q4x;      /* AVX-512, q4_1 weights: [M, K], per 4 blocks their first 16 values, then their last 16 */
    float *dx4;       /* AVX-512, q4_1 weights: [M, K / 8], each dx 4 times */
} acts;

/* Fills a->q, dx, sum, and dx16 / negsum / q4x and dx4 where those are not NULL. */
static void quantize_rows(const float *x, int64_t M, int64_t K, acts *a) {
    const int64_t nb = K / BLOCK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < M * nb; i++) {
        const float *xb = x + i * BLOCK;
        __m256 v[4];
        for (int k = 0; k < 4; k++) v[k] = _mm256_loadu_ps(xb + 8 * k);
        __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float dx = _mm_cvtss_f32(h) / 127.0f;
        const __m256 inv = _mm256_set1_ps(dx != 0.0f ? 1.0f / dx : 0.0f);
        __m256i n[4];
        for (int k = 0; k < 4; k++) n[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv)); /* round to nearest */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(a->q + i * BLOCK), p);
        a->dx[i] = dx;
        a->sum[i] = block_sum(xb);
        if (a->dx16) _mm256_storeu_ps(a->dx16 + 8 * i, _mm256_set1_ps(dx));
        if (a->negsum) {
            const __m256i s4 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8((char)0x80), p),
                                                 _mm256_set1_epi16(1));
            _mm256_storeu_si256((__m256i *)(a->negsum + 8 * i), _mm256_sub_epi32(_mm256_setzero_si256(), s4));
        }
        const int64_t b = i % nb;
        if (a->q4x && b < nb / 4 * 4) {  /* the blocks of whole groups of 4 */
            int8_t *group = a->q4x + (i - b % 4) * BLOCK;
            _mm_storeu_si128((__m128i *)(group + 16 * (b % 4)), _mm256_castsi256_si128(p));
            _mm_storeu_si128((__m128i *)(group + 64 + 16 * (b % 4)), _mm256_extracti128_si256(p, 1));
            _mm_storeu_ps(a->dx4 + 4 * i, _mm_set1_ps(dx));
        }
    }
}

/* One weight row against `rows` quantised input rows (AVX2): y[r * ldy], r < rows. */
static inline __attribute__((always_inline)) void int8_row_avx2(
        int rows, int is_q8, int per, const acts *a, const void *q, const float *d, const float *m,
        float *y, int64_t ldy, int64_t K) {
    const int64_t nb = K / BLOCK;
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i w;
        if (is_q8) {
            w = _mm256_loadu_si256((const __m256i *)((const int8_t *)q + BLOCK * b));
        } else {
            const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint8_t *)q + BLOCK / 2 * b));
            w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
        }
        /* maddubs multiplies unsigned by signed bytes: q8 weights lend their sign to x */
        const __m256i wu = is_q8 ? _mm256_sign_epi8(w, w) : w;
        const __m256 s = per == 1 ? _mm256_set1_ps(d[b])
                                  : _mm256_set_m128(_mm_set1_ps(d[2 * b + 1]), _mm_set1_ps(d[2 * b]));
        for (int r = 0; r < rows; r++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(a->q + r * K + BLOCK * b));
            if (is_q8) xv = _mm256_sign_epi8(xv, w);
            const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xv), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, _mm256_set1_ps(a->dx[r * nb + b])),
                                     acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) y[r * ldy] = hsum(acc[r]) + (m ? dot_offsets(m, a->sum + r * nb, nb) : 0.0f);
}

#if HAVE_VNNI
/* The same with AVX512-VNNI: q4_1 four blocks per 512-bit step (against q4x), q8 two blocks (their
 * values offset by 128 to be unsigned; negsum takes it back out), and the last q4_1 blocks two at a
 * time with their nibbles spread into the elements' order. */
static inline __attribute__((always_inline)) VNNI void int8_row_vnni(
        int rows, int is_q8, int per, const acts *a, const void *q, const float *d, const float *m,
        float *y, int64_t ldy, int64_t K) {
    const int64_t nb = K / BLOCK;
    const __m512i low = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    const __m512i spread = _mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3);  /* block b's 16 bytes twice, then b+1's */
    const __m512i shifts = _mm512_setr_epi64(0, 0, 0x0004000400040004LL, 0x0004000400040004LL, 0, 0,
                                             0x0004000400040004LL, 0x0004000400040004LL);
    const __m512i lanes = per == 1 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                   : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[MAX_ROWS];
    __m256 tail[MAX_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps(), tail[r] = _mm256_setzero_ps();
    int64_t b = 0;
    if (!is_q8) {  /* four blocks per step: low nibbles against x's first halves, high against the second */
        const __m512i by4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        for (; b + 4 <= nb; b += 4) {
            const __m512i raw = _mm512_loadu_si512((const uint8_t *)q + BLOCK / 2 * b);
            const __m512i lo = _mm512_and_si512(raw, low), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            const __m512 s = _mm512_permutexvar_ps(by4, _mm512_castps128_ps512(_mm_loadu_ps(d + b)));
            for (int r = 0; r < rows; r++) {
                const int8_t *xr = a->q4x + r * K + BLOCK * b;
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo,
                                                                            _mm512_loadu_si512(xr)),
                                                        hi, _mm512_loadu_si512(xr + 64));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                         _mm512_mul_ps(s, _mm512_loadu_ps(a->dx4 + r * (K / 8) + 4 * b)), acc[r]);
            }
        }
    }
    for (; b + 2 <= nb; b += 2) {
        __m512i w;
        if (is_q8) {
            w = _mm512_xor_si512(_mm512_loadu_si512((const int8_t *)q + BLOCK * b), flip);
        } else {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint8_t *)q + BLOCK / 2 * b));
            w = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi64(spread, _mm512_castsi256_si512(raw)),
                                                   shifts), low);
        }
        const __m512 s = _mm512_permutexvar_ps(lanes, per == 1
            ? _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(d + b))))
            : _mm512_castps128_ps512(_mm_loadu_ps(d + 2 * b)));
        for (int r = 0; r < rows; r++) {
            const __m512i init = is_q8 ? _mm512_loadu_si512(a->negsum + r * (K / 4) + 8 * b) : _mm512_setzero_si512();
            const __m512i dot = _mm512_dpbusd_epi32(init, w, _mm512_loadu_si512(a->q + r * K + BLOCK * b));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                     _mm512_mul_ps(s, _mm512_loadu_ps(a->dx16 + r * (K / 4) + 8 * b)), acc[r]);
        }
    }
    if (b < nb) {  /* an odd last block, 256 bits wide */
        __m256i w;
        if (is_q8) {
            w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)((const int8_t *)q + BLOCK * b)),
                                 _mm512_castsi512_si256(flip));
        } else {
            const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint8_t *)q + BLOCK / 2 * b));
            w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm512_castsi512_si256(low));
        }
        const __m256 s = per == 1 ? _mm256_set1_ps(d[b])
                                  : _mm256_set_m128(_mm_set1_ps(d[2 * b + 1]), _mm_set1_ps(d[2 * b]));
        for (int r = 0; r < rows; r++) {
            const __m256i init = is_q8 ? _mm256_loadu_si256((const __m256i *)(a->negsum + r * (K / 4) + 8 * b))
                                       : _mm256_setzero_si256();
            const __m256i dot = _mm256_dpbusd_epi32(init, w, _mm256_loadu_si256((const __m256i *)(a->q + r * K + BLOCK * b)));
            tail[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, _mm256_set1_ps(a->dx[r * nb + b])), tail[r]);
        }
    }
    for (int r = 0; r < rows; r++)
        y[r * ldy] = _mm512_reduce_add_ps(acc[r]) + hsum(tail[r]) + (m ? dot_offsets(m, a->sum + r * nb, nb) : 0.0f);
}

/* exact_row with 512-bit vectors: a block's 32 values in two vectors (elements 0-15, 16-31). */
static inline __attribute__((always_inline)) VNNI void exact_row_512(
        int rows, int is_q8, int per, const float *x, const float *xsum, const void *q, const float *d,
        const float *m, float *y, int64_t ldy, int64_t K) {
    const int64_t nb = K / BLOCK;
    const int shared_scale = rows >= 4;
    const __m128i low = _mm_set1_epi8(0x0F);
    __m512 acc[MAX_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 w0, w1;
        if (is_q8) {
            const int8_t *qb = (const int8_t *)q + BLOCK * b;
            w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qb)));
            w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qb + 16))));
        } else {
            const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint8_t *)q + BLOCK / 2 * b));
            w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, low)));
            w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low)));
        }
        const __m512 d0 = _mm512_set1_ps(d[per * b]), d1 = _mm512_set1_ps(d[per * b + per - 1]);
        if (shared_scale) w0 = _mm512_mul_ps(d0, w0), w1 = _mm512_mul_ps(d1, w1);
        for (int r = 0; r < rows; r++) {
            const float *xb = x + r * K + BLOCK * b;
            const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
            if (shared_scale) {
                acc[r] = _mm512_fmadd_ps(x1, w1, _mm512_fmadd_ps(x0, w0, acc[r]));
            } else if (per == 1) {
                acc[r] = _mm512_fmadd_ps(d0, _mm512_fmadd_ps(x1, w1, _mm512_mul_ps(x0, w0)), acc[r]);
            } else {
                acc[r] = _mm512_fmadd_ps(d0, _mm512_mul_ps(x0, w0), acc[r]);
                acc[r] = _mm512_fmadd_ps(d1, _mm512_mul_ps(x1, w1), acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        y[r * ldy] = _mm512_reduce_add_ps(acc[r]) + (m ? dot_offsets(m, xsum + r * nb, nb) : 0.0f);
}
#endif

/* ------------------------------------------------------------------------------------ products */

typedef struct {
    const ibl_weight *w;
    int64_t nw, M, K;
    float *y[MAX_WEIGHTS];
    int64_t first[MAX_WEIGHTS + 1]; /* first chunk of each weight; first[nw]: all chunks */
    int64_t rows[MAX_WEIGHTS];      /* weight rows per chunk */
    int int8, isa, gated;
    const float *x, *xsum;          /* exact path: x [M, K], its block sums [M, K / 32] (offsets) */
    acts a;                         /* int8 path */
} product;

#define EXACT_CASE(R) case R: exact_row(R, is_q8, per, x, xs, qn, dn, mn, y, ldy, K); break;
#define AVX2_CASE(R) case R: int8_row_avx2(R, is_q8, per, &ar, qn, dn, mn, y, ldy, K); break;
#define VNNI_CASE(R) case R: int8_row_vnni(R, is_q8, per, &ar, qn, dn, mn, y, ldy, K); break;
#define EXACT512_CASE(R) case R: exact_row_512(R, is_q8, per, x, xs, qn, dn, mn, y, ldy, K); break;

static int64_t row_bytes_of(const ibl_weight *w, int64_t K) {
    return (w->fmt == FMT_Q8 ? K : K / 2) + 4 * (K / w->group) + (w->m ? 4 * (K / BLOCK) : 0);
}

/* Ask for weight row n's values and scales ahead of use: the three arrays are separate streams, and
 * the compute between loads leaves the hardware prefetchers behind (measured: the products of a
 * decode step 20% faster). */
static inline __attribute__((always_inline)) void prefetch_row(const ibl_weight *w, int64_t n, int64_t K) {
    const int64_t values = w->fmt == FMT_Q8 ? K : K / 2, scales = 4 * (K / w->group), offsets = 4 * (K / BLOCK);
    const char *q = (const char *)w->q + n * values, *d = (const char *)w->d + n * scales;
    for (int64_t o = 0; o < values; o += 64) _mm_prefetch(q + o, _MM_HINT_T0);
    for (int64_t o = 0; o < scales; o += 64) _mm_prefetch(d + o, _MM_HINT_T0);
    if (w->m)
        for (int64_t o = 0; o < offsets; o += 64) _mm_prefetch((const char *)w->m + n * offsets + o, _MM_HINT_T0);
}

/* The loop over weight rows n0..n1, and over groups of up to MAX_ROWS input rows, of each product:
 * __VA_ARGS__ declares what a group needs, CASE(R) multiplies R input rows by weight row n into
 * y[r * ldy] (R a constant per case, so that the accumulators stay in registers). */
#define WEIGHT_ROWS(NAME, ATTR, CASE, ...)                                                                   \
    static ATTR void NAME(const product *p, const ibl_weight *w, float *out, int64_t ldy, int64_t col0,      \
                          int64_t n0, int64_t n1) {                                                          \
        const int64_t K = p->K, nb = K / BLOCK, per = BLOCK / w->group, is_q8 = w->fmt == FMT_Q8;            \
        const int64_t row_bytes = is_q8 ? K : K / 2, ahead = (PREFETCH_BYTES - 1) / row_bytes_of(w, K) + 1;  \
        for (int64_t n = n0; n < n1; n++) {                                                                  \
            if (n + ahead < n1) prefetch_row(w, n + ahead, K);                                               \
            const void *qn = (const uint8_t *)w->q + n * row_bytes;                                          \
            const float *dn = w->d + n * nb * per, *mn = w->m ? w->m + n * nb : NULL;                        \
            for (int64_t r0 = 0; r0 < p->M; r0 += MAX_ROWS) {                                                \
                __VA_ARGS__;                                                                                 \
                float *y = out + r0 * ldy + n - col0;                                                        \
                switch (p->M - r0 < MAX_ROWS ? p->M - r0 : MAX_ROWS) {                                       \
                    CASE(8) CASE(7) CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) CASE(1)                          \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

WEIGHT_ROWS(exact_rows, , EXACT_CASE, const float *x = p->x + r0 * K; const float *xs = p->xsum ? p->xsum + r0 * nb : NULL)
WEIGHT_ROWS(int8_rows_avx2, , AVX2_CASE,
            const acts ar = {.q = p->a.q + r0 * K, .dx = p->a.dx + r0 * nb, .sum = p->a.sum + r0 * nb})
#if HAVE_VNNI
WEIGHT_ROWS(exact_rows_512, VNNI, EXACT512_CASE,
            const float *x = p->x + r0 * K; const float *xs = p->xsum ? p->xsum + r0 * nb : NULL)
WEIGHT_ROWS(int8_rows_vnni, VNNI, VNNI_CASE,
            const acts ar = {p->a.q + r0 * K, p->a.dx + r0 * nb, p->a.sum + r0 * nb, p->a.dx16 + r0 * (K / 4),
                             p->a.negsum ? p->a.negsum + r0 * (K / 4) : NULL, p->a.q4x ? p->a.q4x + r0 * K : NULL,
                             p->a.dx4 ? p->a.dx4 + r0 * (K / 8) : NULL})
#endif

static void weight_rows(const product *p, const ibl_weight *w, float *out, int64_t ldy, int64_t col0, int64_t n0,
                        int64_t n1) {
#if HAVE_VNNI
    if (p->isa == ISA_AVX512_VNNI) {
        if (p->int8) int8_rows_vnni(p, w, out, ldy, col0, n0, n1);
        else exact_rows_512(p, w, out, ldy, col0, n0, n1);
        return;
    }
#endif
    if (p->int8) int8_rows_avx2(p, w, out, ldy, col0, n0, n1);
    else exact_rows(p, w, out, ldy, col0, n0, n1);
}

/* exp(x) (Cephes' polynomial, relative error ~2e-7): 0 below -87.3, inf from 88.7 on. */
static inline __m256 exp_ps(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.3f);
    const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lowest), _mm256_set1_ps(88.7f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* silu(a) * b = a / (1 + exp(-a)) * b, rounded as torch's F.silu(a) * b. */
static void silu_times(float *a, const float *b, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(a + i);
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), v));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                               _mm256_loadu_ps(b + i)));
    }
    for (; i < n; i++) a[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
}

static void product_chunk(const void *ctx, int64_t c) {
    const product *p = ctx;
    int64_t i = 0;
    while (c >= p->first[i + 1]) i++;
    const ibl_weight *w = &p->w[i];
    const int64_t n0 = (c - p->first[i]) * p->rows[i], n1 = n0 + p->rows[i] < w->n ? n0 + p->rows[i] : w->n;
    if (!p->gated) {
        weight_rows(p, w, p->y[i], w->n, 0, n0, n1);
        return;
    }
    /* y0 = silu(x W0^T) * (x W1^T), these rows of both weights (the caller keeps M * rows <= GATE_TILE). */
    float up[GATE_TILE], gate[GATE_TILE];
    const int64_t rows = n1 - n0;
    weight_rows(p, &p->w[0], gate, rows, n0, n0, n1);
    weight_rows(p, &p->w[1], up, rows, n0, n0, n1);
    silu_times(gate, up, p->M * rows);
    for (int64_t r = 0; r < p->M; r++) memcpy(p->y[0] + r * w->n + n0, gate + r * rows, sizeof(float) * rows);
}

/* Weight rows per chunk: about CHUNK_BYTES of weights per input row, and at least 4 chunks per thread
 * when the weight has that many rows.  The chunks only decide which thread computes a row. */
static int64_t chunk_rows(const ibl_weight *w, int64_t M, int64_t K, int64_t threads) {
    int64_t rows = CHUNK_BYTES / (row_bytes_of(w, K) * (M < MAX_ROWS ? M : MAX_ROWS));
    const int64_t spread = (w->n + 4 * threads - 1) / (4 * threads);
    if (rows > spread) rows = spread;
    return rows < 1 ? 1 : rows;
}

/* x [M, K] * rsqrt(mean(x^2) + eps) * norm, row by row, rounded as torch's RMSNorm: the normalised
 * row is rounded before the weight multiplies it. */
static void rms_normalize(const float *x, int64_t M, int64_t K, const float *norm, float eps, float *out) {
    for (int64_t r = 0; r < M; r++) {
        const float *xr = x + r * K;
        __m256 sq = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8) sq = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), _mm256_loadu_ps(xr + k), sq);
        const __m256 scale = _mm256_set1_ps(1.0f / sqrtf(hsum(sq) / (float)K + eps));
        for (int64_t k = 0; k < K; k += 8)
            _mm256_storeu_ps(out + r * K + k,
                             _mm256_mul_ps(_mm256_loadu_ps(norm + k), _mm256_mul_ps(_mm256_loadu_ps(xr + k), scale)));
    }
}

/* y_i [M, N_i] = x [M, K] @ W_i^T for the nw (1..3) weights w[i] (all with K inputs), on `threads`
 * threads.  norm (may be NULL): RMS-normalise the rows of x first, with this weight [K] and eps.
 * gated (nw == 2, equal N): y0 = silu(x W0^T) * (x W1^T) instead (a SwiGLU's gate and up), y1 unused.
 * int8: round x to int8 per 32-block first (see the top of this file).  Returns 0 on bad arguments or
 * when out of memory (nothing is written). */
int64_t ibl_matmul(const float *x, int64_t M, int64_t K, const float *norm, float eps, const ibl_weight *w,
                   int64_t nw, float *y0, float *y1, float *y2, int64_t gated, int64_t threads, int64_t int8) {
    if (nw < 1 || nw > MAX_WEIGHTS || M < 0 || K % BLOCK) return 0;
    if (gated && (nw != 2 || w[0].n != w[1].n || M > GATE_TILE)) return 0;
    if (M == 0) return 1;
    const int64_t nb = K / BLOCK;
    product p = {.w = w, .nw = gated ? 1 : nw, .M = M, .K = K, .y = {y0, y1, y2}, .int8 = int8 != 0,
                 .isa = (int)ibl_isa(), .gated = gated != 0, .x = x};
    int any_offsets = 0, any_q8 = 0, any_q4 = 0;
    for (int64_t i = 0; i < nw; i++) {
        any_offsets |= w[i].m != NULL;
        any_q8 |= w[i].fmt == FMT_Q8;
        any_q4 |= w[i].fmt == FMT_Q4_1;
    }
    for (int64_t i = 0; i < p.nw; i++) {
        p.rows[i] = chunk_rows(&w[i], M, K, threads);
        if (gated && p.rows[i] > GATE_TILE / M) p.rows[i] = GATE_TILE / M;
        p.first[i + 1] = p.first[i] + (w[i].n + p.rows[i] - 1) / p.rows[i];
    }
    float *normed = NULL;
    if (norm) {
        normed = malloc(sizeof(float) * M * K);
        if (!normed) return 0;
        rms_normalize(x, M, K, norm, eps, normed);
        p.x = x = normed;
    }
    void *buffer = NULL;
    if (p.int8) {
        /* q [M, K] int8, then float32: dx and sum [M, nb], dx16 [M, K/4], negsum [M, K/4], q4x [M, K] int8,
         * dx4 [M, K/8] (the last four for AVX-512 only) */
        const int wide = p.isa == ISA_AVX512_VNNI;
        buffer = malloc(M * K + 8 * M * nb + (wide ? 2 * M * K + M * K + M * K / 2 : 0));
        if (!buffer) {
            free(normed);
            return 0;
        }
        p.a.q = buffer;
        p.a.dx = (float *)((char *)buffer + M * K);
        p.a.sum = p.a.dx + M * nb;
        if (wide) {
            p.a.dx16 = p.a.sum + M * nb;
            if (any_q8) p.a.negsum = (int32_t *)(p.a.dx16 + M * K / 4);
            if (any_q4) {
                p.a.q4x = (int8_t *)(p.a.dx16 + M * K / 2);
                p.a.dx4 = (float *)(p.a.q4x + M * K);
            }
        }
        quantize_rows(x, M, K, &p.a);
    } else if (any_offsets) {
        float *xsum = buffer = malloc(sizeof(float) * M * nb);
        if (!buffer) {
            free(normed);
            return 0;
        }
        for (int64_t i = 0; i < M * nb; i++) xsum[i] = block_sum(x + i * BLOCK);
        p.xsum = xsum;
    }
    parallel(product_chunk, &p, p.first[p.nw], threads);
    free(buffer);
    free(normed);
    return 1;
}

/* ---------------------------------------------------------------------------------- dequantising */

typedef struct {
    const ibl_weight *w;
    int64_t K, n0, n1, rows;
    float *out;
} dequant;

static void dequant_chunk(const void *ctx, int64_t c) {
    const dequant *p = ctx;
    const ibl_weight *w = p->w;
    const int64_t K = p->K, nb = K / BLOCK, is_q8 = w->fmt == FMT_Q8, per = BLOCK / w->group;
    const int64_t row_bytes = is_q8 ? K : K / 2;
    for (int64_t k = 0; k < p->rows; k++) {
        const int64_t n = p->n0 + c * p->rows + k;
        if (n >= p->n1) break;
        float *row = p->out + (n - p->n0) * K;
        for (int64_t b = 0; b < nb; b++) {
            __m256 v[4];
            if (is_q8) unpack_q8((const int8_t *)w->q + n * row_bytes + BLOCK * b, v);
            else unpack_q4((const uint8_t *)w->q + n * row_bytes + BLOCK / 2 * b, v);
            const float *db = w->d + (n * nb + b) * per;
            const __m256 mb = _mm256_set1_ps(w->m ? w->m[n * nb + b] : 0.f);
            for (int i = 0; i < 4; i++) {
                __m256 o = _mm256_mul_ps(_mm256_set1_ps(db[i < 2 ? 0 : per - 1]), v[i]);
                if (w->m) o = _mm256_add_ps(o, mb);
                _mm256_storeu_ps(row + BLOCK * b + 8 * i, o);
            }
        }
    }
}

/* out [n1 - n0, K] = rows n0..n1 of the float32 weight, on `threads` threads. */
void ibl_dequantize(const ibl_weight *w, int64_t K, int64_t n0, int64_t n1, float *out, int64_t threads) {
    if (n1 > w->n) n1 = w->n;
    if (n0 >= n1) return;
    dequant p = {w, K, n0, n1, chunk_rows(w, 1, K, threads), out};
    parallel(dequant_chunk, &p, (n1 - n0 + p.rows - 1) / p.rows, threads);
}

/* --------------------------------------------------------------------------------- attention */

#define MAX_HEAD_DIM 256
#define SLOTS 64 /* cache slots scored at a time */

typedef struct {
    const float *q;          /* rotated queries [B, S, H, D] */
    const float *kc, *vc;    /* the cache rows in use, [B, Hkv, T, D] */
    const int64_t *pos;      /* [B, S] */
    float *y;                /* [B, S, H, D] */
    int64_t S, H, Hkv, D, T, kv_len;
    float scale;
} attention;

/* One query head of one position: softmax(q . K^T * scale) V over the visible slots, those at cache
 * positions <= the query's and below kv_len, a block of SLOTS at a time with a running maximum. */
static void attention_chunk(const void *ctx, int64_t c) {
    const attention *a = ctx;
    const int64_t D = a->D, bs = c / a->H, h = c % a->H, b = bs / a->S;
    const int64_t g = h / (a->H / a->Hkv), nv = D / 8;
    const int64_t n = a->pos[bs] + 1 < a->kv_len ? a->pos[bs] + 1 : a->kv_len;
    const float *K = a->kc + (b * a->Hkv + g) * a->T * D, *V = a->vc + (b * a->Hkv + g) * a->T * D;
    __m256 q[MAX_HEAD_DIM / 8], acc[MAX_HEAD_DIM / 8];
    for (int64_t i = 0; i < nv; i++) q[i] = _mm256_loadu_ps(a->q + c * D + 8 * i), acc[i] = _mm256_setzero_ps();
    float m = -INFINITY, l = 0.0f;
    float score[SLOTS] __attribute__((aligned(32)));
    for (int64_t t0 = 0; t0 < n; t0 += SLOTS) {
        const int64_t count = n - t0 < SLOTS ? n - t0 : SLOTS;
        float top = -INFINITY;
        for (int64_t t = 0; t < count; t++) {
            const float *k = K + (t0 + t) * D;
            __m256 dot = _mm256_mul_ps(q[0], _mm256_loadu_ps(k));
            for (int64_t i = 1; i < nv; i++) dot = _mm256_fmadd_ps(q[i], _mm256_loadu_ps(k + 8 * i), dot);
            score[t] = hsum(dot) * a->scale;
            top = score[t] > top ? score[t] : top;
        }
        if (top > m) {  /* rescale what was summed so far to the new maximum */
            const float f = expf(m - top);
            l *= f;
            for (int64_t i = 0; i < nv; i++) acc[i] = _mm256_mul_ps(acc[i], _mm256_set1_ps(f));
            m = top;
        }
        for (int64_t t = count; t < (count + 7) / 8 * 8; t++) score[t] = -INFINITY;
        for (int64_t t = 0; t < count; t += 8)
            _mm256_store_ps(score + t, exp_ps(_mm256_sub_ps(_mm256_load_ps(score + t), _mm256_set1_ps(m))));
        for (int64_t t = 0; t < count; t++) {
            const float *v = V + (t0 + t) * D;
            const __m256 p = _mm256_set1_ps(score[t]);
            l += score[t];
            for (int64_t i = 0; i < nv; i++) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * i), acc[i]);
        }
    }
    const __m256 inv = _mm256_set1_ps(1.0f / l);
    for (int64_t i = 0; i < nv; i++) _mm256_storeu_ps(a->y + c * D + 8 * i, _mm256_mul_ps(acc[i], inv));
}

/* Rotate x [D] by the rotary pairs (cos, sin) rope [D / 2, 2] into out: adjacent channels (2j, 2j + 1)
 * are the complex number x[2j] + i x[2j + 1], multiplied by cos + i sin. */
static inline void rotate(const float *x, const float *rope, float *out, int64_t D) {
    for (int64_t j = 0; j < D; j += 2) {
        const float c = rope[j], s = rope[j + 1];
        out[j] = x[j] * c - x[j + 1] * s;
        out[j + 1] = x[j] * s + x[j + 1] * c;
    }
}

/* Cached attention for a few new positions per row, as a decode step needs it:
 *   - q [B, S, H, D] and k [B, S, Hkv, D] rotated by rope ([rope_rows = 1 or B, S, D / 2] (cos, sin) pairs),
 *   - the rotated k and v [B, S, Hkv, D] stored in the caches kc, vc [B, Hkv, T, D] at slots pos [B, S],
 *   - y [B, S, H, D] = softmax(q k^T / sqrt(D)) v over each query's slots <= its position and < kv_len,
 *     query head h reading cache head h / (H / Hkv), on `threads` threads.
 * Returns 0 (nothing written) when a position is outside [0, T) or D is not a multiple of 8 up to
 * MAX_HEAD_DIM, or when out of memory. */
int64_t ibl_attention(const float *q, const float *k, const float *v, const float *rope, int64_t rope_rows,
                      float *kc, float *vc, const int64_t *pos, int64_t B, int64_t S, int64_t H, int64_t Hkv,
                      int64_t D, int64_t T, int64_t kv_len, float *y, int64_t threads) {
    if (D % 8 || D > MAX_HEAD_DIM || Hkv < 1 || H % Hkv) return 0;
    for (int64_t i = 0; i < B * S; i++)
        if (pos[i] < 0 || pos[i] >= T) return 0;
    float *qr = malloc(sizeof(float) * (B * S * H * D > 0 ? B * S * H * D : 1));
    if (!qr) return 0;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t s = 0; s < S; s++) {
            const int64_t bs = b * S + s, p = pos[bs];
            const float *r = rope + ((rope_rows > 1 ? b : 0) * S + s) * D;
            for (int64_t h = 0; h < H; h++) rotate(q + (bs * H + h) * D, r, qr + (bs * H + h) * D, D);
            for (int64_t g = 0; g < Hkv; g++) {
                const int64_t slot = ((b * Hkv + g) * T + p) * D;
                rotate(k + (bs * Hkv + g) * D, r, kc + slot, D);
                memcpy(vc + slot, v + (bs * Hkv + g) * D, sizeof(float) * D);
            }
        }
    }
    attention a = {qr, kc, vc, pos, y, S, H, Hkv, D, T, kv_len, 1.0f / sqrtf((float)D)};
    parallel(attention_chunk, &a, B * S * H, threads);
    free(qr);
    return 1;
}

/* Pool workers started so far in this process (a forked child starts with none). */
int64_t ibl_pool_workers(void) { return pool.workers; }
