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
#include <structmember.h>
#include <math.h>
#include <stdint.h>

#include "_moments.h"

#define BLOCK 4096 /* elements per float32 partial sum */

/* Portable path: one channel at a time. */
static void moments_scalar(const float *x, int64_t outer, int64_t channels, int64_t inner,
                           result_t *r)
{
    for (int64_t c = 0; c < channels; c++) {
        int64_t zeros = 0;
        for (int64_t o = 0; o < outer; o++) {
            const float *p = x + (o * channels + c) * inner;
            for (int64_t i = 0; i < inner; i++) {
                float v = p[i];
                if (v < r->lo) r->lo = v;
                if (v > r->hi) r->hi = v;
                r->sum += v;
                r->sumsq += (double)v * v;
                zeros += (v == 0.0f);
            }
        }
        r->zeros += zeros;
        r->dead += (zeros == outer * inner);
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

/* The vector accumulators live across channels: with small maps (7x7) a per-channel
 * reduction of min, max and sums would cost more than the data. Float32 lane sums are moved
 * into float64 every BLOCK elements, so they never add up more than BLOCK / 8 values. Zeros
 * are counted per channel (int32 lanes, folded into int64 at every flush and channel end). */
typedef struct {
    __m256 lo, hi, s, q;
    __m256i z;
} lanes_t;

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static double lanes_sum(__m256 v)
{
    float t[8];
    double s = 0;
    _mm256_storeu_ps(t, v);
    for (int k = 0; k < 8; k++) s += t[k];
    return s;
}

AVX2 static int64_t lanes_count(__m256i z)
{
    int32_t t[8];
    int64_t s = 0;
    _mm256_storeu_si256((__m256i *)t, z);
    for (int k = 0; k < 8; k++) s += t[k];
    return s;
}

/* Sums into float64 (result) and zero counts into the channel's int64 counter. */
AVX2 static void flush(lanes_t *a, result_t *r, int64_t *channel_zeros)
{
    r->sum += lanes_sum(a->s);
    r->sumsq += lanes_sum(a->q);
    *channel_zeros += lanes_count(a->z);
    a->s = a->q = _mm256_setzero_ps();
    a->z = _mm256_setzero_si256();
}

/* Six operations per 8 values; the comparison gives -1 per zero lane. */
AVX2 static inline void step(lanes_t *a, __m256 v)
{
    a->lo = _mm256_min_ps(v, a->lo); /* v NaN: keeps a->lo */
    a->hi = _mm256_max_ps(v, a->hi);
    a->s = _mm256_add_ps(a->s, v);
    a->q = _mm256_fmadd_ps(v, v, a->q);
    a->z = _mm256_sub_epi32(a->z, _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_EQ_OQ)));
}

/* The last inner % 8 values of a run: masked load (0.0 elsewhere), neutral min and max. */
AVX2 static inline void step_tail(lanes_t *a, const float *p, __m256i tail)
{
    const __m256 active = _mm256_castsi256_ps(tail);
    __m256 v = _mm256_maskload_ps(p, tail);
    a->lo = _mm256_min_ps(_mm256_blendv_ps(_mm256_set1_ps(INFINITY), v, active), a->lo);
    a->hi = _mm256_max_ps(_mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, active), a->hi);
    a->s = _mm256_add_ps(a->s, v);
    a->q = _mm256_fmadd_ps(v, v, a->q);
    __m256 eq = _mm256_and_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_EQ_OQ), active);
    a->z = _mm256_sub_epi32(a->z, _mm256_castps_si256(eq));
}

AVX2 static void moments_avx2(const float *x, int64_t outer, int64_t channels, int64_t inner,
                              result_t *r)
{
    /* two sets of accumulators: independent chains hide the latency of min, max and add */
    lanes_t a = {_mm256_set1_ps(INFINITY), _mm256_set1_ps(-INFINITY), _mm256_setzero_ps(),
                 _mm256_setzero_ps(), _mm256_setzero_si256()};
    lanes_t b = a;
    const int64_t full = inner / 8 * 8;
    const int rest = (int)(inner - full);
    int32_t bits[8];
    for (int k = 0; k < 8; k++) bits[k] = k < rest ? -1 : 0;
    const __m256i tail = _mm256_loadu_si256((const __m256i *)bits);
    int64_t pending = 0; /* values in the float32 lanes since the last flush, a multiple of 8 */
    for (int64_t c = 0; c < channels; c++) {
        int64_t zeros = 0;
        for (int64_t o = 0; o < outer; o++) {
            const float *p = x + (o * channels + c) * inner;
            for (int64_t i = 0; i < full;) {
                int64_t stop = i + (BLOCK - pending) < full ? i + (BLOCK - pending) : full;
                pending += stop - i;
                for (; i + 16 <= stop; i += 16) {
                    step(&a, _mm256_loadu_ps(p + i));
                    step(&b, _mm256_loadu_ps(p + i + 8));
                }
                if (i < stop) {
                    step(&a, _mm256_loadu_ps(p + i));
                    i += 8;
                }
                if (pending >= BLOCK) {
                    flush(&a, r, &zeros);
                    flush(&b, r, &zeros);
                    pending = 0;
                }
            }
            if (rest) {
                step_tail(&a, p + full, tail);
                if ((pending += 8) >= BLOCK) {
                    flush(&a, r, &zeros);
                    flush(&b, r, &zeros);
                    pending = 0;
                }
            }
        }
        zeros += lanes_count(_mm256_add_epi32(a.z, b.z));
        a.z = b.z = _mm256_setzero_si256();
        r->zeros += zeros;
        r->dead += (zeros == outer * inner);
    }
    flush(&a, r, &r->zeros); /* zero counts are already folded in: these add 0 */
    flush(&b, r, &r->zeros);
    float t[8];
    _mm256_storeu_ps(t, _mm256_min_ps(a.lo, b.lo));
    for (int k = 0; k < 8; k++) r->lo = t[k] < r->lo ? t[k] : r->lo;
    _mm256_storeu_ps(t, _mm256_max_ps(a.hi, b.hi));
    for (int k = 0; k < 8; k++) r->hi = t[k] > r->hi ? t[k] : r->hi;
}
#endif

static int has_simd(void)
{
#ifdef HAVE_AVX2_PATH
    static int avx2 = -1;
    if (avx2 < 0) avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return avx2;
#else
    return 0;
#endif
}

void fvis_moments(const float *x, int64_t outer, int64_t channels, int64_t inner,
                  result_t *r, int allow_simd)
{
#ifdef HAVE_AVX2_PATH
    if (allow_simd && has_simd()) {
        moments_avx2(x, outer, channels, inner, r);
        return;
    }
#else
    (void)allow_simd;
#endif
    moments_scalar(x, outer, channels, inner, r);
}

/* moments(address, outer, channels, inner[, simd]) -> (min, max, sum, sumsq, zeros, dead)
 * address: data_ptr() of a contiguous float32 CPU tensor of outer * channels * inner values,
 * kept alive by the caller for the duration of the call. simd=0 forces the portable loop
 * (tests compare both). */
static PyObject *moments(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "moments(address, outer, channels, inner[, simd])");
        return NULL;
    }
    int allow_simd = nargs == 5 ? PyObject_IsTrue(args[4]) : 1;
    if (allow_simd < 0) return NULL;
    const float *x = (const float *)PyLong_AsVoidPtr(args[0]);
    if (PyErr_Occurred()) return NULL;
    long long outer = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    long long channels = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    long long inner = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (x == NULL || outer < 1 || channels < 1 || inner < 1 ||
        outer > INT64_MAX / channels || outer * channels > INT64_MAX / inner) {
        PyErr_SetString(PyExc_ValueError, "moments: empty or invalid tensor");
        return NULL;
    }
    result_t r = {0.0, 0.0, INFINITY, -INFINITY, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    fvis_moments(x, outer, channels, inner, &r, allow_simd);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(ddddLL)", (double)r.lo, (double)r.hi, r.sum, r.sumsq,
                         (long long)r.zeros, (long long)r.dead);
}

/* The mean and sample standard deviation fvis.stats._mean_std computes in its usual case,
 * with the same double operations in the same order (so the same bits as the Python code):
 * only where the values are finite and that case applies, else 0 (the caller then runs the
 * Python code, which also has the second pass). No fused multiply-add: contraction would
 * change the last bit. */
#if defined(__clang__)
#define NO_CONTRACT
#elif defined(__GNUC__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_CONTRACT
#endif

NO_CONTRACT int fvis_usual_mean_std(double lo, double hi, double sum, double sumsq,
                                    long long numel, double *mean, double *std)
{
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    if (!(-INFINITY < lo && lo <= hi && hi < INFINITY && isfinite(sum + sumsq))) return 0;
    double n = (double)numel;
    double m = sum / n;
    double spread = sumsq / n - m * m;
    double peak = hi > -lo ? hi : -lo; /* Python's max(-lo, hi) */
    if (!(isfinite(spread) && spread >= 1e-3 * m * m) || (0 < peak && peak < 1e-18)) return 0;
    double kept = 0.0 > spread ? 0.0 : spread; /* max(spread, 0.0) */
    double denominator = numel - 1 > 1 ? (double)(numel - 1) : 1.0;
    *mean = m;
    *std = sqrt(kept * n / denominator);
    return 1;
}

/* summary(address, outer, channels, inner) -> (min, max, sum, sumsq, zeros, dead, mean, std):
 * moments() plus the mean and std of its usual case (None, None where Python must decide).
 * Small tensors keep the GIL: releasing it costs more than reading them. */
static PyObject *summary(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "summary(address, outer, channels, inner)");
        return NULL;
    }
    const float *x = (const float *)PyLong_AsVoidPtr(args[0]);
    if (PyErr_Occurred()) return NULL;
    long long outer = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    long long channels = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    long long inner = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (x == NULL || outer < 1 || channels < 1 || inner < 1 ||
        outer > INT64_MAX / channels || outer * channels > INT64_MAX / inner) {
        PyErr_SetString(PyExc_ValueError, "summary: empty or invalid tensor");
        return NULL;
    }
    result_t r = {0.0, 0.0, INFINITY, -INFINITY, 0, 0};
    long long numel = outer * channels * inner;
    if (numel < (1 << 16)) {
        fvis_moments(x, outer, channels, inner, &r, 1);
    } else {
        Py_BEGIN_ALLOW_THREADS
        fvis_moments(x, outer, channels, inner, &r, 1);
        Py_END_ALLOW_THREADS
    }
    double lo = (double)r.lo, hi = (double)r.hi, mean = 0.0, std = 0.0;
    if (fvis_usual_mean_std(lo, hi, r.sum, r.sumsq, numel, &mean, &std)) {
        return Py_BuildValue("(ddddLLdd)", lo, hi, r.sum, r.sumsq, (long long)r.zeros,
                             (long long)r.dead, mean, std);
    }
    return Py_BuildValue("(ddddLLOO)", lo, hi, r.sum, r.sumsq, (long long)r.zeros,
                         (long long)r.dead, Py_None, Py_None);
}

/* Records built without their Python __init__ (fvis/fastbuild.py): a frozen slotted dataclass
 * instance is object.__new__(cls) with each slot set; its generated __init__ does that through
 * object.__setattr__ one field at a time (about 1 us for 12 fields, once per captured tensor).
 *
 * slot_offsets(descriptors) -> offsets: the memory offset of each slot's member descriptor
 * (checked to be an object slot). new_slotted(cls, offsets, values) -> an instance of cls
 * with slot i set to values[i]. fastbuild checks once that the offsets cover every slot of
 * cls and no other, so every slot is set and nothing outside the instance is written. */
static PyObject *slot_offsets(PyObject *self, PyObject *descriptors)
{
    if (!PyTuple_Check(descriptors)) {
        PyErr_SetString(PyExc_TypeError, "slot_offsets: a tuple of slot descriptors");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(descriptors);
    PyObject *offsets = PyTuple_New(n);
    if (offsets == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(descriptors, i);
        if (!Py_IS_TYPE(item, &PyMemberDescr_Type)
            || ((PyMemberDescrObject *)item)->d_member->type != T_OBJECT_EX) {
            Py_DECREF(offsets);
            PyErr_SetString(PyExc_TypeError, "slot_offsets: not an object slot");
            return NULL;
        }
        PyObject *offset = PyLong_FromSsize_t(((PyMemberDescrObject *)item)->d_member->offset);
        if (offset == NULL) {
            Py_DECREF(offsets);
            return NULL;
        }
        PyTuple_SET_ITEM(offsets, i, offset);
    }
    return offsets;
}

static PyObject *new_slotted(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyType_Check(args[0]) || !PyTuple_Check(args[1]) || !PyTuple_Check(args[2])
        || PyTuple_GET_SIZE(args[1]) != PyTuple_GET_SIZE(args[2])) {
        PyErr_SetString(PyExc_TypeError, "new_slotted(cls, offsets, values)");
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)args[0];
    PyObject *obj = type->tp_alloc(type, 0);
    if (obj == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(args[1]);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t offset = PyLong_AsSsize_t(PyTuple_GET_ITEM(args[1], i));
        if (offset < (Py_ssize_t)sizeof(PyObject) || offset > type->tp_basicsize - (Py_ssize_t)sizeof(PyObject *)) {
            Py_DECREF(obj);
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "new_slotted: offset outside the instance");
            }
            return NULL;
        }
        PyObject *value = PyTuple_GET_ITEM(args[2], i);
        PyObject **slot = (PyObject **)((char *)obj + offset);
        Py_INCREF(value);
        Py_XSETREF(*slot, value);
    }
    return obj;
}

static PyMethodDef methods[] = {
    {"moments", (PyCFunction)(void (*)(void))moments, METH_FASTCALL,
     "moments(address, outer, channels, inner[, simd]) -> (min, max, sum, sumsq, zeros, dead)"},
    {"summary", (PyCFunction)(void (*)(void))summary, METH_FASTCALL,
     "summary(address, outer, channels, inner) -> moments plus (mean, std) or (None, None)"},
    {"slot_offsets", (PyCFunction)slot_offsets, METH_O,
     "slot_offsets(descriptors) -> the offset of each object slot"},
    {"new_slotted", (PyCFunction)(void (*)(void))new_slotted, METH_FASTCALL,
     "new_slotted(cls, offsets, values) -> cls instance with its slots set, no __init__"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fvis._moments", "Fused single-pass statistics of float32 data.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__moments(void)
{
    PyObject *m = PyModule_Create(&module);
    /* SIMD: whether this CPU takes the vector path. The scalar loop is single-threaded and can
     * be slower than torch's multi-threaded reductions, so fvis uses it only with SIMD. */
    if (m != NULL && (PyModule_AddIntConstant(m, "SIMD", has_simd()) < 0 || fvis_add_trace(m) < 0 ||
                      fvis_add_walk(m) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
