/* gemma4-mlx: one-row float32 products through GEMV (gemma4_mlx/_blas_shim.py).
 *
 * MLX's CPU backend computes every float32 product with cblas_sgemm, a decode
 * step's one-row products included.  OpenBLAS streams a weight matrix through sgemm
 * with one row or column at 10-16 GB/s and through sgemv at 28-31 GB/s (2-core
 * Zen 4; 0.3.21 and 0.3.31 alike).  This library defines cblas_sgemm ahead of
 * OpenBLAS in the process's global symbol scope: a row-major product with M = 1 or
 * N = 1 becomes one cblas_sgemv call, every other product goes to OpenBLAS's own
 * cblas_sgemm unchanged.  gemv_shim_bind() must succeed before the library is made
 * global: it takes both functions from the OpenBLAS handle.
 */
#include <dlfcn.h>
#include <stddef.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, CONJ_TRANS = 113 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
unsigned long gemv_shim_routed; /* products sent to sgemv, for the tests */

int gemv_shim_bind(void *blas) {
    real_sgemm = (sgemm_fn)dlsym(blas, "cblas_sgemm");
    real_sgemv = (sgemv_fn)dlsym(blas, "cblas_sgemv");
    return real_sgemm != NULL && real_sgemv != NULL;
}

/* MLX passes uninitialised memory for C with beta = 0: BLAS defines that gemv, like
 * gemm, does not read y then (the tests check it with NaN there). */
void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    int a_t = ta == TRANS || ta == CONJ_TRANS, b_t = tb == TRANS || tb == CONJ_TRANS;
    if (order != ROW_MAJOR || M <= 0 || N <= 0 || K <= 0 || (M != 1 && N != 1)) {
        real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    __atomic_fetch_add(&gemv_shim_routed, 1, __ATOMIC_RELAXED);
    if (M == 1) { /* C[0, :] = op(A)[0, :] @ op(B): op(A)'s row is A's row, or A's column when A is [K, 1] */
        if (b_t) /* B is [N, K] */
            real_sgemv(ROW_MAJOR, NO_TRANS, N, K, alpha, B, ldb, A, a_t ? lda : 1, beta, C, 1);
        else /* B is [K, N] */
            real_sgemv(ROW_MAJOR, TRANS, K, N, alpha, B, ldb, A, a_t ? lda : 1, beta, C, 1);
        return;
    }
    /* N == 1: C[:, 0] = op(A) @ op(B)[:, 0]; op(B)'s column is B's column, or B's row when B is [1, K] */
    if (a_t) /* A is [K, M] */
        real_sgemv(ROW_MAJOR, TRANS, K, M, alpha, A, lda, B, b_t ? 1 : ldb, beta, C, ldc);
    else /* A is [M, K] */
        real_sgemv(ROW_MAJOR, NO_TRANS, M, K, alpha, A, lda, B, b_t ? 1 : ldb, beta, C, ldc);
}
