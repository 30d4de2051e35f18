/*
 * A module's forward, wrapped: the pre-hook, the forward, the forward hook, in one C call.
 *
 * Why: any global module hook sends every module call through the slow path of torch's
 * Module._call_impl (a closure, hook loops, a try block: about 1.5-2 us per call, as much as
 * the rest of the bookkeeping). fvis.fasthooks puts one of these in each module's instance
 * __dict__ as ``forward`` instead, where that sees exactly what the global hooks see; the
 * call then takes _call_impl's fast path. A call straight to ``module.forward(x)`` (not seen by
 * global hooks either) is told apart by its caller's frame (_callsite.c).
 *
 * The cycle collector: a capture makes a wrapper per module and a few containers per module
 * (its names, its target entry, what to put back). They live exactly as long as the capture,
 * so every collection during it finds them alive and moves them to the oldest generation,
 * and after about twenty captures CPython runs a full collection over every object torch
 * and the model own (tens of milliseconds: a fifth of a small model's capture). They are
 * therefore kept out of the collector: the wrapper is not tracked while the capture runs, and
 * untrack() takes the containers out. The only cycle through them (module -> __dict__ ->
 * wrapper -> session -> module) is broken by hand when the capture puts each forward back
 * (retire: a wrapper something else kept lets the session go and is tracked from then on).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_moments.h"

typedef struct {
    PyObject_HEAD
    PyObject *tracer, *module;
    PyObject *func; /* the module's forward; with bound, its function, called module first */
    int bound;
    /* the module's key and names in the tracer's names dict and its entry in the tracer's
     * targets (NULL: not a target), known when it was wrapped (the hooks then need not make
     * the key nor look the module up); key NULL where not known */
    PyObject *key, *names, *target;
} Wrapped;

/* What fvis.fasthooks hands over once (configure_wrap): the code objects of torch's
 * Module._call_impl, of its inner function and of _slow_forward (where a call through
 * module(...) calls forward from); nn.Module's own __call__ and _call_impl; ScriptModule. */
static PyObject *plain_call, *plain_call_impl, *script_module;
static PyObject *s_call, *s_call_impl, *s_forward_pre_hooks, *s_forward, *no_keywords;
static PyObject *s_getattribute, *plain_getattribute; /* object.__getattribute__ */
static PyObject *s_backward_hooks, *s_backward_pre_hooks;

#define SMALL_CALL 8

/* The module's own forward on args. */
static PyObject *call_forward(Wrapped *self, PyObject *args, PyObject *kwargs)
{
    if (!self->bound) return PyObject_Call(self->func, args, kwargs);
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *small[SMALL_CALL + 1];
    PyObject **stack = n < SMALL_CALL ? small : PyMem_Malloc((size_t)(n + 1) * sizeof(PyObject *));
    if (stack == NULL) return PyErr_NoMemory();
    stack[0] = self->module;
    for (Py_ssize_t i = 0; i < n; i++) stack[i + 1] = PyTuple_GET_ITEM(args, i);
    PyObject *out = PyObject_VectorcallDict(self->func, stack, (size_t)(n + 1), kwargs);
    if (stack != small) PyMem_Free(stack);
    return out;
}

static PyObject *wrapped_call(Wrapped *self, PyObject *args, PyObject *kwargs)
{
    /* tracer NULL: the capture ended and this wrapper had been kept somewhere (unwrap) */
    if (self->tracer == NULL || !fvis_called_through_call()) { /* _callsite.c */
        return call_forward(self, args, kwargs);
    }
    PyObject *r = fvis_trace_pre(self->tracer, self->module, args, self->key, self->names);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    PyObject *output = call_forward(self, args, kwargs);
    if (output == NULL) return NULL; /* the frame stays: fvis.capture names the failed call */
    /* no keywords: one shared empty dict (the hooks only read it; a new one per call cost
     * an allocation the collector counts) */
    PyObject *post_args[4] = {self->module, args, kwargs != NULL ? kwargs : no_keywords, output};
    r = fvis_trace_post(self->tracer, post_args, self->key, self->target);
    if (r == NULL) {
        Py_DECREF(output);
        return NULL;
    }
    Py_DECREF(r);
    return output;
}

static int wrapped_traverse(Wrapped *self, visitproc visit, void *arg)
{
    Py_VISIT(self->tracer);
    Py_VISIT(self->module);
    Py_VISIT(self->func);
    Py_VISIT(self->key);
    Py_VISIT(self->names);
    Py_VISIT(self->target);
    return 0;
}

static int wrapped_clear(Wrapped *self)
{
    Py_CLEAR(self->tracer);
    Py_CLEAR(self->module);
    Py_CLEAR(self->func);
    Py_CLEAR(self->key);
    Py_CLEAR(self->names);
    Py_CLEAR(self->target);
    return 0;
}

static void wrapped_dealloc(Wrapped *self)
{
    PyObject_GC_UnTrack(self); /* the function, which allows an untracked object */
    wrapped_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The forward as the module had it (a bound method made on demand). */
static PyObject *wrapped_forward(Wrapped *self)
{
    return self->bound ? PyMethod_New(self->func, self->module) : Py_NewRef(self->func);
}

/* Anything else asked of the wrapper is the wrapped forward's (__name__, __self__, ...). */
static PyObject *wrapped_getattro(Wrapped *self, PyObject *name)
{
    PyObject *found = PyObject_GenericGetAttr((PyObject *)self, name);
    if (found != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) return found;
    PyErr_Clear();
    PyObject *forward = wrapped_forward(self);
    if (forward == NULL) return NULL;
    found = PyObject_GetAttr(forward, name);
    Py_DECREF(forward);
    return found;
}

static PyObject *wrapped_get_wrapped(Wrapped *self, void *closure)
{
    (void)closure;
    return wrapped_forward(self); /* inspect.signature follows __wrapped__ */
}

static PyGetSetDef wrapped_getset[] = {
    {"__wrapped__", (getter)wrapped_get_wrapped, NULL, "the module's own forward", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WrappedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fvis._moments.WrappedForward",
    .tp_basicsize = sizeof(Wrapped),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, /* tracked only once it escapes */
    .tp_doc = "A module's forward with the capture's hooks around it (fvis/_wrap.c).",
    .tp_call = (ternaryfunc)wrapped_call,
    .tp_traverse = (traverseproc)wrapped_traverse,
    .tp_clear = (inquiry)wrapped_clear,
    .tp_dealloc = (destructor)wrapped_dealloc,
    .tp_getattro = (getattrofunc)wrapped_getattro,
    .tp_getset = wrapped_getset,
};

/* The wrapper of a module's forward: func called with the module first where bound. */
static PyObject *new_wrapped(PyObject *tracer, PyObject *module, PyObject *func, int bound)
{
    Wrapped *wrapped = PyObject_GC_New(Wrapped, &WrappedType); /* left untracked */
    if (wrapped == NULL) return NULL;
    wrapped->tracer = Py_NewRef(tracer);
    wrapped->module = Py_NewRef(module);
    wrapped->func = Py_NewRef(func);
    wrapped->bound = bound;
    wrapped->key = wrapped->names = wrapped->target = NULL;
    return (PyObject *)wrapped;
}

/* The wrapper of what ``module.forward`` is. A plain function on the class (the usual case)
 * is kept as it is, bound at each call: a bound method is an object the collector tracks
 * (and may not be untracked), and making one costs as much again. */
static PyObject *wrap_forward_of(PyObject *tracer, PyObject *module, PyObject *previous)
{
    if (previous == NULL) { /* attribute lookup is object's (wrappable_module) */
        PyObject *on_class = _PyType_Lookup(Py_TYPE(module), s_forward); /* borrowed */
        if (on_class != NULL && PyFunction_Check(on_class)) {
            return new_wrapped(tracer, module, on_class, 1);
        }
    }
    PyObject *forward =
        previous != NULL ? Py_NewRef(previous) : PyObject_GetAttr(module, s_forward);
    if (forward == NULL) return NULL;
    int bound = PyMethod_Check(forward) && PyMethod_GET_SELF(forward) == module;
    PyObject *func = bound ? PyMethod_GET_FUNCTION(forward) : forward;
    PyObject *wrapped = new_wrapped(tracer, module, func, bound);
    Py_DECREF(forward);
    return wrapped;
}

/* configure_wrap(codes, call, call_impl, script_module): see call_sites. */
static PyObject *configure_wrap(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *codes, *call, *impl, *script;
    if (!PyArg_ParseTuple(args, "O!OOO!", &PyTuple_Type, &codes, &call, &impl, &PyType_Type,
                          &script)) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(codes); i++) {
        if (!PyCode_Check(PyTuple_GET_ITEM(codes, i))) {
            PyErr_SetString(PyExc_TypeError, "configure_wrap: code objects expected");
            return NULL;
        }
    }
    fvis_set_call_sites(codes);
    Py_XSETREF(plain_call, Py_NewRef(call));
    Py_XSETREF(plain_call_impl, Py_NewRef(impl));
    Py_XSETREF(script_module, Py_NewRef(script));
    Py_RETURN_NONE;
}

#define TYPES_SEEN 64

/* Whether own[name] is an empty dict (a module's hook tables); a missing table is not. */
static int empty_dict(PyObject *own, PyObject *name)
{
    PyObject *table = PyDict_GetItemWithError(own, name);
    return table != NULL && PyDict_Check(table) && PyDict_GET_SIZE(table) == 0;
}

/* Whether wrapping this module's forward sees what global hooks would (fvis.fasthooks):
 * torch's own __call__ and _call_impl, object's __getattribute__, no data descriptor named
 * forward, no forward pre-hook or backward hook of its own, not scripted. The
 * type checks are made once per class (seen). 1, 0, or -1 with an exception. */
static int wrappable_module(PyObject *m, PyTypeObject **seen, int *n_seen)
{
    PyObject *own = PyObject_GenericGetDict(m, NULL);
    if (own == NULL) return -1;
    /* its own forward pre-hooks run after the global ones; backward hooks replace the
     * arguments (BackwardHookFunction) after the global pre-hooks saw them */
    int ok = empty_dict(own, s_forward_pre_hooks) && empty_dict(own, s_backward_hooks) &&
             empty_dict(own, s_backward_pre_hooks);
    Py_DECREF(own);
    if (!ok) return PyErr_Occurred() ? -1 : 0;
    PyTypeObject *type = Py_TYPE(m);
    for (int i = 0; i < *n_seen; i++) {
        if (seen[i] == type) return 1;
    }
    /* a class's own __getattribute__, or a data descriptor named forward (a property), would
     * answer ``forward`` without the instance dict */
    PyObject *on_class = _PyType_Lookup(type, s_forward);
    ok = _PyType_Lookup(type, s_call) == plain_call &&
         _PyType_Lookup(type, s_call_impl) == plain_call_impl &&
         _PyType_Lookup(type, s_getattribute) == plain_getattribute &&
         (on_class == NULL || Py_TYPE(on_class)->tp_descr_set == NULL);
    if (ok) {
        int scripted = PyObject_IsSubclass((PyObject *)type, script_module);
        if (scripted < 0) return -1;
        ok = !scripted;
    }
    if (ok && *n_seen < TYPES_SEEN) seen[(*n_seen)++] = type;
    return ok;
}

/* Whether every module of the sequence is wrappable_module; -1 with an exception. */
static int all_wrappable(PyObject *modules)
{
    if (plain_call == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "fvis._moments: configure_wrap first");
        return -1;
    }
    PyTypeObject *seen[TYPES_SEEN];
    int n_seen = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(modules); i++) {
        int ok = wrappable_module(PySequence_Fast_GET_ITEM(modules, i), seen, &n_seen);
        if (ok <= 0) return ok;
    }
    return 1;
}

/* forwards_wrappable(modules) -> bool: see wrappable_module. */
static PyObject *forwards_wrappable(PyObject *module, PyObject *modules)
{
    (void)module;
    PyObject *fast = PySequence_Fast(modules, "forwards_wrappable(modules)");
    if (fast == NULL) return NULL;
    int ok = all_wrappable(fast);
    Py_DECREF(fast);
    return ok < 0 ? NULL : PyBool_FromLong(ok);
}

/* Ends a wrapper's part in the capture as its module gets its forward back. One that was
 * kept somewhere else during the capture (a partial of ``module.forward``, say) stays, as a
 * plain forward: it lets the session go and is tracked from now on, so a cycle through it
 * can be collected. */
static void retire(PyObject *wrapper)
{
    if (wrapper == NULL || !Py_IS_TYPE(wrapper, &WrappedType)) return;
    Wrapped *w = (Wrapped *)wrapper;
    Py_CLEAR(w->tracer);
    /* the hints too: the target entry is untracked, so a reference it held to the module
     * would keep any cycle through the module from being collected */
    Py_CLEAR(w->key);
    Py_CLEAR(w->names);
    Py_CLEAR(w->target);
    if (Py_REFCNT(wrapper) > 2 && !PyObject_GC_IsTracked(wrapper)) { /* beyond dict + ours */
        PyObject_GC_Track(wrapper);
    }
}

/* Puts back what saved records, last first: (own,) where the module had no instance forward
 * (it is removed), (own, previous) where it had one. Every entry is put back even when one
 * fails; the first error is the one raised. */
static int restore(PyObject *saved)
{
    PyObject *type = NULL, *value = NULL, *traceback = NULL;
    for (Py_ssize_t i = PyList_GET_SIZE(saved) - 1; i >= 0; i--) {
        PyObject *entry = PyList_GET_ITEM(saved, i);
        PyObject *own = PyTuple_GET_ITEM(entry, 0);
        PyObject *wrapper = PyDict_GetItemWithError(own, s_forward);
        Py_XINCREF(wrapper);
        retire(wrapper);
        int failed = wrapper == NULL && PyErr_Occurred();
        if (!failed && PyTuple_GET_SIZE(entry) == 2) {
            failed = PyDict_SetItem(own, s_forward, PyTuple_GET_ITEM(entry, 1)) < 0;
        } else if (!failed && PyDict_DelItem(own, s_forward) < 0) {
            failed = !PyErr_ExceptionMatches(PyExc_KeyError);
            if (!failed) PyErr_Clear();
        }
        Py_XDECREF(wrapper);
        if (failed && type == NULL) PyErr_Fetch(&type, &value, &traceback);
        else if (failed) PyErr_Clear();
    }
    if (type == NULL) return 0;
    PyErr_Restore(type, value, traceback);
    return -1;
}

/* Wraps one module's forward and records what to put back in saved; key and names are its
 * entry in the tracer's names dict, or NULL. */
static int wrap_one(PyObject *tracer, PyObject *m, PyObject *saved, PyObject *key, PyObject *names)
{
    PyObject *targets = fvis_tracer_targets(tracer), *target = NULL;
    if (key != NULL && (targets == NULL || !PyDict_Check(targets))) key = NULL;
    if (key != NULL && (target = PyDict_GetItemWithError(targets, key)) == NULL && PyErr_Occurred()) {
        return -1;
    }
    PyObject *own = PyObject_GenericGetDict(m, NULL);
    if (own == NULL) return -1;
    Py_XINCREF(target); /* ours while other code runs (the forward's lookup below) */
    PyObject *previous = PyDict_GetItemWithError(own, s_forward); /* accelerate sets one */
    PyObject *entry = PyErr_Occurred() ? NULL
                      : previous != NULL ? PyTuple_Pack(2, own, previous) : PyTuple_Pack(1, own);
    PyObject *wrapped = entry == NULL ? NULL : wrap_forward_of(tracer, m, previous);
    if (wrapped != NULL && key != NULL) {
        ((Wrapped *)wrapped)->key = Py_NewRef(key);
        ((Wrapped *)wrapped)->names = Py_NewRef(names);
        ((Wrapped *)wrapped)->target = Py_XNewRef(target);
    }
    Py_XDECREF(target);
    int failed = wrapped == NULL || PyList_Append(saved, entry) < 0;
    if (!failed) {
        PyObject_GC_UnTrack(entry); /* see the top of this file */
        failed = PyDict_SetItem(own, s_forward, wrapped) < 0;
        if (failed) PyList_SetSlice(saved, PyList_GET_SIZE(saved) - 1, PyList_GET_SIZE(saved), NULL);
    }
    Py_XDECREF(wrapped);
    Py_XDECREF(entry);
    Py_DECREF(own);
    return failed ? -1 : 0;
}

/* wrap_forwards(tracer, modules) -> what unwrap_forwards puts back, or None (nothing done)
 * where a module is not wrappable_module. On an error, whatever was wrapped is put back. */
static PyObject *wrap_forwards(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyObject_TypeCheck(args[0], fvis_tracer_type())) {
        PyErr_SetString(PyExc_TypeError, "wrap_forwards(tracer, modules)");
        return NULL;
    }
    PyObject *fast = PySequence_Fast(args[1], "wrap_forwards(tracer, modules)");
    if (fast == NULL) return NULL;
    int ok = all_wrappable(fast);
    PyObject *saved = ok <= 0 ? NULL : PyList_New(0);
    /* The walk lists the modules in the order of the names dict: the entries are read side by
     * side, each checked (a module whose entry is elsewhere gets none: its hooks look it up). */
    PyObject *names = fvis_tracer_names(args[0]), *key = NULL, *aliases = NULL;
    Py_ssize_t pos = 0;
    int in_step = names != NULL && PyDict_Check(names);
    for (Py_ssize_t i = 0; saved != NULL && i < PySequence_Fast_GET_SIZE(fast); i++) {
        PyObject *m = PySequence_Fast_GET_ITEM(fast, i);
        in_step = in_step && PyDict_Next(names, &pos, &key, &aliases);
        int same = in_step && PyLong_CheckExact(key) && PyLong_AsVoidPtr(key) == (void *)m &&
                   PyList_Check(aliases) && PyList_GET_SIZE(aliases) >= 1;
        if (PyErr_Occurred()) PyErr_Clear(); /* a key that is no pointer: not the entry */
        if (wrap_one(args[0], m, saved, same ? key : NULL, same ? aliases : NULL) < 0) {
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            restore(saved);
            PyErr_Restore(type, value, traceback);
            Py_CLEAR(saved);
        }
    }
    Py_DECREF(fast);
    if (ok == 0) Py_RETURN_NONE;
    return saved;
}

/* unwrap_forwards(saved): every module's __dict__ as it was before wrap_forwards. */
static PyObject *unwrap_forwards(PyObject *module, PyObject *saved)
{
    (void)module;
    if (!PyList_CheckExact(saved)) {
        PyErr_SetString(PyExc_TypeError, "unwrap_forwards(what wrap_forwards returned)");
        return NULL;
    }
    if (restore(saved) < 0) return NULL;
    Py_RETURN_NONE;
}

/* untrack(containers): each tuple, list or dict of the iterable taken out of the collector
 * (see the top of this file); anything else is left as it is. A dict is tracked again by
 * CPython as soon as it gets a tracked value; lists and tuples stay out. */
static PyObject *untrack(PyObject *module, PyObject *containers)
{
    (void)module;
    PyObject *iterator = PyObject_GetIter(containers);
    if (iterator == NULL) return NULL;
    PyObject *item;
    while ((item = PyIter_Next(iterator)) != NULL) {
        if ((PyTuple_CheckExact(item) || PyList_CheckExact(item) || PyDict_CheckExact(item)) &&
            PyObject_GC_IsTracked(item)) {
            PyObject_GC_UnTrack(item);
        }
        Py_DECREF(item);
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef wrap_functions[] = {
    {"configure_wrap", (PyCFunction)configure_wrap, METH_VARARGS,
     "configure_wrap(codes, call, call_impl, script_module): what wrapping checks against"},
    {"forwards_wrappable", (PyCFunction)forwards_wrappable, METH_O,
     "forwards_wrappable(modules) -> whether each forward can be wrapped"},
    {"wrap_forwards", (PyCFunction)(void (*)(void))wrap_forwards, METH_FASTCALL,
     "wrap_forwards(tracer, modules) -> what to put back, or None where one cannot be"},
    {"unwrap_forwards", (PyCFunction)unwrap_forwards, METH_O,
     "unwrap_forwards(saved): the modules' forwards as they were"},
    {"untrack", (PyCFunction)untrack, METH_O,
     "untrack(containers): the capture's own tuples, lists and dicts kept out of the collector"},
    {NULL, NULL, 0, NULL},
};

int fvis_add_wrap(PyObject *module)
{
    FVIS_INTERN(s_call, "__call__") FVIS_INTERN(s_call_impl, "_call_impl")
    FVIS_INTERN(s_forward_pre_hooks, "_forward_pre_hooks") FVIS_INTERN(s_forward, "forward")
    FVIS_INTERN(s_getattribute, "__getattribute__")
    FVIS_INTERN(s_backward_hooks, "_backward_hooks")
    FVIS_INTERN(s_backward_pre_hooks, "_backward_pre_hooks")
    plain_getattribute = _PyType_Lookup(&PyBaseObject_Type, s_getattribute); /* immortal type */
    if ((no_keywords = PyDict_New()) == NULL || PyType_Ready(&WrappedType) < 0) return -1;
    if (fvis_add_callsite(module) < 0) return -1;
    return PyModule_AddFunctions(module, wrap_functions);
}
