/*
 * The end of a capture on the C path: the version check that sees outputs changed in place
 * after their call, and the final Capture and GradFacts records (fvis.session._Session's
 * _check_versions and result()).
 */
#include "_trace.h"

/* fast_check_versions(): fvis.session._Session._check_versions. */
PyObject *tracer_check_versions(Tracer *self, PyObject *unused)
{
    (void)unused;
    if (!NEED(self, live) || !NEED(self, done)) return NULL;
    if (!PyList_Check(self->live) || !PyList_Check(self->done)) {
        PyErr_SetString(PyExc_TypeError, "Tracer.live and .done are lists");
        return NULL;
    }
    PyObject *live = Py_NewRef(self->live);
    PyObject *still = PyList_New(0);
    if (still == NULL) goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(live); i++) {
        PyObject *item = PyList_GET_ITEM(live, i);
        if (!Py_IS_TYPE(item, cfg.live)) {
            PyErr_SetString(PyExc_TypeError, "Tracer.live holds _Live items");
            goto fail;
        }
        PyObject *ref = *live_slot(item, LIVE_REF), *tensor;
        if (ref == NULL || ref == Py_None) {
            tensor = Py_NewRef(Py_None);
        } else if (PyObject_TypeCheck(ref, cfg.tensor)) { /* held (fvis.records.referent) */
            tensor = Py_NewRef(ref);
        } else {
            tensor = PyObject_CallNoArgs(ref);
            if (tensor == NULL) goto fail;
        }
        if (tensor == Py_None) {
            Py_DECREF(tensor);
            if (PyList_Append(self->done, item) < 0) goto fail;
            continue;
        }
        PyObject *version = tensor_fact(tensor, T_VERSION);
        PyObject *last = *live_slot(item, LIVE_LAST_VERSION);
        int same = version == NULL ? -1 : PyObject_RichCompareBool(version, last, Py_EQ);
        if (same == 0) { /* the rare case: only then name the new grad_fn */
            PyObject *name = PyObject_CallOneArg(cfg.grad_fn_name, tensor);
            if (name == NULL) {
                same = -1;
            } else {
                Py_XSETREF(*live_slot(item, LIVE_LAST_VERSION), Py_NewRef(version));
                Py_XSETREF(*live_slot(item, LIVE_LAST_GRAD_FN), name);
            }
        }
        Py_XDECREF(version);
        Py_DECREF(tensor);
        if (same < 0 || PyList_Append(still, item) < 0) goto fail;
    }
    Py_DECREF(live);
    Py_XSETREF(self->live, still);
    Py_RETURN_NONE;
fail:
    Py_DECREF(live);
    Py_XDECREF(still);
    return NULL;
}

typedef struct {
    Py_ssize_t seq, at;
} by_seq_t;

static int compare_seq(const void *a, const void *b)
{
    const by_seq_t *x = a, *y = b; /* position breaks ties: a stable sort, as sorted() */
    if (x->seq != y->seq) return (x->seq > y->seq) - (x->seq < y->seq);
    return (x->at > y->at) - (x->at < y->at);
}

/* The order to read items in: by their seq (the order the captures were made), as
 * ``sorted(items, key=seq)`` would; in grad mode they usually are in order already. NULL with
 * an exception where an item is no _Live item with an int seq. */
static by_seq_t *in_seq_order(PyObject *items)
{
    Py_ssize_t n = PyList_GET_SIZE(items);
    by_seq_t *order = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(by_seq_t));
    if (order == NULL) return (by_seq_t *)PyErr_NoMemory();
    int sorted = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        PyObject *seq = Py_IS_TYPE(item, cfg.live) ? *live_slot(item, LIVE_SEQ) : NULL;
        order[i].seq = seq != NULL && PyLong_Check(seq) ? PyLong_AsSsize_t(seq) : -1;
        order[i].at = i;
        if (order[i].seq < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "fast_captures: _Live items expected");
            PyMem_Free(order);
            return NULL;
        }
        sorted = sorted && (i == 0 || order[i - 1].seq <= order[i].seq);
    }
    if (!sorted) {
        qsort(order, (size_t)n, sizeof(by_seq_t), compare_seq);
    }
    return order;
}

/* fast_captures(items, batch, calls) -> tuple of Capture: ``item.capture(batch,
 * calls.get(item.key, 1), final=True)`` for each _Live item in seq order
 * (fvis.records._Live.capture). */
PyObject *tracer_captures(Tracer *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyList_Check(args[0]) || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "fast_captures(items: list, batch, calls: dict)");
        return NULL;
    }
    /* a copy: the records made below may run a collection, whose finalizers could change the
     * session's list under the indexes in order */
    PyObject *items = PyList_GetSlice(args[0], 0, PY_SSIZE_T_MAX), *batch = args[1];
    PyObject *calls = args[2];
    if (items == NULL) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(items);
    by_seq_t *order = in_seq_order(items);
    PyObject *out = order != NULL ? PyTuple_New(n) : NULL;
    if (out == NULL) {
        PyMem_Free(order);
        Py_DECREF(items);
        return NULL;
    }
    int modified = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(items, order[i].at);
        PyObject *facts = Py_IS_TYPE(item, cfg.live) ? *live_slot(item, LIVE_FACTS) : NULL;
        if (facts == NULL || !PyTuple_Check(facts) || PyTuple_GET_SIZE(facts) != 7) {
            PyErr_SetString(PyExc_TypeError, "fast_captures: _Live items expected");
            goto fail;
        }
        PyObject *version = PyTuple_GET_ITEM(facts, 6), *after = *live_slot(item, LIVE_LAST_VERSION);
        if (!modified && version != Py_None && after != NULL && after != Py_None) {
            modified = PyObject_RichCompareBool(version, after, Py_NE); /* modified_in_place */
            if (modified < 0) goto fail;
        }
        PyObject *grad_items[FACTS_N];
        for (int k = 0; k < 7; k++) grad_items[k] = Py_NewRef(PyTuple_GET_ITEM(facts, k));
        grad_items[7] = Py_XNewRef(*live_slot(item, LIVE_LAST_VERSION));
        grad_items[8] = Py_XNewRef(*live_slot(item, LIVE_LAST_GRAD_FN));
        PyObject *grad = untracked(new_slots(cfg.facts, cfg.facts_at, FACTS_N, grad_items));
        PyObject *total = PyDict_GetItemWithError(calls, *live_slot(item, LIVE_KEY));
        if (grad == NULL || (total == NULL && PyErr_Occurred())) {
            Py_XDECREF(grad);
            goto fail;
        }
        PyObject *fields[CAPTURE_N] = {
            Py_XNewRef(*live_slot(item, LIVE_LAYER)), Py_XNewRef(*live_slot(item, LIVE_CALL)),
            Py_XNewRef(*live_slot(item, LIVE_PATH)), Py_XNewRef(*live_slot(item, LIVE_SHAPE)),
            Py_XNewRef(*live_slot(item, LIVE_DTYPE)), Py_XNewRef(*live_slot(item, LIVE_DEVICE)),
            grad,
            Py_XNewRef(*live_slot(item, LIVE_STATS)), Py_XNewRef(*live_slot(item, LIVE_VALUES)),
            total != NULL ? Py_NewRef(total) : PyLong_FromLong(1), Py_NewRef(batch),
            Py_XNewRef(*live_slot(item, LIVE_CALL_ID)),
            Py_XNewRef(*live_slot(item, LIVE_TOKEN_GRID)), Py_XNewRef(*live_slot(item, LIVE_SAVED)),
        };
        int atoms = 1;
        for (int k = 0; k < CAPTURE_N; k++) atoms &= atomic(fields[k]);
        PyObject *capture = new_slots(cfg.capture, cfg.capture_at, CAPTURE_N, fields);
        if (capture == NULL) goto fail;
        if (atoms) untracked(capture); /* a kept tensor or a stranger value: tracked */
        PyTuple_SET_ITEM(out, i, capture);
    }
    PyMem_Free(order);
    Py_DECREF(items);
    return Py_BuildValue("(NN)", out, new_bool(modified));
fail:
    PyMem_Free(order);
    Py_DECREF(items);
    Py_DECREF(out);
    return NULL;
}
