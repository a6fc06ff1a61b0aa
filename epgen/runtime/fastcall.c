/* A verified call, replayed from C: the host path's fast lane (issue 15, item 4).

   A call that went through epgen's Python path (every check, every decision) leaves a Plan:
   what its arguments were (dtypes, shapes, strides, alignment, the ints and Nones), the
   outputs it allocated, the argument structs it launched and which of their fields hold a
   tensor's address, and what it returned. A later call with the same flags runs the Plan: its
   arguments are compared with the recorded ones (anything else returns None, and the caller
   takes the Python path, which checks, raises or records a new Plan; so does a call after an
   environment variable a call reads has changed), its outputs allocated
   through torch.empty, each struct copied with this call's addresses patched in, and launched
   with the driver's cuLaunchKernel on the current stream. The rules stay in Python: a Plan only
   says "the same as a call that passed".

   The stream bookkeeping is StreamOrder.scope's synchronous branch (epgen/ops/streams.py):
   taken only when no capture is on (the stream's or the order's), no async work of the Buffer
   is unjoined and the last call ran on this stream or none did; afterwards the order's
   sync_done event is recorded on the stream and the stream remembered. Any other state returns
   None before anything is allocated or launched.

   Built at first use with the host C compiler (epgen/runtime/fastcall.py); without one, every
   call takes the Python path. The driver entry points are given by set_driver, never looked up
   here: the CPU tests give fakes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int (*launch_fn)(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                         unsigned by, unsigned bz, unsigned smem, void *stream, void **params,
                         void **extra);
typedef int (*record_fn)(void *event, void *stream);
typedef int (*capturing_fn)(void *stream, int *status);

static launch_fn cu_launch;
static record_fn cu_event_record;
static capturing_fn cu_stream_is_capturing;
static PyObject *launch_error;      /* the exception type a failed launch raises */

enum { MAX_SLOTS = 64, MAX_ARGS_BYTES = 4096, MAX_DEPTH = 4 };
/* argument specs: (TAG, ...) tuples built by fastcall.py */
enum { ARG_NONE = 0, ARG_TENSOR = 1, ARG_EQUAL = 2, ARG_TUPLE = 3 };
/* result templates */
enum { RES_SLOT = 0, RES_CONST = 1, RES_TUPLE = 2, RES_METHOD = 3 };

static PyObject *s_dtype, *s_is_cuda, *s_device, *s_shape, *s_is_contiguous, *s_stride,
    *s_data_ptr, *s_comm_busy, *s_captured, *s_compute_pending, *s_sync_stream, *s_sync_done,
    *s_cuda_event;

typedef struct {
    void *function;
    unsigned grid, block, smem;
    Py_ssize_t size;
    unsigned char *bytes;            /* the recorded struct */
    Py_ssize_t npatch;
    Py_ssize_t *patch_offset;        /* 8-byte fields set to a slot's data_ptr */
    int *patch_slot;
    PyObject *name;
} Launch;

typedef struct {
    PyObject_HEAD
    PyObject *arg_specs;       /* tuple, one spec per positional argument */
    PyObject *tensor_type;
    PyObject *empty;           /* torch.empty */
    PyObject *outputs;         /* tuple of (args, kwargs) for empty */
    Py_ssize_t nlaunch;
    Launch *launches;
    PyObject *guards;          /* tuple of (dict, key, expected) */
    PyObject *order;           /* the Buffer's StreamOrder */
    PyObject *current_stream;  /* callable -> raw stream (int) */
    volatile int32_t *error_code;   /* mapped error word's code field (NULL: none) */
    Py_ssize_t nenv;
    char **env_names, **env_values;   /* the variables a call reads, as recorded (NULL: unset) */
    PyObject *result;          /* result template */
    int nslots;
} Plan;

typedef struct {
    PyObject *obj[MAX_SLOTS];   /* borrowed (inputs) or owned (outputs) */
    uint64_t ptr[MAX_SLOTS];
    int n, first_output;
} Slots;

/* 1: matches; 0: does not (take the Python path); -1: a Python error is set */
static int tensor_matches(PyObject *t, PyObject *spec, Plan *p, Slots *s) {
    /* (ARG_TENSOR, dtype, shape, strides or None (contiguous), align, device) */
    if (!PyObject_TypeCheck(t, (PyTypeObject *)p->tensor_type)) return 0;
    if (s->n >= MAX_SLOTS) return 0;
    int ok = 0;
    PyObject *v = PyObject_GetAttr(t, s_dtype);
    if (!v) return -1;
    ok = v == PyTuple_GET_ITEM(spec, 1);
    Py_DECREF(v);
    if (!ok) return 0;
    v = PyObject_GetAttr(t, s_is_cuda);
    if (!v) return -1;
    ok = v == Py_True;
    Py_DECREF(v);
    if (!ok) return 0;
    PyObject *device = PyTuple_GET_ITEM(spec, 5);
    if (device != Py_None) {
        v = PyObject_GetAttr(t, s_device);
        if (!v) return -1;
        ok = PyObject_RichCompareBool(v, device, Py_EQ);
        Py_DECREF(v);
        if (ok != 1) return ok;
    }
    v = PyObject_GetAttr(t, s_shape);
    if (!v) return -1;
    ok = PyObject_RichCompareBool(v, PyTuple_GET_ITEM(spec, 2), Py_EQ);
    Py_DECREF(v);
    if (ok != 1) return ok;
    PyObject *strides = PyTuple_GET_ITEM(spec, 3);
    if (strides == Py_None) {
        v = PyObject_CallMethodNoArgs(t, s_is_contiguous);
        if (!v) return -1;
        ok = v == Py_True;
        Py_DECREF(v);
        if (!ok) return 0;
    } else {
        v = PyObject_CallMethodNoArgs(t, s_stride);
        if (!v) return -1;
        ok = PyObject_RichCompareBool(v, strides, Py_EQ);
        Py_DECREF(v);
        if (ok != 1) return ok;
    }
    v = PyObject_CallMethodNoArgs(t, s_data_ptr);
    if (!v) return -1;
    uint64_t ptr = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (PyErr_Occurred()) return -1;
    unsigned long align = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(spec, 4));
    if (align && ptr % align) return 0;
    s->obj[s->n] = t;
    s->ptr[s->n] = ptr;
    s->n++;
    return 1;
}

static int arg_matches(PyObject *a, PyObject *spec, Plan *p, Slots *s, int depth) {
    if (spec == Py_None) return a == Py_None;
    long tag = PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
    switch (tag) {
    case ARG_TENSOR:
        return tensor_matches(a, spec, p, s);
    case ARG_EQUAL: {
        PyObject *want = PyTuple_GET_ITEM(spec, 1);
        if (Py_TYPE(a) != Py_TYPE(want)) return 0;     /* True == 1, 1.0 == 1: not the same call */
        return PyObject_RichCompareBool(a, want, Py_EQ);
    }
    case ARG_TUPLE: {
        PyObject *items = PyTuple_GET_ITEM(spec, 1);
        Py_ssize_t n = PyTuple_GET_SIZE(items);
        if (depth >= MAX_DEPTH || !PyTuple_CheckExact(a) || PyTuple_GET_SIZE(a) != n) return 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            int r = arg_matches(PyTuple_GET_ITEM(a, i), PyTuple_GET_ITEM(items, i), p, s,
                                depth + 1);
            if (r != 1) return r;
        }
        return 1;
    }
    }
    return 0;
}

/* StreamOrder.scope's synchronous branch may run on `stream` (see the top) */
static int order_allows(Plan *p, uint64_t stream, void **event) {
    int capturing = 0;
    if (cu_stream_is_capturing((void *)(uintptr_t)stream, &capturing) != 0 || capturing) return 0;
    PyObject *o = p->order;
    PyObject *v = PyObject_GetAttr(o, s_captured);
    if (!v) return -1;
    int bad = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (bad) return bad < 0 ? -1 : 0;
    v = PyObject_GetAttr(o, s_comm_busy);
    if (!v) return -1;
    bad = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (bad) return bad < 0 ? -1 : 0;
    v = PyObject_GetAttr(o, s_compute_pending);
    if (!v) return -1;
    int pending = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (pending < 0) return -1;
    if (pending) {
        v = PyObject_GetAttr(o, s_sync_stream);
        if (!v) return -1;
        uint64_t last = PyLong_Check(v) ? PyLong_AsUnsignedLongLong(v) : ~(uint64_t)0;
        Py_DECREF(v);
        if (PyErr_Occurred()) PyErr_Clear();
        if (last != stream) return 0;
    }
    v = PyObject_GetAttr(o, s_sync_done);
    if (!v) return -1;
    PyObject *e = PyObject_GetAttr(v, s_cuda_event);
    Py_DECREF(v);
    if (!e) { PyErr_Clear(); return 0; }        /* an event without a handle yet */
    *event = PyLong_AsVoidPtr(e);
    Py_DECREF(e);
    if (PyErr_Occurred()) return -1;
    return *event != NULL;
}

static PyObject *build_result(PyObject *tmpl, Slots *s, int depth) {
    long tag = PyLong_AsLong(PyTuple_GET_ITEM(tmpl, 0));
    switch (tag) {
    case RES_SLOT: {
        PyObject *o = s->obj[PyLong_AsLong(PyTuple_GET_ITEM(tmpl, 1))];
        Py_INCREF(o);
        return o;
    }
    case RES_CONST: {
        PyObject *o = PyTuple_GET_ITEM(tmpl, 1);
        Py_INCREF(o);
        return o;
    }
    case RES_TUPLE: {
        PyObject *items = PyTuple_GET_ITEM(tmpl, 1);
        Py_ssize_t n = PyTuple_GET_SIZE(items);
        if (depth >= MAX_DEPTH) return PyErr_Format(PyExc_ValueError, "result nested too deep");
        PyObject *out = PyTuple_New(n);
        if (!out) return NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *o = build_result(PyTuple_GET_ITEM(items, i), s, depth + 1);
            if (!o) { Py_DECREF(out); return NULL; }
            PyTuple_SET_ITEM(out, i, o);
        }
        return out;
    }
    case RES_METHOD: {      /* (RES_METHOD, slot, name, args): a view of an output */
        PyObject *o = s->obj[PyLong_AsLong(PyTuple_GET_ITEM(tmpl, 1))];
        PyObject *f = PyObject_GetAttr(o, PyTuple_GET_ITEM(tmpl, 2));
        if (!f) return NULL;
        PyObject *r = PyObject_Call(f, PyTuple_GET_ITEM(tmpl, 3), NULL);
        Py_DECREF(f);
        return r;
    }
    }
    return PyErr_Format(PyExc_ValueError, "bad result template tag %ld", tag);
}

static void release_outputs(Slots *s) {
    for (int i = s->first_output; i < s->n; i++) Py_DECREF(s->obj[i]);
    s->n = s->first_output;
}

static int environment_unchanged(Plan *p) {
    for (Py_ssize_t i = 0; i < p->nenv; i++) {
        const char *now = getenv(p->env_names[i]), *then = p->env_values[i];
        if (!now || !then) {
            if (now != then) return 0;
        } else if (strcmp(now, then) != 0) {
            return 0;
        }
    }
    return 1;
}

static PyObject *plan_call(Plan *p, PyObject *args, PyObject *kwargs) {
    if (kwargs && PyDict_GET_SIZE(kwargs)) Py_RETURN_NONE;
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    if (nargs != PyTuple_GET_SIZE(p->arg_specs)) Py_RETURN_NONE;
    if ((p->error_code && *p->error_code != 0) || !environment_unchanged(p)) Py_RETURN_NONE;
    Slots s;
    s.n = 0;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        int r = arg_matches(PyTuple_GET_ITEM(args, i), PyTuple_GET_ITEM(p->arg_specs, i), p, &s, 0);
        if (r < 0) return NULL;
        if (r == 0) Py_RETURN_NONE;
    }
    if (s.n + PyTuple_GET_SIZE(p->outputs) != p->nslots) Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(p->guards); i++) {
        PyObject *g = PyTuple_GET_ITEM(p->guards, i);
        PyObject *have = PyDict_GetItemWithError(PyTuple_GET_ITEM(g, 0), PyTuple_GET_ITEM(g, 1));
        if (!have) { if (PyErr_Occurred()) return NULL; Py_RETURN_NONE; }
        PyObject *want = PyTuple_GET_ITEM(g, 2);
        int same = have == want ? 1 : PyObject_RichCompareBool(have, want, Py_EQ);
        if (same < 0) return NULL;
        if (!same) Py_RETURN_NONE;
    }
    PyObject *st = PyObject_CallNoArgs(p->current_stream);
    if (!st) return NULL;
    uint64_t stream = PyLong_AsUnsignedLongLong(st);
    Py_DECREF(st);
    if (PyErr_Occurred()) return NULL;
    void *event = NULL;
    int allowed = order_allows(p, stream, &event);
    if (allowed < 0) return NULL;
    if (!allowed) Py_RETURN_NONE;

    s.first_output = s.n;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(p->outputs); i++) {
        PyObject *o = PyTuple_GET_ITEM(p->outputs, i);
        PyObject *t = PyObject_Call(p->empty, PyTuple_GET_ITEM(o, 0), PyTuple_GET_ITEM(o, 1));
        if (!t) { release_outputs(&s); return NULL; }
        s.obj[s.n] = t;
        PyObject *v = PyObject_CallMethodNoArgs(t, s_data_ptr);
        s.n++;
        if (!v) { release_outputs(&s); return NULL; }
        s.ptr[s.n - 1] = PyLong_AsUnsignedLongLong(v);
        Py_DECREF(v);
    }
    _Alignas(16) unsigned char buf[MAX_ARGS_BYTES];
    for (Py_ssize_t i = 0; i < p->nlaunch; i++) {
        Launch *l = &p->launches[i];
        memcpy(buf, l->bytes, l->size);
        for (Py_ssize_t j = 0; j < l->npatch; j++)
            memcpy(buf + l->patch_offset[j], &s.ptr[l->patch_slot[j]], 8);
        void *params[1] = {buf};
        int rc = cu_launch(l->function, l->grid, 1, 1, l->block, 1, 1, l->smem,
                           (void *)(uintptr_t)stream, params, NULL);
        if (rc != 0) {
            release_outputs(&s);
            return PyErr_Format(launch_error, "launch %U: CUDA error %d (cuLaunchKernel)",
                                l->name, rc);
        }
    }
    int rc = cu_event_record(event, (void *)(uintptr_t)stream);
    if (rc != 0) {
        release_outputs(&s);
        return PyErr_Format(launch_error, "cuEventRecord after a replayed call: CUDA error %d", rc);
    }
    PyObject *sv = PyLong_FromUnsignedLongLong(stream);
    if (!sv || PyObject_SetAttr(p->order, s_compute_pending, Py_True) < 0 ||
        PyObject_SetAttr(p->order, s_sync_stream, sv) < 0) {
        Py_XDECREF(sv);
        release_outputs(&s);
        return NULL;
    }
    Py_DECREF(sv);
    PyObject *out = build_result(p->result, &s, 0);
    release_outputs(&s);
    return out;
}

static void plan_dealloc(Plan *p) {
    for (Py_ssize_t i = 0; i < p->nlaunch; i++) {
        Launch *l = &p->launches[i];
        PyMem_Free(l->bytes);
        PyMem_Free(l->patch_offset);
        PyMem_Free(l->patch_slot);
        Py_XDECREF(l->name);
    }
    PyMem_Free(p->launches);
    for (Py_ssize_t i = 0; i < p->nenv; i++) {
        PyMem_Free(p->env_names[i]);
        PyMem_Free(p->env_values[i]);
    }
    PyMem_Free(p->env_names);
    PyMem_Free(p->env_values);
    Py_XDECREF(p->arg_specs);
    Py_XDECREF(p->tensor_type);
    Py_XDECREF(p->empty);
    Py_XDECREF(p->outputs);
    Py_XDECREF(p->guards);
    Py_XDECREF(p->order);
    Py_XDECREF(p->current_stream);
    Py_XDECREF(p->result);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

/* Plan(arg_specs, tensor_type, empty, outputs, launches, guards, order, current_stream,
        error_code_addr, environment, result, nslots)
   environment: tuple of (name, value or None), the variables a call reads
   launches: tuple of (function, grid, block, smem, struct bytes, ((offset, slot), ...), name) */
static PyObject *plan_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *arg_specs, *tensor_type, *empty, *outputs, *launches, *guards, *order, *cur,
        *environment, *result;
    unsigned long long error_addr;
    int nslots;
    if (!PyArg_ParseTuple(args, "O!OOO!O!O!OOKO!Oi", &PyTuple_Type, &arg_specs, &tensor_type,
                          &empty, &PyTuple_Type, &outputs, &PyTuple_Type, &launches,
                          &PyTuple_Type, &guards, &order, &cur, &error_addr, &PyTuple_Type,
                          &environment, &result, &nslots))
        return NULL;
    if (nslots > MAX_SLOTS) return PyErr_Format(PyExc_ValueError, "%d slots > %d", nslots, MAX_SLOTS);
    Plan *p = (Plan *)type->tp_alloc(type, 0);
    if (!p) return NULL;
#define KEEP(field, v) (Py_INCREF(v), p->field = (v))
    KEEP(arg_specs, arg_specs); KEEP(tensor_type, tensor_type); KEEP(empty, empty);
    KEEP(outputs, outputs); KEEP(guards, guards); KEEP(order, order); KEEP(current_stream, cur);
    KEEP(result, result);
#undef KEEP
    p->nslots = nslots;
    p->error_code = (volatile int32_t *)(uintptr_t)error_addr;
    Py_ssize_t nenv = PyTuple_GET_SIZE(environment);
    p->env_names = PyMem_Calloc(nenv ? nenv : 1, sizeof(char *));
    p->env_values = PyMem_Calloc(nenv ? nenv : 1, sizeof(char *));
    if (!p->env_names || !p->env_values) { PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t i = 0; i < nenv; i++) {
        const char *name, *value;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(environment, i), "sz", &name, &value)) goto fail;
        p->nenv = i + 1;        /* freed from here on */
        p->env_names[i] = PyMem_Malloc(strlen(name) + 1);
        if (!p->env_names[i]) { PyErr_NoMemory(); goto fail; }
        strcpy(p->env_names[i], name);
        if (value) {
            p->env_values[i] = PyMem_Malloc(strlen(value) + 1);
            if (!p->env_values[i]) { PyErr_NoMemory(); goto fail; }
            strcpy(p->env_values[i], value);
        }
    }
    p->nlaunch = PyTuple_GET_SIZE(launches);
    p->launches = PyMem_Calloc(p->nlaunch ? p->nlaunch : 1, sizeof(Launch));
    if (!p->launches) { PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t i = 0; i < p->nlaunch; i++) {
        Launch *l = &p->launches[i];
        PyObject *patches, *name;
        unsigned long long fn;
        const char *bytes;
        Py_ssize_t size;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(launches, i), "KIIIy#O!U", &fn, &l->grid,
                              &l->block, &l->smem, &bytes, &size, &PyTuple_Type, &patches, &name))
            goto fail;
        if (size > MAX_ARGS_BYTES) {
            PyErr_Format(PyExc_ValueError, "argument struct of %zd bytes > %d", size, MAX_ARGS_BYTES);
            goto fail;
        }
        l->function = (void *)(uintptr_t)fn;
        l->size = size;
        l->bytes = PyMem_Malloc(size ? size : 1);
        l->npatch = PyTuple_GET_SIZE(patches);
        l->patch_offset = PyMem_Malloc(sizeof(Py_ssize_t) * (l->npatch ? l->npatch : 1));
        l->patch_slot = PyMem_Malloc(sizeof(int) * (l->npatch ? l->npatch : 1));
        if (!l->bytes || !l->patch_offset || !l->patch_slot) { PyErr_NoMemory(); goto fail; }
        memcpy(l->bytes, bytes, size);
        Py_INCREF(name);
        l->name = name;
        for (Py_ssize_t j = 0; j < l->npatch; j++) {
            Py_ssize_t off;
            int slot;
            if (!PyArg_ParseTuple(PyTuple_GET_ITEM(patches, j), "ni", &off, &slot)) goto fail;
            if (off < 0 || off + 8 > size || slot < 0 || slot >= nslots) {
                PyErr_Format(PyExc_ValueError, "patch (%zd, %d) outside the struct or slots", off, slot);
                goto fail;
            }
            l->patch_offset[j] = off;
            l->patch_slot[j] = slot;
        }
    }
    return (PyObject *)p;
fail:
    Py_DECREF(p);
    return NULL;
}

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "epgen_fastcall.Plan",
    .tp_basicsize = sizeof(Plan),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A verified call's launches, replayed (epgen/runtime/fastcall.c)",
    .tp_new = plan_new,
    .tp_dealloc = (destructor)plan_dealloc,
    .tp_call = (ternaryfunc)plan_call,
};

/* set_driver(cuLaunchKernel, cuEventRecord, cuStreamIsCapturing, error type): addresses */
static PyObject *set_driver(PyObject *self, PyObject *args) {
    unsigned long long launch, record, capturing;
    PyObject *err;
    if (!PyArg_ParseTuple(args, "KKKO", &launch, &record, &capturing, &err)) return NULL;
    cu_launch = (launch_fn)(uintptr_t)launch;
    cu_event_record = (record_fn)(uintptr_t)record;
    cu_stream_is_capturing = (capturing_fn)(uintptr_t)capturing;
    Py_INCREF(err);
    Py_XSETREF(launch_error, err);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_driver", set_driver, METH_VARARGS, "the driver entry points a Plan calls"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "epgen_fastcall", NULL, -1, methods};

PyMODINIT_FUNC PyInit_epgen_fastcall(void) {
#define INTERN(var, text) if (!(var = PyUnicode_InternFromString(text))) return NULL
    INTERN(s_dtype, "dtype"); INTERN(s_is_cuda, "is_cuda"); INTERN(s_device, "device");
    INTERN(s_shape, "shape"); INTERN(s_is_contiguous, "is_contiguous"); INTERN(s_stride, "stride");
    INTERN(s_data_ptr, "data_ptr"); INTERN(s_comm_busy, "comm_busy");
    INTERN(s_captured, "_captured"); INTERN(s_compute_pending, "compute_pending");
    INTERN(s_sync_stream, "sync_stream"); INTERN(s_sync_done, "sync_done");
    INTERN(s_cuda_event, "cuda_event");
#undef INTERN
    if (PyType_Ready(&PlanType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&PlanType);
    if (PyModule_AddObject(m, "Plan", (PyObject *)&PlanType) < 0) {
        Py_DECREF(&PlanType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
