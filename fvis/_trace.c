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
 * builds are in _facts.c, a capture's snapshot in _snapshot.c, the end of a capture in
 * _trace_end.c, what fvis.fasthooks configures in _trace_config.c, the module walk in _walk.c
 * (_trace.h: what they share).
 */
#include "_trace.h"

#include <stddef.h>
#include <structmember.h>

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

PyObject *trace_fallback(Tracer *self, PyObject *method, PyObject *const *args, Py_ssize_t n)
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
        result = trace_fallback(self, s_pre, args, 2);
        goto done;
    }
    Py_ssize_t depth = PyList_GET_SIZE(self->stack);
    PyObject *parent = Py_None;
    if (depth) {
        PyObject *top = PyList_GET_ITEM(self->stack, depth - 1);
        if (!PyTuple_Check(top) || PyTuple_GET_SIZE(top) < FRAME_N) {
            result = trace_fallback(self, s_pre, args, 2);
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
        PyObject *r = trace_fallback(self, s_check_versions, NULL, 0);
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
    status = trace_snapshot(self, key, PyTuple_GET_ITEM(target, 0), record, output, u->shape,
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
    int marked = found == 0 && PyDict_GET_SIZE(children);
    if (marked && PyDict_SetItem(self->params_grad, key, Py_False) < 0) found = -1;
    pos = 0;
    while (found == 0 && PyDict_Next(children, &pos, &name, &value)) {
        if (value == Py_None) continue;
        PyObject *child = PyLong_FromVoidPtr(value);
        PyObject *inside = child != NULL ? params_grad(self, value, child, depth + 1) : NULL;
        Py_XDECREF(child);
        found = inside == NULL ? -1 : inside == Py_True;
    }
    Py_DECREF(own);
    if (found < 0) { /* the Python code decides: no half-made mark may stay for it to trust */
        if (marked) {
            PyObject *type, *value, *trace;
            PyErr_Fetch(&type, &value, &trace);
            if (PyDict_DelItem(self->params_grad, key) < 0) PyErr_Clear();
            PyErr_Restore(type, value, trace);
        }
        return NULL;
    }
    if (PyDict_SetItem(self->params_grad, key, found ? Py_True : Py_False) < 0) return NULL;
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
        return usual < 0 ? NULL : trace_fallback(self, s_post, args, 4);
    }
    /* Our own tensor reads are not the model's (as in _Session._post). */
    Py_XSETREF(self->in_hook, Py_NewRef(Py_True));
    Py_ssize_t depth = PyList_GET_SIZE(self->stack);
    /* the frame popped as list.pop() would, its reference now ours (the list keeps its room:
     * PyList_SetSlice cost as much as the rest of the bookkeeping of the pop); only if it is
     * still on top, as usual_call saw it (code run since could have changed the stack) */
    PyObject *frame = depth ? PyList_GET_ITEM(self->stack, depth - 1) : NULL;
    if (frame == u.frame) {
        Py_SET_SIZE(self->stack, depth - 1);
    } else {
        Py_XSETREF(self->in_hook, Py_NewRef(Py_False));
        usual_clear(&u);
        Py_DECREF(key);
        return trace_fallback(self, s_post, args, 4);
    }
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

static PyObject *tracer_new_checked(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (!cfg.ready) {
        PyErr_SetString(PyExc_RuntimeError, "fvis._moments.Tracer: configure_trace first");
        return NULL;
    }
    return PyType_GenericNew(type, args, kwargs);
}

int fvis_add_trace(PyObject *module)
{
    if (fvis_add_trace_config(module) < 0) return -1;
    TracerType.tp_new = tracer_new_checked;
    if (PyType_Ready(&TracerType) < 0 || fvis_add_wrap(module) < 0) return -1;
    return PyModule_AddObjectRef(module, "Tracer", (PyObject *)&TracerType);
}
