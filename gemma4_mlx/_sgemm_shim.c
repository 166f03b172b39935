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
 *     below, which reads each weight row once for all R rows, on as many threads as
 *     OpenBLAS uses (started for the call: nothing of ours outlives it);
 *   - everything else: OpenBLAS's cblas_sgemm, unchanged.
 * (OpenBLAS's own sgemv streamed 28-31 GB/s too, but its thread pool hung the
 * process after pexpect's forks in the test suite: 0.3.21, a call spinning for
 * workers that were gone; so no OpenBLAS routine but sgemm is called.)
 * sgemm_shim_bind() must succeed before the library is made global.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>

/* The kernels need AVX2 and FMA (SSE alone ran 6 GB/s at 8 rows); a build without them
 * only forwards, and _blas_shim.py does not load it (sgemm_shim_kernels). */
#if defined(__AVX2__) && defined(__FMA__)
#define ROWS_KERNELS 1
#else
#define ROWS_KERNELS 0
#endif
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, CONJ_TRANS = 113 };
enum { ROWS_MAX = 8, MAX_THREADS = 64 };
/* Weights of fewer floats (4 MB) go to OpenBLAS: there starting threads costs more than
 * they save, and alone our kernel lost to OpenBLAS's on short rows ([1024, 256] x 8 rows:
 * 206 against 119 us; an MoE layer's experts). */
#define ROWS_MIN_FLOATS (1 << 20)
#define PER_THREAD_FLOATS (1 << 18) /* a thread costs ~20-50 us to start: give each at least 1 MB */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn real_sgemm;
static int threads = 1;
unsigned long sgemm_shim_rows; /* products our kernel took, for the tests */

/* Whether this build has the kernels (AVX2 and FMA): without, it would only forward. */
int sgemm_shim_kernels(void) { return ROWS_KERNELS; }

int sgemm_shim_bind(void *blas) {
    int (*count)(void) = (int (*)(void))dlsym(blas, "openblas_get_num_threads");
    real_sgemm = (sgemm_fn)dlsym(blas, "cblas_sgemm");
    threads = count ? count() : 1;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    return real_sgemm != NULL;
}

/* ---- 1-8 rows: C[m, j] = alpha * sum_k X[m, k] W[j, k] + beta * C[m, j] ---------- */

/* Vector width and how many vector registers hold partial sums: AVX-512 has 32
 * registers of 16 floats (24 accumulators measured 10-20 % faster than 16 at 8 rows on
 * Zen 4), AVX2 16 of 8.  GCC's vector types: plain C, unaligned loads through memcpy. */
#ifdef __AVX512F__
#define LANES 16
#define ACCUMULATORS 24
#else
#define LANES 8
#define ACCUMULATORS 8
#endif
/* Natural alignment: declared under-aligned, GCC kept AVX2 accumulators in memory (1 GB/s). */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load_vec(const float *p) {
    vec v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

typedef struct {
    int R, j0, j1, K, ldx, ldw, ldc, cs; /* cs: C's stride from one output j to the next */
    const float *X, *W;
    float *C;
    float alpha, beta;
} rows_job;

static inline void store(const rows_job *t, int m, int j, float dot) {
    float *c = t->C + (size_t)m * t->ldc + (size_t)j * t->cs;
    *c = t->beta == 0.0f ? t->alpha * dot : t->alpha * dot + t->beta * *c; /* beta 0: C is not read */
}

/* G weight rows at a time, each read once for all R rows: G * R vector accumulators. */
#define ROWS_KERNEL(R)                                                                       \
    static void rows_##R(const rows_job *t) {                                                \
        enum { G = ACCUMULATORS / R > 12 ? 12 : ACCUMULATORS / R };                         \
        const int K = t->K;                                                                  \
        int j = t->j0;                                                                       \
        for (; j + G <= t->j1; j += G) {                                                     \
            vec acc[G][R];                                                                    \
            __builtin_memset(acc, 0, sizeof acc);                                            \
            int k = 0;                                                                       \
            for (; k + LANES <= K; k += LANES) {                                                     \
                vec x[R];                                                                     \
                for (int m = 0; m < R; m++) x[m] = load_vec(t->X + (size_t)m * t->ldx + k);     \
                for (int g = 0; g < G; g++) {                                                \
                    vec w = load_vec(t->W + (size_t)(j + g) * t->ldw + k);                       \
                    for (int m = 0; m < R; m++) acc[g][m] += x[m] * w;                       \
                }                                                                            \
            }                                                                                \
            for (int g = 0; g < G; g++)                                                      \
                for (int m = 0; m < R; m++) {                                                \
                    float dot = 0.0f;                                                        \
                    for (int l = 0; l < LANES; l++) dot += acc[g][m][l];                         \
                    for (int kk = k; kk < K; kk++)                                           \
                        dot += t->X[(size_t)m * t->ldx + kk] * t->W[(size_t)(j + g) * t->ldw + kk]; \
                    store(t, m, j + g, dot);                                                 \
                }                                                                            \
        }                                                                                    \
        for (; j < t->j1; j++)                                                               \
            for (int m = 0; m < R; m++) {                                                    \
                float dot = 0.0f;                                                            \
                for (int kk = 0; kk < K; kk++)                                               \
                    dot += t->X[(size_t)m * t->ldx + kk] * t->W[(size_t)j * t->ldw + kk];    \
                store(t, m, j, dot);                                                         \
            }                                                                                \
    }
ROWS_KERNEL(1)
ROWS_KERNEL(2)
ROWS_KERNEL(3)
ROWS_KERNEL(4)
ROWS_KERNEL(5)
ROWS_KERNEL(6)
ROWS_KERNEL(7)
ROWS_KERNEL(8)

static void (*const kernels[ROWS_MAX + 1])(const rows_job *) = {
    NULL, rows_1, rows_2, rows_3, rows_4, rows_5, rows_6, rows_7, rows_8,
};

static void *run_rows(void *job) {
    const rows_job *t = job;
    kernels[t->R](t);
    return NULL;
}

/* The weight's rows split into one contiguous share per thread; this thread takes the
 * first (and any whose thread could not start). */
static inline int min_int(int a, int b) { return a < b ? a : b; }

static void rows_product(rows_job all) {
    size_t most = (size_t)all.j1 * all.K / PER_THREAD_FLOATS; /* threads the work pays for */
    int n = threads < 1 ? 1 : threads;
    if (most < (size_t)n) n = most > 0 ? (int)most : 1;
    int per = ((all.j1 + n - 1) / n + 15) / 16 * 16;
    rows_job part[MAX_THREADS];
    pthread_t id[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < n; i++) {
        part[i] = all;
        part[i].j0 = min_int(i * per, all.j1);
        part[i].j1 = min_int((i + 1) * per, all.j1);
    }
    for (int i = 1; i < n; i++)
        if (part[i].j0 < part[i].j1) started[i] = pthread_create(&id[i], NULL, run_rows, &part[i]) == 0;
    run_rows(&part[0]);
    for (int i = 1; i < n; i++) {
        if (started[i])
            pthread_join(id[i], NULL);
        else if (part[i].j0 < part[i].j1)
            run_rows(&part[i]);
    }
}

/* ---- the entry point MLX calls ---------------------------------------------------- */

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    int a_t = ta == TRANS || ta == CONJ_TRANS, b_t = tb == TRANS || tb == CONJ_TRANS;
    int ours = ROWS_KERNELS && order == ROW_MAJOR && M > 0 && N > 0 && K > 0 && !a_t && alpha != 0.0f;
    if (ours && M <= ROWS_MAX && b_t && (size_t)N * K >= ROWS_MIN_FLOATS) { /* x [M, K] @ (W [N, K])^T */
        __atomic_fetch_add(&sgemm_shim_rows, 1, __ATOMIC_RELAXED);
        rows_product((rows_job){M, 0, N, K, lda, ldb, ldc, 1, A, B, C, alpha, beta});
        return;
    }
    if (ours && N == 1 && (b_t || ldb == 1) && (size_t)M * K >= ROWS_MIN_FLOATS) { /* W [M, K] @ x [K, 1] */
        __atomic_fetch_add(&sgemm_shim_rows, 1, __ATOMIC_RELAXED);
        rows_product((rows_job){1, 0, M, K, 0, lda, 0, ldc, B, A, C, alpha, beta});
        return;
    }
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
