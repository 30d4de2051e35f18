/*
 * What fvis.fasthooks hands the C hook path once (configure_trace: the record classes, their
 * slot offsets, the torch callables it calls), and the interned names the C files read
 * attributes and call methods by. Part of fvis/_trace.c's hook path (_trace.h).
 */
#include "_trace.h"

trace_cfg_t cfg;

PyObject *s_requires_grad, *s_grad_fn, *s_shape, *s_dtype, *s_is_cpu,
    *s_version, *s_output_nr, *s_is_inference, *s_data_ptr, *s_is_contiguous, *s_is_neg,
    *s_is_zerotensor, *s_name, *s_parameters, *s_modules, *s_inplace, *s_is_floating_point, *s_is_complex,
    *s_pre, *s_post, *s_snapshot, *s_check_versions, *s_channel_dim, *s_token_grid,
    *s_deliver, *s_native;


static int offsets_into(PyObject *tuple, Py_ssize_t *out, Py_ssize_t n, PyTypeObject *type)
{
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != n) {
        PyErr_SetString(PyExc_ValueError, "configure_trace: wrong number of slot offsets");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(tuple, i));
        if (out[i] == -1 && PyErr_Occurred()) return -1;
        if (out[i] < (Py_ssize_t)sizeof(PyObject)
            || out[i] > type->tp_basicsize - (Py_ssize_t)sizeof(PyObject *)) {
            PyErr_SetString(PyExc_ValueError, "configure_trace: offset outside the instance");
            return -1;
        }
    }
    return 0;
}

static int is_type(PyObject *obj) { return obj != NULL && PyType_Check(obj); }

/* configure_trace(classes, offsets, functions): see fvis.fasthooks.configure. */
static PyObject *configure_trace(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *tensor, *parameter, *record, *frame, *live, *stats, *capture, *facts;
    PyObject *live_at, *stats_at, *capture_at, *facts_at;
    PyObject *grad_enabled, *inference_mode, *float32, *sample_values, *gradient_edge;
    PyObject *dtype_name, *tensor_stats, *stats_module, *grad_fn_name;
    if (!PyArg_ParseTuple(args, "(OOOOOOOO)(OOOO)(OOOOOOOOO)", &tensor, &parameter, &record,
                          &frame, &live, &stats, &capture, &facts, &live_at, &stats_at,
                          &capture_at, &facts_at, &grad_enabled, &inference_mode, &float32,
                          &sample_values, &gradient_edge, &dtype_name, &tensor_stats,
                          &stats_module, &grad_fn_name)) {
        return NULL;
    }
    PyObject *types[8] = {tensor, parameter, record, frame, live, stats, capture, facts};
    for (int i = 0; i < 8; i++) {
        if (!is_type(types[i])) {
            PyErr_SetString(PyExc_TypeError, "configure_trace: classes expected");
            return NULL;
        }
    }
    if (!PyType_IsSubtype((PyTypeObject *)record, &PyTuple_Type)
        || !PyType_IsSubtype((PyTypeObject *)frame, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "configure_trace: records are NamedTuples");
        return NULL;
    }
    if (offsets_into(live_at, cfg.live_at, LIVE_N, (PyTypeObject *)live) < 0
        || offsets_into(stats_at, cfg.stats_at, STATS_N, (PyTypeObject *)stats) < 0
        || offsets_into(capture_at, cfg.capture_at, CAPTURE_N, (PyTypeObject *)capture) < 0
        || offsets_into(facts_at, cfg.facts_at, FACTS_N, (PyTypeObject *)facts) < 0) {
        cfg.ready = 0;
        return NULL;
    }
#define KEEP(field, value) Py_XSETREF(cfg.field, (void *)Py_NewRef(value));
    KEEP(tensor, tensor) KEEP(parameter, parameter) KEEP(record, record) KEEP(frame, frame)
    KEEP(live, live) KEEP(stats, stats) KEEP(capture, capture)
    KEEP(facts, facts) KEEP(grad_fn_name, grad_fn_name) KEEP(grad_enabled, grad_enabled)
    KEEP(inference_mode, inference_mode) KEEP(float32, float32)
    KEEP(sample_values, sample_values) KEEP(gradient_edge, gradient_edge)
    KEEP(dtype_name, dtype_name) KEEP(tensor_stats, tensor_stats) KEEP(stats_module, stats_module)
#undef KEEP
    Py_XSETREF(cfg.dtypes, PyDict_New());
    Py_XSETREF(cfg.node_names, PyDict_New());
    if (cfg.dtypes == NULL || cfg.node_names == NULL) return NULL;
    find_tensor_descriptors();
    cfg.ready = 1;
    Py_RETURN_NONE;
}

static PyMethodDef trace_functions[] = {
    {"configure_trace", (PyCFunction)configure_trace, METH_VARARGS,
     "configure_trace((classes), (offsets), (functions)): what the fast hooks build and call"},
    {NULL, NULL, 0, NULL},
};

/* configure_trace and the interned names, added to the extension module. */
int fvis_add_trace_config(PyObject *module)
{
    FVIS_INTERN(s_requires_grad, "requires_grad") FVIS_INTERN(s_grad_fn, "grad_fn")
    FVIS_INTERN(s_shape, "shape") FVIS_INTERN(s_dtype, "dtype") FVIS_INTERN(s_is_cpu, "is_cpu")
    FVIS_INTERN(s_version, "_version") FVIS_INTERN(s_output_nr, "output_nr")
    FVIS_INTERN(s_is_inference, "is_inference") FVIS_INTERN(s_data_ptr, "data_ptr")
    FVIS_INTERN(s_is_contiguous, "is_contiguous") FVIS_INTERN(s_is_neg, "is_neg")
    FVIS_INTERN(s_is_zerotensor, "_is_zerotensor") FVIS_INTERN(s_name, "name")
    FVIS_INTERN(s_parameters, "_parameters") FVIS_INTERN(s_modules, "_modules")
    FVIS_INTERN(s_inplace, "inplace") FVIS_INTERN(s_is_floating_point, "is_floating_point")
    FVIS_INTERN(s_is_complex, "is_complex") FVIS_INTERN(s_pre, "_pre")
    FVIS_INTERN(s_post, "_post") FVIS_INTERN(s_snapshot, "_snapshot")
    FVIS_INTERN(s_check_versions, "_check_versions") FVIS_INTERN(s_channel_dim, "_channel_dim")
    FVIS_INTERN(s_token_grid, "_token_grid") FVIS_INTERN(s_deliver, "_deliver")
    FVIS_INTERN(s_native, "_native") FVIS_INTERN(cfg.empty, "") FVIS_INTERN(cfg.cpu, "cpu")
    return PyModule_AddFunctions(module, trace_functions);
}
