/* The generated row-lane kernels' C interface (backends/product.py SIGNATURES), declared per level suffix: what
 * packed.c dispatches to and what tests call directly. */
#ifndef XBITC_KERNEL_ABI_H
#define XBITC_KERNEL_ABI_H

#include <stdint.h>

#define XB_DECLARE_KERNELS(level)                                                                                \
    void xbitc_rows_gemv_##level(const int64_t *, int64_t, const float *, const int32_t *, float *, int64_t,    \
                                 int64_t);                                                                       \
    void xbitc_rows_gemm_##level(const int64_t *, int64_t, const float *, float *, int64_t, int64_t, int64_t,   \
                                 int64_t, int64_t);                                                              \
    void xbitc_rows_q8_##level(const int64_t *, int64_t, const float *, const int32_t *, float *, int64_t,      \
                               int64_t, int64_t, int64_t, int64_t, int8_t *);

#endif
