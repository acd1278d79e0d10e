/*
 * A C program against the ACL/aclnn C API, in the call sequence of ops-nn's INT4Pack example:
 * init, set device, stream, malloc, memcpy, create tensors, both phases of
 * aclnnConvertWeightToINT4Pack, re-init the packed tensor as the transposed (k, n) FRACTAL_NZ view,
 * aclnnWeightQuantBatchMatmulV2, copy back, destroy, reset, finalize.
 *
 * It builds against the aclnn project's headers (sys/include) and runs on real CANN or on the
 * simulator's C libraries (aclnn-simlib). Inputs are chosen so that every output is exact in
 * fp16; the program checks each against a plain integer computation and exits 0 only if all
 * match (and, on the simulator, if it reports no leak or misuse).
 *
 *   gcc -I sys/include int4pack_w4a16.c -L DIR -lascendcl -lnnopbase -lopapi -o int4pack_w4a16
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acl/acl.h"
#include "aclnn/aclnn_base.h"
#include "aclnnop/aclnn_convert_weight_to_int4_pack.h"
#include "aclnnop/aclnn_weight_quant_batch_matmul_v2.h"

/* Exported only by the simulator's C libraries; NULL on real CANN. */
extern int32_t aclnnSimCheck(char *buf, size_t len) __attribute__((weak));

#define M 16
#define K 72
#define N 17

#define CHECK(call)                                                                       \
    do {                                                                                  \
        int32_t status_ = (int32_t)(call);                                                \
        if (status_ != 0) {                                                               \
            const char *msg_ = aclGetRecentErrMsg();                                      \
            fprintf(stderr, "%s:%d: %s returned %d: %s\n", __FILE__, __LINE__, #call, status_, \
                    msg_ ? msg_ : "(no message)");                                        \
            return 1;                                                                     \
        }                                                                                 \
    } while (0)

/* Exact fp16 encoding of small dyadic values (|v| in [2^-14, 65504], at most 11 significant bits). */
static uint16_t to_half(float v) {
    if (v == 0.0f) return 0;
    uint16_t sign = v < 0 ? 0x8000 : 0;
    float a = v < 0 ? -v : v;
    int exp = 0;
    while (a >= 2.0f) { a /= 2.0f; exp++; }
    while (a < 1.0f) { a *= 2.0f; exp--; }
    return (uint16_t)(sign | ((exp + 15) << 10) | (uint16_t)((a - 1.0f) * 1024.0f));
}

static float from_half(uint16_t h) {
    int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    float v;
    if (exp == 0) v = (float)mant / 1024.0f / 16384.0f;
    else if (exp == 31) v = mant ? 0.0f / 0.0f : 1.0f / 0.0f;
    else {
        v = 1.0f + (float)mant / 1024.0f;
        for (; exp > 15; exp--) v *= 2.0f;
        for (; exp < 15; exp++) v /= 2.0f;
    }
    return (h & 0x8000) ? -v : v;
}

static int run_and_free(aclOpExecutor *executor, uint64_t ws_size, aclrtStream stream,
                        aclnnStatus (*launch)(void *, uint64_t, aclOpExecutor *, aclrtStream)) {
    void *workspace = NULL;
    if (ws_size > 0) CHECK(aclrtMalloc(&workspace, ws_size, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(launch(workspace, ws_size, executor, stream));
    CHECK(aclrtSynchronizeStream(stream));
    if (workspace) CHECK(aclrtFree(workspace));
    return 0;
}

int main(void) {
    static int32_t weight[N * K];
    static uint16_t x[M * K], scale[N], y[M * N];
    for (int j = 0; j < N; j++)
        for (int i = 0; i < K; i++) weight[j * K + i] = (j * 7 + i * 3) % 16 - 8;
    for (int r = 0; r < M; r++)
        for (int c = 0; c < K; c++) x[r * K + c] = to_half((float)((r + 2 * c) % 5 - 2));
    for (int j = 0; j < N; j++) scale[j] = to_half(j % 2 ? 0.5f : 1.0f);

    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(0));
    aclrtStream stream = NULL;
    CHECK(aclrtCreateStream(&stream));

    const uint64_t packed_bytes = 2 * 2 * 16 * 64 / 2; /* INT4 NZ storage (ceil(k/64), ceil(n/16), 16, 64) */
    void *weight_dev = NULL, *packed_dev = NULL, *x_dev = NULL, *scale_dev = NULL, *y_dev = NULL;
    CHECK(aclrtMalloc(&weight_dev, sizeof weight, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&packed_dev, packed_bytes, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&x_dev, sizeof x, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&scale_dev, sizeof scale, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&y_dev, sizeof y, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMemcpy(weight_dev, sizeof weight, weight, sizeof weight, ACL_MEMCPY_HOST_TO_DEVICE));
    CHECK(aclrtMemcpy(x_dev, sizeof x, x, sizeof x, ACL_MEMCPY_HOST_TO_DEVICE));
    CHECK(aclrtMemcpy(scale_dev, sizeof scale, scale, sizeof scale, ACL_MEMCPY_HOST_TO_DEVICE));

    /* The weight stored transposed, (n, k) int32; packed to INT4 FRACTAL_NZ of the same view. */
    const int64_t nk[2] = {N, K}, nk_strides[2] = {K, 1}, storage[4] = {2, 2, 16, 64};
    aclTensor *w = aclCreateTensor(nk, 2, ACL_INT32, nk_strides, 0, ACL_FORMAT_ND, nk, 2, weight_dev);
    aclTensor *packed = aclCreateTensor(nk, 2, ACL_INT4, nk_strides, 0, ACL_FORMAT_FRACTAL_NZ, storage, 4, packed_dev);
    if (!w || !packed) { fprintf(stderr, "aclCreateTensor returned NULL\n"); return 1; }
    uint64_t ws_size = 0;
    aclOpExecutor *executor = NULL;
    CHECK(aclnnConvertWeightToINT4PackGetWorkspaceSize(w, packed, &ws_size, &executor));
    if (run_and_free(executor, ws_size, stream, aclnnConvertWeightToINT4Pack)) return 1;

    /* The matmul reads the packed weight as the transposed (k, n) view of the same storage. */
    const int64_t kn[2] = {K, N}, kn_strides[2] = {1, K};
    CHECK(aclInitTensor(packed, kn, 2, ACL_INT4, kn_strides, 0, ACL_FORMAT_FRACTAL_NZ, storage, 4, packed_dev));
    const int64_t mk[2] = {M, K}, mk_strides[2] = {K, 1}, mn[2] = {M, N}, mn_strides[2] = {N, 1};
    const int64_t n1[1] = {N}, n1_strides[1] = {1};
    aclTensor *xt = aclCreateTensor(mk, 2, ACL_FLOAT16, mk_strides, 0, ACL_FORMAT_ND, mk, 2, x_dev);
    aclTensor *st = aclCreateTensor(n1, 1, ACL_FLOAT16, n1_strides, 0, ACL_FORMAT_ND, n1, 1, scale_dev);
    aclTensor *yt = aclCreateTensor(mn, 2, ACL_FLOAT16, mn_strides, 0, ACL_FORMAT_ND, mn, 2, y_dev);
    if (!xt || !st || !yt) { fprintf(stderr, "aclCreateTensor returned NULL\n"); return 1; }
    CHECK(aclnnWeightQuantBatchMatmulV2GetWorkspaceSize(xt, packed, st, NULL, NULL, NULL, NULL, 0, yt,
                                                        &ws_size, &executor));
    if (run_and_free(executor, ws_size, stream, aclnnWeightQuantBatchMatmulV2)) return 1;
    CHECK(aclrtMemcpy(y, sizeof y, y_dev, sizeof y, ACL_MEMCPY_DEVICE_TO_HOST));

    int wrong = 0;
    for (int r = 0; r < M; r++) {
        for (int j = 0; j < N; j++) {
            long sum = 0;
            for (int i = 0; i < K; i++) sum += (long)((r + 2 * i) % 5 - 2) * weight[j * K + i];
            float expected = (float)sum * (j % 2 ? 0.5f : 1.0f), got = from_half(y[r * N + j]);
            if (got != expected && wrong++ < 5)
                fprintf(stderr, "y[%d][%d] = %g, expected %g\n", r, j, got, expected);
        }
    }

    CHECK(aclDestroyTensor(w));
    CHECK(aclDestroyTensor(packed));
    CHECK(aclDestroyTensor(xt));
    CHECK(aclDestroyTensor(st));
    CHECK(aclDestroyTensor(yt));
    CHECK(aclrtFree(weight_dev));
    CHECK(aclrtFree(packed_dev));
    CHECK(aclrtFree(x_dev));
    CHECK(aclrtFree(scale_dev));
    CHECK(aclrtFree(y_dev));
    CHECK(aclrtDestroyStream(stream));
    CHECK(aclrtResetDevice(0));
    CHECK(aclFinalize());

    if (aclnnSimCheck) {
        char report[4096];
        int problems = aclnnSimCheck(report, sizeof report);
        if (problems) {
            fprintf(stderr, "the simulator reports %d problem(s): %s\n", problems, report);
            return 1;
        }
    }
    if (wrong) {
        fprintf(stderr, "%d of %d outputs wrong\n", wrong, M * N);
        return 1;
    }
    printf("ok: all %d outputs of the W4A16 matmul over the packed weight are exact\n", M * N);
    return 0;
}
