/*
 * Whether a wrapped forward (fvis/_wrap.c) was called through Module.__call__: the frames
 * ``module(...)`` calls forward from (torch's _call_impl, its inner function, _slow_forward),
 * which fvis.fasthooks hands over once, against the running Python frame.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>

#include "_moments.h"

static PyObject *call_sites; /* the code objects, a tuple */

/* The code object of the running Python frame, read without making a frame object.
 *
 * Why: PyEval_GetFrame() makes a frame object for the running frame (torch's _call_impl) on
 * every wrapped call, and the interpreter then copies the frame into it when the call
 * returns: about 5% of a small module's capture. CPython 3.11 and 3.12 keep the running
 * interpreter frame in the thread state (cframe->current_frame), whose code object sits at a
 * fixed place that the public headers do not name (pointer 4 in 3.11, pointer 0 in 3.12).
 * configure_wrap finds that place by comparing against PyEval_GetFrame() once, and only a
 * place found that way is read; elsewhere (another version, no match) the frame object is
 * made as before. */
static int code_slot = -1; /* the pointer index of f_code in the interpreter frame, or -1 */

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
#define FAST_CODE 1
static void *running_frame(void)
{
    PyThreadState *ts = PyThreadState_Get();
    return ts->cframe != NULL ? (void *)ts->cframe->current_frame : NULL;
}
#else
#define FAST_CODE 0
#endif

/* Finds code_slot for the frame running now (the Python frame that called configure_wrap). */
static void find_code_slot(void)
{
    code_slot = -1;
#if FAST_CODE
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed */
    void **running = running_frame();
    if (frame == NULL || running == NULL) return;
    PyCodeObject *code = PyFrame_GetCode(frame);
    for (int i = 0; i < 8 && code_slot < 0; i++) {
        if (running[i] == (void *)code) code_slot = i;
    }
    Py_DECREF(code);
#endif
}

static PyObject *running_code(void) /* borrowed, or NULL */
{
#if FAST_CODE
    if (code_slot >= 0) {
        void **running = running_frame();
        return running != NULL ? (PyObject *)running[code_slot] : NULL;
    }
#endif
    PyFrameObject *frame = PyEval_GetFrame();
    if (frame == NULL) return NULL;
    PyCodeObject *code = PyFrame_GetCode(frame); /* the frame holds it: borrowed is safe */
    Py_DECREF(code);
    return (PyObject *)code;
}

/* Whether the running Python frame is one of call_sites: a call made through __call__, which
 * global hooks see, and not ``module.forward(x)`` straight from the model's code, which they
 * do not (fvis reports that module as never called, and says why). */
int fvis_called_through_call(void)
{
    PyObject *code = call_sites != NULL ? running_code() : NULL;
    if (code == NULL) return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(call_sites); i++) {
        if (PyTuple_GET_ITEM(call_sites, i) == code) return 1;
    }
    return 0;
}

void fvis_set_call_sites(PyObject *codes)
{
    Py_XSETREF(call_sites, Py_NewRef(codes));
    find_code_slot();
}

/* code_slot() -> where the running frame's code object is read (-1: through a frame object) */
static PyObject *code_slot_of(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromLong(code_slot);
}

static PyMethodDef callsite_functions[] = {
    {"code_slot", (PyCFunction)code_slot_of, METH_NOARGS,
     "code_slot() -> the pointer index the running frame's code is read at, or -1"},
    {NULL, NULL, 0, NULL},
};

int fvis_add_callsite(PyObject *module)
{
    return PyModule_AddFunctions(module, callsite_functions);
}
