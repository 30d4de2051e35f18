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

static PyObject *s_modules, *s_dot, *s_empty;

/* Visits module under prefix: the same steps as fvis.capture._walk's loop body. The children
 * go on the stack last first, so they are visited in order. 1 done, 0 where Python must walk
 * (a _modules that is not exactly a dict, a child name that is not exactly a str), -1 with an
 * exception. */
static int visit(PyObject *prefix, PyObject *module, PyObject *names, PyObject *modules,
                 PyObject *by_name, PyObject *classes, PyObject *stack)
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
    int failed = PyDict_SetItem(names, key, own) < 0 || PyDict_SetItem(modules, key, module) < 0 ||
                 PySet_Add(classes, (PyObject *)Py_TYPE(module)) < 0;
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
    Py_ssize_t count = PyDict_GET_SIZE(children), at = PyList_GET_SIZE(stack), pos = 0;
    PyObject *name, *child;
    status = 1;
    if (count > 0) {
        PyObject *dot = PyUnicode_GET_LENGTH(prefix) ? PyUnicode_Concat(prefix, s_dot) : NULL;
        if (PyUnicode_GET_LENGTH(prefix) && dot == NULL) status = -1;
        PyObject *added = status < 0 ? NULL : PyList_New(0);
        while (added != NULL && PyDict_Next(children, &pos, &name, &child)) {
            if (child == Py_None) continue;
            if (!PyUnicode_CheckExact(name)) { /* a name Python must spell (or refuse) */
                Py_CLEAR(added);
                status = 0;
                break;
            }
            PyObject *full = dot != NULL ? PyUnicode_Concat(dot, name) : Py_NewRef(name);
            PyObject *entry = full == NULL ? NULL : PyTuple_Pack(2, full, child);
            Py_XDECREF(full);
            if (entry == NULL || PyList_Append(added, entry) < 0) Py_CLEAR(added);
            Py_XDECREF(entry);
        }
        if (added == NULL) {
            if (status > 0) status = -1;
        } else {
            if (PyList_Reverse(added) < 0 || PyList_SetSlice(stack, at, at, added) < 0) status = -1;
            Py_DECREF(added);
        }
        Py_XDECREF(dot);
    }
    Py_DECREF(children);
done:
    Py_DECREF(key);
    return status;
}

/* walk_modules(model) -> (names, modules, by_name, classes), or None where Python must walk. */
static PyObject *walk_modules(PyObject *unused, PyObject *model)
{
    (void)unused;
    PyObject *names = PyDict_New(), *modules = PyDict_New(), *by_name = PyDict_New();
    PyObject *classes = PySet_New(NULL), *stack = PyList_New(0), *result = NULL;
    PyObject *root = PyTuple_Pack(2, s_empty, model);
    int status = names && modules && by_name && classes && stack && root ? 1 : -1;
    if (status > 0 && PyList_Append(stack, root) < 0) status = -1;
    while (status > 0 && PyList_GET_SIZE(stack) > 0) {
        Py_ssize_t last = PyList_GET_SIZE(stack) - 1;
        PyObject *entry = Py_NewRef(PyList_GET_ITEM(stack, last));
        if (PyList_SetSlice(stack, last, last + 1, NULL) < 0) status = -1;
        else status = visit(PyTuple_GET_ITEM(entry, 0), PyTuple_GET_ITEM(entry, 1), names,
                            modules, by_name, classes, stack);
        Py_DECREF(entry);
    }
    if (status > 0) {
        PyObject *frozen = PyFrozenSet_New(classes);
        result = frozen == NULL ? NULL : Py_BuildValue("(OOON)", names, modules, by_name, frozen);
    } else if (status == 0) {
        result = Py_NewRef(Py_None);
    }
    Py_XDECREF(names);
    Py_XDECREF(modules);
    Py_XDECREF(by_name);
    Py_XDECREF(classes);
    Py_XDECREF(stack);
    Py_XDECREF(root);
    return result;
}

static PyMethodDef walk_functions[] = {
    {"walk_modules", (PyCFunction)walk_modules, METH_O,
     "walk_modules(model) -> (names, modules, by_name, classes), or None: fvis.capture._walk"},
    {NULL, NULL, 0, NULL},
};

int fvis_add_walk(PyObject *module)
{
    if ((s_modules = PyUnicode_InternFromString("_modules")) == NULL) return -1;
    if ((s_dot = PyUnicode_InternFromString(".")) == NULL) return -1;
    if ((s_empty = PyUnicode_InternFromString("")) == NULL) return -1;
    return PyModule_AddFunctions(module, walk_functions);
}
