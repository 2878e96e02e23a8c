/* edged.gallery._scan: the float16 gallery scan for Python (the kernels: _scan_kernel.h).
 *
 * Optional: setup.py builds it when a C compiler and the Python headers are there; without
 * it edged.gallery widens float16 blocks with OpenCV or numpy instead (same scores, slower).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_scan_kernel.h"

/* the buffer's items are `type` ('e' float16, 'f' float32), in this machine's byte order */
static int is_type(const Py_buffer *view, char type)
{
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=' || *f == '<')  /* '<': little-endian, this module's targets */
        f++;
    return f[0] == type && f[1] == '\0';
}

static int get(PyObject *obj, Py_buffer *view, int flags, const char *what, char type)
{
    if (PyObject_GetBuffer(obj, view, flags | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (view->ndim != 2 || !is_type(view, type)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: want a C-contiguous 2-D array of %s, got %d-D of format '%s'",
                     what, type == 'e' ? "float16" : "float32", view->ndim,
                     view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* the float16 matrix and the float32 queries every scan takes; on failure neither is held */
static int get_matrix_queries(PyObject *mo, PyObject *qo, Py_buffer *m, Py_buffer *q)
{
    if (get(mo, m, PyBUF_SIMPLE, "matrix", 'e') < 0)
        return -1;
    if (get(qo, q, PyBUF_SIMPLE, "queries", 'f') < 0) {
        PyBuffer_Release(m);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(scan_f16_doc,
"scan_f16(matrix, queries, out)\n--\n\n"
"Cosine scores of float16 rows with float32 queries, the GIL released:\n"
"``out[r, j] = matrix[r] . queries[j]``.  ``matrix`` is (rows, dim) float16,\n"
"``queries`` (nq, dim) float32, ``out`` (rows, nq) float32, all C-contiguous.");

static PyObject *scan_f16(PyObject *self, PyObject *args)
{
    PyObject *mo, *qo, *oo;
    Py_buffer m, q, o;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO:scan_f16", &mo, &qo, &oo))
        return NULL;
    if (get_matrix_queries(mo, qo, &m, &q) < 0)
        return NULL;
    if (get(oo, &o, PyBUF_WRITABLE, "out", 'f') < 0) {
        PyBuffer_Release(&m);
        PyBuffer_Release(&q);
        return NULL;
    }
    Py_ssize_t rows = m.shape[0], dim = m.shape[1], nq = q.shape[0];
    if (q.shape[1] != dim || o.shape[0] != rows || o.shape[1] != nq) {
        PyErr_Format(PyExc_ValueError,
                     "shapes do not fit: matrix (%zd, %zd), queries (%zd, %zd), out (%zd, %zd)",
                     rows, dim, q.shape[0], q.shape[1], o.shape[0], o.shape[1]);
    } else {
        Py_BEGIN_ALLOW_THREADS
        edged_scan_f16((const uint16_t *)m.buf, rows, dim, (const float *)q.buf, nq,
                       (float *)o.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&m);
    PyBuffer_Release(&q);
    PyBuffer_Release(&o);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(scan_f16_best_doc,
"scan_f16_best(matrix, queries, starts, out)\n--\n\n"
"Each identity's best score, the GIL released: ``out[j, k]`` is the highest of\n"
"``matrix[r] . queries[k]`` over the rows ``starts[j] - starts[0] <= r < starts[j + 1] -\n"
"starts[0]`` (-inf where there are none).  ``matrix`` is (rows, dim) float16, ``queries``\n"
"(nq, dim) float32, ``starts`` 1-D uint64 with n_ids + 1 entries, not decreasing, spanning\n"
"exactly ``rows``; ``out`` (n_ids, nq) float32, all C-contiguous.  The scores of a block of\n"
"rows stay in the cache: the same as ``numpy.maximum.reduceat`` over :func:`scan_f16`'s\n"
"output, without writing that out.");

static PyObject *scan_f16_best(PyObject *self, PyObject *args)
{
    PyObject *mo, *qo, *so, *oo;
    Py_buffer m, q, st, o;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOO:scan_f16_best", &mo, &qo, &so, &oo))
        return NULL;
    if (get_matrix_queries(mo, qo, &m, &q) < 0)
        return NULL;
    if (PyObject_GetBuffer(so, &st, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&m);
        PyBuffer_Release(&q);
        return NULL;
    }
    if (get(oo, &o, PyBUF_WRITABLE, "out", 'f') < 0) {
        PyBuffer_Release(&m);
        PyBuffer_Release(&q);
        PyBuffer_Release(&st);
        return NULL;
    }
    Py_ssize_t rows = m.shape[0], dim = m.shape[1], nq = q.shape[0];
    float *tmp = NULL;
    /* numpy names its uint64 'L' where unsigned long has 64 bits, else 'Q' */
    int u64 = is_type(&st, 'Q') || (sizeof(unsigned long) == 8 && is_type(&st, 'L'));
    if (st.ndim != 1 || !u64 || st.itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "starts: want a C-contiguous 1-D array of uint64, got "
                     "%d-D of format '%s'", st.ndim, st.format ? st.format : "B");
    } else if (st.shape[0] < 1) {
        PyErr_SetString(PyExc_ValueError, "starts: want at least one entry (identities + 1)");
    } else if (q.shape[1] != dim || o.shape[0] != st.shape[0] - 1 || o.shape[1] != nq) {
        PyErr_Format(PyExc_ValueError,
                     "shapes do not fit: matrix (%zd, %zd), queries (%zd, %zd), starts (%zd,), "
                     "out (%zd, %zd)", rows, dim, q.shape[0], q.shape[1], st.shape[0],
                     o.shape[0], o.shape[1]);
    } else if (!(tmp = PyMem_RawMalloc(sizeof(float) * EDGED_BEST_BLOCK * (nq > 0 ? nq : 1)))) {
        PyErr_NoMemory();
    } else {
        int bad;
        Py_BEGIN_ALLOW_THREADS
        bad = edged_scan_f16_best((const uint16_t *)m.buf, rows, dim, (const float *)q.buf, nq,
                                  (const uint64_t *)st.buf, st.shape[0] - 1, (float *)o.buf, tmp);
        Py_END_ALLOW_THREADS
        if (bad)
            PyErr_Format(PyExc_ValueError, "starts: must not decrease and must span the %zd "
                         "rows of the matrix", rows);
    }
    PyMem_RawFree(tmp);
    PyBuffer_Release(&m);
    PyBuffer_Release(&q);
    PyBuffer_Release(&st);
    PyBuffer_Release(&o);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scan_f16", scan_f16, METH_VARARGS, scan_f16_doc},
    {"scan_f16_best", scan_f16_best, METH_VARARGS, scan_f16_best_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "edged.gallery._scan",
    "The float16 gallery scan (C; optional, see edged.gallery).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void)
{
    PyObject *mod = PyModule_Create(&module);
    if (mod && (PyModule_AddStringConstant(mod, "KERNEL", edged_scan_kernel()) < 0
                || PyModule_AddIntConstant(mod, "MAX_DIM", EDGED_MAX_DIM) < 0)) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
