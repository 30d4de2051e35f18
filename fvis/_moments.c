/*
 * One read of a float32 activation for every statistic fvis reports: min, max, sum, sum of
 * squares, zero count and dead channels.
 *
 * Why native: these statistics are computed inside the forward hook of every captured layer.
 * With torch ops they take five to seven reductions per tensor (aminmax, sum, a norm, a bool
 * copy and its sum, per-channel max and min), and with every leaf of a ResNet-18 hooked that
 * alone costs 30-40% of the forward pass. One fused pass costs a few percent.
 *
 * Semantics (tests compare them with the torch path in fvis/stats.py):
 * - min and max skip NaN; NaN shows up in the sum, and the caller then takes the exact,
 *   slow path for tensors with NaN or Inf, so neither needs to be exact here;
 * - sums are float32 per SIMD lane within blocks of BLOCK elements, added up in float64;
 * - -0.0 counts as zero, NaN does not;
 * - the tensor is read as (outer, channels, inner); a channel is dead when all of its
 *   outer * inner values are zero.
 *
 * Built by setup.py as an optional extension: without a C compiler fvis uses torch ops.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 4096 /* elements per float32 partial sum */

typedef struct {
    double sum, sumsq;
    float lo, hi;
    int64_t zeros;
} acc_t;

static void span_scalar(const float *x, int64_t n, acc_t *a)
{
    float lo = a->lo, hi = a->hi;
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
        a->sum += v;
        a->sumsq += (double)v * v;
        a->zeros += (v == 0.0f);
    }
    a->lo = lo;
    a->hi = hi;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

__attribute__((target("avx2"))) static double lanes_sum(__m256 v)
{
    float t[8];
    double s = 0;
    _mm256_storeu_ps(t, v);
    for (int k = 0; k < 8; k++) s += t[k];
    return s;
}

__attribute__((target("avx2"))) static void span_avx2(const float *x, int64_t n, acc_t *a)
{
    /* _mm256_min_ps(v, lo) returns lo when v is NaN: NaN is skipped, as in span_scalar. */
    __m256 lo = _mm256_set1_ps(a->lo), hi = _mm256_set1_ps(a->hi);
    const __m256 zero = _mm256_setzero_ps();
    int64_t i = 0;
    while (n - i >= 16) {
        int64_t end = i + BLOCK < n ? i + BLOCK : n;
        __m256 s0 = zero, s1 = zero, q0 = zero, q1 = zero;
        __m256i z0 = _mm256_setzero_si256(), z1 = _mm256_setzero_si256();
        for (; end - i >= 16; i += 16) { /* two independent chains hide the add latency */
            __m256 v = _mm256_loadu_ps(x + i), w = _mm256_loadu_ps(x + i + 8);
            lo = _mm256_min_ps(w, _mm256_min_ps(v, lo));
            hi = _mm256_max_ps(w, _mm256_max_ps(v, hi));
            s0 = _mm256_add_ps(s0, v);
            s1 = _mm256_add_ps(s1, w);
            q0 = _mm256_add_ps(q0, _mm256_mul_ps(v, v));
            q1 = _mm256_add_ps(q1, _mm256_mul_ps(w, w));
            /* the comparison gives -1 per zero lane */
            z0 = _mm256_sub_epi32(z0, _mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_EQ_OQ)));
            z1 = _mm256_sub_epi32(z1, _mm256_castps_si256(_mm256_cmp_ps(w, zero, _CMP_EQ_OQ)));
        }
        int32_t z[8];
        _mm256_storeu_si256((__m256i *)z, _mm256_add_epi32(z0, z1));
        a->sum += lanes_sum(_mm256_add_ps(s0, s1));
        a->sumsq += lanes_sum(_mm256_add_ps(q0, q1));
        for (int k = 0; k < 8; k++) a->zeros += z[k];
    }
    float t[8];
    _mm256_storeu_ps(t, lo);
    for (int k = 0; k < 8; k++) a->lo = t[k] < a->lo ? t[k] : a->lo;
    _mm256_storeu_ps(t, hi);
    for (int k = 0; k < 8; k++) a->hi = t[k] > a->hi ? t[k] : a->hi;
    span_scalar(x + i, n - i, a);
}
#endif

static void span(const float *x, int64_t n, acc_t *a, int avx2)
{
#ifdef HAVE_AVX2_PATH
    if (avx2) {
        span_avx2(x, n, a);
        return;
    }
#endif
    (void)avx2;
    span_scalar(x, n, a);
}

static int has_avx2(void)
{
#ifdef HAVE_AVX2_PATH
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("avx2") ? 1 : 0;
    return cached;
#else
    return 0;
#endif
}

/* moments(address, outer, channels, inner) -> (min, max, sum, sumsq, zeros, dead_channels)
 * address: data_ptr() of a contiguous float32 CPU tensor of outer * channels * inner values,
 * kept alive by the caller for the duration of the call. */
static PyObject *moments(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "moments(address, outer, channels, inner)");
        return NULL;
    }
    const float *x = (const float *)PyLong_AsVoidPtr(args[0]);
    long long outer = PyLong_AsLongLong(args[1]);
    long long channels = PyLong_AsLongLong(args[2]);
    long long inner = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (x == NULL || outer < 1 || channels < 1 || inner < 1 ||
        outer > INT64_MAX / channels || outer * channels > INT64_MAX / inner) {
        PyErr_SetString(PyExc_ValueError, "moments: empty or invalid tensor");
        return NULL;
    }
    acc_t a = {0.0, 0.0, INFINITY, -INFINITY, 0};
    long long dead = 0;
    int avx2 = has_avx2();
    Py_BEGIN_ALLOW_THREADS
    for (long long c = 0; c < channels; c++) {
        int64_t before = a.zeros;
        for (long long o = 0; o < outer; o++) span(x + (o * channels + c) * inner, inner, &a, avx2);
        dead += (a.zeros - before == outer * inner);
    }
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(ddddLL)", (double)a.lo, (double)a.hi, a.sum, a.sumsq,
                         (long long)a.zeros, dead);
}

static PyMethodDef methods[] = {
    {"moments", (PyCFunction)(void (*)(void))moments, METH_FASTCALL,
     "moments(address, outer, channels, inner) -> (min, max, sum, sumsq, zeros, dead)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fvis._moments", "Fused single-pass statistics of float32 data.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__moments(void) { return PyModule_Create(&module); }
