/* Shared by the two C files of fvis._moments: the statistics kernel (_moments.c) and the
 * hook fast path (_trace.c), which reads a captured tensor's statistics with the same kernel
 * so that both give the same bits. */
#ifndef FVIS_MOMENTS_H
#define FVIS_MOMENTS_H

#include <Python.h>
#include <stdint.h>

typedef struct {
    double sum, sumsq;
    float lo, hi;
    int64_t zeros, dead;
} result_t;

/* One read of outer * channels * inner float32 values (see _moments.c). */
void fvis_moments(const float *x, int64_t outer, int64_t channels, int64_t inner, result_t *r,
                  int allow_simd);

/* fvis.stats._mean_std's usual case; 0 where Python must decide. */
int fvis_usual_mean_std(double lo, double hi, double sum, double sumsq, long long numel,
                        double *mean, double *std);

/* Adds the Tracer type and configure_trace() to the module (_trace.c). */
int fvis_add_trace(PyObject *module);

#endif
