/*
 * A capture's snapshot on the C path (fvis.session._Session._snapshot of a module's plain
 * tensor output): its grad facts, the gradient edge, the reference kept for the version check,
 * its statistics and its _Live item. Called by _trace.c's forward hook; what needs torch ops
 * or is rare goes to the Python method (trace_fallback).
 */
#include "_trace.h"

/* The channel dim of a capture: the module's own decision remembered in ``decided``, else
 * fvis.session._Session._channel_dim; -1 with an error set on failure. */
static long channel_dim(Tracer *self, PyObject *key, PyObject *record, PyObject *shape)
{
    PyObject *memo = PyTuple_Pack(2, key, shape);
    if (memo == NULL) return -1;
    PyObject *own = PyDict_GetItemWithError(self->decided, memo); /* borrowed */
    Py_DECREF(memo);
    if (own == NULL && PyErr_Occurred()) return -1;
    PyObject *dim;
    if (own != NULL && own != Py_None && PyTuple_Check(own) && PyTuple_GET_SIZE(own) >= 1) {
        dim = Py_NewRef(PyTuple_GET_ITEM(own, 0));
    } else {
        PyObject *args[3] = {key, record, shape};
        dim = trace_fallback(self, s_channel_dim, args, 3);
        if (dim == NULL) return -1;
    }
    long value = PyLong_AsLong(dim);
    Py_DECREF(dim);
    return value == -1 && PyErr_Occurred() ? -1 : value;
}

/* fvis.session._Session._snapshot of a module's tensor output (path ""). */
int trace_snapshot(Tracer *self, PyObject *key, PyObject *layer, PyObject *record,
                    PyObject *tensor, PyObject *shape, PyObject *dtype_name, int requires_grad,
                    int float32)
{
    int keep_tensors = truth(self->keep_tensors);
    int defer = truth(self->defer_cpu);
    int is_cpu = tensor_truth(tensor, T_IS_CPU);
    if (keep_tensors < 0 || defer < 0 || is_cpu < 0) return -1;
    if (keep_tensors || defer || !is_cpu) { /* a copy kept, or statistics on a device */
        PyObject *args[5] = {key, layer, record, cfg.empty, tensor};
        PyObject *r = trace_fallback(self, s_snapshot, args, 5);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    int grad_enabled = PyTuple_GET_ITEM(record, 3) == Py_True;
    PyObject *call = PyTuple_GET_ITEM(record, 2);
    int keep_values = truth(self->keep_values);
    int callback_values = truth(self->callback_values);
    int hold = truth(self->hold);
    if (keep_values < 0 || callback_values < 0 || hold < 0) return -1;
    int inference;
    PyObject *version = version_or_inference(tensor, PyTuple_GET_ITEM(record, 4) == Py_True,
                                             &inference);
    if (version == NULL) return -1;
    PyObject *node = tensor_fact(tensor, T_GRAD_FN);
    if (node == NULL) {
        Py_DECREF(version);
        return -1;
    }
    int status = -1;
    PyObject *values = NULL, *ref = NULL, *stats = NULL, *item = NULL;
    PyObject *node_name = node == Py_None ? Py_NewRef(Py_None) : node_name_of(node);
    /* is_leaf is torch's ``not grad_fn`` (THPVariable_is_leaf): no second read */
    PyObject *facts_items[7] = {
        new_bool(grad_enabled), Py_NewRef(PyTuple_GET_ITEM(record, 4)), new_bool(requires_grad),
        node_name, new_bool(node == Py_None), new_bool(inference), version,
    };
    PyObject *facts = untracked_tuple(new_named(&PyTuple_Type, 7, facts_items));
    if (facts == NULL) goto done;
    if (keep_values || callback_values) {
        values = PyObject_CallFunctionObjArgs(cfg.sample_values, tensor, self->sample, NULL);
    } else {
        values = Py_NewRef(Py_None);
    }
    if (values == NULL) goto done;
    if (requires_grad && grad_enabled) {
        PyObject *edge = node != Py_None ? untracked_holder(node_edge(node, tensor))
                                         : PyObject_CallOneArg(cfg.gradient_edge, tensor);
        if (edge == NULL) goto done;
        int failed = 0;
        if (edge != Py_None) {
            PyObject *where = untracked_tuple(PyTuple_Pack(3, layer, call, cfg.empty));
            failed = where == NULL || PyDict_SetItem(self->edges, where, edge) < 0;
            Py_XDECREF(where);
        }
        Py_DECREF(edge);
        if (failed) goto done;
    }
    if (inference) {
        ref = Py_NewRef(Py_None);
    } else if (hold) { /* the tensor itself: compared once at the end */
        ref = Py_NewRef(tensor);
    } else {
        ref = PyWeakref_NewRef(tensor, NULL);
    }
    if (ref == NULL) goto done;
    Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
    long axis = ndim >= 3 ? channel_dim(self, key, record, shape) : 1;
    if (axis == -1 && PyErr_Occurred()) goto done;
    stats = float32 ? fast_stats(tensor, shape, axis) : Py_NewRef(Py_None);
    if (stats == Py_None) {
        Py_DECREF(stats);
        PyObject *dim = PyLong_FromLong(axis);
        stats = dim == NULL ? NULL : PyObject_CallFunctionObjArgs(cfg.tensor_stats, tensor, dim, NULL);
        Py_XDECREF(dim);
    }
    if (stats == NULL) goto done;
    Py_ssize_t seq = PyList_GET_SIZE(self->live) + PyList_GET_SIZE(self->done);
    PyObject *slots[LIVE_N];
    slots[LIVE_CALL] = Py_NewRef(call);
    slots[LIVE_CALL_ID] = Py_NewRef(PyTuple_GET_ITEM(record, 10));
    slots[LIVE_FACTS] = Py_NewRef(facts);
    slots[LIVE_KEY] = Py_NewRef(key);
    slots[LIVE_LAST_GRAD_FN] = Py_NewRef(PyTuple_GET_ITEM(facts, 3));
    slots[LIVE_LAST_VERSION] = Py_NewRef(PyTuple_GET_ITEM(facts, 6));
    slots[LIVE_LAYER] = Py_NewRef(layer);
    slots[LIVE_PATH] = Py_NewRef(cfg.empty);
    slots[LIVE_REF] = Py_NewRef(ref);
    slots[LIVE_SAVED] = Py_NewRef(Py_None);
    slots[LIVE_SEQ] = PyLong_FromSsize_t(seq);
    slots[LIVE_STATS] = Py_NewRef(stats);
    slots[LIVE_SHAPE] = Py_NewRef(shape);
    slots[LIVE_DTYPE] = Py_NewRef(dtype_name);
    slots[LIVE_DEVICE] = Py_NewRef(cfg.cpu);
    slots[LIVE_TOKEN_GRID] = Py_NewRef(Py_None);
    slots[LIVE_VALUES] = Py_NewRef(values);
    item = untracked_holder(new_slots(cfg.live, cfg.live_at, LIVE_N, slots));
    if (item == NULL) goto done;
    if (ndim == 3 && axis == 2) { /* tokens: a grid of patches, if a patch embedding ran */
        PyObject *args[2] = {record, shape};
        PyObject *grid = trace_fallback(self, s_token_grid, args, 2);
        if (grid == NULL) goto done;
        PyObject **slot = (PyObject **)((char *)item + cfg.live_at[LIVE_TOKEN_GRID]);
        Py_XSETREF(*slot, grid);
    }
    if (self->on_capture != Py_None) { /* pictures are drawn there */
        PyObject *r = trace_fallback(self, s_deliver, &item, 1);
        if (r == NULL) goto done;
        Py_DECREF(r);
    }
    /* An inference tensor has no version counter and no reference to check: it is done. */
    if (PyList_Append(ref != Py_None ? self->live : self->done, item) < 0) goto done;
    status = 0;
done:
    Py_DECREF(node);
    Py_XDECREF(facts);
    Py_XDECREF(values);
    Py_XDECREF(ref);
    Py_XDECREF(stats);
    Py_XDECREF(item);
    return status;
}

