/*
 * What the hook fast path (_trace.c) reads and builds: the session's flags, a tensor's facts
 * read through torch.Tensor's own descriptors, the records (tuples and slotted instances,
 * kept out of the cycle collector), a dtype's facts, the statistics of a usual tensor and the
 * name of a grad_fn.
 */
#include "_trace.h"

/* A member read before Python set it: the session is not initialized. */
PyObject *need(PyObject *value, const char *name)
{
    if (value == NULL) PyErr_Format(PyExc_AttributeError, "Tracer.%s is not set", name);
    return value;
}

/* Truth of a member that holds a bool (or any object); -1 on error. */
int truth(PyObject *value)
{
    if (value == Py_True) return 1;
    if (value == Py_False || value == Py_None) return 0;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "Tracer: a flag is not set");
        return -1;
    }
    return PyObject_IsTrue(value);
}

int call_truth(PyObject *callable)
{
    PyObject *r = PyObject_CallNoArgs(callable);
    if (r == NULL) return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

static int attr_truth(PyObject *obj, PyObject *name)
{
    PyObject *r = PyObject_GetAttr(obj, name);
    if (r == NULL) return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

static PyObject **tensor_names[T_N] = {
    &s_requires_grad, &s_grad_fn, &s_shape, &s_dtype, &s_is_cpu, &s_version,
    &s_output_nr, &s_is_inference, &s_is_contiguous, &s_is_neg, &s_is_zerotensor, &s_data_ptr,
};
static PyObject *no_args; /* (), for torch's parsed methods (call_method) */
static PyObject *tensor_descr[T_N]; /* borrowed from the classes, which cfg keeps */
static unsigned int looked_up_in[2];  /* the classes' version tags when they were looked up */

void find_tensor_descriptors(void)
{
    if (no_args == NULL) no_args = PyTuple_New(0);
    for (int i = 0; i < T_N; i++) {
        PyObject *d = _PyType_Lookup(cfg.tensor, *tensor_names[i]);
        int usable = d != NULL && d == _PyType_Lookup(cfg.parameter, *tensor_names[i]) &&
                     (i < T_FIRST_METHOD ? Py_IS_TYPE(d, &PyGetSetDescr_Type)
                                         : Py_IS_TYPE(d, &PyMethodDescr_Type));
        tensor_descr[i] = usable ? d : NULL;
    }
    looked_up_in[0] = cfg.tensor->tp_version_tag;
    looked_up_in[1] = cfg.parameter->tp_version_tag;
}

/* Whether the classes are as they were looked up: CPython gives a class a new version tag
 * whenever it or a base changes (``torch.Tensor.data_ptr = ...``); 0 is no tag. */
static int descriptors_current(void)
{
    return looked_up_in[0] != 0 && looked_up_in[0] == cfg.tensor->tp_version_tag &&
           looked_up_in[1] != 0 && looked_up_in[1] == cfg.parameter->tp_version_tag;
}

/* A method descriptor of torch.Tensor called on self with no arguments, its C function called
 * directly for the two kinds torch's tensor methods are (no arguments; positional and keyword
 * arguments, parsed by torch): the method call's own dispatch and, for the second kind, its
 * argument tuple were a fifth of what the call cost. */
static PyObject *call_method(PyObject *descr, PyObject *self)
{
    PyMethodDef *m = ((PyMethodDescrObject *)descr)->d_method;
    int kind = m->ml_flags & (METH_VARARGS | METH_FASTCALL | METH_NOARGS | METH_O | METH_KEYWORDS
                              | METH_METHOD);
    if (kind == METH_NOARGS) return m->ml_meth(self, NULL);
    if (kind == (METH_VARARGS | METH_KEYWORDS) && no_args != NULL) {
        return ((PyCFunctionWithKeywords)(void (*)(void))m->ml_meth)(self, no_args, NULL);
    }
    return PyObject_Vectorcall(descr, &self, 1, NULL);
}

/* tensor.<name> (a getset) or tensor.<name>() (a method), as a new reference. A method set
 * on one tensor object itself (``t.is_contiguous = f``) is not seen: torch never does that,
 * and for data_ptr the real address is what the statistics must read. */
PyObject *tensor_fact(PyObject *tensor, int which)
{
    if (!descriptors_current()) find_tensor_descriptors();
    PyObject *d = tensor_descr[which];
    if (d != NULL && is_plain_tensor(tensor)) {
        if (which < T_FIRST_METHOD) {
            PyGetSetDef *g = ((PyGetSetDescrObject *)d)->d_getset;
            return g->get(tensor, g->closure);
        }
        return call_method(d, tensor);
    }
    return which < T_FIRST_METHOD ? PyObject_GetAttr(tensor, *tensor_names[which])
                                  : PyObject_CallMethodNoArgs(tensor, *tensor_names[which]);
}

int tensor_truth(PyObject *tensor, int which)
{
    PyObject *r = tensor_fact(tensor, which);
    if (r == NULL) return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

int is_plain_tensor(PyObject *obj)
{
    return Py_IS_TYPE(obj, cfg.tensor) || Py_IS_TYPE(obj, cfg.parameter);
}

/* A tuple subclass (a NamedTuple) with its items, which it steals; NULL items fail it. */
PyObject *new_named(PyTypeObject *type, Py_ssize_t n, PyObject **items)
{
    PyObject *obj = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (items[i] == NULL) goto fail;
    }
    obj = type == &PyTuple_Type ? PyTuple_New(n) : type->tp_alloc(type, n);
    if (obj == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(obj, i, items[i]);
    return obj;
fail:
    for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(items[i]);
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_SystemError, "Tracer: a field is not set");
    return NULL;
}

/* A slotted instance with slot i at offsets[i] set to items[i] (stolen). */
PyObject *new_slots(PyTypeObject *type, const Py_ssize_t *offsets, Py_ssize_t n,
                           PyObject **items)
{
    PyObject *obj = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (items[i] == NULL) goto fail;
    }
    obj = type->tp_alloc(type, 0);
    if (obj == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject **slot = (PyObject **)((char *)obj + offsets[i]);
        Py_XSETREF(*slot, items[i]);
    }
    return obj;
fail:
    for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(items[i]);
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_SystemError, "Tracer: a field is not set");
    return NULL;
}

/* The records built here hold only numbers, strings, None and other such records: they can
 * never be part of a reference cycle, so the cycle collector need not walk them. Untracking
 * them (as CPython does lazily for tuples of atoms) keeps each collection during a capture
 * from walking every record made so far; without it the collector took about a quarter of a
 * capture's time with every leaf of a small model captured. */
PyObject *untracked(PyObject *obj)
{
    if (obj != NULL && PyObject_GC_IsTracked(obj)) PyObject_GC_UnTrack(obj);
    return obj;
}


/* A tuple of atoms, untracked; any other object as it is. */
PyObject *untracked_tuple(PyObject *obj)
{
    if (obj == NULL || !PyTuple_Check(obj)) return obj;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(obj); i++) {
        if (!atomic(PyTuple_GET_ITEM(obj, i))) return obj;
    }
    return untracked(obj);
}

/* (floating, name) of a dtype, remembered: borrowed. */
PyObject *dtype_facts(PyObject *dtype)
{
    PyObject *known = PyDict_GetItemWithError(cfg.dtypes, dtype);
    if (known != NULL || PyErr_Occurred()) return known;
    int floating = attr_truth(dtype, s_is_floating_point);
    if (floating < 0) return NULL;
    if (!floating) {
        floating = attr_truth(dtype, s_is_complex);
        if (floating < 0) return NULL;
    }
    PyObject *name = PyObject_CallOneArg(cfg.dtype_name, dtype);
    if (name == NULL) return NULL;
    PyObject *facts = Py_BuildValue("(NN)", new_bool(floating), name);
    if (facts == NULL || PyDict_SetItem(cfg.dtypes, dtype, facts) < 0) {
        Py_XDECREF(facts);
        return NULL;
    }
    Py_DECREF(facts);
    return facts;
}

/* Dead channels on the last dim of rows x channels values: channels that are zero in every
 * row (fvis.stats._dead_channels for finite values); -1 when out of memory. */
static int64_t dead_last(const float *x, int64_t rows, int64_t channels)
{
    char *alive = PyMem_Calloc((size_t)channels, 1);
    if (alive == NULL) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * channels;
        for (int64_t c = 0; c < channels; c++) alive[c] |= row[c] != 0.0f;
    }
    int64_t dead = 0;
    for (int64_t c = 0; c < channels; c++) dead += !alive[c];
    PyMem_Free(alive);
    return dead;
}

/* fvis.stats._native_stats for a finite contiguous float32 host tensor (the caller read the
 * dtype), or Py_None (a new reference) where fvis.stats.tensor_stats must decide; NULL on
 * error. */
/* numel as an int, the previous call's object where the same (same-shaped layers in a row) */
static PyObject *count_of(long long numel)
{
    static PyObject *last;
    static long long last_numel = -1;
    if (last != NULL && numel == last_numel) return Py_NewRef(last);
    PyObject *count = PyLong_FromLongLong(numel);
    if (count != NULL) {
        Py_XSETREF(last, Py_NewRef(count));
        last_numel = numel;
    }
    return count;
}

/* zeros / numel as a float; no zero at all (most maps before a ReLU) shares one 0.0. */
static PyObject *zero_fraction(long long zeros, long long numel)
{
    static PyObject *none_zero;
    if (zeros != 0) return PyFloat_FromDouble((double)zeros / (double)numel);
    if (none_zero == NULL && (none_zero = PyFloat_FromDouble(0.0)) == NULL) return NULL;
    return Py_NewRef(none_zero);
}

PyObject *fast_stats(PyObject *tensor, PyObject *shape, long axis)
{
    /* fvis.stats._native, read from the module's dict (tests switch it off) */
    PyObject *native = PyDict_GetItemWithError(PyModule_GetDict(cfg.stats_module), s_native);
    if (native == NULL) return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    if (native == Py_None || !is_plain_tensor(tensor)) return Py_NewRef(Py_None);
    Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
    long long numel = 1;
    for (Py_ssize_t i = 0; i < ndim; i++) {
        long long size = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
        if (size == -1 && PyErr_Occurred()) return NULL;
        if (size <= 0 || numel > INT64_MAX / size) return Py_NewRef(Py_None);
        numel *= size;
    }
    int contiguous = tensor_truth(tensor, T_IS_CONTIGUOUS);
    if (contiguous <= 0) return contiguous < 0 ? NULL : Py_NewRef(Py_None);
    int neg = tensor_truth(tensor, T_IS_NEG);
    if (neg) return neg < 0 ? NULL : Py_NewRef(Py_None);
    int zero = tensor_truth(tensor, T_IS_ZEROTENSOR);
    if (zero) return zero < 0 ? NULL : Py_NewRef(Py_None);
    /* fvis.stats._channel_dim: None below 3 dims, else 1 or the last dim. */
    long dim = -1;
    if (ndim >= 3) {
        dim = axis % (long)ndim;
        if (dim < 0) dim += (long)ndim;
        if (dim != 1 && dim != (long)ndim - 1) dim = 1;
    }
    int first = dim == 1;
    long long channels = dim >= 0 ? PyLong_AsLongLong(PyTuple_GET_ITEM(shape, dim)) : 0;
    long long outer = first ? PyLong_AsLongLong(PyTuple_GET_ITEM(shape, 0)) : 1;
    long long inner = first ? numel / (outer * channels) : numel;
    PyObject *address = tensor_fact(tensor, T_DATA_PTR);
    if (address == NULL) return NULL;
    const float *x = (const float *)PyLong_AsVoidPtr(address);
    Py_DECREF(address);
    if (x == NULL) return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    result_t r = {0.0, 0.0, INFINITY, -INFINITY, 0, 0};
    if (numel < (1 << 16)) { /* as fvis._moments.summary: small tensors keep the GIL */
        fvis_moments(x, outer, first ? channels : 1, inner, &r, 1);
    } else {
        Py_BEGIN_ALLOW_THREADS
        fvis_moments(x, outer, first ? channels : 1, inner, &r, 1);
        Py_END_ALLOW_THREADS
    }
    double lo = (double)r.lo, hi = (double)r.hi, mean = 0.0, std = 0.0;
    if (!fvis_usual_mean_std(lo, hi, r.sum, r.sumsq, numel, &mean, &std)) {
        return Py_NewRef(Py_None); /* NaN, Inf, or cancellation: Python's second pass */
    }
    int64_t dead = r.dead;
    if (dim >= 0 && !first) dead = r.zeros ? dead_last(x, numel / channels, channels) : 0;
    if (dead < 0) return PyErr_NoMemory();
    PyObject *items[STATS_N] = {
        count_of(numel), PyFloat_FromDouble(lo), PyFloat_FromDouble(hi),
        PyFloat_FromDouble(mean), PyFloat_FromDouble(std),
        zero_fraction(r.zeros, numel), PyLong_FromLong(0),
        PyLong_FromLong(0), PyLong_FromLong(0), PyLong_FromLongLong(channels),
        PyLong_FromLongLong(channels ? dead : 0),
        dim >= 0 ? PyLong_FromLong(dim) : Py_NewRef(Py_None),
    };
    return untracked(new_slots(cfg.stats, cfg.stats_at, STATS_N, items));
}

/* ``tensor._version``, and in *inference whether the tensor is an inference tensor (then the
 * version is None). Out of inference mode the version is read first: only an inference tensor
 * has no version counter (c10 refuses one to it), so a version read means "not inference" and
 * the is_inference() call (a method, as dear as three getters) is made only where the read
 * failed. */
PyObject *version_or_inference(PyObject *tensor, int inference_mode, int *inference)
{
    if (inference_mode) {
        *inference = tensor_truth(tensor, T_IS_INFERENCE);
        if (*inference < 0) return NULL;
        return *inference ? Py_NewRef(Py_None) : tensor_fact(tensor, T_VERSION);
    }
    PyObject *version = tensor_fact(tensor, T_VERSION);
    *inference = 0;
    if (version != NULL) return version;
    PyObject *type, *value, *trace;
    PyErr_Fetch(&type, &value, &trace);
    *inference = tensor_truth(tensor, T_IS_INFERENCE);
    if (*inference <= 0) { /* not the reason: the read's own error stands */
        if (*inference < 0) PyErr_Clear();
        PyErr_Restore(type, value, trace);
        *inference = 0;
        return NULL;
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(trace);
    return Py_NewRef(Py_None);
}

/* The last output shape recorded, as a plain tuple and as a record's 1-tuple of output shapes:
 * a call whose output has the same shape as the previous one's shares both (tuples of ints are
 * immutable, and runs of same-shaped layers are the rule), two objects fewer per record. */
static PyObject *last_shape, *last_shapes;

static int same_dims(PyObject *size, PyObject *shape)
{
    Py_ssize_t n = PyTuple_GET_SIZE(size);
    if (n != PyTuple_GET_SIZE(shape)) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyTuple_GET_ITEM(size, i), *b = PyTuple_GET_ITEM(shape, i);
        if (a == b) continue;
        if (!PyLong_CheckExact(a) || !PyLong_CheckExact(b)) return 0;
        int overflow_a, overflow_b;
        long long x = PyLong_AsLongLongAndOverflow(a, &overflow_a);
        long long y = PyLong_AsLongLongAndOverflow(b, &overflow_b);
        if (overflow_a || overflow_b || x != y) return 0;
    }
    return 1;
}

/* tuple(size) for a torch.Size (a tuple subclass), shared with the previous call's where equal. */
PyObject *plain_shape(PyObject *size)
{
    if (!PyTuple_Check(size)) return untracked_tuple(PySequence_Tuple(size));
    if (last_shape != NULL && same_dims(size, last_shape)) return Py_NewRef(last_shape);
    PyObject *shape = untracked_tuple(PyTuple_GetSlice(size, 0, PY_SSIZE_T_MAX));
    if (shape != NULL) Py_XSETREF(last_shape, Py_NewRef(shape));
    return shape;
}

/* (shape,), the same object for the same shape object as the previous call's. */
PyObject *one_shape(PyObject *shape)
{
    if (last_shapes != NULL && PyTuple_GET_ITEM(last_shapes, 0) == shape) {
        return Py_NewRef(last_shapes);
    }
    PyObject *shapes = untracked_tuple(PyTuple_Pack(1, shape));
    if (shapes != NULL) Py_XSETREF(last_shapes, Py_NewRef(shapes));
    return shapes;
}

/* (node, tensor.output_nr): the gradient edge of a tensor whose grad_fn is node. */
PyObject *node_edge(PyObject *node, PyObject *tensor)
{
    PyObject *nr = tensor_fact(tensor, T_OUTPUT_NR);
    if (nr == NULL) return NULL;
    PyObject *edge = PyTuple_New(2);
    if (edge == NULL) {
        Py_DECREF(nr);
        return NULL;
    }
    PyTuple_SET_ITEM(edge, 0, Py_NewRef(node));
    PyTuple_SET_ITEM(edge, 1, nr);
    return edge;
}

/* grad_fn.name(), remembered per node class where every node of the class is named after it:
 * each backward node torch generates has a class of its own, and a Python autograd.Function's
 * node is named after its class; the catch-all class of other C++ nodes ("CppFunction") is
 * named otherwise and is asked every time. */
PyObject *node_name_of(PyObject *node)
{
    PyObject *type = (PyObject *)Py_TYPE(node);
    PyObject *known = PyDict_GetItemWithError(cfg.node_names, type);
    if (known != NULL || PyErr_Occurred()) return Py_XNewRef(known);
    PyObject *name = PyObject_CallMethodNoArgs(node, s_name);
    PyObject *type_name = name != NULL ? PyObject_GetAttrString(type, "__name__") : NULL;
    int same = type_name != NULL && PyUnicode_Check(name) && PyUnicode_Check(type_name) &&
               PyUnicode_Compare(name, type_name) == 0;
    Py_XDECREF(type_name);
    if (name == NULL || PyErr_Occurred() || (same && PyDict_SetItem(cfg.node_names, type, name) < 0)) {
        Py_XDECREF(name);
        return NULL;
    }
    return name;
}
