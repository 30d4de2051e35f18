/* Shared by the C files of fvis._moments: the statistics kernel (_moments.c), the hook fast
 * path (_trace.c with _facts.c and _trace_end.c, see _trace.h), the wrapped forwards (_wrap.c)
 * and the module walk (_walk.c). The fast path reads a captured tensor's statistics with the
 * same kernel, so both give the same bits. */
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

/* The Tracer type and the session's pre-hook and forward hook (_trace.c), which the wrapped
 * forwards call. */
PyTypeObject *fvis_tracer_type(void);
/* The hooks around a module's call; key and names: the module's entry in the tracer's names
 * dict where the caller has it, else NULL (looked up). */
PyObject *fvis_trace_pre(PyObject *tracer, PyObject *module, PyObject *args, PyObject *key,
                         PyObject *names);
PyObject *fvis_trace_post(PyObject *tracer, PyObject *const *args, PyObject *key,
                          PyObject *target); /* target: the module's targets entry, or NULL */
PyObject *fvis_tracer_names(PyObject *tracer);   /* borrowed, may be NULL */
PyObject *fvis_tracer_targets(PyObject *tracer); /* borrowed, may be NULL */

/* Adds the wrapped forwards' functions: configure_wrap(), forwards_wrappable(),
 * wrap_forwards(), unwrap_forwards(), untrack() (_wrap.c). */
/* var = the interned text, or return -1 from the function that adds names to the module. */
#define FVIS_INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1;

int fvis_add_wrap(PyObject *module);
/* _callsite.c: whether the running frame is one of the call sites configure_wrap was given. */
void fvis_set_call_sites(PyObject *codes);
int fvis_called_through_call(void);
int fvis_add_callsite(PyObject *module);

/* Adds walk_modules(): fvis.capture._walk (_walk.c). */
int fvis_add_walk(PyObject *module);

#endif
