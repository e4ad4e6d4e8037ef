/* Calls llama.cpp's NEON dot products (ggml-cpu/arch/arm/quants.c) over ROWS rows of N weights against one q8
 * activation row, so bench/arm_instructions.py can count their instructions under qemu the way it counts xbitc's.
 *   ggml_dot q4_0|q4_K|q3_K ROWS N
 * Block contents are arbitrary bytes: the dot products' control flow does not depend on the values. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
/* what quants.c references but these dot products never reach */
float ggml_table_f32_ue4m3[256];
void quantize_row_q8_K_ref(const float *x, void *y, int64_t k) { (void)x; (void)y; (void)k; }
typedef void (*dot_fn)(int, float *, size_t, const void *, size_t, const void *, size_t, int);
void ggml_vec_dot_q4_0_q8_0(int, float *, size_t, const void *, size_t, const void *, size_t, int);
void ggml_vec_dot_q4_K_q8_K(int, float *, size_t, const void *, size_t, const void *, size_t, int);
void ggml_vec_dot_q3_K_q8_K(int, float *, size_t, const void *, size_t, const void *, size_t, int);
int main(int argc, char **argv) {
    int rows = atoi(argv[2]), n = atoi(argv[3]);
    dot_fn f; size_t wblock, wbytes, ablock, abytes;
    if (!strcmp(argv[1], "q4_0")) { f = ggml_vec_dot_q4_0_q8_0; wblock = 32; wbytes = 18; ablock = 32; abytes = 34; }
    else if (!strcmp(argv[1], "q4_K")) { f = ggml_vec_dot_q4_K_q8_K; wblock = 256; wbytes = 144; ablock = 256; abytes = 292; }
    else { f = ggml_vec_dot_q3_K_q8_K; wblock = 256; wbytes = 110; ablock = 256; abytes = 292; }
    size_t rowbytes = n / wblock * wbytes;
    unsigned char *w = calloc(rows, rowbytes), *a = calloc(n / ablock, abytes);
    for (size_t i = 0; i < rows * rowbytes; i++) w[i] = (unsigned char)(i * 37);
    float s, total = 0;
    for (int r = 0; r < rows; r++) { f(n, &s, 0, w + r * rowbytes, 0, a, 0, 1); total += s; }
    printf("%zu %f\n", rowbytes, total);
    return 0;
}
