/*
 * The hook session's hot path in C: the forward pre-hook and forward hook that run once per
 * module call of a capture (fvis/session.py, fvis/fasthooks.py), called around each module's
 * forward (fvis/_wrap.c) or installed as global module hooks.
 *
 * Why native: with every leaf captured, the Python hooks cost about 12 us per module call on
 * a small layer (frame bookkeeping, the CallRecord, the grad facts, the statistics, the _Live
 * item), three times what torch's own hook dispatch costs. Here the same work is a few
 * attribute reads and one pass of the statistics kernel.
 *
 * Only the usual call takes this path: one tensor in, no keyword arguments, one plain tensor
 * out, nothing cut, on the host. Every other call, and every part that is rare or needs
 * torch ops (the channel axis a module does not decide, token grids, drawn samples, pictures,
 * statistics of anything but a finite contiguous float32 tensor), is handed to the Python
 * method that does it; the Python session stays the reference, and tests compare the two
 * record by record on the sample zoo and on real models.
 *
 * Tracer is the base class of fvis.session._Session: its members are the session's state,
 * set and read from Python by name, read here directly. The tensor facts and records it
 * builds are in _facts.c, the end of a capture in _trace_end.c, the module walk in _walk.c
 * (_trace.h: what they share).
 */
#include "_trace.h"

#include <stddef.h>
#include <structmember.h>

trace_cfg_t cfg;

PyObject *s_requires_grad, *s_grad_fn, *s_shape, *s_dtype, *s_is_cpu, *s_is_leaf,
    *s_version, *s_output_nr, *s_is_inference, *s_data_ptr, *s_is_contiguous, *s_is_neg,
    *s_is_zerotensor, *s_name, *s_parameters, *s_modules, *s_inplace, *s_is_floating_point, *s_is_complex,
    *s_pre, *s_post, *s_snapshot, *s_check_versions, *s_channel_dim, *s_token_grid,
    *s_deliver, *s_native;

#define FRAME_N 5

static int tracer_traverse(Tracer *self, visitproc visit, void *arg)
{
#define VISIT(name) Py_VISIT(self->name);
    TRACER_OBJECTS(VISIT)
#undef VISIT
    return 0;
}

static int tracer_clear(Tracer *self)
{
#define CLEAR(name) Py_CLEAR(self->name);
    TRACER_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}

static void tracer_dealloc(Tracer *self)
{
    PyObject_GC_UnTrack(self);
    tracer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *fallback(Tracer *self, PyObject *method, PyObject *const *args, Py_ssize_t n)
{
    PyObject *full[6] = {(PyObject *)self, NULL, NULL, NULL, NULL, NULL};
    if (n > 5) {
        PyErr_SetString(PyExc_SystemError, "Tracer: too many arguments for a fallback");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) full[i + 1] = args[i];
    return PyObject_VectorcallMethod(method, full, (size_t)(n + 1) | 0, NULL);
}

/* fvis.session._Session._pre of module called with args; key and names are the module's
 * entry in ``names`` where the caller knows it (a wrapped forward: fvis/_wrap.c), else NULL. */
static PyObject *pre_call(Tracer *self, PyObject *module, PyObject *call_args, PyObject *key,
                          PyObject *names)
{
    if (!NEED(self, names) || !NEED(self, stack) || !NEED(self, targets)) return NULL;
    int replaying = truth(self->replaying);
    if (replaying) return replaying < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *args[2] = {module, call_args};
    key = key != NULL ? Py_NewRef(key) : PyLong_FromVoidPtr(module);
    if (key == NULL) return NULL;
    PyObject *result = NULL;
    if (names == NULL) names = PyDict_GetItemWithError(self->names, key);
    if (names == NULL) {
        result = PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    int grad_on = call_truth(cfg.grad_enabled);
    int hold = truth(self->hold);
    int inputs = truth(self->want_inputs);
    if (grad_on < 0 || hold < 0 || inputs < 0) goto done;
    int target = inputs ? PyDict_Contains(self->targets, key) : 0;
    if (target < 0) goto done;
    if ((!grad_on && hold) || target || !PyList_Check(names) || PyList_GET_SIZE(names) < 1
        || !PyList_Check(self->stack)) {
        result = fallback(self, s_pre, args, 2);
        goto done;
    }
    Py_ssize_t depth = PyList_GET_SIZE(self->stack);
    PyObject *parent = Py_None;
    if (depth) {
        PyObject *top = PyList_GET_ITEM(self->stack, depth - 1);
        if (!PyTuple_Check(top) || PyTuple_GET_SIZE(top) < FRAME_N) {
            result = fallback(self, s_pre, args, 2);
            goto done;
        }
        parent = PyTuple_GET_ITEM(top, 2);
    }
    PyObject *items[FRAME_N] = {
        Py_NewRef(key), Py_NewRef(PyList_GET_ITEM(names, 0)),
        PyLong_FromSsize_t(self->next_call_id), Py_NewRef(parent), new_bool(!grad_on),
    };
    /* left tracked: it lives for the call only, and the room fvis/collector.py makes keeps
     * collections out of the capture; untracking it was work for nothing */
    PyObject *frame = new_named(cfg.frame, FRAME_N, items);
    if (frame == NULL) goto done;
    int failed = PyList_Append(self->stack, frame);
    Py_DECREF(frame);
    if (failed) goto done;
    self->next_call_id++;
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(key);
    return result;
}

/* pre(module, args): fvis.session._Session._pre. */
static PyObject *tracer_pre(Tracer *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pre(module, args)");
        return NULL;
    }
    return pre_call(self, args[0], args[1], NULL, NULL);
}

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
        dim = fallback(self, s_channel_dim, args, 3);
        if (dim == NULL) return -1;
    }
    long value = PyLong_AsLong(dim);
    Py_DECREF(dim);
    return value == -1 && PyErr_Occurred() ? -1 : value;
}

/* fvis.session._Session._snapshot of a module's tensor output (path ""). */
static int snapshot(Tracer *self, PyObject *key, PyObject *layer, PyObject *record,
                    PyObject *tensor, PyObject *shape, PyObject *dtype_name, int requires_grad,
                    int float32)
{
    int keep_tensors = truth(self->keep_tensors);
    int defer = truth(self->defer_cpu);
    int is_cpu = tensor_truth(tensor, T_IS_CPU);
    if (keep_tensors < 0 || defer < 0 || is_cpu < 0) return -1;
    if (keep_tensors || defer || !is_cpu) { /* a copy kept, or statistics on a device */
        PyObject *args[5] = {key, layer, record, cfg.empty, tensor};
        PyObject *r = fallback(self, s_snapshot, args, 5);
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
        PyObject *grid = fallback(self, s_token_grid, args, 2);
        if (grid == NULL) goto done;
        PyObject **slot = (PyObject **)((char *)item + cfg.live_at[LIVE_TOKEN_GRID]);
        Py_XSETREF(*slot, grid);
    }
    if (self->on_capture != Py_None) { /* pictures are drawn there */
        PyObject *r = fallback(self, s_deliver, &item, 1);
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

/* Whether a call takes the fast path, read before anything changes; the facts it needs. */
typedef struct {
    PyObject *frame, *params_grad, *dtype_name, *shape;
    int has_params, inplace, grad_on, inference, inputs_rg, outputs_rg, floating, float32;
    /* the module's entry in ``targets`` (borrowed, NULL: not a target) where the caller knew
     * it when the forward was wrapped (target_known), else looked up */
    PyObject *target;
    int target_known;
} usual_t;

static void usual_clear(usual_t *u)
{
    Py_CLEAR(u->shape);
}

/* The record of a usual call and its capture; the frame is already popped. */
static int record_call(Tracer *self, PyObject *module, PyObject *key, PyObject *frame,
                       PyObject *call, PyObject *output, const usual_t *u)
{
#if PY_VERSION_HEX >= 0x030B0000
    PyObject *class_name = PyType_GetQualName(Py_TYPE(module));
#else
    PyObject *class_name = PyObject_GetAttrString((PyObject *)Py_TYPE(module), "__qualname__");
#endif
    PyObject *items[RECORD_N] = {
        Py_NewRef(PyTuple_GET_ITEM(frame, 1)), class_name, Py_NewRef(call),
        new_bool(u->grad_on), new_bool(u->inference), new_bool(u->inputs_rg),
        Py_NewRef(u->params_grad), new_bool(u->outputs_rg), new_bool(u->floating),
        one_shape(u->shape), Py_NewRef(PyTuple_GET_ITEM(frame, 2)),
        Py_NewRef(PyTuple_GET_ITEM(frame, 3)), new_bool(0), new_bool(u->has_params), new_bool(0),
    };
    PyObject *record = untracked_tuple(new_named(cfg.record, RECORD_N, items));
    if (record == NULL) return -1;
    int status = -1;
    if (PyList_Append(self->trace, record) < 0) goto done;
    if (u->inplace) Py_XSETREF(self->in_place_ops, Py_NewRef(Py_True));
    int hold = truth(self->hold);
    if (hold < 0) goto done;
    if (!hold && PyList_GET_SIZE(self->live)) {
        PyObject *r = fallback(self, s_check_versions, NULL, 0);
        if (r == NULL) goto done;
        Py_DECREF(r);
    }
    int outputs = truth(self->want_outputs);
    if (outputs < 0) goto done;
    PyObject *target = u->target_known ? u->target : PyDict_GetItemWithError(self->targets, key);
    if (target == NULL || !outputs) {
        status = PyErr_Occurred() ? -1 : 0;
        goto done;
    }
    if (!PyTuple_Check(target) || PyTuple_GET_SIZE(target) < 1) {
        PyErr_SetString(PyExc_TypeError, "Tracer.targets: (name, module) values");
        goto done;
    }
    Py_INCREF(target);
    status = snapshot(self, key, PyTuple_GET_ITEM(target, 0), record, output, u->shape,
                      u->dtype_name, u->outputs_rg, u->float32);
    Py_DECREF(target);
done:
    Py_DECREF(record);
    return status;
}

/* fvis.session._Session._params_grad: whether any parameter of the module or its children
 * requires grad, remembered per module in ``params_grad`` (a borrowed reference). */
static PyObject *params_grad(Tracer *self, PyObject *module, PyObject *key, int depth)
{
    PyObject *known = PyDict_GetItemWithError(self->params_grad, key);
    if (known != NULL || PyErr_Occurred()) return known;
    if (depth > 200) return NULL; /* the Python code decides deep trees */
    PyObject *own = PyObject_GenericGetDict(module, NULL);
    if (own == NULL) return NULL;
    int found = 0;
    PyObject *params = PyDict_GetItemWithError(own, s_parameters);
    PyObject *children = params != NULL ? PyDict_GetItemWithError(own, s_modules) : NULL;
    if (params == NULL || children == NULL || !PyDict_Check(params) || !PyDict_Check(children)) {
        Py_DECREF(own);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "not an nn.Module");
        return NULL;
    }
    Py_ssize_t pos = 0;
    PyObject *name, *value;
    while (!found && PyDict_Next(params, &pos, &name, &value)) {
        if (value == Py_None) continue;
        found = tensor_truth(value, T_REQUIRES_GRAD);
        if (found < 0) break;
    }
    /* A module that contains itself stops here (as in Python); a leaf needs no such mark. */
    if (found == 0 && PyDict_GET_SIZE(children)
        && PyDict_SetItem(self->params_grad, key, Py_False) < 0) {
        found = -1;
    }
    pos = 0;
    while (found == 0 && PyDict_Next(children, &pos, &name, &value)) {
        if (value == Py_None) continue;
        PyObject *child = PyLong_FromVoidPtr(value);
        PyObject *inside = child != NULL ? params_grad(self, value, child, depth + 1) : NULL;
        Py_XDECREF(child);
        found = inside == NULL ? -1 : inside == Py_True;
    }
    Py_DECREF(own);
    if (found < 0 || PyDict_SetItem(self->params_grad, key, found ? Py_True : Py_False) < 0) {
        return NULL;
    }
    return found ? Py_True : Py_False;
}

/* 1: the usual call (u filled), 0: Python decides, -1: error. */
static int usual_call(Tracer *self, PyObject *module, PyObject *key, PyObject *args,
                      PyObject *kwargs, PyObject *output, usual_t *u)
{
    if (!PyDict_Check(kwargs) || PyDict_GET_SIZE(kwargs) || !PyTuple_Check(args)
        || PyTuple_GET_SIZE(args) != 1 || !is_plain_tensor(PyTuple_GET_ITEM(args, 0))
        || !Py_IS_TYPE(output, cfg.tensor) || !PyList_Check(self->stack)
        || !PyList_Check(self->trace) || !PyList_Check(self->live) || !PyList_Check(self->done)
        || !PyDict_Check(self->cut_outputs) || PyDict_GET_SIZE(self->cut_outputs)
        || !PyDict_Check(self->calls) || !PyDict_Check(self->edges)
        || !PyDict_Check(self->decided) || !PyDict_Check(self->params_grad)) {
        return 0;
    }
    Py_ssize_t depth = PyList_GET_SIZE(self->stack);
    if (!depth) return 0;
    u->frame = PyList_GET_ITEM(self->stack, depth - 1);
    if (!PyTuple_Check(u->frame) || PyTuple_GET_SIZE(u->frame) < FRAME_N
        || PyLong_AsVoidPtr(PyTuple_GET_ITEM(u->frame, 0)) != (void *)module) {
        return PyErr_Occurred() ? -1 : 0;
    }
    int parent_grad_on = 0;
    if (depth >= 2) {
        PyObject *parent = PyList_GET_ITEM(self->stack, depth - 2);
        if (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) < FRAME_N) return 0;
        parent_grad_on = PyTuple_GET_ITEM(parent, 4) != Py_True;
    }
    u->params_grad = params_grad(self, module, key, 0);
    if (u->params_grad == NULL) { /* a deep or odd tree: the Python code decides */
        PyErr_Clear();
        return 0;
    }
    PyObject *own = PyObject_GenericGetDict(module, NULL);
    if (own == NULL) return -1;
    PyObject *inplace = PyDict_GetItemWithError(own, s_inplace);
    PyObject *params = inplace != NULL || !PyErr_Occurred()
                           ? PyDict_GetItemWithError(own, s_parameters) : NULL;
    u->inplace = inplace == Py_True;
    u->has_params = params != NULL ? PyObject_IsTrue(params) : 0;
    Py_DECREF(own);
    if (PyErr_Occurred() || u->has_params < 0) return -1;
    u->grad_on = call_truth(cfg.grad_enabled);
    u->inference = call_truth(cfg.inference_mode);
    u->inputs_rg = tensor_truth(PyTuple_GET_ITEM(args, 0), T_REQUIRES_GRAD);
    if (u->grad_on < 0 || u->inference < 0 || u->inputs_rg < 0) return -1;
    PyObject *dtype = tensor_fact(output, T_DTYPE);
    if (dtype == NULL) return -1;
    PyObject *facts = dtype_facts(dtype);
    u->float32 = dtype == cfg.float32;
    Py_DECREF(dtype);
    if (facts == NULL) return -1;
    u->floating = PyTuple_GET_ITEM(facts, 0) == Py_True;
    u->dtype_name = PyTuple_GET_ITEM(facts, 1);
    u->outputs_rg = u->floating ? tensor_truth(output, T_REQUIRES_GRAD) : 0;
    if (u->outputs_rg < 0) return -1;
    int needs_grad = u->inputs_rg || u->params_grad == Py_True;
    int cut = u->grad_on && u->floating && needs_grad && !u->inference && !u->outputs_rg;
    int block = !u->grad_on && u->floating && needs_grad && parent_grad_on;
    if (cut || block) return 0; /* a cut, or the first call of a no_grad block: Python */
    PyObject *size = tensor_fact(output, T_SHAPE);
    if (size == NULL) return -1;
    u->shape = plain_shape(size);
    Py_DECREF(size);
    return u->shape == NULL ? -1 : 1;
}

/* fvis.session._Session._post of args (module, args, kwargs, output); key is the module's
 * key in ``names`` where the caller knows it is there (a wrapped forward), and then target its
 * entry in ``targets`` (NULL: none); else key is NULL. */
static PyObject *post_call(Tracer *self, PyObject *const *args, PyObject *known_key,
                           PyObject *target)
{
    if (!NEED(self, names) || !NEED(self, stack) || !NEED(self, targets) || !NEED(self, trace)
        || !NEED(self, calls) || !NEED(self, params_grad) || !NEED(self, live)
        || !NEED(self, done) || !NEED(self, edges) || !NEED(self, cut_outputs)
        || !NEED(self, decided) || !NEED(self, on_capture) || !NEED(self, sample)) {
        return NULL;
    }
    int replaying = truth(self->replaying);
    if (replaying) return replaying < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *module = args[0];
    PyObject *key = known_key != NULL ? Py_NewRef(known_key) : PyLong_FromVoidPtr(module);
    if (key == NULL) return NULL;
    int known = known_key != NULL ? 1 : PyDict_Contains(self->names, key);
    if (known <= 0) {
        Py_DECREF(key);
        return known < 0 ? NULL : Py_NewRef(Py_None);
    }
    usual_t u = {0};
    u.target_known = known_key != NULL;
    u.target = target;
    int usual = usual_call(self, module, key, args[1], args[2], args[3], &u);
    if (usual <= 0) {
        usual_clear(&u);
        Py_DECREF(key);
        return usual < 0 ? NULL : fallback(self, s_post, args, 4);
    }
    /* Our own tensor reads are not the model's (as in _Session._post). */
    Py_XSETREF(self->in_hook, Py_NewRef(Py_True));
    Py_ssize_t depth = PyList_GET_SIZE(self->stack);
    /* the frame popped as list.pop() would, its reference now ours (the list keeps its room:
     * PyList_SetSlice cost as much as the rest of the bookkeeping of the pop) */
    PyObject *frame = u.frame;
    Py_SET_SIZE(self->stack, depth - 1);
    PyObject *before = PyDict_GetItemWithError(self->calls, key);
    long long previous = before != NULL ? PyLong_AsLongLong(before) : 0;
    PyObject *count = PyErr_Occurred() ? NULL : PyLong_FromLongLong(previous + 1);
    int status = count == NULL || PyDict_SetItem(self->calls, key, count) < 0 ? -1 : 0;
    if (status == 0) {
        status = record_call(self, module, key, frame, count, args[3], &u);
    }
    Py_XDECREF(count);
    Py_DECREF(frame);
    usual_clear(&u);
    Py_DECREF(key);
    Py_XSETREF(self->in_hook, Py_NewRef(Py_False));
    if (status < 0) return NULL;
    self->fast_calls++;
    return Py_NewRef(Py_None);
}

/* post(module, args, kwargs, output): fvis.session._Session._post. */
static PyObject *tracer_post(Tracer *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "post(module, args, kwargs, output)");
        return NULL;
    }
    return post_call(self, args, NULL, NULL);
}

static PyTypeObject TracerType;

PyTypeObject *fvis_tracer_type(void) { return &TracerType; }

PyObject *fvis_trace_pre(PyObject *tracer, PyObject *module, PyObject *args, PyObject *key,
                         PyObject *names)
{
    return pre_call((Tracer *)tracer, module, args, key, names);
}

PyObject *fvis_trace_post(PyObject *tracer, PyObject *const *args, PyObject *key,
                          PyObject *target)
{
    return post_call((Tracer *)tracer, args, key, target);
}

PyObject *fvis_tracer_names(PyObject *tracer)
{
    return ((Tracer *)tracer)->names;
}

PyObject *fvis_tracer_targets(PyObject *tracer)
{
    return ((Tracer *)tracer)->targets;
}

static PyMethodDef tracer_methods[] = {
    {"fast_check_versions", (PyCFunction)tracer_check_versions, METH_NOARGS,
     "fast_check_versions(): _Session._check_versions"},
    {"fast_captures", (PyCFunction)(void (*)(void))tracer_captures, METH_FASTCALL,
     "fast_captures(items, batch, calls) -> (the final Capture of each _Live item, whether "
     "one was modified in place)"},
    {"fast_pre", (PyCFunction)(void (*)(void))tracer_pre, METH_FASTCALL,
     "fast_pre(module, args): the forward pre-hook (fvis.session._Session._pre)"},
    {"fast_post", (PyCFunction)(void (*)(void))tracer_post, METH_FASTCALL,
     "fast_post(module, args, kwargs, output): the forward hook (_Session._post)"},
    {NULL, NULL, 0, NULL},
};

#define MEMBER(name) {#name, T_OBJECT_EX, offsetof(Tracer, name), 0, NULL},
static PyMemberDef tracer_members[] = {
    TRACER_OBJECTS(MEMBER)
    {"next_call_id", T_PYSSIZET, offsetof(Tracer, next_call_id), 0, NULL},
    {"fast_calls", T_PYSSIZET, offsetof(Tracer, fast_calls), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};
#undef MEMBER

static PyTypeObject TracerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fvis._moments.Tracer",
    .tp_basicsize = sizeof(Tracer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The hook session's state and its fast forward hooks (fvis/_trace.c).",
    .tp_traverse = (traverseproc)tracer_traverse,
    .tp_clear = (inquiry)tracer_clear,
    .tp_dealloc = (destructor)tracer_dealloc,
    .tp_methods = tracer_methods,
    .tp_members = tracer_members,
    .tp_new = PyType_GenericNew,
};

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
                          &frame, &live, &stats, &capture, &facts, &live_at, &stats_at, &capture_at, &facts_at, &grad_enabled, &inference_mode,
                          &float32, &sample_values, &gradient_edge, &dtype_name, &tensor_stats,
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

static PyObject *tracer_new_checked(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (!cfg.ready) {
        PyErr_SetString(PyExc_RuntimeError, "fvis._moments.Tracer: configure_trace first");
        return NULL;
    }
    return PyType_GenericNew(type, args, kwargs);
}

static PyMethodDef trace_functions[] = {
    {"configure_trace", (PyCFunction)configure_trace, METH_VARARGS,
     "configure_trace((classes), (offsets), (functions)): what the fast hooks build and call"},
    {NULL, NULL, 0, NULL},
};

int fvis_add_trace(PyObject *module)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1;
    INTERN(s_requires_grad, "requires_grad") INTERN(s_grad_fn, "grad_fn")
    INTERN(s_shape, "shape") INTERN(s_dtype, "dtype") INTERN(s_is_cpu, "is_cpu")
    INTERN(s_is_leaf, "is_leaf") INTERN(s_version, "_version") INTERN(s_output_nr, "output_nr")
    INTERN(s_is_inference, "is_inference") INTERN(s_data_ptr, "data_ptr")
    INTERN(s_is_contiguous, "is_contiguous") INTERN(s_is_neg, "is_neg")
    INTERN(s_is_zerotensor, "_is_zerotensor") INTERN(s_name, "name")
    INTERN(s_parameters, "_parameters") INTERN(s_modules, "_modules") INTERN(s_inplace, "inplace")
    INTERN(s_is_floating_point, "is_floating_point") INTERN(s_is_complex, "is_complex")
    INTERN(s_pre, "_pre") INTERN(s_post, "_post") INTERN(s_snapshot, "_snapshot")
    INTERN(s_check_versions, "_check_versions") INTERN(s_channel_dim, "_channel_dim")
    INTERN(s_token_grid, "_token_grid") INTERN(s_deliver, "_deliver") INTERN(s_native, "_native")
    INTERN(cfg.empty, "") INTERN(cfg.cpu, "cpu")
#undef INTERN
    TracerType.tp_new = tracer_new_checked;
    if (PyType_Ready(&TracerType) < 0 || fvis_add_wrap(module) < 0) return -1;
    if (PyModule_AddObjectRef(module, "Tracer", (PyObject *)&TracerType) < 0) return -1;
    return PyModule_AddFunctions(module, trace_functions);
}
