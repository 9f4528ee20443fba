/* pymodule.c -- runtime._llamavid, the CPython extension over the C core.
 *
 *   Model(dir, stages, verify_hashes=False, native=(), manifest_sha256=None)
 *                                            stages: {"vision"|"head"|"llm"|"llm_prefill": (variant index, stage)}
 *                                            where stage.run(inputs, outputs, context) runs one call on
 *                                            {name: memoryview} buffers the core owns (zero-copy, buffer protocol)
 *                                            and stage.new_context() (optional) makes per-session state;
 *                                            a stage with `incremental = True` is handed only the tensors whose
 *                                            buffer, shape or dtype changed since its last call in that context
 *                                            native: [(library path, {option: value})], backends in shared
 *                                            libraries (llamavid_backend_load, e.g. TensorRT), tried after stages
 *   Session(model, n_ctx=0, n_batch=0, frame_chunk=0)   .prompt(...) .next(sampler) .rollback(p) .reset() ...
 *   Sampler(n_vocab, temperature=0, top_k=0, top_p=1, repetition_penalty=1, seed=0)   .sample(logits, history)
 *   rng_doubles(seed, n)
 *
 * The GIL is released while the core works and taken again only inside a Python stage's run, so sessions on
 * several threads run their stages concurrently. A core error becomes ValueError (argument, manifest, capacity),
 * RuntimeError (backend, shape, state), OSError or MemoryError, with the core's message.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "llamavid.h"

#include <string.h>

static PyObject *raise_error(llamavid_error *e) {
    PyObject *type;
    switch (llamavid_error_code(e)) {
    case LLAMAVID_ERR_ARGUMENT: case LLAMAVID_ERR_MANIFEST: case LLAMAVID_ERR_CAPACITY: type = PyExc_ValueError; break;
    case LLAMAVID_ERR_IO: type = PyExc_OSError; break;
    case LLAMAVID_ERR_MEMORY: type = PyExc_MemoryError; break;
    default: type = PyExc_RuntimeError;
    }
    PyErr_SetString(type, llamavid_error_message(e));
    llamavid_error_free(e);
    return NULL;
}

/* ---- the python backend: stages are Python objects (runtime/backends/ort.py) --------------------------------------- */
typedef struct {
    PyObject *run;      /* the stage's bound run method */
    PyObject *obj;
    int incremental;    /* hand over only the tensors that changed */
} py_stage;

typedef struct {
    const void *data;
    llamavid_dtype dtype;
    int32_t ndim;
    int64_t shape[LLAMAVID_MAX_DIMS];
    PyObject *view;     /* the memoryview last made for this tensor, reused while data/shape/dtype stay */
    PyObject *name;
} py_slot;

typedef struct {
    PyObject *user;     /* what stage.new_context() returned, or None */
    int32_t n;
    py_slot *slots;     /* inputs then outputs, made on the first run */
} py_context;

static const char *buffer_format(llamavid_dtype t) {
    switch (t) {
    case LLAMAVID_F32: return "f";
    case LLAMAVID_F16: return "e";
    case LLAMAVID_BF16: return "H";      /* raw bits */
    case LLAMAVID_I64: return "q";
    case LLAMAVID_I32: return "i";
    case LLAMAVID_U8: return "B";
    }
    return "B";
}

static llamavid_error *python_error(const char *what) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *msg = value ? PyObject_Str(value) : NULL;
    const char *text = msg ? PyUnicode_AsUTF8(msg) : NULL;
    llamavid_error *e = llamavid_error_new(LLAMAVID_ERR_BACKEND, "%s: %s: %s", what,
                                           type ? ((PyTypeObject *)type)->tp_name : "error", text ? text : "(no message)");
    Py_XDECREF(msg);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
    return e;
}

static llamavid_error *py_open_stage(void *user, const llamavid_variant *v, void **out) {
    PyObject *stages = user;
    *out = NULL;
    PyObject *entry = PyDict_GetItemString(stages, strcmp(v->role, "prefill") == 0 ? "llm_prefill" : v->stage);
    if (!entry) return NULL;
    long index;
    PyObject *obj;
    if (!PyArg_ParseTuple(entry, "lO", &index, &obj)) return python_error("stage entry: expected (variant index, stage)");
    if (index != v->index) return NULL;
    py_stage *ps = PyMem_Calloc(1, sizeof *ps);
    if (!ps) return llamavid_error_new(LLAMAVID_ERR_MEMORY, "out of memory");
    ps->run = PyObject_GetAttrString(obj, "run");
    if (!ps->run) {
        PyMem_Free(ps);
        return python_error("stage: expected a run(inputs, outputs, context) method");
    }
    PyObject *inc = PyObject_GetAttrString(obj, "incremental");
    ps->incremental = inc && PyObject_IsTrue(inc) == 1;
    Py_XDECREF(inc);
    PyErr_Clear();
    Py_INCREF(obj);
    ps->obj = obj;
    *out = ps;
    return NULL;
}

static void py_close_stage(void *stage) {
    py_stage *ps = stage;
    PyGILState_STATE g = PyGILState_Ensure();
    Py_XDECREF(ps->run);
    Py_XDECREF(ps->obj);
    PyMem_Free(ps);
    PyGILState_Release(g);
}

static llamavid_error *py_open_context(void *stage, void **out) {
    py_stage *ps = stage;
    PyGILState_STATE g = PyGILState_Ensure();
    llamavid_error *e = NULL;
    py_context *c = PyMem_Calloc(1, sizeof *c);
    if (!c) e = llamavid_error_new(LLAMAVID_ERR_MEMORY, "out of memory");
    else if (PyObject_HasAttrString(ps->obj, "new_context")) {
        c->user = PyObject_CallMethod(ps->obj, "new_context", NULL);
        if (!c->user) e = python_error("new_context()");
    } else {
        c->user = Py_NewRef(Py_None);
    }
    if (e && c) PyMem_Free(c);
    else *out = c;
    PyGILState_Release(g);
    return e;
}

static void py_close_context(void *stage, void *ctx) {
    (void)stage;
    py_context *c = ctx;
    PyGILState_STATE g = PyGILState_Ensure();
    for (int32_t i = 0; i < c->n; i++) {
        Py_XDECREF(c->slots[i].view);
        Py_XDECREF(c->slots[i].name);
    }
    PyMem_Free(c->slots);
    Py_XDECREF(c->user);
    PyMem_Free(c);
    PyGILState_Release(g);
}

/* The memoryview of tensor t in slot s: the previous one while data, shape and dtype are the same (*fresh 0). */
static PyObject *slot_view(py_slot *s, const llamavid_tensor *t, int *fresh) {
    *fresh = 0;
    if (s->view && s->data == t->data && s->dtype == t->dtype && s->ndim == t->ndim &&
        memcmp(s->shape, t->shape, sizeof s->shape) == 0)
        return s->view;
    *fresh = 1;
    Py_ssize_t shape[LLAMAVID_MAX_DIMS], n = 1, size = (Py_ssize_t)llamavid_dtype_size(t->dtype);
    for (int32_t d = 0; d < t->ndim; d++) n *= (shape[d] = (Py_ssize_t)t->shape[d]);
    Py_buffer b = {.buf = t->data, .obj = NULL, .len = n * size, .itemsize = size, .readonly = 0, .ndim = t->ndim,
                   .format = (char *)buffer_format(t->dtype), .shape = shape};
    PyObject *view = PyMemoryView_FromBuffer(&b);
    if (!view) return NULL;
    Py_XSETREF(s->view, view);
    s->data = t->data;
    s->dtype = t->dtype;
    s->ndim = t->ndim;
    memcpy(s->shape, t->shape, sizeof s->shape);
    if (!s->name) s->name = PyUnicode_InternFromString(t->name);
    return s->name ? view : NULL;
}

/* {name: memoryview} of tensors t (only_changed: those whose view is new) */
static PyObject *tensor_dict(py_slot *slots, const llamavid_tensor *t, int32_t n, int only_changed) {
    PyObject *d = PyDict_New();
    for (int32_t i = 0; d && i < n; i++) {
        int fresh;
        PyObject *v = slot_view(&slots[i], &t[i], &fresh);
        if (!v || ((fresh || !only_changed) && PyDict_SetItem(d, slots[i].name, v) < 0)) Py_CLEAR(d);
    }
    return d;
}

static llamavid_error *py_run(void *stage, void *ctx, const llamavid_tensor *in, int32_t n_in, llamavid_tensor *out,
                              int32_t n_out) {
    py_stage *ps = stage;
    py_context *c = ctx;
    llamavid_error *e = NULL;
    PyGILState_STATE g = PyGILState_Ensure();
    if (c->n < n_in + n_out) {                 /* first run: the slots (the tensor count of a stage is fixed) */
        py_slot *grown = PyMem_Realloc(c->slots, (size_t)(n_in + n_out) * sizeof *grown);
        if (!grown) { e = llamavid_error_new(LLAMAVID_ERR_MEMORY, "out of memory"); goto done; }
        memset(grown + c->n, 0, (size_t)(n_in + n_out - c->n) * sizeof *grown);
        c->slots = grown;
        c->n = n_in + n_out;
    }
    PyObject *ins = tensor_dict(c->slots, in, n_in, ps->incremental);
    PyObject *outs = ins ? tensor_dict(c->slots + n_in, out, n_out, ps->incremental) : NULL;
    PyObject *r = outs ? PyObject_CallFunctionObjArgs(ps->run, ins, outs, c->user, NULL) : NULL;
    if (!r) e = python_error("run");
    Py_XDECREF(r);
    Py_XDECREF(ins);
    Py_XDECREF(outs);
done:
    PyGILState_Release(g);
    return e;
}

/* ---- buffers from Python ----------------------------------------------------------------------------------------- */
/* A C-contiguous buffer of `kind` ('f' float32, 'i' int32, 'q' int64) and rank `ndim` (0: any), or an error. */
static int get_buffer(PyObject *obj, Py_buffer *b, char kind, int ndim, const char *what) {
    if (PyObject_GetBuffer(obj, b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous array, found %s", what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *f = b->format ? b->format : "B";
    while (*f == '<' || *f == '=' || *f == '@') f++;
    int ok = (kind == 'f' && b->itemsize == 4 && *f == 'f') ||
             (kind == 'i' && b->itemsize == 4 && (*f == 'i' || *f == 'l')) ||
             (kind == 'q' && b->itemsize == 8 && (*f == 'q' || *f == 'l'));
    if (!ok || f[1] || (ndim && b->ndim != ndim)) {
        static const char *names[] = {"float32", "int32", "int64"};
        PyErr_Format(PyExc_ValueError, "%s: expected %s%s, found format '%s' (%zd bytes per item), %d dims", what,
                     names[kind == 'f' ? 0 : kind == 'i' ? 1 : 2], ndim == 4 ? " [T,3,S,S]" : ndim == 2 ? " [rows, columns]" : "",
                     b->format ? b->format : "B", b->itemsize, b->ndim);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* ---- Model ---------------------------------------------------------------------------------------------------------- */
#define MAX_NATIVE 4

typedef struct {
    PyObject_HEAD
    llamavid_model *m;
    PyObject *stages;
    llamavid_backend backend;
    llamavid_backend *native[MAX_NATIVE];   /* loaded backend libraries, unloaded after the model is freed */
    int n_native;
    llamavid_model_info info;
} ModelObject;

static void Model_dealloc(ModelObject *self) {
    llamavid_model_free(self->m);
    for (int i = 0; i < self->n_native; i++) llamavid_backend_unload(self->native[i]);
    Py_XDECREF(self->stages);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* native: [(path, {option: value})] -> self->native, loaded with llamavid_backend_load; -1 with an exception. */
static int load_native(ModelObject *self, PyObject *native) {
    PyObject *seq = PySequence_Fast(native, "native: expected a sequence of (library path, {option: value})");
    Py_ssize_t n = seq ? PySequence_Fast_GET_SIZE(seq) : 0;
    if (n > MAX_NATIVE) PyErr_Format(PyExc_ValueError, "native: expected at most %d libraries, found %zd", MAX_NATIVE, n);
    for (Py_ssize_t i = 0; seq && !PyErr_Occurred() && i < n; i++) {
        const char *path, *keys[32], *values[32];
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i), *options, *key, *value;
        Py_ssize_t pos = 0;
        int32_t k = 0;
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "sO!", &path, &PyDict_Type, &options)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "native[%zd]: expected (library path, {option: value}), found %R", i, item);
            break;
        }
        while (k < 32 && PyDict_Next(options, &pos, &key, &value)) {
            keys[k] = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
            values[k] = PyUnicode_Check(value) ? PyUnicode_AsUTF8(value) : NULL;
            if (!keys[k] || !values[k]) break;
            k++;
        }
        if (k < PyDict_Size(options)) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "native %s: expected at most 32 options, each a str: str, found %R", path,
                             options);
            break;
        }
        llamavid_error *e = llamavid_backend_load(path, keys, values, k, &self->native[self->n_native]);
        if (e) raise_error(e);
        else self->n_native++;
    }
    Py_XDECREF(seq);
    return PyErr_Occurred() ? -1 : 0;
}

static int Model_init(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"dir", "stages", "verify_hashes", "native", "manifest_sha256", NULL};
    const char *dir, *digest = NULL;
    PyObject *stages, *native = NULL;
    int verify = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sO!|pOz", names, &dir, &PyDict_Type, &stages, &verify, &native, &digest))
        return -1;
    if (self->m || self->n_native) { PyErr_SetString(PyExc_RuntimeError, "Model: already open"); return -1; }
    if (native && native != Py_None && load_native(self, native) < 0) return -1;
    self->stages = Py_NewRef(stages);
    self->backend = (llamavid_backend){"python", stages, py_open_stage, py_open_context, py_run, py_close_context,
                                       py_close_stage};
    const llamavid_backend *list[1 + MAX_NATIVE] = {&self->backend};
    for (int i = 0; i < self->n_native; i++) list[1 + i] = self->native[i];
    llamavid_model_params p = llamavid_model_default_params();
    p.backends = list;
    p.n_backends = 1 + self->n_native;
    p.verify_hashes = verify;
    p.manifest_sha256 = digest;
    llamavid_error *e = llamavid_model_open(dir, &p, &self->m);
    if (!e) e = llamavid_model_get_info(self->m, &self->info);
    if (e) { raise_error(e); return -1; }
    return 0;
}

static PyObject *Model_info(ModelObject *self, void *closure) {
    (void)closure;
    const llamavid_model_info *i = &self->info;
    return Py_BuildValue("{si s(fff) s(fff) si si si si si si si si si si si si si si si si}", "image_size", i->image_size,
                         "mean", i->mean[0], i->mean[1], i->mean[2], "std", i->std[0], i->std[1], i->std[2],
                         "vision_tokens", i->vision_tokens, "vision_width", i->vision_width, "tokens_per_frame",
                         i->tokens_per_frame, "hidden", i->hidden, "vocab_size", i->vocab_size, "context", i->context,
                         "layers", i->layers, "kv_heads", i->kv_heads, "head_dim", i->head_dim, "frame_chunk",
                         i->frame_chunk, "bos", i->bos, "eos", i->eos, "image_id", i->image_id, "shared_kv", i->shared_kv,
                         "has_prefill", i->has_prefill, "api_version", LLAMAVID_API_VERSION);
}

static PyObject *Model_stage(ModelObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    return name ? PyUnicode_FromString(llamavid_model_stage(self->m, name)) : NULL;
}

static PyMethodDef Model_methods[] = {
    {"stage", (PyCFunction)Model_stage, METH_O, "stage(name) -> 'file precision on backend' ('' if not opened)"},
    {NULL}};
static PyGetSetDef Model_getset[] = {{"info", (getter)Model_info, NULL, "the model's sizes and ids", NULL}, {NULL}};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "runtime._llamavid.Model",
    .tp_basicsize = sizeof(ModelObject), .tp_dealloc = (destructor)Model_dealloc, .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An opened artifact set: Config + Stages, shared by sessions on any thread.", .tp_methods = Model_methods,
    .tp_getset = Model_getset, .tp_init = (initproc)Model_init, .tp_new = PyType_GenericNew};

/* ---- Sampler ------------------------------------------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    llamavid_sampler *s;
    int32_t n_vocab;
} SamplerObject;

static void Sampler_dealloc(SamplerObject *self) {
    llamavid_sampler_free(self->s);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Sampler_init(SamplerObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"n_vocab", "temperature", "top_k", "top_p", "repetition_penalty", "seed", NULL};
    llamavid_sampler_params p = llamavid_sampler_default_params();
    int n_vocab;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|fiffK", names, &n_vocab, &p.temperature, &p.top_k, &p.top_p,
                                     &p.repetition_penalty, &seed))
        return -1;
    p.seed = seed;
    llamavid_sampler_free(self->s);
    self->s = NULL;
    llamavid_error *e = llamavid_sampler_create(&p, n_vocab, &self->s);
    if (e) { raise_error(e); return -1; }
    self->n_vocab = n_vocab;
    return 0;
}

static PyObject *Sampler_sample(SamplerObject *self, PyObject *args) {
    PyObject *lo, *ho = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &lo, &ho)) return NULL;
    Py_buffer l, h = {0};
    if (get_buffer(lo, &l, 'f', 0, "logits") < 0) return NULL;
    if (ho != Py_None && get_buffer(ho, &h, 'i', 0, "history") < 0) { PyBuffer_Release(&l); return NULL; }
    PyObject *r = NULL;
    if (l.len / 4 != self->n_vocab)
        PyErr_Format(PyExc_ValueError, "logits: expected %d values, found %zd", self->n_vocab, l.len / 4);
    else
        r = PyLong_FromLong(llamavid_sampler_sample(self->s, l.buf, h.buf, (int32_t)(h.len / 4)));
    PyBuffer_Release(&l);
    if (ho != Py_None) PyBuffer_Release(&h);
    return r;
}

static PyObject *Sampler_reset(SamplerObject *self, PyObject *arg) {
    unsigned long long seed = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    llamavid_sampler_reset(self->s, seed);
    Py_RETURN_NONE;
}

static PyMethodDef Sampler_methods[] = {
    {"sample", (PyCFunction)Sampler_sample, METH_VARARGS, "sample(logits float32 [V], history int32 [n]=None) -> id"},
    {"reset", (PyCFunction)Sampler_reset, METH_O, "reset(seed): restart the RNG"},
    {NULL}};

static PyTypeObject SamplerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "runtime._llamavid.Sampler",
    .tp_basicsize = sizeof(SamplerObject), .tp_dealloc = (destructor)Sampler_dealloc, .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The core's sampler (llamavid.h documents its steps and RNG).", .tp_methods = Sampler_methods,
    .tp_init = (initproc)Sampler_init, .tp_new = PyType_GenericNew};

/* ---- Session ------------------------------------------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    llamavid_session *s;
    ModelObject *model;
    int busy;          /* a call is running on another thread */
} SessionObject;

/* A session's or stream's handle h is open and no call runs on it (else an exception, 0). */
static int open_and_idle(const void *h, int busy, const char *what) {
    if (!h) {
        PyErr_Format(PyExc_ValueError, "%s: expected an open %s, found a closed one", what, what);
        return 0;
    }
    if (busy) {
        PyErr_Format(PyExc_RuntimeError, "%s: expected one call at a time, found another call running on it (use one "
                     "%s per thread)", what, what);
        return 0;
    }
    return 1;
}

static int usable(SessionObject *self) { return open_and_idle(self->s, self->busy, "session"); }

/* next(sampler) on session s with the GIL released; *busy marks the call. */
static PyObject *next_token(llamavid_session *s, PyObject *sampler, int *busy) {
    if (!PyObject_TypeCheck(sampler, &SamplerType) || !((SamplerObject *)sampler)->s) {
        PyErr_SetString(PyExc_TypeError, "next: expected a Sampler");
        return NULL;
    }
    int32_t token;
    llamavid_error *e;
    *busy = 1;
    Py_BEGIN_ALLOW_THREADS
    e = llamavid_session_next(s, ((SamplerObject *)sampler)->s, &token);
    Py_END_ALLOW_THREADS
    *busy = 0;
    return e ? raise_error(e) : PyLong_FromLong(token);
}

static PyObject *stats_object(const llamavid_session *session) {
    llamavid_stats s;
    llamavid_error *e = llamavid_session_stats(session, &s);
    if (e) return raise_error(e);
    return Py_BuildValue("{s(LLLL) s(dddd) sd sL}", "calls", s.calls[0], s.calls[1], s.calls[2], s.calls[3],
                         "stage_seconds", s.stage_seconds[0], s.stage_seconds[1], s.stage_seconds[2], s.stage_seconds[3],
                         "api_seconds", s.api_seconds, "tokens", s.tokens);
}

static void Session_close_impl(SessionObject *self) {
    llamavid_session_free(self->s);
    self->s = NULL;
}

static void Session_dealloc(SessionObject *self) {
    Session_close_impl(self);
    Py_XDECREF(self->model);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Session_init(SessionObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"model", "n_ctx", "n_batch", "frame_chunk", NULL};
    ModelObject *model;
    llamavid_session_params p = {0, 0, 0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|iii", names, &ModelType, &model, &p.n_ctx, &p.n_batch, &p.frame_chunk))
        return -1;
    if (self->s) { PyErr_SetString(PyExc_RuntimeError, "Session: already open"); return -1; }
    llamavid_error *e = llamavid_session_create(model->m, &p, &self->s);
    if (e) { raise_error(e); return -1; }
    self->model = (ModelObject *)Py_NewRef(model);
    return 0;
}

static PyObject *Session_prompt(SessionObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"ids", "pixels", "qformer_ids", "qformer_mask", "image_counts", "embeds", NULL};
    PyObject *o[6] = {NULL, Py_None, Py_None, Py_None, Py_None, Py_None};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OOOOO", names, &o[0], &o[1], &o[2], &o[3], &o[4], &o[5])) return NULL;
    if (!usable(self)) return NULL;
    static const struct { char kind; int ndim; const char *what; } spec[6] = {
        {'i', 1, "ids"}, {'f', 4, "pixels"}, {'q', 2, "qformer_ids"}, {'q', 2, "qformer_mask"}, {'i', 1, "image_counts"},
        {'f', 2, "embeds"}};
    Py_buffer b[6];
    int held[6] = {0};
    PyObject *result = NULL;
    for (int k = 0; k < 6; k++) {
        if (o[k] == Py_None) continue;
        if (get_buffer(o[k], &b[k], spec[k].kind, spec[k].ndim, spec[k].what) < 0) goto out;
        held[k] = 1;
    }
    const llamavid_model_info *i = &self->model->info;
    if (held[1] && (b[1].shape[1] != 3 || b[1].shape[2] != i->image_size || b[1].shape[3] != i->image_size)) {
        PyErr_Format(PyExc_ValueError, "pixels: expected [T,3,%d,%d] float32, found [%zd, %zd, %zd, %zd]", i->image_size,
                     i->image_size, b[1].shape[0], b[1].shape[1], b[1].shape[2], b[1].shape[3]);
        goto out;
    }
    if (held[5] && b[5].shape[1] != i->hidden) {
        PyErr_Format(PyExc_ValueError, "embeds: expected [rows,%d] float32, found [%zd, %zd]", i->hidden, b[5].shape[0],
                     b[5].shape[1]);
        goto out;
    }
    if (held[2] && held[3] && (b[2].shape[0] != 1 || b[3].shape[0] != 1 || b[2].shape[1] != b[3].shape[1])) {
        PyErr_SetString(PyExc_ValueError, "qformer_ids/qformer_mask: expected two [1,L] int64 arrays of the same L");
        goto out;
    }
    llamavid_prompt p = {
        .ids = b[0].buf, .n_ids = (int32_t)(b[0].len / 4),
        .image_counts = held[4] ? b[4].buf : NULL,
        .pixels = held[1] ? b[1].buf : NULL, .n_frames = held[1] ? (int32_t)b[1].shape[0] : 0,
        .qformer_ids = held[2] ? b[2].buf : NULL, .qformer_mask = held[3] ? b[3].buf : NULL,
        .n_qformer = held[2] ? (int32_t)b[2].shape[1] : 0,
        .embeds = held[5] ? b[5].buf : NULL, .n_embeds = held[5] ? (int32_t)b[5].shape[0] : 0};
    llamavid_error *e;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    e = llamavid_session_prompt(self->s, &p);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    result = e ? raise_error(e) : Py_NewRef(Py_None);
out:
    for (int k = 0; k < 6; k++)
        if (held[k]) PyBuffer_Release(&b[k]);
    return result;
}

static PyObject *Session_encode(SessionObject *self, PyObject *args) {
    PyObject *o[4];
    if (!PyArg_ParseTuple(args, "OOOO", &o[0], &o[1], &o[2], &o[3]) || !usable(self)) return NULL;
    static const struct { char kind; int ndim; const char *what; } spec[4] = {
        {'f', 4, "pixels"}, {'q', 2, "qformer_ids"}, {'q', 2, "qformer_mask"}, {'f', 0, "out"}};
    Py_buffer b[4];
    int held = 0;
    PyObject *r = NULL;
    for (; held < 4; held++)
        if (get_buffer(o[held], &b[held], spec[held].kind, spec[held].ndim, spec[held].what) < 0) goto out;
    const llamavid_model_info *i = &self->model->info;
    Py_ssize_t want = b[0].shape[0] * i->tokens_per_frame * i->hidden * 4;
    if (b[3].readonly || b[3].len != want || b[1].shape[1] != b[2].shape[1] || b[0].shape[1] != 3 ||
        b[0].shape[2] != i->image_size || b[0].shape[3] != i->image_size) {
        PyErr_Format(PyExc_ValueError, "encode: expected pixels [T,3,%d,%d], Q-Former ids and mask [1,L] and a writable "
                     "float32 out of T x %d x %d values", i->image_size, i->image_size, i->tokens_per_frame, i->hidden);
        goto out;
    }
    llamavid_error *e;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    e = llamavid_session_encode(self->s, b[0].buf, (int32_t)b[0].shape[0], b[1].buf, b[2].buf, (int32_t)b[1].shape[1],
                                b[3].buf);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    r = e ? raise_error(e) : Py_NewRef(Py_None);
out:
    for (int k = 0; k < held; k++) PyBuffer_Release(&b[k]);
    return r;
}

static PyObject *Session_next(SessionObject *self, PyObject *arg) {
    return usable(self) ? next_token(self->s, arg, &self->busy) : NULL;
}

static PyObject *Session_set_stop(SessionObject *self, PyObject *arg) {
    if (!usable(self)) return NULL;
    PyObject *seq = PySequence_Fast(arg, "set_stop: expected a sequence of token ids");
    if (!seq) return NULL;
    int32_t ids[17];
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t k = 0; k < n && k < 17; k++) ids[k] = (int32_t)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, k));
    Py_DECREF(seq);
    if (PyErr_Occurred()) return NULL;
    llamavid_error *e = llamavid_session_set_stop(self->s, ids, n > 16 ? 17 : (int32_t)n);
    return e ? raise_error(e) : Py_NewRef(Py_None);
}

static PyObject *Session_logits(SessionObject *self, PyObject *unused) {
    (void)unused;
    if (!usable(self)) return NULL;
    const float *l = llamavid_session_logits(self->s);
    if (!l) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)l, (Py_ssize_t)self->model->info.vocab_size * 4);
}

static PyObject *Session_rollback(SessionObject *self, PyObject *arg) {
    long p = PyLong_AsLong(arg);
    if (PyErr_Occurred() || !usable(self)) return NULL;
    llamavid_error *e = llamavid_session_rollback(self->s, (int32_t)p);
    return e ? raise_error(e) : Py_NewRef(Py_None);
}

static PyObject *Session_evict(SessionObject *self, PyObject *args) {
    int start, n;
    if (!PyArg_ParseTuple(args, "ii", &start, &n) || !usable(self)) return NULL;
    llamavid_error *e = llamavid_session_evict(self->s, start, n);
    return e ? raise_error(e) : Py_NewRef(Py_None);
}

static PyObject *Session_reset(SessionObject *self, PyObject *unused) {
    (void)unused;
    if (!usable(self)) return NULL;
    llamavid_session_reset(self->s);
    Py_RETURN_NONE;
}

static PyObject *Session_close(SessionObject *self, PyObject *unused) {
    (void)unused;
    if (self->busy) {
        usable(self);       /* sets the error */
        return NULL;
    }
    Session_close_impl(self);
    Py_RETURN_NONE;
}

static PyObject *Session_kv_info(SessionObject *self, PyObject *unused) {
    (void)unused;
    if (!usable(self)) return NULL;
    llamavid_kv_info k;
    llamavid_error *e = llamavid_session_kv_info(self->s, &k);
    if (e) return raise_error(e);
    return Py_BuildValue("{si si sn sn}", "capacity", k.capacity, "position", k.position, "kv_bytes",
                         (Py_ssize_t)k.kv_bytes, "buffer_bytes", (Py_ssize_t)k.buffer_bytes);
}

static PyObject *Session_stats(SessionObject *self, PyObject *unused) {
    (void)unused;
    return usable(self) ? stats_object(self->s) : NULL;
}

static PyObject *Session_position(SessionObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->s ? llamavid_session_position(self->s) : -1);
}

static PyMethodDef Session_methods[] = {
    {"prompt", (PyCFunction)(void (*)(void))Session_prompt, METH_VARARGS | METH_KEYWORDS,
     "prompt(ids int32, pixels=None float32 [T,3,S,S], qformer_ids=None int64 [1,L], qformer_mask=None, "
     "image_counts=None int32, embeds=None float32 [R,H]): append to the KV cache; logits ready"},
    {"encode", (PyCFunction)Session_encode, METH_VARARGS, "encode(pixels, qformer_ids, qformer_mask, out float32 "
     "[T,n+1,H]): the frames' tokens, the KV cache untouched"},
    {"next", (PyCFunction)Session_next, METH_O, "next(sampler) -> token (eos ends the answer; -1: the cache is full)"},
    {"set_stop", (PyCFunction)Session_set_stop, METH_O, "set_stop(ids): the tokens that end an answer (default: eos)"},
    {"logits", (PyCFunction)Session_logits, METH_NOARGS, "logits() -> bytes of float32 [V], or None"},
    {"rollback", (PyCFunction)Session_rollback, METH_O, "rollback(position): keep positions [0, position)"},
    {"reset", (PyCFunction)Session_reset, METH_NOARGS, "reset(): rollback(0)"},
    {"evict", (PyCFunction)Session_evict, METH_VARARGS, "evict(start, n): drop positions [start, start+n), later keys re-rotated"},
    {"close", (PyCFunction)Session_close, METH_NOARGS, "close(): free the session's buffers now"},
    {"kv_info", (PyCFunction)Session_kv_info, METH_NOARGS, "kv_info() -> {capacity, position, kv_bytes, buffer_bytes}"},
    {"stats", (PyCFunction)Session_stats, METH_NOARGS, "stats() -> calls and seconds per stage, api seconds, tokens"},
    {NULL}};
static PyGetSetDef Session_getset[] = {{"position", (getter)Session_position, NULL, "positions in the KV cache", NULL},
                                       {NULL}};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "runtime._llamavid.Session",
    .tp_basicsize = sizeof(SessionObject), .tp_dealloc = (destructor)Session_dealloc, .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A conversation's KV cache on a Model (one thread at a time).", .tp_methods = Session_methods,
    .tp_getset = Session_getset, .tp_init = (initproc)Session_init, .tp_new = PyType_GenericNew};

/* ---- Stream ------------------------------------------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    llamavid_stream *st;
    ModelObject *model;
    int busy;
} StreamObject;

static int stream_usable(StreamObject *self) { return open_and_idle(self->st, self->busy, "stream"); }

static void Stream_dealloc(StreamObject *self) {
    llamavid_stream_free(self->st);
    Py_XDECREF(self->model);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Runs a core call on the stream with the GIL released; e: its result. */
#define STREAM_CALL(self, e, call) \
    do { self->busy = 1; Py_BEGIN_ALLOW_THREADS e = (call); Py_END_ALLOW_THREADS self->busy = 0; } while (0)

static int Stream_init(StreamObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"model", "prefix_ids", "ingest_ids", "ingest_mask", "n_ctx", "focus_frames", "focus_replace",
                            "reserve", "evict_frames", "max_subtitle", NULL};
    ModelObject *model;
    PyObject *o[3];
    llamavid_stream_params p = llamavid_stream_default_params();
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!OOO|iiiiii", names, &ModelType, &model, &o[0], &o[1], &o[2], &p.n_ctx,
                                     &p.focus_frames, &p.focus_replace, &p.reserve, &p.evict_frames, &p.max_subtitle))
        return -1;
    if (self->st) { PyErr_SetString(PyExc_RuntimeError, "Stream: already open"); return -1; }
    Py_buffer b[3];
    const char kinds[3] = {'i', 'q', 'q'};
    const char *what[3] = {"prefix_ids", "ingest_ids", "ingest_mask"};
    int held = 0, rc = -1;
    for (; held < 3; held++)
        if (get_buffer(o[held], &b[held], kinds[held], held ? 2 : 1, what[held]) < 0) goto out;
    if (b[1].shape[0] != 1 || b[2].shape[0] != 1 || b[1].shape[1] != b[2].shape[1]) {
        PyErr_SetString(PyExc_ValueError, "ingest_ids/ingest_mask: expected two [1,L] int64 arrays of the same L");
        goto out;
    }
    p.prefix_ids = b[0].buf;
    p.n_prefix = (int32_t)(b[0].len / 4);
    p.ingest_qformer_ids = b[1].buf;
    p.ingest_qformer_mask = b[2].buf;
    p.n_ingest = (int32_t)b[1].shape[1];
    llamavid_error *e;
    Py_BEGIN_ALLOW_THREADS
    e = llamavid_stream_create(model->m, &p, &self->st);
    Py_END_ALLOW_THREADS
    if (e) { raise_error(e); goto out; }
    self->model = (ModelObject *)Py_NewRef(model);
    rc = 0;
out:
    for (int k = 0; k < held; k++) PyBuffer_Release(&b[k]);
    return rc;
}

static PyObject *Stream_push(StreamObject *self, PyObject *args) {
    PyObject *px, *sub = Py_None;
    double t;
    if (!PyArg_ParseTuple(args, "Od|O", &px, &t, &sub) || !stream_usable(self)) return NULL;
    Py_buffer b, sb = {0};
    if (get_buffer(px, &b, 'f', 3, "pixels") < 0) return NULL;
    if (sub != Py_None && get_buffer(sub, &sb, 'i', 1, "subtitle") < 0) { PyBuffer_Release(&b); return NULL; }
    const int S = self->model->info.image_size;
    PyObject *r = NULL;
    if (b.shape[0] != 3 || b.shape[1] != S || b.shape[2] != S) {
        PyErr_Format(PyExc_ValueError, "pixels: expected [3,%d,%d] float32, found [%zd, %zd, %zd]", S, S, b.shape[0],
                     b.shape[1], b.shape[2]);
    } else {
        llamavid_error *e;
        STREAM_CALL(self, e, llamavid_stream_push(self->st, b.buf, t, sb.buf, (int32_t)(sb.len / 4)));
        r = e ? raise_error(e) : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&b);
    if (sub != Py_None) PyBuffer_Release(&sb);
    return r;
}

static PyObject *Stream_flush(StreamObject *self, PyObject *unused) {
    (void)unused;
    if (!stream_usable(self)) return NULL;
    llamavid_error *e;
    STREAM_CALL(self, e, llamavid_stream_flush(self->st));
    return e ? raise_error(e) : Py_NewRef(Py_None);
}

static PyObject *Stream_begin(StreamObject *self, PyObject *args) {
    PyObject *o[3];
    if (!PyArg_ParseTuple(args, "OOO", &o[0], &o[1], &o[2]) || !stream_usable(self)) return NULL;
    Py_buffer b[3];
    const char kinds[3] = {'i', 'q', 'q'};
    const char *what[3] = {"ids", "qformer_ids", "qformer_mask"};
    int held = 0;
    PyObject *r = NULL;
    for (; held < 3; held++)
        if (get_buffer(o[held], &b[held], kinds[held], held ? 2 : 1, what[held]) < 0) goto out;
    llamavid_question q = {b[0].buf, (int32_t)(b[0].len / 4), b[1].buf, b[2].buf, (int32_t)b[1].shape[1]};
    llamavid_error *e;
    STREAM_CALL(self, e, llamavid_stream_begin(self->st, &q));
    r = e ? raise_error(e) : Py_NewRef(Py_None);
out:
    for (int k = 0; k < held; k++) PyBuffer_Release(&b[k]);
    return r;
}

static PyObject *Stream_next(StreamObject *self, PyObject *arg) {
    return stream_usable(self) ? next_token(llamavid_stream_session(self->st), arg, &self->busy) : NULL;
}

static PyObject *Stream_end(StreamObject *self, PyObject *unused) {
    (void)unused;
    if (!stream_usable(self)) return NULL;
    llamavid_error *e;
    STREAM_CALL(self, e, llamavid_stream_end(self->st));
    return e ? raise_error(e) : Py_NewRef(Py_None);
}

static PyObject *Stream_info(StreamObject *self, PyObject *unused) {
    (void)unused;
    if (!stream_usable(self)) return NULL;
    llamavid_stream_info i;
    llamavid_error *e = llamavid_stream_get_info(self->st, &i);
    if (e) return raise_error(e);
    return Py_BuildValue("{sL sL sL si si sd sd si si sn sn sn}", "frames_pushed", (long long)i.frames_pushed,
                         "frames_encoded", (long long)i.frames_encoded, "frames_evicted", (long long)i.frames_evicted,
                         "frames_held", i.frames_held, "frames_pending", i.frames_pending, "first_time", i.first_time,
                         "last_time", i.last_time, "position", i.position, "capacity", i.capacity, "kv_bytes",
                         (Py_ssize_t)i.kv_bytes, "feature_bytes", (Py_ssize_t)i.feature_bytes, "buffer_bytes",
                         (Py_ssize_t)i.buffer_bytes);
}

static PyObject *Stream_stats(StreamObject *self, PyObject *unused) {
    (void)unused;
    return stream_usable(self) ? stats_object(llamavid_stream_session(self->st)) : NULL;
}

static PyObject *Stream_close(StreamObject *self, PyObject *unused) {
    (void)unused;
    if (self->busy) {
        stream_usable(self);
        return NULL;
    }
    llamavid_stream_free(self->st);
    self->st = NULL;
    Py_RETURN_NONE;
}

static PyMethodDef Stream_methods[] = {
    {"push", (PyCFunction)Stream_push, METH_VARARGS, "push(pixels float32 [3,S,S], t, subtitle=None int32)"},
    {"flush", (PyCFunction)Stream_flush, METH_NOARGS, "flush(): encode the frames pushed so far"},
    {"begin", (PyCFunction)Stream_begin, METH_VARARGS, "begin(ids int32, qformer_ids int64 [1,L], qformer_mask)"},
    {"next", (PyCFunction)Stream_next, METH_O, "next(sampler) -> token of the open question's answer"},
    {"end", (PyCFunction)Stream_end, METH_NOARGS, "end(): roll back to the warm tier"},
    {"info", (PyCFunction)Stream_info, METH_NOARGS, "info() -> frames, positions, memory"},
    {"stats", (PyCFunction)Stream_stats, METH_NOARGS, "stats() -> calls and seconds per stage"},
    {"close", (PyCFunction)Stream_close, METH_NOARGS, "close(): free the stream now"},
    {NULL}};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "runtime._llamavid.Stream",
    .tp_basicsize = sizeof(StreamObject), .tp_dealloc = (destructor)Stream_dealloc, .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Live video into a warm KV cache (llamavid.h's llamavid_stream).", .tp_methods = Stream_methods,
    .tp_init = (initproc)Stream_init, .tp_new = PyType_GenericNew};

/* ---- module ------------------------------------------------------------------------------------------------------ */
static PyObject *rng_doubles(PyObject *mod, PyObject *args) {
    (void)mod;
    unsigned long long seed;
    int n;
    if (!PyArg_ParseTuple(args, "Ki", &seed, &n)) return NULL;
    if (n < 0 || n > (1 << 24)) return PyErr_Format(PyExc_ValueError, "n: expected 0..2^24, found %d", n);
    double *u = PyMem_Malloc((size_t)(n ? n : 1) * sizeof *u);
    if (!u) return PyErr_NoMemory();
    llamavid_rng_doubles(seed, u, n);
    PyObject *list = PyList_New(n);
    for (int i = 0; list && i < n; i++) PyList_SET_ITEM(list, i, PyFloat_FromDouble(u[i]));
    PyMem_Free(u);
    return list;
}

static PyMethodDef module_methods[] = {
    {"rng_doubles", rng_doubles, METH_VARARGS, "rng_doubles(seed, n) -> the core RNG's first n doubles"}, {NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_llamavid", "The C core of the LLaMA-VID runtime.", -1,
                                    module_methods};

PyMODINIT_FUNC PyInit__llamavid(void) {
    if (PyType_Ready(&ModelType) < 0 || PyType_Ready(&SessionType) < 0 || PyType_Ready(&SamplerType) < 0 ||
        PyType_Ready(&StreamType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Model", (PyObject *)&ModelType) < 0 ||
        PyModule_AddObjectRef(m, "Session", (PyObject *)&SessionType) < 0 ||
        PyModule_AddObjectRef(m, "Sampler", (PyObject *)&SamplerType) < 0 ||
        PyModule_AddObjectRef(m, "Stream", (PyObject *)&StreamType) < 0 ||
        PyModule_AddIntConstant(m, "API_VERSION", LLAMAVID_API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
