/*
 * fvis.capture._walk in C: every module of a model under every dotted name, once per capture.
 *
 * Why native: the walk runs over every module at the start of each capture; in Python it
 * cost about 0.3 us per module, as much as a fifth of what recording a small module's call
 * costs (issue 15's per-record budget is 5 us). The Python _walk stays the reference (used
 * where the extension is not built; tests compare the two).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_moments.h"

static PyObject *s_modules, *s_dot, *s_empty, *s_training;

/* The modules still to visit, last on top: (prefix, module) pairs holding references. A C
 * array rather than a list of tuples: a model's widest container (hundreds of children) made
 * the list grow and copy, and a tuple per module. */
typedef struct {
    PyObject **items; /* prefix, module, prefix, module, ... */
    Py_ssize_t size, allocated;
} pending_t;

static int pending_reserve(pending_t *p, Py_ssize_t more)
{
    if (p->size + 2 * more <= p->allocated) return 0;
    Py_ssize_t want = (p->size + 2 * more) * 2;
    PyObject **grown = PyMem_Realloc(p->items, (size_t)want * sizeof(PyObject *));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    p->items = grown;
    p->allocated = want;
    return 0;
}

static void pending_clear(pending_t *p)
{
    for (Py_ssize_t i = 0; i < p->size; i++) Py_DECREF(p->items[i]);
    PyMem_Free(p->items);
}

static int push_children(PyObject *prefix, PyObject *children, pending_t *stack);

/* Visits module under prefix: the same steps as fvis.capture._walk's loop body. The children
 * go on the stack last first, so they are visited in order. 1 done, 0 where Python must walk
 * (a _modules that is not exactly a dict, a child name that is not exactly a str), -1 with an
 * exception. */
static int visit(PyObject *prefix, PyObject *module, PyObject *names, PyObject *modules,
                 PyObject *by_name, PyObject *classes, PyObject *kinds, pending_t *stack)
{
    if (PyDict_SetItem(by_name, prefix, module) < 0) return -1;
    PyObject *key = PyLong_FromVoidPtr(module); /* id(module) */
    if (key == NULL) return -1;
    PyObject *aliases = PyDict_GetItemWithError(names, key);
    int status = -1;
    if (aliases != NULL) { /* a shared module, seen again under another name */
        status = PyList_Append(aliases, prefix) < 0 ? -1 : 1;
        goto done;
    }
    if (PyErr_Occurred()) goto done;
    PyObject *own = PyList_New(1);
    if (own == NULL) goto done;
    PyList_SET_ITEM(own, 0, Py_NewRef(prefix));
    PyObject_GC_UnTrack(own); /* names only: never part of a cycle (fvis/_wrap.c) */
    int failed = PyDict_SetItem(names, key, own) < 0 || PyList_Append(modules, module) < 0 ||
                 PySet_Add(classes, (PyObject *)Py_TYPE(module)) < 0 ||
                 PyDict_SetItem(kinds, prefix, (PyObject *)Py_TYPE(module)) < 0;
    Py_DECREF(own);
    if (failed) goto done;
    /* _modules read from the instance dict: Module.__getattr__ makes getattr slow */
    PyObject *own_dict = PyObject_GenericGetDict(module, NULL);
    if (own_dict == NULL) goto done;
    PyObject *children = PyDict_GetItemWithError(own_dict, s_modules);
    Py_XINCREF(children);
    Py_DECREF(own_dict);
    if (children == NULL || !PyDict_CheckExact(children)) { /* an OrderedDict keeps its order */
        status = PyErr_Occurred() ? -1 : 0; /* Python's walk says what is wrong with it */
        Py_XDECREF(children);
        goto done;
    }
    status = push_children(prefix, children, stack);
    Py_DECREF(children);
done:
    Py_DECREF(key);
    return status;
}

/* The children of a module (its _modules, in order) pushed so the first is on top. */
static int push_children(PyObject *prefix, PyObject *children, pending_t *stack)
{
    Py_ssize_t count = PyDict_GET_SIZE(children), pos = 0, at = stack->size;
    if (count == 0) return 1;
    if (pending_reserve(stack, count) < 0) return -1;
    PyObject *dot = NULL, *name, *child;
    if (PyUnicode_GET_LENGTH(prefix) && (dot = PyUnicode_Concat(prefix, s_dot)) == NULL) return -1;
    Py_ssize_t pushed = 0;
    int status = 1;
    while (PyDict_Next(children, &pos, &name, &child)) {
        if (child == Py_None) continue;
        if (!PyUnicode_CheckExact(name)) { /* a name Python must spell (or refuse) */
            status = 0;
            break;
        }
        PyObject *full = dot != NULL ? PyUnicode_Concat(dot, name) : Py_NewRef(name);
        if (full == NULL) {
            status = -1;
            break;
        }
        stack->items[at + 2 * pushed] = full;
        stack->items[at + 2 * pushed + 1] = Py_NewRef(child);
        stack->size += 2;
        pushed++;
    }
    Py_XDECREF(dot);
    /* reverse the pairs just pushed: the first child is visited first */
    for (Py_ssize_t i = 0, j = pushed - 1; i < j; i++, j--) {
        PyObject **a = stack->items + at + 2 * i, **b = stack->items + at + 2 * j;
        PyObject *p0 = a[0], *p1 = a[1];
        a[0] = b[0], a[1] = b[1], b[0] = p0, b[1] = p1;
    }
    return status;
}

/* walk_modules(model) -> (names, modules (a tuple, walk order), by_name, classes, kinds), or
 * None where Python must walk. */
static PyObject *walk_modules(PyObject *unused, PyObject *model)
{
    (void)unused;
    PyObject *names = PyDict_New(), *modules = PyList_New(0), *by_name = PyDict_New();
    PyObject *classes = PySet_New(NULL), *kinds = PyDict_New(), *result = NULL;
    pending_t stack = {NULL, 0, 0};
    int status = names && modules && by_name && classes && kinds ? 1 : -1;
    if (status > 0 && pending_reserve(&stack, 16) < 0) status = -1;
    if (status > 0) {
        stack.items[0] = Py_NewRef(s_empty);
        stack.items[1] = Py_NewRef(model);
        stack.size = 2;
    }
    while (status > 0 && stack.size > 0) {
        PyObject *module = stack.items[--stack.size], *prefix = stack.items[--stack.size];
        status = visit(prefix, module, names, modules, by_name, classes, kinds, &stack);
        Py_DECREF(prefix);
        Py_DECREF(module);
    }
    if (status > 0) {
        PyObject *frozen = PyFrozenSet_New(classes);
        PyObject *all = frozen == NULL ? NULL : PyList_AsTuple(modules);
        result = all == NULL ? NULL
                             : Py_BuildValue("(ONONO)", names, all, by_name, frozen, kinds);
        if (all == NULL) Py_XDECREF(frozen);
    } else if (status == 0) {
        result = Py_NewRef(Py_None);
    }
    pending_clear(&stack);
    Py_XDECREF(names);
    Py_XDECREF(modules);
    Py_XDECREF(by_name);
    Py_XDECREF(classes);
    Py_XDECREF(kinds);
    return result;
}

/* targets_of(by_name, layers) -> ({id(module): (layer, module)}, None), or (None, layer) for
 * the first layer by_name lacks: fvis.capture._targets. */
static PyObject *targets_of(PyObject *unused, PyObject *const *args, Py_ssize_t nargs)
{
    (void)unused;
    if (nargs != 2 || !PyDict_Check(args[0]) || !PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "targets_of(by_name: dict, layers: list)");
        return NULL;
    }
    PyObject *by_name = args[0], *layers = args[1], *targets = PyDict_New();
    if (targets == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(layers); i++) {
        PyObject *layer = PyList_GET_ITEM(layers, i);
        PyObject *module = PyDict_GetItemWithError(by_name, layer);
        if (module == NULL) {
            Py_DECREF(targets);
            return PyErr_Occurred() ? NULL : Py_BuildValue("(OO)", Py_None, layer);
        }
        PyObject *key = PyLong_FromVoidPtr(module);
        int known = key == NULL ? -1 : PyDict_Contains(targets, key);
        PyObject *entry = known == 0 ? PyTuple_Pack(2, layer, module) : NULL;
        /* (name, module): no cycle through it outlives the capture (fvis/_wrap.c) */
        if (entry != NULL) PyObject_GC_UnTrack(entry);
        int failed = known < 0 || (known == 0 && (entry == NULL
                                                   || PyDict_SetItem(targets, key, entry) < 0));
        Py_XDECREF(key);
        Py_XDECREF(entry);
        if (failed) {
            Py_DECREF(targets);
            return NULL;
        }
    }
    return Py_BuildValue("(NO)", targets, Py_None);
}

/* training_flags(modules) -> bytes: each module's ``training``, read from its __dict__. */
static PyObject *training_flags(PyObject *unused, PyObject *modules)
{
    (void)unused;
    if (!PyTuple_CheckExact(modules)) {
        PyErr_SetString(PyExc_TypeError, "training_flags(modules: tuple)");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(modules);
    PyObject *flags = PyBytes_FromStringAndSize(NULL, n);
    if (flags == NULL) return NULL;
    char *out = PyBytes_AS_STRING(flags);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = PyObject_GetAttr(PyTuple_GET_ITEM(modules, i), s_training);
        int flag = value == NULL ? -1 : PyObject_IsTrue(value);
        Py_XDECREF(value);
        if (flag < 0) {
            Py_DECREF(flags);
            return NULL;
        }
        out[i] = (char)flag;
    }
    return flags;
}

/* restore_training(modules, flags): ``module.training = flag`` where it changed (only there:
 * Module.__setattr__ is slow); every module is restored, the first error raised after. */
static PyObject *restore_training(PyObject *unused, PyObject *const *args, Py_ssize_t nargs)
{
    (void)unused;
    if (nargs != 2 || !PyTuple_CheckExact(args[0]) || !PyBytes_CheckExact(args[1])
        || PyBytes_GET_SIZE(args[1]) != PyTuple_GET_SIZE(args[0])) {
        PyErr_SetString(PyExc_TypeError, "restore_training(modules: tuple, flags: bytes)");
        return NULL;
    }
    PyObject *modules = args[0], *type = NULL, *value = NULL, *trace = NULL;
    const char *flags = PyBytes_AS_STRING(args[1]);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(modules); i++) {
        PyObject *module = PyTuple_GET_ITEM(modules, i), *now = PyObject_GetAttr(module, s_training);
        int flag = now == NULL ? -1 : PyObject_IsTrue(now);
        Py_XDECREF(now);
        if (flag >= 0 && flag != flags[i]) {
            flag = PyObject_SetAttr(module, s_training, flags[i] ? Py_True : Py_False);
        }
        if (flag < 0 && type == NULL) PyErr_Fetch(&type, &value, &trace);
        else if (flag < 0) PyErr_Clear();
    }
    if (type == NULL) Py_RETURN_NONE;
    PyErr_Restore(type, value, trace);
    return NULL;
}

static PyMethodDef walk_functions[] = {
    {"walk_modules", (PyCFunction)walk_modules, METH_O,
     "walk_modules(model) -> (names, modules, by_name, classes, kinds), or None: "
     "fvis.capture._walk"},
    {"targets_of", (PyCFunction)(void (*)(void))targets_of, METH_FASTCALL,
     "targets_of(by_name, layers) -> (targets, None), or (None, the missing layer)"},
    {"training_flags", (PyCFunction)training_flags, METH_O,
     "training_flags(modules) -> bytes of each module's training flag"},
    {"restore_training", (PyCFunction)(void (*)(void))restore_training, METH_FASTCALL,
     "restore_training(modules, flags): put back every flag that changed"},
    {NULL, NULL, 0, NULL},
};

int fvis_add_walk(PyObject *module)
{
    if ((s_modules = PyUnicode_InternFromString("_modules")) == NULL) return -1;
    if ((s_dot = PyUnicode_InternFromString(".")) == NULL) return -1;
    if ((s_empty = PyUnicode_InternFromString("")) == NULL) return -1;
    if ((s_training = PyUnicode_InternFromString("training")) == NULL) return -1;
    return PyModule_AddFunctions(module, walk_functions);
}
