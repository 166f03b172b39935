/* gemma4-mlx: the float32 products a decode step makes, faster than OpenBLAS's GEMM
 * makes them (gemma4_mlx/_blas_shim.py; docs/text-decoder.md §6.4).
 *
 * MLX's CPU backend computes every float32 product with cblas_sgemm.  OpenBLAS's
 * GEMM is built for big products: it streams a weight matrix at 7-16 GB/s when the
 * other operand has 1-8 rows (one decode step of 1-8 sequences, a verify block),
 * where the machine streams 28-31 GB/s.  This library defines cblas_sgemm ahead of
 * OpenBLAS in the process's global symbol scope:
 *   - 1-8 rows times a transposed weight (x @ W^T: what MLX programs write), or a
 *     weight times one column (W @ x), the weight at least ROWS_MIN_FLOATS: `rows_R`
 *     below, which reads each weight row once for all R rows;
 *   - 9-32 rows times a transposed weight (a batch of verify blocks, a short prompt),
 *     while the rows hold at most MANY_X_FLOATS: `rows_many`, the rows in blocks of up
 *     to 8 over a weight block kept in L2;
 *   - 1-8 rows times a weight as stored (x @ W, W [K, N]: attention's probabilities
 *     times V), at least COLUMNS_MIN_FLOATS: `columns_R`, which reads W's rows once;
 *   - both on as many threads as OpenBLAS uses (a pool of ours, kept between calls:
 *     see "the pool");
 *   - everything else: OpenBLAS's cblas_sgemm, unchanged.
 * (OpenBLAS's own sgemv streamed 28-31 GB/s too, but its thread pool hung the
 * process after pexpect's forks in the test suite: 0.3.21, a call spinning for
 * workers that were gone; so no OpenBLAS routine but sgemm is called.)
 * sgemm_shim_bind() must succeed before the library is made global.
 */
#include <dlfcn.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* The kernels need AVX2 and FMA (SSE alone ran 6 GB/s at 8 rows); a build without them
 * only forwards, and _blas_shim.py does not load it (sgemm_shim_kernels). */
#if defined(__AVX2__) && defined(__FMA__)
#define ROWS_KERNELS 1
#else
#define ROWS_KERNELS 0
#endif
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, CONJ_TRANS = 113 };
enum { ROWS_MAX = 8, MAX_THREADS = 64 };
/* Weights of fewer floats (256 KB) go to OpenBLAS.  Above, two threads of ours beat it
 * at every row count measured, 1.2-3.3x ([512, 256] to [4096, 1024], 1-8 rows, cold
 * weights, Zen 4); alone our kernel lost to it on short rows at 8 rows. */
#define ROWS_MIN_FLOATS (1 << 16)
/* x @ W as stored: at [513, 128] (2^16 floats) two threads of ours lost to OpenBLAS
 * (0.83-1.0x), from [512, 256] they win 1.2-2x at 1-8 rows. */
#define COLUMNS_MIN_FLOATS (1 << 17)
#define PER_THREAD_FLOATS (1 << 15) /* a share of under 128 KB is not worth a worker's wake-up */
#ifndef SPIN_NS /* the tests build one with 0: every wait then sleeps */
/* How long an idle worker (or the caller) spins before sleeping.  A decode step's
 * products come 0.1-1 ms apart (MLX's other ops between them); a worker asleep by then
 * costs a futex wake per product.  In one-row generation 3 ms against 100 us measured
 * moe-small's decode 1.25-1.35x faster, e2b-small's 1.0-1.1x (docs/text-decoder.md §6.4). */
#define SPIN_NS 3000000LL
#endif
/* From this many multiply-adds OpenBLAS's GEMM runs on its own threads across the
 * cores (its threshold: 65536 x GEMM_MULTITHREAD_THRESHOLD 4): our idle workers stop
 * spinning then (`park`), or they would take a core from it for up to SPIN_NS
 * (moe-small's prefill, per-expert GEMMs, lost 8-21 % with 3 ms and no park). */
#define PARK_MIN_FMAS (1 << 18)

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn real_sgemm;
static unsigned park; /* bumped before each big product OpenBLAS takes: spinning waiters go to sleep */
static unsigned long sleeps; /* waits that ended their spin and slept (for the tests) */
static long long spin_ns = SPIN_NS; /* shorter where processes share the cores (`_blas.short_spin`) */

void sgemm_shim_set_spin_ns(long long ns) { __atomic_store_n(&spin_ns, ns < 0 ? 0 : ns, __ATOMIC_RELAXED); }
long long sgemm_shim_spin_ns(void) { return __atomic_load_n(&spin_ns, __ATOMIC_RELAXED); }
static void forget_pool(void);
static int threads = 1;
static unsigned long routed; /* products our kernels took */

/* For the tests; a function, as a global variable would be interposed by another build
 * of this library loaded ahead of it (the tests load two). */
unsigned long sgemm_shim_routed(void) { return __atomic_load_n(&routed, __ATOMIC_RELAXED); }

/* Whether this build has the kernels (AVX2 and FMA): without, it would only forward. */
int sgemm_shim_kernels(void) { return ROWS_KERNELS; }

int sgemm_shim_bind(void *blas) {
    int (*count)(void) = (int (*)(void))dlsym(blas, "openblas_get_num_threads");
    real_sgemm = (sgemm_fn)dlsym(blas, "cblas_sgemm");
    threads = count ? count() : 1;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    static int registered;
    if (!registered) registered = pthread_atfork(NULL, NULL, forget_pool) == 0;
    return real_sgemm == NULL ? 0 : registered ? 1 : -1; /* -1: no fork handler, so no pool is safe */
}

/* ---- 1-8 rows: C[m, j] = alpha * sum_k X[m, k] W[j, k] + beta * C[m, j] ---------- */

/* Vector width, registers, and how many of them hold partial sums: AVX-512 has 32
 * registers of 16 floats, AVX2 16 of 8.  With the rows' x vectors kept in registers
 * too (rows_R), 16 accumulators measured 1.1-2.4x faster than 24 at 2-8 rows on a
 * weight in L2 (Zen 4): at 24, x could not stay in registers at 8 rows.  GCC's vector
 * types: plain C, unaligned loads through memcpy. */
#ifdef __AVX512F__
#define LANES 16
#define REGISTERS 32
#define ACCUMULATORS 16
#else
#define LANES 8
#define REGISTERS 16
#define ACCUMULATORS 8
#endif
/* The kernels' vector width in floats, for the tests (which build an AVX2 variant too). */
int sgemm_shim_lanes(void) { return LANES; }

/* Natural alignment: declared under-aligned, GCC kept AVX2 accumulators in memory (1 GB/s). */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load_vec(const float *p) {
    vec v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

typedef struct rows_job rows_job;
typedef void (*kernel_fn)(const rows_job *);
struct rows_job {
    kernel_fn kernel; /* rows_R (W transposed) or columns_R (W as stored) */
    int R, j0, j1, K, ldx, ldw, ldc, cs; /* outputs j0..j1; cs: C's stride from one j to the next */
    const float *X, *W;
    float *C;
    float alpha, beta;
};

static inline int min_int(int a, int b) { return a < b ? a : b; }

static inline void store(const rows_job *t, int m, int j, float dot) {
    float *c = t->C + (size_t)m * t->ldc + (size_t)j * t->cs;
    *c = t->beta == 0.0f ? t->alpha * dot : t->alpha * dot + t->beta * *c; /* beta 0: C is not read */
}

/* dot plus X[m, k] * w[k * step] for k0 <= k < K, one float at a time (scalar_outputs:
 * outputs too few for a vector; the rows kernel masks its last step instead). */
static inline float dot_on(const rows_job *t, int m, float dot, int k0, const float *w, size_t step) {
    for (int k = k0; k < t->K; k++) dot += t->X[(size_t)m * t->ldx + k] * w[(size_t)k * step];
    return dot;
}

/* Outputs j0..j1 one float each (those past the last vector): output j's weights start
 * at W + j * per_j and step per_k from one k to the next. */
static void scalar_outputs(const rows_job *t, int j0, size_t per_j, size_t per_k) {
    for (int j = j0; j < t->j1; j++)
        for (int m = 0; m < t->R; m++) store(t, m, j, dot_on(t, m, 0.0f, 0, t->W + j * per_j, per_k));
}

/* The later K chunks of rows_R add alpha times their part to what the first stored. */
static inline void add_partial(const rows_job *t, int m, int j, float dot, int first) {
    if (first) store(t, m, j, dot);
    else t->C[(size_t)m * t->ldc + (size_t)j * t->cs] += t->alpha * dot;
}

/* A vector's lanes summed as a tree (summed lane by lane, an output waited on 15 dependent adds). */
static inline float hsum(vec v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX2__)
    __m128 a = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
#else /* no kernels here (ROWS_KERNELS 0): only has to compile */
    float sum = 0.0f;
    for (int l = 0; l < LANES; l++) sum += v[l];
    return sum;
#endif
}

/* Lanes lo..hi-1 from p[lo..hi), the others zero; p's other floats are not read. */
static inline vec load_lanes(const float *p, int lo, int hi) {
#if defined(__AVX512F__)
    return (vec)_mm512_maskz_loadu_ps((__mmask16)((0xFFFFu << lo) & (0xFFFFu >> (LANES - hi))), p);
#elif defined(__AVX2__)
    __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(lanes, _mm256_set1_epi32(lo - 1)),
                                  _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), lanes));
    return (vec)_mm256_maskload_ps(p, in);
#else
    vec v = {0};
    for (int l = lo; l < hi; l++) v[l] = p[l];
    return v;
#endif
}

/* GCC otherwise reads a row's x vector again for every weight row (a memory operand of
 * each FMA): 18 loads per 16 FMAs at 8 rows, where loads bound the kernel. */
#if defined(__x86_64__) || defined(__i386__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif
/* At most 8 weight rows at a time: rows 4 KB apart (K = 1024, 2048, ...) share one L1
 * set, and 12 of them (8 ways) halved a one-row product on a weight in L2. */
#define GROUP_MAX 8
/* Weight rows per group at R rows (rows_R's G; rows_many rounds its blocks to it). */
#define GROUP_ROWS(R) (ACCUMULATORS / (R) > GROUP_MAX ? GROUP_MAX : ACCUMULATORS / (R))
/* The rows' x of one K chunk, packed: 16 KB, in L1 beside the weight's stream.  At
 * 8 rows and K = 4096, x (128 KB) came from L2 for every group of weight rows. */
#define CHUNK_BYTES 16384
/* The next group's weight lines are prefetched into L2 (prefetcht2), one per weight
 * vector read.  Out of cache, two threads, against the same prefetches into L1 with the
 * non-temporal hint (prefetchnta) from 4 rows: 8 rows 10-27 -> 22-37 GB/s, 4 rows
 * 15-34 -> 23-49, 1-2 rows mostly 34-52 -> 46-61 (bench_sgemm_shim.py,
 * docs/text-decoder.md §6.4). */
#define PREFETCH_LOCALITY 1
/* Up to 4 rows, a weight vector across two cache lines cost 20-30 % on a weight in L2
 * (loads bound those steps); from 5, the FMAs bound them, and the masked first step
 * cost more than the aligned loads saved (8 rows: 35 -> 31 GFMA/s). */
#define ALIGNED_ROWS 4

/* One vector step at k for the group's G weight rows from w: x from the packed chunk,
 * each weight vector read by LOAD(address). */
#define ROWS_STEP(R, G, k, LOAD)                                                             \
    {                                                                                        \
        vec x[R];                                                                             \
        for (int m = 0; m < R; m++) {                                                        \
            x[m] = load_vec(xp + ((k) - k0) * R + m * LANES);                                \
            if (R * (G + 1) < REGISTERS) IN_REGISTER(x[m]);                                  \
        }                                                                                    \
        for (int g = 0; g < G; g++) {                                                        \
            const float *wk = w + (size_t)g * t->ldw + (k);                                  \
            __builtin_prefetch(wk + (size_t)G * t->ldw, 0, PREFETCH_LOCALITY);              \
            vec wv = LOAD(wk);                                                               \
            for (int m = 0; m < R; m++) acc[g][m] += x[m] * wv;                              \
        }                                                                                    \
    }
#define MASKED_LOAD(p) load_lanes(p, lo, hi)

/* G weight rows at a time, each read once for all R rows: G * R vector accumulators.
 * K runs in chunks of KC: the chunk of the R rows of x is packed vector by vector into
 * xp, and each weight row's chunk streams past it.  Up to ALIGNED_ROWS rows, the vector
 * steps start where the weight rows' vectors are aligned, when the rows all start at
 * the same offset (ldw a multiple of LANES; MLX's arrays start 8 bytes past 64).  The
 * first step then starts below k = 0, and the last may end past K: their lanes outside
 * 0..K-1 are masked (zero in xp, not read from W). */
#define ROWS_KERNEL(R)                                                                       \
    static void rows_##R(const rows_job *t) {                                                \
        enum { G = GROUP_ROWS(R) };                                                          \
        enum { KC = CHUNK_BYTES / (R * LANES * sizeof(float)) * LANES };                     \
        float xp[R * KC] __attribute__((aligned(64)));                                        \
        const int K = t->K, groups_end = t->j0 + (t->j1 - t->j0) / G * G;                   \
        const uintptr_t first = (uintptr_t)(t->W + (size_t)t->j0 * t->ldw) / sizeof(float); \
        const int lead = R > ALIGNED_ROWS || t->ldw % LANES ? 0 : (int)(-first % LANES);     \
        const int origin = lead ? lead - LANES : 0;                                          \
        for (int k0 = origin; k0 < K; k0 += KC) {                                            \
            const int k1 = K - k0 <= KC ? K : k0 + KC;                                        \
            for (int k = k0; k < k1; k += LANES)                                              \
                for (int m = 0; m < R; m++) {                                                \
                    const float *xm = t->X + (size_t)m * t->ldx;                             \
                    float *to = xp + (k - k0) * R + m * LANES;                               \
                    if (k >= 0 && k + LANES <= K) __builtin_memcpy(to, xm + k, sizeof(vec)); \
                    else for (int l = 0; l < LANES; l++) to[l] = k + l < 0 || k + l >= K ? 0.0f : xm[k + l]; \
                }                                                                            \
            for (int j = t->j0; j < groups_end; j += G) {                                    \
                const float *w = t->W + (size_t)j * t->ldw;                                  \
                vec acc[G][R];                                                                \
                __builtin_memset(acc, 0, sizeof acc);                                        \
                int k = k0;                                                                  \
                if (k < 0) { /* the first chunk's first step */                             \
                    const int lo = -k, hi = K - k < LANES ? K - k : LANES;                   \
                    ROWS_STEP(R, G, k, MASKED_LOAD)                                          \
                    k += LANES;                                                              \
                }                                                                            \
                for (; k + LANES <= k1; k += LANES) ROWS_STEP(R, G, k, load_vec)             \
                if (k < k1) { /* the last chunk's last step */                              \
                    const int lo = 0, hi = K - k;                                            \
                    ROWS_STEP(R, G, k, MASKED_LOAD)                                          \
                }                                                                            \
                for (int g = 0; g < G; g++)                                                  \
                    for (int m = 0; m < R; m++) add_partial(t, m, j + g, hsum(acc[g][m]), k0 == origin); \
            }                                                                                \
        }                                                                                    \
        scalar_outputs(t, groups_end, t->ldw, 1);                                            \
    }
ROWS_KERNEL(1)
ROWS_KERNEL(2)
ROWS_KERNEL(3)
ROWS_KERNEL(4)
ROWS_KERNEL(5)
ROWS_KERNEL(6)
ROWS_KERNEL(7)
ROWS_KERNEL(8)

/* ---- 1-8 rows times a weight as stored: C[m, j] = alpha * sum_k X[m, k] W[k, j] + ... ----
 * (attention's probabilities times V: V is [context, head_dim]).  NV vectors of outputs
 * at a time, from column j, for all R rows, each row of W read once for them; every sum
 * runs over k in order, lane by lane. */
#define COLUMNS_BLOCK(R, NV)                                                                 \
    {                                                                                        \
        vec acc[NV][R];                                                                      \
        __builtin_memset(acc, 0, sizeof acc);                                                \
        for (int k = 0; k < t->K; k++) {                                                     \
            const float *w = t->W + (size_t)k * t->ldw + j;                                  \
            float x[R];                                                                      \
            for (int m = 0; m < R; m++) x[m] = t->X[(size_t)m * t->ldx + k];                 \
            for (int v = 0; v < NV; v++) {                                                   \
                vec wv = load_vec(w + v * LANES);                                            \
                for (int m = 0; m < R; m++) acc[v][m] += x[m] * wv;                          \
            }                                                                                \
        }                                                                                    \
        for (int v = 0; v < NV; v++)                                                         \
            for (int m = 0; m < R; m++)                                                      \
                for (int l = 0; l < LANES; l++) store(t, m, j + v * LANES + l, acc[v][m][l]); \
    }
#define COLUMNS_KERNEL(R)                                                                    \
    static void columns_##R(const rows_job *t) {                                             \
        enum { NV = ACCUMULATORS / R > 8 ? 8 : ACCUMULATORS / R };                          \
        int j = t->j0;                                                                       \
        for (; j + NV * LANES <= t->j1; j += NV * LANES) COLUMNS_BLOCK(R, NV)                \
        for (; j + LANES <= t->j1; j += LANES) COLUMNS_BLOCK(R, 1)                           \
        scalar_outputs(t, j, 1, t->ldw);                                                     \
    }
COLUMNS_KERNEL(1)
COLUMNS_KERNEL(2)
COLUMNS_KERNEL(3)
COLUMNS_KERNEL(4)
COLUMNS_KERNEL(5)
COLUMNS_KERNEL(6)
COLUMNS_KERNEL(7)
COLUMNS_KERNEL(8)

static const kernel_fn rows_kernels[ROWS_MAX + 1] = {
    NULL, rows_1, rows_2, rows_3, rows_4, rows_5, rows_6, rows_7, rows_8,
};

/* ---- 9-32 rows: blocks of at most 8 rows over a block of weight rows in L2 ---------
 * OpenBLAS's GEMM is slow here too: W [4096, 1024] at 7-11 GB/s cold from 9 to 48
 * rows (9 rows cost 1.8-2x 8 rows), 29-90 GFMA/s on a weight in L2.  Here the rows
 * are split into blocks of at most ROWS_MAX, as even as they go (12 = 6 + 6), and the
 * weight into blocks of WEIGHT_BLOCK_BYTES: the first row block reads a weight block
 * from memory, the others find it in L2.  Two threads, against OpenBLAS: cold 1.4-4.8x
 * at 9-16 rows, 1.5-2.7x at 24, 1.0-1.6x at 32, 1.0-1.6x at 40-48; 88-107 GFMA/s in L2,
 * near the two cores' peak (bench_sgemm_shim.py).  Up to 32: one shape was already
 * even there (W [1024, 4096], 1.01-1.03x), and prefill's chunks are far larger.  Weight
 * blocks of 128 KB measured slower, 512 KB no better. */
enum { MANY_MAX = 32, WEIGHT_BLOCK_BYTES = 256 * 1024 };
/* Every weight block reads all the rows' x again (packed chunk by chunk): while x is
 * small that is L2 traffic beside the weight's; once x outgrows L2 (M x K past 768 KB)
 * it costs more than the weight.  Cold, two threads, against OpenBLAS: W [1536, 6144]
 * won 1.6-2.6x at 16-32 rows (x up to 768 KB); W [2048, 9216] 1.46x at 16 rows (576 KB)
 * but 0.73-0.92x at 24-32; W [1024, 21504] 0.62-0.84x at 16-32. So the rows go to
 * OpenBLAS past MANY_X_FLOATS (blocking K too would lift this; not done). */
#define MANY_X_FLOATS (3 << 16)

static void rows_many(const rows_job *t) {
    const int blocks = (t->R + ROWS_MAX - 1) / ROWS_MAX, per = (t->R + blocks - 1) / blocks;
    const int last = t->R - (blocks - 1) * per;
    int step = GROUP_ROWS(per); /* a weight block's rows: a multiple of both row blocks' groups */
    while (step % GROUP_ROWS(last)) step += GROUP_ROWS(per);
    int rows = (int)(WEIGHT_BLOCK_BYTES / ((size_t)t->K * sizeof(float))) / step * step;
    rows = rows < step ? step : rows;
    for (int j = t->j0; j < t->j1; j += rows)
        for (int m = 0; m < t->R; m += per) {
            rows_job part = *t;
            part.R = min_int(per, t->R - m);
            part.X = t->X + (size_t)m * t->ldx;
            part.C = t->C + (size_t)m * t->ldc;
            part.j0 = j;
            part.j1 = min_int(j + rows, t->j1);
            rows_kernels[part.R](&part);
        }
}

static const kernel_fn columns_kernels[ROWS_MAX + 1] = {
    NULL, columns_1, columns_2, columns_3, columns_4, columns_5, columns_6, columns_7, columns_8,
};

/* ---- the pool: workers kept between calls -------------------------------------------
 * Starting a thread costs 20-50 us, as long as the whole product of a 1 MB weight, so
 * the workers stay: started at the first product that needs them, each waits on its own
 * slot, spinning SPIN_NS, then sleeping on a futex.  One caller at a time owns the pool;
 * another caller meanwhile runs its product on its own thread.  A forked child has none
 * of its parent's threads (pexpect's forks in the test suite; OpenBLAS's own pool
 * hung there): pthread_atfork forgets ours in the child, which starts its own. */
typedef struct {
    unsigned word, sleeping; /* word: a sequence number; sleeping: a waiter is in futex wait */
} signal_t;

typedef struct { /* go and done on their own cache lines: a spinning waiter reads only its own */
    signal_t go __attribute__((aligned(64)));   /* the caller bumps it with a share in `part` */
    signal_t done __attribute__((aligned(64))); /* the worker answers */
    rows_job part;
} slot_t;

static slot_t slots[MAX_THREADS];
static int workers;  /* started in this process */
static int pool_owned; /* a caller is using the pool */

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() ((void)0)
#endif

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Wait until s->word differs from old: spin up to SPIN_NS (or until a big OpenBLAS
 * product starts), then sleep on the futex. */
static unsigned wait_change(signal_t *s, unsigned old) {
    long long until = 0;
    unsigned parked = __atomic_load_n(&park, __ATOMIC_RELAXED);
    for (int i = 0;; i++) {
        unsigned v = __atomic_load_n(&s->word, __ATOMIC_ACQUIRE);
        if (v != old) return v;
        if (__atomic_load_n(&park, __ATOMIC_RELAXED) != parked) break;
        if ((i & 63) == 0) {
            long long t = now_ns();
            if (!until) until = t + __atomic_load_n(&spin_ns, __ATOMIC_RELAXED);
            else if (t > until) break;
        }
        cpu_relax();
    }
    __atomic_fetch_add(&sleeps, 1, __ATOMIC_RELAXED);
    for (;;) {
        __atomic_store_n(&s->sleeping, 1, __ATOMIC_SEQ_CST);
        unsigned v = __atomic_load_n(&s->word, __ATOMIC_SEQ_CST);
        if (v != old) {
            __atomic_store_n(&s->sleeping, 0, __ATOMIC_RELAXED); /* only the waiter clears its flag */
            return v;
        }
        syscall(SYS_futex, &s->word, FUTEX_WAIT_PRIVATE, old, NULL, NULL, 0);
    }
}

static void post(signal_t *s, unsigned v) {
    __atomic_store_n(&s->word, v, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&s->sleeping, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, &s->word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static void *worker(void *arg) {
    slot_t *slot = arg;
    unsigned seen = 0;
    for (;;) {
        seen = wait_change(&slot->go, seen);
        slot->part.kernel(&slot->part);
        post(&slot->done, seen);
    }
    return NULL;
}

/* Workers started in this process, and waits that went to sleep: for the tests. */
int sgemm_shim_workers(void) { return __atomic_load_n(&workers, __ATOMIC_RELAXED); }
unsigned long sgemm_shim_sleeps(void) { return __atomic_load_n(&sleeps, __ATOMIC_RELAXED); }

static void forget_pool(void) { /* in a forked child: the workers are the parent's */
    __builtin_memset(slots, 0, sizeof slots);
    workers = 0;
    pool_owned = 0;
}

static void start_pool(int want) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* workers inherit: signals go to the process's own threads */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (workers < want) {
        pthread_t id;
        if (pthread_create(&id, &attr, worker, &slots[workers + 1])) {
            __atomic_store_n(&threads, workers + 1, __ATOMIC_RELAXED); /* no retry on every product */
            break;
        }
        __atomic_store_n(&workers, workers + 1, __ATOMIC_RELAXED);
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* The weight's rows split into one contiguous share per thread; the caller takes the
 * first.  Without the pool (another caller has it), the caller takes them all. */
static void rows_product(rows_job all) {
    size_t most = (size_t)all.j1 * all.K / PER_THREAD_FLOATS; /* threads the work pays for */
    const int pool = __atomic_load_n(&threads, __ATOMIC_RELAXED);
    int n = pool < 1 ? 1 : pool;
    if (most < (size_t)n) n = most > 0 ? (int)most : 1;
    int expected = 0;
    if (n == 1 || !__atomic_compare_exchange_n(&pool_owned, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        all.kernel(&all);
        return;
    }
    if (workers < n - 1) start_pool(pool - 1);
    if (n > workers + 1) n = workers + 1;
    int per = ((all.j1 + n - 1) / n + 15) / 16 * 16;
    n = min_int(n, (all.j1 + per - 1) / per); /* rounded shares may leave the last threads nothing */
    unsigned seq[MAX_THREADS];
    for (int i = 1; i < n; i++) {
        slot_t *s = &slots[i];
        s->part = all;
        s->part.j0 = min_int(i * per, all.j1);
        s->part.j1 = min_int((i + 1) * per, all.j1);
        seq[i] = __atomic_load_n(&s->go.word, __ATOMIC_RELAXED) + 1; /* only the owner writes go */
        post(&s->go, seq[i]);
    }
    rows_job mine = all;
    mine.j1 = min_int(per, all.j1);
    mine.kernel(&mine);
    for (int i = 1; i < n; i++) wait_change(&slots[i].done, seq[i] - 1); /* done goes from seq - 1 to seq */
    __atomic_store_n(&pool_owned, 0, __ATOMIC_RELEASE);
}

/* ---- the entry point MLX calls ---------------------------------------------------- */

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    int a_t = ta == TRANS || ta == CONJ_TRANS, b_t = tb == TRANS || tb == CONJ_TRANS;
    int a_n = ta == NO_TRANS, b_n = tb == NO_TRANS; /* any other value: OpenBLAS reports it */
    int ours = ROWS_KERNELS && order == ROW_MAJOR && M > 0 && N > 0 && K > 0 && alpha != 0.0f;
    /* One row handed over as a transposed column ([K, 1], lda 1: MLX does so for a row
     * gathered per MoE pair) is the same contiguous row. */
    int x_rows = a_n || (a_t && M == 1 && lda == 1);
    int rows_ok = M <= ROWS_MAX || (M <= MANY_MAX && N > 1 && (size_t)M * K <= MANY_X_FLOATS);
    if (ours && x_rows && rows_ok && b_t && (size_t)N * K >= ROWS_MIN_FLOATS) { /* x [M, K] @ (W [N, K])^T */
        __atomic_fetch_add(&routed, 1, __ATOMIC_RELAXED);
        kernel_fn kernel = M <= ROWS_MAX ? rows_kernels[M] : rows_many;
        rows_product((rows_job){kernel, M, 0, N, K, lda, ldb, ldc, 1, A, B, C, alpha, beta});
        return;
    }
    if (ours && x_rows && M <= ROWS_MAX && b_n && N >= LANES && (size_t)N * K >= COLUMNS_MIN_FLOATS) { /* x @ W [K, N] */
        __atomic_fetch_add(&routed, 1, __ATOMIC_RELAXED);
        rows_product((rows_job){columns_kernels[M], M, 0, N, K, lda, ldb, ldc, 1, A, B, C, alpha, beta});
        return;
    }
    if (ours && a_n && N == 1 && (b_t || (b_n && ldb == 1)) && (size_t)M * K >= ROWS_MIN_FLOATS) { /* W [M, K] @ x [K, 1] */
        __atomic_fetch_add(&routed, 1, __ATOMIC_RELAXED);
        rows_product((rows_job){rows_1, 1, 0, M, K, 0, lda, 0, ldc, B, A, C, alpha, beta});
        return;
    }
    if ((double)M * N * K >= PARK_MIN_FMAS) __atomic_fetch_add(&park, 1, __ATOMIC_RELAXED);
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
