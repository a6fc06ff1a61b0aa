/* A verified call, replayed from C++: the host path's fast lane (issue 15, item 4).

   A call that went through epgen's Python path (every check, every decision) leaves a Plan:
   what its arguments were (dtypes, shapes, strides, alignment, devices, the ints and Nones),
   the outputs it allocated, the argument structs it launched and which of their fields hold a
   tensor's address, and what it returned. A later call with the same flags runs the Plan: its
   arguments are compared with the recorded ones (anything else returns None, and the caller
   takes the Python path, which checks, raises or records a new Plan; so does a call after an
   environment variable a call reads has changed), its outputs allocated through ATen's
   at::empty (torch's caching allocator, as torch.empty), each struct copied with this call's
   addresses patched in (fresh_output: the allocator at::empty uses, without the dispatcher),
   and launched with the driver's cuLaunchKernel on the current stream.
   The rules stay in Python: a Plan only says "the same as a call that passed".

   Why C++ against libtorch, not the Python C API: a replayed call is a handful of tensor
   metadata reads, allocations and launches, and through Python each torch.empty costs ~5 us
   and each tensor's checks ~1 us on an H200 host (bench/NOTES.md, "Host fast lane"); here they
   are at::Tensor field reads and at::empty.

   The stream bookkeeping is StreamOrder.scope's synchronous branch (epgen/ops/streams.py):
   taken only when no capture is on (the stream's or the order's), no async work of the Buffer
   is unjoined and the last call ran on this stream or none did; afterwards the order's
   sync_done event is recorded on the stream and the stream remembered. Any other state returns
   None before anything is allocated or launched.

   Built with the host C++ compiler against the installed torch by `epgen precompile`, or in
   the background at first use (epgen/runtime/fastcall.py); until then, or without a compiler,
   every call takes the Python path. The driver entry
   points are given by set_driver, never looked up here: the CPU tests give fakes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

namespace {

typedef int (*launch_fn)(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                         unsigned by, unsigned bz, unsigned smem, void *stream, void **params,
                         void **extra);
typedef int (*record_fn)(void *event, void *stream);
typedef int (*capturing_fn)(void *stream, int *status);

launch_fn cu_launch;
record_fn cu_event_record;
capturing_fn cu_stream_is_capturing;
PyObject *launch_error;      // the exception type a failed launch raises

constexpr int MAX_SLOTS = 64, MAX_ARGS_BYTES = 4096, MAX_DEPTH = 4;
// argument specs: (TAG, ...) tuples built by fastcall.py
enum { ARG_NONE = 0, ARG_TENSOR = 1, ARG_EQUAL = 2, ARG_TUPLE = 3 };
// result templates
enum { RES_SLOT = 0, RES_CONST = 1, RES_TUPLE = 2 };

PyObject *s_comm_busy, *s_captured, *s_compute_pending, *s_sync_stream, *s_sync_done,
    *s_cuda_event;

struct ArgSpec {
    int tag = ARG_NONE;
    // ARG_TENSOR
    at::ScalarType dtype = at::ScalarType::Undefined;
    std::vector<int64_t> shape, strides;   // strides empty: contiguous
    bool contiguous = true;
    uint64_t align = 0;
    at::Device device{at::kCPU};
    // ARG_EQUAL (owned)
    PyObject *equal = nullptr;
    // ARG_TUPLE
    std::vector<ArgSpec> items;
};

struct Launch {
    void *function;
    unsigned grid, block, smem;
    std::vector<unsigned char> bytes;                  // the recorded struct
    std::vector<std::pair<Py_ssize_t, int>> patches;   // (8-byte field offset, slot)
    std::string name;
};

struct Output {
    std::vector<int64_t> shape, strides;
    at::TensorOptions options;
    c10::DispatchKeySet backend;     // the device's dispatch key (fresh outputs)
    c10::Allocator *allocator = nullptr;   // where the first at::empty's storage came from
    int block = -1;              // the earlier output (a uint8 block) it lies in, or -1: fresh
    int64_t offset = 0;          // its first byte in the block
    bool returned = false;       // the result holds it: it needs a Python object
};

struct PlanData {
    std::vector<ArgSpec> args;        // one per positional argument
    std::vector<Output> outputs;
    std::vector<Launch> launches;
    PyObject *guards = nullptr;       // tuple of (dict, key, expected)
    PyObject *order = nullptr;        // the Buffer's StreamOrder
    PyObject *current_stream = nullptr;   // callable -> raw stream (int)
    volatile int32_t *error_code = nullptr;   // mapped error word's code field (none: NULL)
    std::vector<std::pair<std::string, std::pair<bool, std::string>>> env;  // name, (set, value)
    PyObject *result = nullptr;       // result template
    int nslots = 0;

    ~PlanData() {
        release(args);
        Py_XDECREF(guards);
        Py_XDECREF(order);
        Py_XDECREF(current_stream);
        Py_XDECREF(result);
    }
    static void release(std::vector<ArgSpec> &specs) {
        for (ArgSpec &s : specs) {
            Py_XDECREF(s.equal);
            release(s.items);
        }
    }
};

struct Plan {
    PyObject_HEAD
    PlanData *d;
};

struct Slots {
    PyObject *obj[MAX_SLOTS];   // borrowed (inputs) or owned (outputs)
    uint64_t ptr[MAX_SLOTS];
    int n = 0, first_output = MAX_SLOTS;   // the outputs from first_output on (none yet)
    ~Slots() {
        for (int i = first_output; i < n; i++) Py_XDECREF(obj[i]);
    }
};

bool same_ints(c10::IntArrayRef have, const std::vector<int64_t> &want) {
    return have.size() == want.size() &&
           std::equal(have.begin(), have.end(), want.begin());
}

// 1: matches; 0: does not (take the Python path)
int tensor_matches(PyObject *obj, const ArgSpec &spec, Slots &s) {
    if (!THPVariable_Check(obj) || s.n >= MAX_SLOTS) return 0;
    const at::Tensor &t = THPVariable_Unpack(obj);
    // strided, with storage and data: what the recorded call had (a sparse tensor has no
    // strides, a meta tensor no storage, a wrapper subclass a null data pointer)
    if (!t.defined() || t.layout() != at::kStrided || !t.has_storage() ||
        t.scalar_type() != spec.dtype || t.device() != spec.device ||
        !same_ints(t.sizes(), spec.shape))
        return 0;
    if (spec.contiguous ? !t.is_contiguous() : !same_ints(t.strides(), spec.strides)) return 0;
    uint64_t ptr = reinterpret_cast<uintptr_t>(t.data_ptr());
    if ((spec.align && ptr % spec.align) || (!ptr && t.numel())) return 0;   // null: no data
    s.obj[s.n] = obj;
    s.ptr[s.n] = ptr;
    s.n++;
    return 1;
}

// 1: matches; 0: does not; -1: a Python error is set
int arg_matches(PyObject *a, const ArgSpec &spec, Slots &s, int depth) {
    switch (spec.tag) {
    case ARG_NONE:
        return a == Py_None;
    case ARG_TENSOR:
        return tensor_matches(a, spec, s);
    case ARG_EQUAL:
        if (Py_TYPE(a) != Py_TYPE(spec.equal)) return 0;   // True == 1, 1.0 == 1: not the same call
        return PyObject_RichCompareBool(a, spec.equal, Py_EQ);
    case ARG_TUPLE: {
        Py_ssize_t n = static_cast<Py_ssize_t>(spec.items.size());
        if (depth >= MAX_DEPTH || !PyTuple_CheckExact(a) || PyTuple_GET_SIZE(a) != n) return 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            int r = arg_matches(PyTuple_GET_ITEM(a, i), spec.items[i], s, depth + 1);
            if (r != 1) return r;
        }
        return 1;
    }
    }
    return 0;
}

// 1 and *event set: StreamOrder.scope's synchronous branch may run on `stream` (see the top)
int order_allows(PlanData *p, uint64_t stream, void **event) {
    int capturing = 0;
    if (cu_stream_is_capturing((void *)(uintptr_t)stream, &capturing) != 0 || capturing) return 0;
    PyObject *o = p->order;
    for (PyObject *name : {s_captured, s_comm_busy}) {
        PyObject *v = PyObject_GetAttr(o, name);
        if (!v) return -1;
        int bad = PyObject_IsTrue(v);
        Py_DECREF(v);
        if (bad) return bad < 0 ? -1 : 0;
    }
    PyObject *v = PyObject_GetAttr(o, s_compute_pending);
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
    if (!e) { PyErr_Clear(); return 0; }        // an event without a handle yet
    *event = PyLong_AsVoidPtr(e);
    Py_DECREF(e);
    if (PyErr_Occurred()) return -1;
    return *event != nullptr;
}

PyObject *build_result(PyObject *tmpl, Slots &s, int depth) {
    long tag = PyLong_AsLong(PyTuple_GET_ITEM(tmpl, 0));
    switch (tag) {
    case RES_SLOT: {
        PyObject *o = s.obj[PyLong_AsLong(PyTuple_GET_ITEM(tmpl, 1))];
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
        if (!out) return nullptr;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *o = build_result(PyTuple_GET_ITEM(items, i), s, depth + 1);
            if (!o) { Py_DECREF(out); return nullptr; }
            PyTuple_SET_ITEM(out, i, o);
        }
        return out;
    }
    }
    return PyErr_Format(PyExc_ValueError, "bad result template tag %ld", tag);
}

bool environment_unchanged(const PlanData *p) {
    for (const auto &[name, then] : p->env) {
        const char *now = getenv(name.c_str());
        if (!now != !then.first || (now && then.second != now)) return false;
    }
    return true;
}

// A tensor of `out`'s dtype, sizes and strides at its offset in `block`, sharing the block's
// storage as ops/outputs.carve's parts do (their views share it too): a TensorImpl made
// directly, ~0.1 us, where slice + view(dtype) + view(shape) through the dispatcher cost ~3 us
// on the build host (each view op's autograd bookkeeping).
at::Tensor part_of(const at::Tensor &block, const Output &out) {
    at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(
        c10::Storage(block.storage()), block.key_set(), out.options.dtype());
    t.unsafeGetTensorImpl()->set_sizes_and_strides(
        out.shape, out.strides, out.offset / static_cast<int64_t>(out.options.dtype().itemsize()));
    return t;
}

// An output with storage of its own. The first comes from at::empty (torch.empty's path
// through the dispatcher); later ones from the allocator that first storage came from (torch's
// caching allocator on CUDA), through at::detail::empty_generic under a device guard: what
// at::empty's CUDA kernel (at::detail::empty_cuda) runs, without the dispatcher's walk through
// the autograd and backend-select keys (~0.3-0.4 us a tensor on an H200 host: bench/NOTES.md,
// "Sessions 22-23"). at::empty again wherever the dispatcher would do more: a key in the
// thread's included set (a Python dispatch mode, functionalization) or torch's deterministic
// fill of uninitialized memory.
bool included_keys_are_defaults() {
    return c10::impl::tls_local_dispatch_key_set().included_ == c10::default_included_set;
}

at::Tensor fresh_output(Output &out) {
    const auto &ctx = at::globalContext();
    if (out.allocator && included_keys_are_defaults() &&
        !(ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory())) {
        c10::DeviceGuard guard(out.options.device());      // the allocator takes the current one
        return at::detail::empty_generic(out.shape, out.allocator, out.backend,
                                         out.options.dtype().toScalarType(), std::nullopt);
    }
    at::Tensor t = at::empty(out.shape, out.options);
    out.allocator = t.storage().allocator();
    return t;
}

// the outputs, allocated into the slots after the inputs; false: a Python error is set
bool allocate_outputs(PlanData *p, Slots &s) {
    std::vector<at::Tensor> made;
    made.reserve(p->outputs.size());
    for (Output &out : p->outputs) {
        made.push_back(out.block < 0 ? fresh_output(out)
                                     : part_of(made[out.block - s.first_output], out));
        s.ptr[s.n] = reinterpret_cast<uintptr_t>(made.back().data_ptr());
        PyObject *o = nullptr;  // a block or a store only the kernel sees: no Python object
        if (out.returned && !(o = THPVariable_Wrap(made.back()))) return false;
        s.obj[s.n++] = o;
    }
    return true;
}

// Where a replay's host time goes (Plan.timed, bench/host_overhead.py): nanoseconds summed per
// stage over the timed calls.
enum { STAGE_MATCH, STAGE_STREAM, STAGE_ALLOCATE, STAGE_LAUNCH, STAGE_FINISH, NUM_STAGES };

struct StageClock {
    uint64_t *ns;        // NUM_STAGES sums, or nullptr: an untimed call (one branch a stage)
    uint64_t last = 0;
    static uint64_t now() {
        timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        return static_cast<uint64_t>(t.tv_sec) * 1000000000ull + t.tv_nsec;
    }
    explicit StageClock(uint64_t *sums) : ns(sums) { if (ns) last = now(); }
    void end(int stage) {
        if (!ns) return;
        uint64_t t = now();
        ns[stage] += t - last;
        last = t;
    }
};

PyObject *replay(Plan *self, PyObject *args, PyObject *kwargs, StageClock &clock);

// A C++ exception from ATen (an allocation failure: torch.OutOfMemoryError; anything else)
// becomes torch's Python exception, never a terminate.
PyObject *plan_call(Plan *self, PyObject *args, PyObject *kwargs) {
    HANDLE_TH_ERRORS
    StageClock untimed(nullptr);
    return replay(self, args, kwargs, untimed);
    END_HANDLE_TH_ERRORS
}

/* Plan.timed(args, calls): `calls` replays of plan(*args), each a real one (it allocates and
   launches), and the nanoseconds they spent per stage: (match, stream, allocate, launch,
   finish), summed; None where a replay did not match. The stages: comparing the arguments,
   guards and environment; the current stream and StreamOrder's state; the outputs; the
   cuLaunchKernel calls; the event record, the order's update and the result. */
PyObject *plan_timed(Plan *self, PyObject *args) {
    HANDLE_TH_ERRORS
    PyObject *call_args;
    int calls;
    if (!PyArg_ParseTuple(args, "O!i", &PyTuple_Type, &call_args, &calls)) return nullptr;
    uint64_t ns[NUM_STAGES] = {};
    for (int i = 0; i < calls; i++) {
        StageClock clock(ns);
        PyObject *r = replay(self, call_args, nullptr, clock);
        if (!r) return nullptr;
        bool matched = r != Py_None;
        Py_DECREF(r);
        if (!matched) Py_RETURN_NONE;
    }
    PyObject *out = PyTuple_New(NUM_STAGES);
    if (!out) return nullptr;
    for (int i = 0; i < NUM_STAGES; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(ns[i]);
        if (!v) { Py_DECREF(out); return nullptr; }
        PyTuple_SET_ITEM(out, i, v);
    }
    return out;
    END_HANDLE_TH_ERRORS
}

PyObject *replay(Plan *self, PyObject *args, PyObject *kwargs, StageClock &clock) {
    PlanData *p = self->d;
    if (kwargs && PyDict_GET_SIZE(kwargs)) Py_RETURN_NONE;
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    if (nargs != static_cast<Py_ssize_t>(p->args.size())) Py_RETURN_NONE;
    if ((p->error_code && *p->error_code != 0) || !environment_unchanged(p)) Py_RETURN_NONE;
    Slots s;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        int r = arg_matches(PyTuple_GET_ITEM(args, i), p->args[i], s, 0);
        if (r < 0) return nullptr;
        if (r == 0) Py_RETURN_NONE;
    }
    if (s.n + static_cast<int>(p->outputs.size()) != p->nslots) Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(p->guards); i++) {
        PyObject *g = PyTuple_GET_ITEM(p->guards, i);
        PyObject *have = PyDict_GetItemWithError(PyTuple_GET_ITEM(g, 0), PyTuple_GET_ITEM(g, 1));
        if (!have) { if (PyErr_Occurred()) return nullptr; Py_RETURN_NONE; }
        PyObject *want = PyTuple_GET_ITEM(g, 2);
        int same = have == want ? 1 : PyObject_RichCompareBool(have, want, Py_EQ);
        if (same < 0) return nullptr;
        if (!same) Py_RETURN_NONE;
    }
    clock.end(STAGE_MATCH);
    PyObject *st = PyObject_CallNoArgs(p->current_stream);
    if (!st) return nullptr;
    uint64_t stream = PyLong_AsUnsignedLongLong(st);
    Py_DECREF(st);
    if (PyErr_Occurred()) return nullptr;
    void *event = nullptr;
    int allowed = order_allows(p, stream, &event);
    if (allowed < 0) return nullptr;
    if (!allowed) Py_RETURN_NONE;
    clock.end(STAGE_STREAM);

    s.first_output = s.n;
    if (!allocate_outputs(p, s)) return nullptr;
    clock.end(STAGE_ALLOCATE);
    alignas(16) unsigned char buf[MAX_ARGS_BYTES];
    for (const Launch &l : p->launches) {
        memcpy(buf, l.bytes.data(), l.bytes.size());
        for (const auto &[offset, slot] : l.patches) memcpy(buf + offset, &s.ptr[slot], 8);
        void *params[1] = {buf};
        int rc = cu_launch(l.function, l.grid, 1, 1, l.block, 1, 1, l.smem,
                           (void *)(uintptr_t)stream, params, nullptr);
        if (rc != 0)
            return PyErr_Format(launch_error, "launch %s: CUDA error %d (cuLaunchKernel)",
                                l.name.c_str(), rc);
    }
    clock.end(STAGE_LAUNCH);
    int rc = cu_event_record(event, (void *)(uintptr_t)stream);
    if (rc != 0)
        return PyErr_Format(launch_error, "cuEventRecord after a replayed call: CUDA error %d", rc);
    PyObject *sv = PyLong_FromUnsignedLongLong(stream);
    if (!sv || PyObject_SetAttr(p->order, s_compute_pending, Py_True) < 0 ||
        PyObject_SetAttr(p->order, s_sync_stream, sv) < 0) {
        Py_XDECREF(sv);
        return nullptr;
    }
    Py_DECREF(sv);
    PyObject *result = build_result(p->result, s, 0);
    clock.end(STAGE_FINISH);
    return result;
}

void plan_dealloc(Plan *self) {
    delete self->d;
    Py_TYPE(self)->tp_free(reinterpret_cast<PyObject *>(self));
}

std::vector<int64_t> ints_of(PyObject *seq, const char *what) {
    std::vector<int64_t> out;
    if (!PyTuple_Check(seq)) {
        PyErr_Format(PyExc_TypeError, "%s: a tuple of ints expected", what);
        return out;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(seq); i++) {
        out.push_back(PyLong_AsLongLong(PyTuple_GET_ITEM(seq, i)));
        if (PyErr_Occurred()) return out;
    }
    return out;
}

// a spec tuple (fastcall.py _arg_spec) into an ArgSpec; false: a Python error is set
bool parse_spec(PyObject *t, ArgSpec &spec, int depth) {
    if (t == Py_None) return true;
    if (depth >= MAX_DEPTH || !PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 2) {
        PyErr_SetString(PyExc_ValueError, "bad argument spec");
        return false;
    }
    spec.tag = static_cast<int>(PyLong_AsLong(PyTuple_GET_ITEM(t, 0)));
    switch (spec.tag) {
    case ARG_TENSOR: {      // (ARG_TENSOR, dtype, shape, strides or None (contiguous), align, device)
        PyObject *dtype = PyTuple_GET_ITEM(t, 1), *device = PyTuple_GET_ITEM(t, 5);
        if (PyTuple_GET_SIZE(t) != 6 || !THPDtype_Check(dtype) || !THPDevice_Check(device)) {
            PyErr_SetString(PyExc_ValueError, "bad tensor spec");
            return false;
        }
        spec.dtype = reinterpret_cast<THPDtype *>(dtype)->scalar_type;
        spec.device = reinterpret_cast<THPDevice *>(device)->device;
        spec.shape = ints_of(PyTuple_GET_ITEM(t, 2), "shape");
        PyObject *strides = PyTuple_GET_ITEM(t, 3);
        spec.contiguous = strides == Py_None;
        if (!spec.contiguous) spec.strides = ints_of(strides, "strides");
        spec.align = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 4));
        return !PyErr_Occurred();
    }
    case ARG_EQUAL:
        spec.equal = PyTuple_GET_ITEM(t, 1);
        Py_INCREF(spec.equal);
        return true;
    case ARG_TUPLE: {
        PyObject *items = PyTuple_GET_ITEM(t, 1);
        if (!PyTuple_Check(items)) break;
        spec.items.resize(PyTuple_GET_SIZE(items));
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(items); i++)
            if (!parse_spec(PyTuple_GET_ITEM(items, i), spec.items[i], depth + 1)) return false;
        return true;
    }
    }
    PyErr_Format(PyExc_ValueError, "bad argument spec tag %d", spec.tag);
    return false;
}

// The outputs the result template's slots name (their Python objects are made); false: a
// Python error is set (a bad template)
bool mark_returned(PyObject *tmpl, PlanData *p, int first_output, int depth) {
    if (depth >= MAX_DEPTH || !PyTuple_Check(tmpl) || PyTuple_GET_SIZE(tmpl) != 2) {
        PyErr_SetString(PyExc_ValueError, "bad result template");
        return false;
    }
    long tag = PyLong_AsLong(PyTuple_GET_ITEM(tmpl, 0));
    PyObject *item = PyTuple_GET_ITEM(tmpl, 1);
    if (tag == RES_SLOT) {
        long slot = PyLong_AsLong(item);
        if (slot < 0 || slot >= first_output + static_cast<long>(p->outputs.size())) {
            PyErr_Format(PyExc_ValueError, "result slot %ld outside the slots", slot);
            return false;
        }
        if (slot >= first_output) p->outputs[slot - first_output].returned = true;
        return true;
    }
    if (tag == RES_TUPLE) {
        if (!PyTuple_Check(item)) {
            PyErr_SetString(PyExc_ValueError, "bad result template");
            return false;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(item); i++)
            if (!mark_returned(PyTuple_GET_ITEM(item, i), p, first_output, depth + 1)) return false;
        return true;
    }
    if (tag == RES_CONST) return true;
    PyErr_Format(PyExc_ValueError, "bad result template tag %ld", tag);
    return false;
}

/* Plan(arg_specs, outputs, launches, guards, order, current_stream, error_code_addr,
        environment, result, nslots)
   outputs: tuple of (shape, dtype, device), each allocated with at::empty, or (shape, dtype,
            device, block slot, byte offset, strides): a tensor in an earlier output, a uint8
            block
   environment: tuple of (name, value or None), the variables a call reads
   launches: tuple of (function, grid, block, smem, struct bytes, ((offset, slot), ...), name) */
PyObject *plan_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *arg_specs, *outputs, *launches, *guards, *order, *cur, *environment, *result;
    unsigned long long error_addr;
    int nslots;
    if (!PyArg_ParseTuple(args, "O!O!O!O!OOKO!Oi", &PyTuple_Type, &arg_specs, &PyTuple_Type,
                          &outputs, &PyTuple_Type, &launches, &PyTuple_Type, &guards, &order,
                          &cur, &error_addr, &PyTuple_Type, &environment, &result, &nslots))
        return nullptr;
    if (nslots > MAX_SLOTS) return PyErr_Format(PyExc_ValueError, "%d slots > %d", nslots, MAX_SLOTS);
    Plan *self = reinterpret_cast<Plan *>(type->tp_alloc(type, 0));
    if (!self) return nullptr;
    PlanData *p = self->d = new PlanData();
    for (PyObject *o : {guards, order, cur, result}) Py_INCREF(o);
    p->guards = guards; p->order = order; p->current_stream = cur; p->result = result;
    p->nslots = nslots;
    p->error_code = (volatile int32_t *)(uintptr_t)error_addr;
    p->args.resize(PyTuple_GET_SIZE(arg_specs));
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(arg_specs); i++)
        if (!parse_spec(PyTuple_GET_ITEM(arg_specs, i), p->args[i], 0)) goto fail;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(outputs); i++) {
        PyObject *shape, *dtype, *device, *strides = nullptr;
        Output out;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(outputs, i), "O!O!O!|iLO!", &PyTuple_Type, &shape,
                              &THPDtypeType, &dtype, &THPDeviceType, &device, &out.block,
                              &out.offset, &PyTuple_Type, &strides))
            goto fail;
        out.shape = ints_of(shape, "output shape");
        if (PyErr_Occurred()) goto fail;
        at::ScalarType type = reinterpret_cast<THPDtype *>(dtype)->scalar_type;
        out.options = at::TensorOptions().dtype(type).device(
            reinterpret_cast<THPDevice *>(device)->device);
        out.backend = c10::DispatchKeySet(
            c10::computeDispatchKey(type, at::kStrided, out.options.device()));
        if (out.block >= 0) {     // in an earlier fresh uint8 block [n]: its bytes inside it
            if (strides) out.strides = ints_of(strides, "output strides");
            if (PyErr_Occurred()) goto fail;
            const int64_t item = static_cast<int64_t>(c10::elementSize(type));
            int64_t last = 0;     // the furthest element from the first, in elements
            bool ok = out.strides.size() == out.shape.size();
            for (size_t d = 0; ok && d < out.shape.size(); d++) {
                ok = out.shape[d] >= 0 && out.strides[d] >= 0;
                if (out.shape[d] == 0) last = -1;
                else if (last >= 0) last += (out.shape[d] - 1) * out.strides[d];
            }
            const int first = nslots - static_cast<int>(PyTuple_GET_SIZE(outputs));
            const int b = out.block - first;
            const Output *blk = b >= 0 && b < static_cast<int>(i) ? &p->outputs[b] : nullptr;
            if (!ok || !blk || blk->block >= 0 || blk->shape.size() != 1 ||
                blk->options.dtype().toScalarType() != at::kByte || out.offset < 0 ||
                out.offset % item || out.offset + (last + 1) * item > blk->shape[0]) {
                PyErr_Format(PyExc_ValueError, "output %zd: not a tensor inside an earlier block", i);
                goto fail;
            }
        }
        p->outputs.push_back(std::move(out));
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(environment); i++) {
        const char *name, *value;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(environment, i), "sz", &name, &value)) goto fail;
        p->env.push_back({name, {value != nullptr, value ? value : ""}});
    }
    if (!mark_returned(result, p, nslots - static_cast<int>(p->outputs.size()), 0)) goto fail;
    p->launches.resize(PyTuple_GET_SIZE(launches));
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(launches); i++) {
        Launch &l = p->launches[i];
        PyObject *patches;
        const char *bytes, *name;
        unsigned long long fn;
        Py_ssize_t size;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(launches, i), "KIIIy#O!s", &fn, &l.grid,
                              &l.block, &l.smem, &bytes, &size, &PyTuple_Type, &patches, &name))
            goto fail;
        if (size > MAX_ARGS_BYTES) {
            PyErr_Format(PyExc_ValueError, "argument struct of %zd bytes > %d", size, MAX_ARGS_BYTES);
            goto fail;
        }
        l.function = (void *)(uintptr_t)fn;
        l.bytes.assign(bytes, bytes + size);
        l.name = name;
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(patches); j++) {
            Py_ssize_t off;
            int slot;
            if (!PyArg_ParseTuple(PyTuple_GET_ITEM(patches, j), "ni", &off, &slot)) goto fail;
            if (off < 0 || off + 8 > size || slot < 0 || slot >= nslots) {
                PyErr_Format(PyExc_ValueError, "patch (%zd, %d) outside the struct or slots", off, slot);
                goto fail;
            }
            l.patches.emplace_back(off, slot);
        }
    }
    return reinterpret_cast<PyObject *>(self);
fail:
    Py_DECREF(self);
    return nullptr;
}

PyMethodDef plan_methods[] = {
    {"timed", reinterpret_cast<PyCFunction>(plan_timed), METH_VARARGS,
     "timed(args, calls): replays, and their nanoseconds per stage"},
    {nullptr, nullptr, 0, nullptr},
};

PyTypeObject PlanType = {PyVarObject_HEAD_INIT(nullptr, 0)};

/* set_driver(cuLaunchKernel, cuEventRecord, cuStreamIsCapturing, error type): addresses */
PyObject *set_driver(PyObject *, PyObject *args) {
    unsigned long long launch, record, capturing;
    PyObject *err;
    if (!PyArg_ParseTuple(args, "KKKO", &launch, &record, &capturing, &err)) return nullptr;
    cu_launch = (launch_fn)(uintptr_t)launch;
    cu_event_record = (record_fn)(uintptr_t)record;
    cu_stream_is_capturing = (capturing_fn)(uintptr_t)capturing;
    Py_INCREF(err);
    Py_XSETREF(launch_error, err);
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"set_driver", set_driver, METH_VARARGS, "the driver entry points a Plan calls"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "epgen_fastcall", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_epgen_fastcall(void) {
#define INTERN(var, text) if (!(var = PyUnicode_InternFromString(text))) return nullptr
    INTERN(s_comm_busy, "comm_busy"); INTERN(s_captured, "_captured");
    INTERN(s_compute_pending, "compute_pending"); INTERN(s_sync_stream, "sync_stream");
    INTERN(s_sync_done, "sync_done"); INTERN(s_cuda_event, "cuda_event");
#undef INTERN
    PlanType.tp_name = "epgen_fastcall.Plan";
    PlanType.tp_basicsize = sizeof(Plan);
    PlanType.tp_flags = Py_TPFLAGS_DEFAULT;
    PlanType.tp_doc = "A verified call's launches, replayed (epgen/runtime/fastcall.cpp)";
    PlanType.tp_new = plan_new;
    PlanType.tp_dealloc = reinterpret_cast<destructor>(plan_dealloc);
    PlanType.tp_call = reinterpret_cast<ternaryfunc>(plan_call);
    PlanType.tp_methods = plan_methods;
    if (PyType_Ready(&PlanType) < 0) return nullptr;
    PyObject *m = PyModule_Create(&module);
    if (!m) return nullptr;
    Py_INCREF(&PlanType);
    if (PyModule_AddObject(m, "Plan", reinterpret_cast<PyObject *>(&PlanType)) < 0) {
        Py_DECREF(&PlanType);
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
