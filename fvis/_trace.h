/* What the C files of the hook fast path share: the session's hooks (_trace.c), the tensor
 * facts and records they build (_facts.c) and the end of a capture (_trace_end.c). Internal
 * to fvis._moments (built with hidden symbols). */
#ifndef FVIS_TRACE_H
#define FVIS_TRACE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_moments.h"

/* The order of _Live's slots as fvis.fasthooks passes their offsets. */
enum {
    LIVE_CALL, LIVE_CALL_ID, LIVE_DEVICE, LIVE_DTYPE, LIVE_FACTS, LIVE_KEY, LIVE_LAST_GRAD_FN,
    LIVE_LAST_VERSION, LIVE_LAYER, LIVE_PATH, LIVE_REF, LIVE_SAVED, LIVE_SEQ, LIVE_SHAPE,
    LIVE_STATS, LIVE_TOKEN_GRID, LIVE_VALUES, LIVE_N
};
#define STATS_N 12
#define CAPTURE_N 14 /* Capture's fields, in order */
#define FACTS_N 9    /* GradFacts' fields, in order */
#define RECORD_N 15

/* What fvis.fasthooks.configure hands over once: classes, slot offsets, torch callables. */
typedef struct {
    int ready;
    PyTypeObject *tensor, *parameter, *record, *frame, *live, *stats, *capture, *facts;
    Py_ssize_t live_at[LIVE_N], stats_at[STATS_N], capture_at[CAPTURE_N];
    Py_ssize_t facts_at[FACTS_N];
    PyObject *grad_enabled, *inference_mode, *float32, *sample_values, *gradient_edge;
    PyObject *grad_fn_name;
    PyObject *dtype_name, *tensor_stats, *stats_module, *empty, *cpu;
    PyObject *dtypes; /* dtype -> (floating, name) */
    PyObject *node_names; /* grad_fn class -> name (node_name_of) */
} trace_cfg_t;
extern trace_cfg_t cfg;

/* Interned attribute and method names (_trace.c). */
extern PyObject *s_requires_grad, *s_grad_fn, *s_shape, *s_dtype, *s_is_cpu,
    *s_version, *s_output_nr, *s_is_inference, *s_data_ptr, *s_is_contiguous, *s_is_neg,
    *s_is_zerotensor, *s_name, *s_parameters, *s_modules, *s_inplace, *s_is_floating_point, *s_is_complex,
    *s_pre, *s_post, *s_snapshot, *s_check_versions, *s_channel_dim, *s_token_grid,
    *s_deliver, *s_native;

typedef struct {
    PyObject_HEAD
    PyObject *names, *targets, *calls, *trace, *stack, *params_grad, *live, *done, *edges;
    PyObject *cut_outputs, *decided, *on_capture, *sample;
    PyObject *replaying, *hold, *want_inputs, *want_outputs, *keep_values, *callback_values;
    PyObject *keep_tensors, *defer_cpu, *in_hook, *in_place_ops;
    Py_ssize_t next_call_id;
    Py_ssize_t fast_calls; /* module calls recorded here, not handed to Python (for tests) */
} Tracer;

#define TRACER_OBJECTS(X)                                                                       \
    X(names) X(targets) X(calls) X(trace) X(stack) X(params_grad) X(live) X(done) X(edges)     \
    X(cut_outputs) X(decided) X(on_capture) X(sample) X(replaying) X(hold) X(want_inputs)      \
    X(want_outputs) X(keep_values) X(callback_values) X(keep_tensors) X(defer_cpu) X(in_hook)  \
    X(in_place_ops)

/* _facts.c: flags, tensor facts, records. */
PyObject *need(PyObject *value, const char *name);
#define NEED(self, name) need((self)->name, #name)
int truth(PyObject *value);
int call_truth(PyObject *callable);

/* Tensor facts read through the descriptors of torch.Tensor itself (fvis.fasthooks hands the
 * classes over once), for exact Tensor and Parameter objects only: a getset's getter called
 * directly and a method descriptor called with the tensor, without the attribute lookup and
 * the bound method each read otherwise makes (about 40-80 ns, and a record reads some twenty).
 * The getters are torch's own, so what they return is what ``tensor.name`` returns. A
 * subclass, or a name the classes do not define as a plain getset or method (one torch
 * overrides in Python), takes the usual getattr. */
enum {
    T_REQUIRES_GRAD, T_GRAD_FN, T_SHAPE, T_DTYPE, T_IS_CPU, T_VERSION, T_OUTPUT_NR,
    T_IS_INFERENCE, T_IS_CONTIGUOUS, T_IS_NEG, T_IS_ZEROTENSOR, T_DATA_PTR, T_N
};
#define T_FIRST_METHOD T_IS_INFERENCE
void find_tensor_descriptors(void);
PyObject *tensor_fact(PyObject *tensor, int which);
int tensor_truth(PyObject *tensor, int which);
int is_plain_tensor(PyObject *obj);

PyObject *new_named(PyTypeObject *type, Py_ssize_t n, PyObject **items);
PyObject *new_slots(PyTypeObject *type, const Py_ssize_t *offsets, Py_ssize_t n, PyObject **items);
static inline PyObject *new_bool(int value) { return Py_NewRef(value ? Py_True : Py_False); }
PyObject *untracked(PyObject *obj);
/* A record that holds tensors (a _Live item, its strong reference, a gradient edge) but that
 * nothing it reaches can refer back to: no cycle can pass through it. Untracked, it still
 * keeps what it holds alive for the collector (a reference from an untracked object counts
 * as one from outside). */
#define untracked_holder untracked
/* No reference a collection could follow: not a GC type at all (ints, strs, floats, bools,
 * None: checked inline), or not tracked. */
static inline int atomic(PyObject *obj)
{
    return obj == NULL || !PyObject_IS_GC(obj) || !PyObject_GC_IsTracked(obj);
}
PyObject *untracked_tuple(PyObject *obj);

PyObject *dtype_facts(PyObject *dtype);
PyObject *fast_stats(PyObject *tensor, PyObject *shape, long axis);
PyObject *node_name_of(PyObject *node);
PyObject *version_or_inference(PyObject *tensor, int inference_mode, int *inference);
PyObject *node_edge(PyObject *node, PyObject *tensor);
PyObject *plain_shape(PyObject *size);
PyObject *one_shape(PyObject *shape);

/* _trace.c: a session method called with the tracer first (the Python code decides). */
PyObject *trace_fallback(Tracer *self, PyObject *method, PyObject *const *args, Py_ssize_t n);

/* _snapshot.c: a module's tensor output captured (path ""); 0, or -1 with an exception. */
int trace_snapshot(Tracer *self, PyObject *key, PyObject *layer, PyObject *record,
                   PyObject *tensor, PyObject *shape, PyObject *dtype_name, int requires_grad,
                   int float32);

/* _trace_config.c: configure_trace and the interned names, added to the module. */
int fvis_add_trace_config(PyObject *module);

/* _trace_end.c: the methods that end a capture. */
static inline PyObject **live_slot(PyObject *item, int which)
{
    return (PyObject **)((char *)item + cfg.live_at[which]);
}
PyObject *tracer_check_versions(Tracer *self, PyObject *unused);
PyObject *tracer_captures(Tracer *self, PyObject *const *args, Py_ssize_t nargs);

#endif
