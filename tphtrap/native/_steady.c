/*
 * The native steady path of tphtrap serve: one request line in, its reply and audit line out,
 * for the requests that dominate a running guest, in the state the Python engine armed.
 *
 * handle(armed, passes, line) takes a cfg_write, msix_write, cfg_read or msix_read line in the
 * plainest JSON (no escapes, printable ASCII strings, integers, each member once, nothing else)
 * naming a session in ``armed`` (a dict: b"vm\0bdf" -> Armed), and decides it when it is
 *   - a write the engine passes untouched: outside what it filters (the config bytes outside
 *     the TPH capability and the reset registers, the MSI-X BAR outside the ST table), or in
 *     the MSI-X table with no byte in a Vector Control word (in_vector_control), or
 *   - a write of one whole ST entry or Vector Control word while the session is in the state
 *     Armed describes: the tag resolved by the engine's own resolver (kept per tag), the
 *     device value checked against the checker's rule, the guest view, the device state and
 *     the self-check's copy updated as the engine's steady path updates them. In the host
 *     backend only while the decision has no host operation to do (the device already holds
 *     that tag, or cannot be set now): one that sets a tag is the Python path's; or
 *   - a write of the whole TPH control register the engine decided before in the same state
 *     (control(): its decision and effects kept, made on a copy of the session); or
 *   - a valid read of a session armed with its reads: its bytes in a TPH capability, or in
 *     the ST half of a Vector Control word, served from the guest's view (the session's own
 *     image and tags), any other passed to the device.
 * Anything else returns None, and the Python path decides (the same decision: the engines run
 * side by side in tests/test_native.py). Nothing is changed before every test has passed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define NCODES 4        /* the reasons of a steady entry decision (tphtrap.native.CODES) */
#define TAGS 65536      /* a guest tag is the 16 bits of an ST entry or a Vector Control's */
#define UNKNOWN (-2)    /* a tag the resolver has not been asked about yet */
#define MAX_TEXT 1024   /* templates longer than this are not armed (tphtrap.native) */
#define OUT 8192
#define MAX_LINE 65536  /* tphtrap.wire.MAX_LINE: a longer line is refused (line-too-long) */

enum { E_NONE = 0, E_IN_USE = 1, E_UNUSED = 2, E_STALE = 3 };

typedef struct {
    PyObject_HEAD
    PyObject *counts, *written, *guest_tag, *guest_low, *dev_ent, *dev_low, *check_ent;
    PyObject *image, *dirty, *table, *resolver, *allowed, *heads, *whys, *rules, *reasons;
    PyObject *verdicts, *who, *pass_head, *pass_tail, *ops_text;
    PyObject *sess, *controls, *learn, *key_attrs, *backend_attrs; /* control writes */
    PyObject *host; /* None (the writes backend), or (allocated vectors or None, idle effects) */
    PyObject *reads; /* None (reads are the Python path's), or what they need (armed_reads) */
    long long ctrl_off;
    int in_msix, entries, reads_ok;
    long long watch_lo, watch_hi, first, n, bir, msix_start, msix_end, mask;
} Armed;

static PyObject *S_CFG, *S_MSIX, *S_CFG_READ, *S_MSIX_READ, *S_PASS, *S_NOT_TPH, *S_PASS_KEY;
/* attribute names, interned once */
static PyObject *N_image, *N_checker, *N_dirty, *N_rules, *N_dev_ctrl, *N_ctrl, *N_backend, *N_ent;

/* Every object an Armed holds (the resolver and learn close over the NativePath holding it:
 * a cycle the collector must see). */
#define ARMED_OBJECTS(X)                                                                      \
    X(counts) X(written) X(guest_tag) X(guest_low) X(dev_ent) X(dev_low) X(check_ent)         \
    X(image) X(dirty) X(table) X(resolver) X(allowed) X(heads) X(whys) X(rules) X(reasons)    \
    X(verdicts) X(who) X(pass_head) X(pass_tail) X(ops_text) X(sess) X(controls) X(learn)  \
    X(key_attrs) X(backend_attrs) X(host) X(reads)

static int armed_traverse(Armed *a, visitproc visit, void *arg) {
#define VISIT(f) Py_VISIT(a->f);
    ARMED_OBJECTS(VISIT)
#undef VISIT
    return 0;
}

static int armed_clear(Armed *a) {
#define CLEAR(f) Py_CLEAR(a->f);
    ARMED_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}

static void armed_dealloc(Armed *a) {
    PyObject_GC_UnTrack(a);
    armed_clear(a);
    Py_TYPE(a)->tp_free((PyObject *)a);
}

static int tuple_of(PyObject *t, Py_ssize_t n, PyTypeObject *type, const char *what) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != n) {
        PyErr_Format(PyExc_TypeError, "%s: a tuple of %zd", what, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyTuple_GET_ITEM(t, i);
        if (type != NULL && Py_TYPE(o) != type) {
            PyErr_Format(PyExc_TypeError, "%s[%zd]: wrong type", what, i);
            return -1;
        }
        if (PyBytes_Check(o) && PyBytes_GET_SIZE(o) > MAX_TEXT) {
            PyErr_Format(PyExc_ValueError, "%s[%zd]: longer than %d bytes", what, i, MAX_TEXT);
            return -1;
        }
    }
    return 0;
}

static int text_of(PyObject *o, const char *what) {
    if (!PyBytes_Check(o) || PyBytes_GET_SIZE(o) > MAX_TEXT) {
        PyErr_Format(PyExc_TypeError, "%s: bytes of at most %d", what, MAX_TEXT);
        return -1;
    }
    return 0;
}

static int list_or_none(PyObject *o, long long n, const char *what) {
    if (o == Py_None) return 0;
    if (!PyList_CheckExact(o) || PyList_GET_SIZE(o) < n) {
        PyErr_Format(PyExc_TypeError, "%s: a list of at least %lld items", what, n);
        return -1;
    }
    return 0;
}

/* A text with slots, as tphtrap.native._template builds it: (pieces, slots), the pieces bytes,
 * one more of them than the slots, each slot one of SLOTS. */
#define SLOTS "itowbvm" /* id, timestamp, offset, width, bar, guest view, read mask */
static int template_valid(PyObject *t) {
    if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 2) return -1;
    PyObject *pieces = PyTuple_GET_ITEM(t, 0), *slots = PyTuple_GET_ITEM(t, 1);
    if (!PyBytes_CheckExact(slots) || tuple_of(pieces, PyBytes_GET_SIZE(slots) + 1,
                                               &PyBytes_Type, "template pieces"))
        return -1;
    const char *k = PyBytes_AS_STRING(slots);
    Py_ssize_t length = 0;
    for (Py_ssize_t i = 0; i < PyBytes_GET_SIZE(slots); i++)
        if (k[i] == 0 || strchr(SLOTS, k[i]) == NULL) return -1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(pieces); i++)
        length += PyBytes_GET_SIZE(PyTuple_GET_ITEM(pieces, i));
    return length <= MAX_TEXT ? 0 : -1;
}

/* What reads need (tphtrap.native, NativePath._arm): (caps, verdicts, their names,
 * reasons, templates). caps: the (start, end) of each TPH capability, served from the image;
 * verdicts, names, reasons: of a read passed and of one served from the guest's view;
 * templates: the replies of both, the audit lines of a served config and MSI-X read. */
static int reads_valid(Armed *a) {
    PyObject *r = a->reads, *caps, *templates;
    if (!PyTuple_CheckExact(r) || PyTuple_GET_SIZE(r) != 5) goto bad;
    caps = PyTuple_GET_ITEM(r, 0);
    templates = PyTuple_GET_ITEM(r, 4);
    if (!PyTuple_CheckExact(caps) || !PyByteArray_CheckExact(a->image) ||
        tuple_of(PyTuple_GET_ITEM(r, 1), 2, NULL, "read verdicts") ||
        tuple_of(PyTuple_GET_ITEM(r, 2), 2, &PyUnicode_Type, "read verdict names") ||
        tuple_of(PyTuple_GET_ITEM(r, 3), 2, &PyUnicode_Type, "read reasons") ||
        tuple_of(templates, 4, &PyTuple_Type, "read templates"))
        goto bad;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(caps); i++) {
        PyObject *c = PyTuple_GET_ITEM(caps, i);
        if (!PyTuple_CheckExact(c) || PyTuple_GET_SIZE(c) != 2) goto bad;
        long long start = PyLong_AsLongLong(PyTuple_GET_ITEM(c, 0));
        long long end = PyLong_AsLongLong(PyTuple_GET_ITEM(c, 1));
        if (PyErr_Occurred() || start < 0 || end <= start ||
            end > PyByteArray_GET_SIZE(a->image))
            goto bad;
    }
    for (Py_ssize_t i = 0; i < 4; i++)
        if (template_valid(PyTuple_GET_ITEM(templates, i))) goto bad;
    if (a->in_msix && (a->n <= 0 || list_or_none(a->guest_tag, a->n, "guest_tag") ||
                       a->guest_tag == Py_None))
        goto bad;
    return 0;
bad:
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "reads");
    return -1;
}

static PyObject *armed_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if (kw != NULL && PyDict_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "Armed takes positional arguments only");
        return NULL;
    }
    Armed *a = (Armed *)type->tp_alloc(type, 0);
    if (a == NULL) return NULL;
    PyObject **slot[] = {&a->counts, &a->written, &a->guest_tag, &a->guest_low, &a->dev_ent,
                         &a->dev_low, &a->check_ent, &a->image, &a->dirty, &a->table,
                         &a->resolver, &a->allowed, &a->heads, &a->whys, &a->rules,
                         &a->reasons, &a->verdicts, &a->who, &a->pass_head, &a->pass_tail,
                         &a->ops_text, &a->sess, &a->controls, &a->learn, &a->key_attrs,
                         &a->backend_attrs, &a->host, &a->reads};
    enum { N = sizeof slot / sizeof slot[0] };
    PyObject *o[N];
    if (!PyArg_ParseTuple(args, "OOOOOOOOO(pLLLLLLL)iOOOLOOOOOOOOOOLOOOOOO:Armed", &o[0], &o[1],
                          &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &a->in_msix,
                          &a->watch_lo, &a->watch_hi, &a->first, &a->n, &a->bir,
                          &a->msix_start, &a->msix_end, &a->entries, &o[9], &o[10], &o[11],
                          &a->mask, &o[12], &o[13], &o[14], &o[15], &o[16], &o[17], &o[18],
                          &o[19], &o[20], &o[21], &a->ctrl_off, &o[22], &o[23], &o[24], &o[25],
                          &o[26], &o[27])) {
        Py_DECREF(a);
        return NULL;
    }
    for (int i = 0; i < N; i++) {
        Py_INCREF(o[i]);
        *slot[i] = o[i];
    }
    if (!PyDict_CheckExact(a->counts)) {
        PyErr_SetString(PyExc_TypeError, "counts: a dict");
        goto fail;
    }
    if (text_of(a->who, "who") || text_of(a->pass_head, "pass_head") ||
        text_of(a->pass_tail, "pass_tail") || text_of(a->ops_text, "ops_text"))
        goto fail;
    if (tuple_of(a->backend_attrs,
                 PyTuple_Check(a->backend_attrs) ? PyTuple_GET_SIZE(a->backend_attrs) : -1,
                 &PyUnicode_Type, "backend_attrs"))
        goto fail;
    if (a->host != Py_None) {
        /* (allocated: a frozenset, or None when every entry can be set; idle: a tuple of
         * (object, attribute name, value)) */
        PyObject *allocated, *idle;
        if (!PyTuple_CheckExact(a->host) || PyTuple_GET_SIZE(a->host) != 2) goto fail_host;
        allocated = PyTuple_GET_ITEM(a->host, 0);
        idle = PyTuple_GET_ITEM(a->host, 1);
        if ((allocated != Py_None && !PyFrozenSet_CheckExact(allocated)) ||
            (a->in_msix && allocated == Py_None) || !PyTuple_CheckExact(idle))
            goto fail_host;
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(idle); k++) {
            PyObject *e = PyTuple_GET_ITEM(idle, k);
            if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 3 ||
                !PyUnicode_CheckExact(PyTuple_GET_ITEM(e, 1)))
                goto fail_host;
        }
    }
    if (a->ctrl_off >= 0 &&
        (!PyDict_CheckExact(a->controls) || !PyCallable_Check(a->learn) ||
         tuple_of(a->key_attrs, PyTuple_Check(a->key_attrs) ? PyTuple_GET_SIZE(a->key_attrs) : -1,
                  &PyUnicode_Type, "key_attrs"))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "control writes");
        goto fail;
    }
    if (a->reads != Py_None) {
        if (reads_valid(a)) goto fail;
        a->reads_ok = 1;
    }
    if (a->entries != E_NONE && a->entries != E_IN_USE && a->entries != E_UNUSED) {
        PyErr_SetString(PyExc_ValueError, "entries mode");
        goto fail;
    }
    /* (a replayed control write may arm the entries: what they need, when either is armed) */
    if (a->entries != E_NONE || a->ctrl_off >= 0) {
        if (a->n <= 0 || list_or_none(a->written, a->n, "written") ||
            list_or_none(a->dev_ent, a->n, "dev_ent") ||
            list_or_none(a->check_ent, a->n, "check_ent") || a->written == Py_None ||
            a->dev_ent == Py_None || a->check_ent == Py_None)
            goto fail_types;
        if (a->in_msix) {
            if (list_or_none(a->guest_tag, a->n, "guest_tag") ||
                list_or_none(a->guest_low, a->n, "guest_low") ||
                list_or_none(a->dev_low, a->n, "dev_low") || a->guest_tag == Py_None ||
                a->guest_low == Py_None || a->dev_low == Py_None)
                goto fail_types;
        } else if (!PyByteArray_CheckExact(a->image) ||
                   PyByteArray_GET_SIZE(a->image) < a->first + 2 * a->n || a->first < 0) {
            PyErr_SetString(PyExc_TypeError, "image: a bytearray holding the ST table");
            goto fail;
        }
        if (a->entries != E_NONE && (!PyByteArray_CheckExact(a->table) ||
                                     PyByteArray_GET_SIZE(a->table) != 4 * TAGS ||
                                     !PyCallable_Check(a->resolver))) {
            PyErr_SetString(PyExc_TypeError, "table: a bytearray of 65536 int32, resolver");
            goto fail;
        }
        if (a->entries == E_IN_USE && !PyFrozenSet_CheckExact(a->allowed)) {
            PyErr_SetString(PyExc_TypeError, "allowed: a frozenset while entries are in use");
            goto fail;
        }
        if (!PySet_CheckExact(a->dirty)) {
            PyErr_SetString(PyExc_TypeError, "dirty: a set");
            goto fail;
        }
        if (tuple_of(a->heads, 2 * NCODES, &PyBytes_Type, "heads") ||
            tuple_of(a->whys, 2 * NCODES, &PyBytes_Type, "whys") ||
            tuple_of(a->rules, NCODES, &PyBytes_Type, "rules") ||
            tuple_of(a->reasons, NCODES, &PyUnicode_Type, "reasons") ||
            tuple_of(a->verdicts, 4, NULL, "verdicts"))
            goto fail;
        for (int k = 2; k < 4; k++)
            if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(a->verdicts, k))) {
                PyErr_SetString(PyExc_TypeError, "verdicts: two verdicts and their names");
                goto fail;
            }
    }
    return (PyObject *)a;
fail_host:
    PyErr_SetString(PyExc_TypeError, "host: (allocated, idle effects)");
    goto fail;
fail_types:
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "entry lists");
fail:
    Py_DECREF(a);
    return NULL;
}

static PyObject *armed_stale(Armed *a, PyObject *noargs) {
    (void)noargs;
    a->entries = E_STALE;
    a->reads_ok = 0;
    Py_RETURN_NONE;
}

static PyObject *armed_passes_only(Armed *a, PyObject *noargs) {
    (void)noargs;
    a->entries = E_NONE;
    a->ctrl_off = -1;
    a->reads_ok = 0;
    Py_RETURN_NONE;
}

static PyMethodDef armed_methods[] = {
    {"stale", (PyCFunction)armed_stale, METH_NOARGS,
     "The engine changed the session: its entry writes and reads wait to be armed again; "
     "passes go on."},
    {"passes_only", (PyCFunction)armed_passes_only, METH_NOARGS,
     "Passes only: entry and control writes and reads are the Python path's until the session "
     "is armed."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ArmedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tphtrap.native._steady.Armed",
    .tp_basicsize = sizeof(Armed),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)armed_traverse,
    .tp_clear = (inquiry)armed_clear,
    .tp_new = armed_new,
    .tp_dealloc = (destructor)armed_dealloc,
    .tp_methods = armed_methods,
    .tp_doc = "One session's state for the native steady path (tphtrap.native.arm).",
};

/* --- the request line ------------------------------------------------------------------ */
enum { F_ID = 1, F_OP = 2, F_VM = 4, F_BDF = 8, F_BAR = 16, F_OFFSET = 32, F_WIDTH = 64,
       F_VALUE = 128 };
#define OP_CFG 1
#define OP_MSIX 2
#define OP_CFG_READ 3
#define OP_MSIX_READ 4
#define MAX_ID_LEN 128
#define MAX_NAME_LEN 64

typedef struct {
    const char *id, *vm, *bdf;
    Py_ssize_t id_len, vm_len, bdf_len;
    int id_is_str, op, seen;
    unsigned long long bar, offset, width, value;
} Req;

typedef struct { const char *p, *end; } Cur;

static void blank(Cur *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\r' || *c->p == '\n'))
        c->p++;
}

/* A string of printable ASCII but '"' and '\\' (anything else: not the plainest JSON). */
static int string(Cur *c, const char **s, Py_ssize_t *len) {
    if (c->p >= c->end || *c->p != '"') return -1;
    const char *start = ++c->p;
    while (c->p < c->end && *c->p != '"') {
        unsigned char ch = (unsigned char)*c->p;
        if (ch < 0x20 || ch > 0x7e || ch == '\\') return -1;
        c->p++;
    }
    if (c->p >= c->end) return -1;
    *s = start;
    *len = c->p - start;
    c->p++;
    return 0;
}

/* A JSON integer of at most ``digits`` digits, no sign, no leading zero. */
static int number(Cur *c, unsigned long long *v, int digits) {
    const char *start = c->p;
    unsigned long long x = 0;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
        x = 10 * x + (unsigned long long)(*c->p - '0');
        c->p++;
    }
    Py_ssize_t n = c->p - start;
    if (n == 0 || n > digits || (n > 1 && *start == '0')) return -1;
    if (c->p < c->end && (*c->p == '.' || *c->p == 'e' || *c->p == 'E')) return -1;
    *v = x;
    return 0;
}

static int key_is(const char *k, Py_ssize_t n, const char *name) {
    return (Py_ssize_t)strlen(name) == n && memcmp(k, name, (size_t)n) == 0;
}

static int member(Cur *c, Req *r) {
    const char *k;
    Py_ssize_t n;
    if (string(c, &k, &n)) return -1;
    blank(c);
    if (c->p >= c->end || *c->p != ':') return -1;
    c->p++;
    blank(c);
    int flag;
    unsigned long long *num = NULL;
    if (key_is(k, n, "id")) flag = F_ID;
    else if (key_is(k, n, "op")) flag = F_OP;
    else if (key_is(k, n, "vm")) flag = F_VM;
    else if (key_is(k, n, "bdf")) flag = F_BDF;
    else if (key_is(k, n, "bar")) flag = F_BAR, num = &r->bar;
    else if (key_is(k, n, "offset")) flag = F_OFFSET, num = &r->offset;
    else if (key_is(k, n, "width")) flag = F_WIDTH, num = &r->width;
    else if (key_is(k, n, "value")) flag = F_VALUE, num = &r->value;
    else return -1;
    if (r->seen & flag) return -1;
    r->seen |= flag;
    if (num != NULL) return number(c, num, 19);
    if (flag == F_ID) {
        if (c->p < c->end && *c->p == '"') {
            r->id_is_str = 1;
            if (string(c, &r->id, &r->id_len)) return -1;
            return r->id_len >= 1 && r->id_len <= MAX_ID_LEN ? 0 : -1;
        }
        const char *start = c->p;
        if (c->p < c->end && *c->p == '-') c->p++;
        unsigned long long v;
        if (number(c, &v, 18) || (v == 0 && *start == '-')) return -1; /* "-0" is 0 */
        r->id = start;
        r->id_len = c->p - start;
        return 0;
    }
    const char *s;
    Py_ssize_t len;
    if (string(c, &s, &len)) return -1;
    if (flag == F_OP) {
        if (key_is(s, len, "cfg_write")) r->op = OP_CFG;
        else if (key_is(s, len, "msix_write")) r->op = OP_MSIX;
        else if (key_is(s, len, "cfg_read")) r->op = OP_CFG_READ;
        else if (key_is(s, len, "msix_read")) r->op = OP_MSIX_READ;
        else return -1;
    } else if (flag == F_VM) {
        if (len < 1 || len > MAX_NAME_LEN) return -1;
        r->vm = s, r->vm_len = len;
    } else {
        r->bdf = s, r->bdf_len = len;
    }
    return 0;
}

static int parse(const char *p, Py_ssize_t n, Req *r) {
    Cur c = {p, p + n};
    memset(r, 0, sizeof *r);
    blank(&c);
    if (c.p >= c.end || *c.p != '{') return -1;
    c.p++;
    for (;;) {
        blank(&c);
        if (member(&c, r)) return -1;
        blank(&c);
        if (c.p >= c.end) return -1;
        if (*c.p == '}') break;
        if (*c.p != ',') return -1;
        c.p++;
    }
    c.p++;
    blank(&c);
    if (c.p != c.end) return -1;
    int need = F_ID | F_OP | F_VM | F_BDF | F_OFFSET | F_WIDTH;
    unsigned long long w = r->width;
    int cfg = r->op == OP_CFG || r->op == OP_CFG_READ;
    if (r->op == OP_CFG || r->op == OP_MSIX) need |= F_VALUE;
    if (!cfg) need |= F_BAR;
    if (r->seen != need) return -1;
    if (cfg) {
        if ((w != 1 && w != 2 && w != 4) || r->offset + w > 4096) return -1;
    } else if (r->bar > 5 || (w != 1 && w != 2 && w != 4 && w != 8)) {
        return -1;  /* (an offset of 19 digits is below 2^64 - 8) */
    }
    if (w < 8 && r->value >> (8 * w)) return -1;
    return 0;
}

/* --- text ------------------------------------------------------------------------------- */
typedef struct { char buf[OUT]; size_t n; } Text;

static void put(Text *t, const char *s, size_t n) {
    if (t->n + n <= OUT) memcpy(t->buf + t->n, s, n);
    t->n += n;
}
#define puts_(t, s) put((t), (s), sizeof(s) - 1) /* a string literal */
static void put_bytes(Text *t, PyObject *b) {
    put(t, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
}
static void put_u(Text *t, unsigned long long v) {
    char d[24];
    char *p = d + sizeof d;
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put(t, p, (size_t)(d + sizeof d - p));
}
static void put_id(Text *t, const Req *r) {
    if (r->id_is_str) put(t, "\"", 1);
    put(t, r->id, (size_t)r->id_len);
    if (r->id_is_str) put(t, "\"", 1);
}
/* A write at the request's place, of ``width`` bytes (the request's, or the host backend's
 * low half of Vector Control). */
static void put_write(Text *t, const Req *r, unsigned long long width, unsigned long long value) {
    if (r->op == OP_CFG) {
        puts_(t, "{\"space\":\"config\",\"offset\":");
    } else {
        puts_(t, "{\"space\":\"bar\",\"bar\":");
        put_u(t, r->bar);
        puts_(t, ",\"offset\":");
    }
    put_u(t, r->offset);
    puts_(t, ",\"width\":");
    put_u(t, width);
    puts_(t, ",\"value\":");
    put_u(t, value);
    puts_(t, "}");
}

/* ISO 8601 UTC with microseconds, as the audit's clock writes it (tphtrap.audit._UtcClock). */
static void put_timestamp(Text *t) {
    static time_t second = -1;
    static char prefix[32];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != second) {
        struct tm tm;
        gmtime_r(&ts.tv_sec, &tm);
        strftime(prefix, sizeof prefix, "%Y-%m-%dT%H:%M:%S", &tm);
        second = ts.tv_sec;
    }
    char micro[8] = {'.', 0, 0, 0, 0, 0, 0, 'Z'};
    long us = ts.tv_nsec / 1000;
    for (int k = 6; k >= 1; k--, us /= 10) micro[k] = (char)('0' + us % 10);
    put(t, prefix, strlen(prefix));
    put(t, micro, sizeof micro);
}

static PyObject *text_bytes(const Text *t) {
    if (t->n > OUT) {
        PyErr_SetString(PyExc_OverflowError, "native reply longer than its buffer");
        return NULL;
    }
    return PyBytes_FromStringAndSize(t->buf, (Py_ssize_t)t->n);
}

/* --- state ------------------------------------------------------------------------------ */
static int bump(PyObject *counts, PyObject *key) {
    PyObject *old = PyDict_GetItemWithError(counts, key);
    if (old == NULL && PyErr_Occurred()) return -1;
    long v = old == NULL ? 0 : PyLong_AsLong(old);
    if (v == -1 && PyErr_Occurred()) return -1;
    PyObject *nv = PyLong_FromLong(v + 1);
    if (nv == NULL) return -1;
    int rc = PyDict_SetItem(counts, key, nv);
    Py_DECREF(nv);
    return rc;
}

static void set_item(PyObject *list, Py_ssize_t i, PyObject *v) {
    Py_INCREF(v);
    PyList_SetItem(list, i, v); /* steals v, drops the old item; i was checked */
}

static PyObject *pass_reply(Armed *a, const Req *r, PyObject *op) {
    Text t;
    t.n = 0;
    puts_(&t, "{\"id\":");
    put_id(&t, r);
    puts_(&t, ",\"ok\":true,\"decision\":");
    put_bytes(&t, a->pass_head);
    puts_(&t, ",\"writes\":[");
    put_write(&t, r, r->width, r->value);
    put_bytes(&t, a->pass_tail);
    puts_(&t, "}}\n");
    PyObject *reply = text_bytes(&t);
    if (reply == NULL) return NULL;
    if (bump(a->counts, S_PASS_KEY)) {
        Py_DECREF(reply);
        return NULL;
    }
    return Py_BuildValue("(NOOOO)", reply, Py_None, op, S_PASS, S_NOT_TPH);
}

/* The resolved device value and reason of guest tag ``tag`` (packed: reason << 16 | value),
 * or -1: not a steady decision. Asks the resolver the first time. */
static long long resolved(Armed *a, unsigned long long tag) {
    int32_t *table = (int32_t *)PyByteArray_AS_STRING(a->table);
    int32_t v = table[tag];
    if (v == UNKNOWN) {
        PyObject *got = PyObject_CallFunction(a->resolver, "K", tag);
        if (got == NULL) return -2;
        long x = PyLong_AsLong(got);
        Py_DECREF(got);
        if (x == -1 && PyErr_Occurred()) return -2;
        if (x < -1 || x >= (long)NCODES << 16) {
            PyErr_SetString(PyExc_ValueError, "resolver: out of range");
            return -2;
        }
        table = (int32_t *)PyByteArray_AS_STRING(a->table); /* (the call may not resize it) */
        table[tag] = (int32_t)x;
        v = (int32_t)x;
    }
    return v;
}

static PyObject *entry(Armed *a, const Req *r, PyObject *op, Py_ssize_t i) {
    unsigned long long tag, was = 0;
    int written;
    if (a->in_msix) {
        tag = r->value >> 16;
        PyObject *old = PyList_GET_ITEM(a->guest_tag, i);
        if (!PyLong_CheckExact(old)) Py_RETURN_NONE;
        was = PyLong_AsUnsignedLongLong(old);
        if (PyErr_Occurred()) return NULL;
        written = PyList_GET_ITEM(a->written, i) == Py_True || tag != was;
    } else {
        tag = r->value;
        written = 1;
    }
    if (!written) Py_RETURN_NONE; /* an unwritten entry takes the fallback: the Python path */
    long long packed = resolved(a, tag);
    if (packed == -2) return NULL;
    if (packed < 0) Py_RETURN_NONE;
    int code = (int)(packed >> 16);
    unsigned long long dv = (unsigned long long)(packed & 0xFFFF);
    unsigned long long word = a->in_msix ? (r->value & 0xFFFF) | (dv << 16) : dv;

    /* the self-check: the entry in use holds a tag the checker's rule allows at its width */
    if (a->entries == E_IN_USE) {
        PyObject *t = PyLong_FromUnsignedLongLong(dv & (unsigned long long)a->mask);
        if (t == NULL) return NULL;
        int ok = PySet_Contains(a->allowed, t);
        Py_DECREF(t);
        if (ok < 0) return NULL;
        if (!ok) Py_RETURN_NONE;
    }
    int verdict;
    if (a->host != Py_None) {
        /* HostOps.ops: an st_set where the tag is in use, the entry can be set (its vector
         * allocated) and the device does not hold it yet; then the Python path decides */
        PyObject *allocated = PyTuple_GET_ITEM(a->host, 0);
        int settable = 1;
        if (a->entries == E_IN_USE && allocated != Py_None) {
            PyObject *o = PyLong_FromSsize_t(i);
            settable = o == NULL ? -1 : PySet_Contains(allocated, o);
            Py_XDECREF(o);
            if (settable < 0) return NULL;
        }
        if (a->entries == E_IN_USE && settable) {
            PyObject *cur = PyList_GET_ITEM(a->dev_ent, i);
            if (!PyLong_CheckExact(cur)) Py_RETURN_NONE;
            unsigned long long held = PyLong_AsUnsignedLongLong(cur);
            if (PyErr_Occurred()) return NULL;
            if (held != (dv & (unsigned long long)a->mask)) Py_RETURN_NONE;
        }
        verdict = a->in_msix; /* nothing to do, or the guest's mask bits go through */
    } else {
        verdict = word == r->value ? 0 : 1;
    }
    /* what goes to the device as a write: the entry (writes), the low half of Vector Control
     * (host, MSI-X) or nothing (host, the capability's ST table) */
    int raw = a->host == Py_None, writes = raw || a->in_msix;
    unsigned long long out_width = raw ? r->width : 2;
    unsigned long long out_value = raw ? word : r->value & 0xFFFF;
    unsigned long long read_mask = a->in_msix ? 0xFFFF0000ULL : 0xFFFFULL;
    unsigned long long view = a->in_msix ? tag << 16 : r->value;

    /* every object made before anything changes */
    PyObject *o_dv = PyLong_FromUnsignedLongLong(dv);
    PyObject *o_word = PyLong_FromUnsignedLongLong(word);
    PyObject *o_tag = PyLong_FromUnsignedLongLong(tag);
    PyObject *o_low = PyLong_FromUnsignedLongLong(r->value & 0xFFFF);
    PyObject *o_i = PyLong_FromSsize_t(i);
    Text rep, aud;
    rep.n = aud.n = 0;
    PyObject *reply = NULL, *audit = NULL, *out = NULL;
    if (!o_dv || !o_word || !o_tag || !o_low || !o_i) goto done;

    puts_(&rep, "{\"id\":");
    put_id(&rep, r);
    puts_(&rep, ",\"ok\":true,\"decision\":");
    put_bytes(&rep, PyTuple_GET_ITEM(a->heads, 2 * code + verdict));
    puts_(&rep, ",\"writes\":[");
    if (writes) put_write(&rep, r, out_width, out_value);
    puts_(&rep, "]");
    put_bytes(&rep, a->ops_text);
    puts_(&rep, ",\"guest_value\":");
    put_u(&rep, view);
    puts_(&rep, ",\"read_mask\":");
    put_u(&rep, read_mask);
    put_bytes(&rep, PyTuple_GET_ITEM(a->rules, code));
    puts_(&rep, "}}\n");

    put_bytes(&aud, a->who);
    if (r->op == OP_MSIX) {
        puts_(&aud, "\"msix\",\"op\":\"write\",\"bar\":");
        put_u(&aud, r->bar);
        puts_(&aud, ",\"offset\":");
    } else {
        puts_(&aud, "\"config\",\"op\":\"write\",\"offset\":");
    }
    put_u(&aud, r->offset);
    puts_(&aud, ",\"width\":");
    put_u(&aud, r->width);
    puts_(&aud, ",\"guest_value\":");
    put_u(&aud, r->value);
    put_bytes(&aud, PyTuple_GET_ITEM(a->whys, 2 * code + verdict));
    if (writes) {
        puts_(&aud, ",\"device_writes\":[");
        put_write(&aud, r, out_width, out_value);
        puts_(&aud, "],\"device_value\":");
        put_u(&aud, out_value);
    }
    puts_(&aud, ",\"guest_view\":");
    put_u(&aud, view);
    puts_(&aud, ",\"read_mask\":");
    put_u(&aud, read_mask);
    puts_(&aud, ",\"id\":");
    put_id(&aud, r);
    puts_(&aud, ",\"event\":\"access.decided\",\"level\":\"info\",\"timestamp\":\"");
    put_timestamp(&aud);
    puts_(&aud, "\"}\n");
    reply = text_bytes(&rep);
    audit = text_bytes(&aud);
    if (!reply || !audit) goto done;
    out = PyTuple_Pack(5, reply, audit, op, PyTuple_GET_ITEM(a->verdicts, 2 + verdict),
                       PyTuple_GET_ITEM(a->reasons, code));
    if (out == NULL) goto done;
    if (a->entries == E_UNUSED && PySet_Add(a->dirty, o_i)) goto fail;
    if (bump(a->counts, PyTuple_GET_ITEM(a->verdicts, verdict))) goto fail;

    /* the guest's view (Session.put_entry), the device (Session.commit), the checker's copy */
    if (a->in_msix) {
        if (tag != was) {
            set_item(a->guest_tag, i, o_tag);
            set_item(a->written, i, Py_True);
        }
        set_item(a->guest_low, i, o_low);
        set_item(a->dev_low, i, o_low);
    } else {
        char *image = PyByteArray_AS_STRING(a->image);
        image[a->first + 2 * i] = (char)(r->value & 0xFF);
        image[a->first + 2 * i + 1] = (char)(r->value >> 8);
        set_item(a->written, i, Py_True);
    }
    if (raw) {
        set_item(a->dev_ent, i, o_dv);
        set_item(a->check_ent, i, o_word);
    } else { /* no host operation: the device and the self-check's copy are as they were */
        PyObject *idle = PyTuple_GET_ITEM(a->host, 1);
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(idle); k++) {
            PyObject *e = PyTuple_GET_ITEM(idle, k);
            if (PyObject_SetAttr(PyTuple_GET_ITEM(e, 0), PyTuple_GET_ITEM(e, 1),
                                 PyTuple_GET_ITEM(e, 2)))
                goto fail; /* (plain attributes: it does not fail) */
        }
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    Py_XDECREF(o_dv); Py_XDECREF(o_word); Py_XDECREF(o_tag); Py_XDECREF(o_low);
    Py_XDECREF(o_i); Py_XDECREF(reply); Py_XDECREF(audit);
    return out;
}


/* --- control writes: the engine's own decisions, replayed ------------------------------------
 * A write of the whole TPH control register is decided by the engine itself, on a copy of the
 * session (tphtrap.native, NativePath._learn), the first time it is seen in a state; the
 * decision and what it changed are kept under the state it depended on (control_key), and
 * replayed here when the same write comes in the same state. */

static PyObject *item0(PyObject *owner, PyObject *attr) {
    PyObject *list = PyObject_GetAttr(owner, attr);
    if (list == NULL) return NULL;
    if (!PyList_CheckExact(list) || PyList_GET_SIZE(list) < 1) {
        Py_DECREF(list);
        PyErr_Format(PyExc_TypeError, "%U: a non-empty list", attr);
        return NULL;
    }
    PyObject *v = Py_NewRef(PyList_GET_ITEM(list, 0));
    Py_DECREF(list);
    return v;
}

/* (value, guest control, device control, checker's control, dirty entries, rules, the
 * session's attributes..., the backend's...): tphtrap.native.control_key builds the same. */
/* The dirty entries as tphtrap.native._dirty_key gives them: (entry, the guest's value,
 * written, the device's value, the self-check's copy) each, in order, or their number when
 * there are more than DIRTY_KEYED. */
#define DIRTY_KEYED 8
static PyObject *dirty_key(Armed *a, PyObject *dirty, PyObject *image, PyObject *checker) {
    Py_ssize_t n = PySet_GET_SIZE(dirty);
    if (n > DIRTY_KEYED) return PyLong_FromSsize_t(n);
    PyObject *order = PySequence_List(dirty), *ent = PyObject_GetAttr(checker, N_ent);
    PyObject *out = order && ent && !PyList_Sort(order) ? PyTuple_New(n) : NULL;
    if (out != NULL && !PyList_CheckExact(ent)) {
        PyErr_SetString(PyExc_TypeError, "control key: checker.ent");
        Py_CLEAR(out);
    }
    for (Py_ssize_t k = 0; out != NULL && k < n; k++) {
        PyObject *i = PyList_GET_ITEM(order, k), *guest = NULL;
        Py_ssize_t at = PyLong_AsSsize_t(i);
        if (at < 0 || at >= a->n || at >= PyList_GET_SIZE(a->written) ||
            at >= PyList_GET_SIZE(a->dev_ent) || at >= PyList_GET_SIZE(ent) ||
            (!a->in_msix && a->first + 2 * at + 1 >= PyByteArray_GET_SIZE(image))) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "control key: dirty");
            Py_CLEAR(out);
            break;
        }
        if (a->in_msix) {
            guest = Py_NewRef(PyList_GET_ITEM(a->guest_tag, at));
        } else {
            const unsigned char *img = (const unsigned char *)PyByteArray_AS_STRING(image);
            guest = PyLong_FromLong(img[a->first + 2 * at] | img[a->first + 2 * at + 1] << 8);
        }
        PyObject *item = guest == NULL ? NULL
                                       : PyTuple_Pack(5, i, guest, PyList_GET_ITEM(a->written, at),
                                                      PyList_GET_ITEM(a->dev_ent, at),
                                                      PyList_GET_ITEM(ent, at));
        Py_XDECREF(guest);
        if (item == NULL) Py_CLEAR(out);
        else PyTuple_SET_ITEM(out, k, item);
    }
    Py_XDECREF(order);
    Py_XDECREF(ent);
    return out;
}

static PyObject *control_key(Armed *a, unsigned long long value) {
    Py_ssize_t n = PyTuple_GET_SIZE(a->key_attrs), nb = PyTuple_GET_SIZE(a->backend_attrs);
    PyObject *key = PyTuple_New(6 + n + nb);
    if (key == NULL) return NULL;
    PyObject *image = PyObject_GetAttr(a->sess, N_image);
    PyObject *checker = PyObject_GetAttr(a->sess, N_checker);
    PyObject *dirty = PyObject_GetAttr(a->sess, N_dirty);
    PyObject *rules = PyObject_GetAttr(a->sess, N_rules);
    if (!image || !checker || !dirty || !rules) goto fail;
    if (!PyByteArray_CheckExact(image) || PyByteArray_GET_SIZE(image) < a->ctrl_off + 4 ||
        !PySet_CheckExact(dirty)) {
        PyErr_SetString(PyExc_TypeError, "control key: image, dirty");
        goto fail;
    }
    const unsigned char *img = (const unsigned char *)PyByteArray_AS_STRING(image) + a->ctrl_off;
    unsigned long guest = img[0] | img[1] << 8 | img[2] << 16 | (unsigned long)img[3] << 24;
    PyObject *parts[6] = {PyLong_FromUnsignedLongLong(value), PyLong_FromUnsignedLong(guest),
                          item0(a->sess, N_dev_ctrl), item0(checker, N_ctrl),
                          dirty_key(a, dirty, image, checker), PyLong_FromVoidPtr(rules)};
    int bad = 0;
    for (int k = 0; k < 6; k++) {
        if (parts[k] == NULL) bad = 1;
        else PyTuple_SET_ITEM(key, k, parts[k]);
    }
    if (bad) goto fail;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *v = PyObject_GetAttr(a->sess, PyTuple_GET_ITEM(a->key_attrs, k));
        if (v == NULL) goto fail;
        PyTuple_SET_ITEM(key, 6 + k, v);
    }
    if (nb) {
        PyObject *backend = PyObject_GetAttr(a->sess, N_backend);
        if (backend == NULL) goto fail;
        for (Py_ssize_t k = 0; k < nb; k++) {
            PyObject *v = PyObject_GetAttr(backend, PyTuple_GET_ITEM(a->backend_attrs, k));
            if (v == NULL) {
                Py_DECREF(backend);
                goto fail;
            }
            PyTuple_SET_ITEM(key, 6 + n + k, v);
        }
        Py_DECREF(backend);
    }
    Py_DECREF(image); Py_DECREF(checker); Py_DECREF(dirty); Py_DECREF(rules);
    return key;
fail:
    Py_XDECREF(image); Py_XDECREF(checker); Py_XDECREF(dirty); Py_XDECREF(rules);
    Py_DECREF(key); /* (NULL items of a new tuple are skipped) */
    return NULL;
}

/* Does every entry of the checker's copy but those in ``skip`` (NULL: none) hold a tag
 * ``check`` (allowed, mask, shift) allows?
 * 1 yes, 0 no, 2 some entry is unknown or one of several values (the Python path tells),
 * -1 an error. */
static int entries_allowed(Armed *a, PyObject *check, PyObject *skip) {
    PyObject *allowed = PyTuple_GET_ITEM(check, 0);
    long long mask = PyLong_AsLongLong(PyTuple_GET_ITEM(check, 1));
    long long shift = PyLong_AsLongLong(PyTuple_GET_ITEM(check, 2));
    if (PyErr_Occurred()) return -1;
    PyObject *checker = PyObject_GetAttr(a->sess, N_checker);
    if (checker == NULL) return -1;
    PyObject *ent = PyObject_GetAttr(checker, N_ent);
    Py_DECREF(checker);
    if (ent == NULL) return -1;
    int ok = PyList_CheckExact(ent);
    /* the entries settled by the decision (the engine checked them as it decided): at most
     * DIRTY_KEYED of them, the dirty entries its key holds */
    Py_ssize_t skipped[DIRTY_KEYED], n_skipped = 0;
    if (skip != NULL) {
        PyObject *it = PyObject_GetIter(skip), *o;
        while (ok == 1 && it != NULL && (o = PyIter_Next(it)) != NULL) {
            Py_ssize_t i = PyLong_AsSsize_t(o);
            Py_DECREF(o);
            if (i == -1 && PyErr_Occurred()) ok = -1;
            else if (n_skipped == DIRTY_KEYED) ok = 2; /* (not a memo _control_memo makes) */
            else skipped[n_skipped++] = i;
        }
        if (it == NULL || PyErr_Occurred()) ok = -1;
        Py_XDECREF(it);
    }
    for (Py_ssize_t i = 0; ok == 1 && i < PyList_GET_SIZE(ent); i++) {
        int settled = 0;
        for (Py_ssize_t k = 0; k < n_skipped; k++) settled |= skipped[k] == i;
        if (settled) continue;
        PyObject *v = PyList_GET_ITEM(ent, i);
        if (!PyLong_CheckExact(v)) {
            ok = 2; /* unknown, or several values: the Python path's */
            break;
        }
        unsigned long long x = PyLong_AsUnsignedLongLong(v);
        if (PyErr_Occurred()) {
            ok = -1;
            break;
        }
        PyObject *t = PyLong_FromUnsignedLongLong((x >> shift) & (unsigned long long)mask);
        ok = t == NULL ? -1 : PySet_Contains(allowed, t);
        Py_XDECREF(t);
    }
    Py_DECREF(ent);
    return ok;
}

/* The checker's undo records of host operations, (list, index, old value) each, from
 * ``named`` (the list's attribute name, index, old value) each. */
static PyObject *undo_records(PyObject *checker, PyObject *named) {
    if (!PyTuple_CheckExact(named)) {
        PyErr_SetString(PyExc_TypeError, "effect: undo records");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(named);
    PyObject *out = PyTuple_New(n);
    for (Py_ssize_t k = 0; out != NULL && k < n; k++) {
        PyObject *e = PyTuple_GET_ITEM(named, k), *regs;
        if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 3 ||
            (regs = PyObject_GetAttr(checker, PyTuple_GET_ITEM(e, 0))) == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "effect: undo record");
            Py_CLEAR(out);
            break;
        }
        PyObject *rec = PyTuple_Pack(3, regs, PyTuple_GET_ITEM(e, 1), PyTuple_GET_ITEM(e, 2));
        Py_DECREF(regs);
        if (rec == NULL) Py_CLEAR(out);
        else PyTuple_SET_ITEM(out, k, rec);
    }
    return out;
}

/* One effect (owner, attribute, index, value): owner 0 the session, 1 its checker, 2 its
 * backend; index -1 sets the attribute, -2 the checker's undo records (undo_records), -3
 * empties the set, else the list item, or (bytes) the bytearray's bytes from there. */
static int apply(Armed *a, PyObject *effect) {
    long owner = PyLong_AsLong(PyTuple_GET_ITEM(effect, 0));
    PyObject *attr = PyTuple_GET_ITEM(effect, 1);
    Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(effect, 2));
    PyObject *value = PyTuple_GET_ITEM(effect, 3);
    if (PyErr_Occurred()) return -1;
    PyObject *on = owner == 0   ? Py_NewRef(a->sess)
                   : owner == 1 ? PyObject_GetAttr(a->sess, N_checker)
                                : PyObject_GetAttr(a->sess, N_backend);
    if (on == NULL) return -1;
    int rc;
    if (index == -3) { /* the set emptied where it is */
        PyObject *target = PyObject_GetAttr(on, attr);
        rc = target == NULL ? -1 : PySet_Clear(target);
        Py_XDECREF(target);
    } else if (index == -2) {
        PyObject *records = undo_records(on, value);
        rc = records == NULL ? -1 : PyObject_SetAttr(on, attr, records);
        Py_XDECREF(records);
    } else if (index < 0) {
        rc = PyObject_SetAttr(on, attr, value);
    } else {
        PyObject *target = PyObject_GetAttr(on, attr);
        if (target == NULL) {
            rc = -1;
        } else if (PyBytes_Check(value)) {
            rc = PyByteArray_CheckExact(target) &&
                         index + PyBytes_GET_SIZE(value) <= PyByteArray_GET_SIZE(target)
                     ? 0
                     : -1;
            if (rc == 0)
                memcpy(PyByteArray_AS_STRING(target) + index, PyBytes_AS_STRING(value),
                       (size_t)PyBytes_GET_SIZE(value));
            else
                PyErr_SetString(PyExc_ValueError, "effect: bytes outside the bytearray");
        } else {
            rc = PyList_CheckExact(target) && index < PyList_GET_SIZE(target) ? 0 : -1;
            if (rc == 0) set_item(target, index, value);
            else PyErr_SetString(PyExc_ValueError, "effect: no such list item");
        }
        Py_XDECREF(target);
    }
    Py_DECREF(on);
    return rc;
}

enum { M_REPLY, M_AUDIT_HEAD, M_AUDIT_MID, M_AUDIT_TAIL, M_VERDICT, M_REASON, M_COUNT,
       M_EFFECTS, M_NEXT, M_CHECK, M_RULES, M_GUARD, M_SETTLED, M_SIZE };

/* Is ``tup`` a tuple of ``n`` items (n < 0: any number)? */
static int tuple_n(PyObject *tup, Py_ssize_t n) {
    return PyTuple_CheckExact(tup) && (n < 0 || PyTuple_GET_SIZE(tup) == n);
}

/* A check of the entries (entries_allowed): (allowed tags, mask, shift[, answer]). */
static int check_ok(PyObject *c, Py_ssize_t n) {
    return tuple_n(c, n) && PyAnySet_CheckExact(PyTuple_GET_ITEM(c, 0)) &&
           PyLong_CheckExact(PyTuple_GET_ITEM(c, 1)) && PyLong_CheckExact(PyTuple_GET_ITEM(c, 2));
}

/* Is ``memo`` laid out as NativePath._control_memo makes it? Everything control() reads of
 * it without a check of its own, checked before anything changes. */
static int memo_ok(PyObject *memo) {
    if (!tuple_n(memo, M_SIZE)) return 0;
    for (int k = M_REPLY; k <= M_AUDIT_TAIL; k++)
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(memo, k))) return 0;
    PyObject *effects = PyTuple_GET_ITEM(memo, M_EFFECTS), *next = PyTuple_GET_ITEM(memo, M_NEXT);
    PyObject *check = PyTuple_GET_ITEM(memo, M_CHECK), *guard = PyTuple_GET_ITEM(memo, M_GUARD);
    if (!tuple_n(effects, -1) || !tuple_n(next, 5) || !tuple_n(guard, -1)) return 0;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(effects); k++) {
        PyObject *e = PyTuple_GET_ITEM(effects, k);
        if (!tuple_n(e, 4) || !PyLong_CheckExact(PyTuple_GET_ITEM(e, 0)) ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(e, 1)) ||
            !PyLong_CheckExact(PyTuple_GET_ITEM(e, 2)))
            return 0;
    }
    if (check != Py_None && !check_ok(check, 3)) return 0;
    if (!PyFrozenSet_CheckExact(PyTuple_GET_ITEM(memo, M_SETTLED))) return 0;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(guard); k++)
        if (!check_ok(PyTuple_GET_ITEM(guard, k), 4)) return 0;
    return 1;
}

static PyObject *control(Armed *a, const Req *r, PyObject *op) {
    PyObject *key = control_key(a, r->value);
    if (key == NULL) return NULL;
    PyObject *memo = PyDict_GetItemWithError(a->controls, key);
    if (memo != NULL) {
        Py_INCREF(memo);
    } else if (!PyErr_Occurred()) {
        memo = PyObject_CallOneArg(a->learn, key); /* None: not a decision to replay */
    }
    Py_DECREF(key);
    if (memo == NULL) return NULL;
    PyObject *out = NULL;
    if (memo == Py_None) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    if (!memo_ok(memo)) {
        PyErr_SetString(PyExc_TypeError, "control memo");
        goto done;
    }
    /* the rules it was decided under are the session's (the key holds their address only) */
    PyObject *rules = PyObject_GetAttr(a->sess, N_rules);
    if (rules == NULL) goto done;
    Py_DECREF(rules);
    if (rules != PyTuple_GET_ITEM(memo, M_RULES)) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    /* what the decision read of the entries (the host backend: are they all allowed at each
     * width?) is as it was; and the self-check: every entry allowed by the rule after it */
    PyObject *guard = PyTuple_GET_ITEM(memo, M_GUARD);
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(guard); k++) {
        PyObject *g = PyTuple_GET_ITEM(guard, k);
        int ok = entries_allowed(a, g, NULL);
        if (ok < 0) goto done;
        if (ok != PyObject_IsTrue(PyTuple_GET_ITEM(g, 3))) {
            out = Py_NewRef(Py_None);
            goto done;
        }
    }
    PyObject *check = PyTuple_GET_ITEM(memo, M_CHECK);
    if (check != Py_None) {
        int ok = entries_allowed(a, check, PyTuple_GET_ITEM(memo, M_SETTLED));
        if (ok < 0) goto done;
        if (ok != 1) {
            out = Py_NewRef(Py_None);
            goto done;
        }
    }
    PyObject *next = PyTuple_GET_ITEM(memo, M_NEXT);
    long mode = PyLong_AsLong(PyTuple_GET_ITEM(next, 0));
    long long mask = PyLong_AsLongLong(PyTuple_GET_ITEM(next, 1));
    if (PyErr_Occurred()) goto done;
    Text rep, aud;
    rep.n = aud.n = 0;
    puts_(&rep, "{\"id\":");
    put_id(&rep, r);
    put_bytes(&rep, PyTuple_GET_ITEM(memo, M_REPLY));
    put_bytes(&aud, PyTuple_GET_ITEM(memo, M_AUDIT_HEAD));
    put_id(&aud, r);
    put_bytes(&aud, PyTuple_GET_ITEM(memo, M_AUDIT_MID));
    put_timestamp(&aud);
    put_bytes(&aud, PyTuple_GET_ITEM(memo, M_AUDIT_TAIL));
    PyObject *reply = text_bytes(&rep), *audit = reply ? text_bytes(&aud) : NULL;
    if (audit != NULL)
        out = PyTuple_Pack(5, reply, audit, op, PyTuple_GET_ITEM(memo, M_VERDICT),
                           PyTuple_GET_ITEM(memo, M_REASON));
    Py_XDECREF(reply);
    Py_XDECREF(audit);
    if (out == NULL || bump(a->counts, PyTuple_GET_ITEM(memo, M_COUNT))) goto fail;
    PyObject *effects = PyTuple_GET_ITEM(memo, M_EFFECTS);
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(effects); k++)
        if (apply(a, PyTuple_GET_ITEM(effects, k))) goto fail; /* (Python-checked: none fails) */
    /* the entries' state after it, as _steady_state finds it */
    PyObject **slot[] = {&a->allowed, &a->table, &a->resolver};
    for (int k = 0; k < 3; k++) Py_XSETREF(*slot[k], Py_NewRef(PyTuple_GET_ITEM(next, 2 + k)));
    a->mask = mask;
    /* (not the usual state: the entries are the Python path's, control writes go on) */
    a->entries = mode == E_IN_USE || mode == E_UNUSED ? (int)mode : E_NONE;
    goto done;
fail:
    Py_CLEAR(out);
done:
    Py_DECREF(memo);
    return out;
}

/* --- reads: the bytes a read is served from the guest's view ------------------------------ */
static void put_template(Text *t, PyObject *tpl, const Req *r, unsigned long long view,
                         unsigned long long mask) {
    PyObject *pieces = PyTuple_GET_ITEM(tpl, 0), *slots = PyTuple_GET_ITEM(tpl, 1);
    const char *k = PyBytes_AS_STRING(slots);
    Py_ssize_t n = PyBytes_GET_SIZE(slots);
    for (Py_ssize_t i = 0; i < n; i++) {
        put_bytes(t, PyTuple_GET_ITEM(pieces, i));
        switch (k[i]) {
        case 'i': put_id(t, r); break;
        case 't': put_timestamp(t); break;
        case 'o': put_u(t, r->offset); break;
        case 'w': put_u(t, r->width); break;
        case 'b': put_u(t, r->bar); break;
        case 'v': put_u(t, view); break;
        default: put_u(t, mask); break; /* 'm' (template_valid) */
        }
    }
    put_bytes(t, PyTuple_GET_ITEM(pieces, n));
}

/* The bytes of a read served from the guest's view, as Session.config_view and
 * Session.msix_view give them: 0, -1 on an error, 1 when the read is the Python path's. */
static int read_view(Armed *a, const Req *r, unsigned long long *mask, unsigned long long *view) {
    unsigned long long m = 0, v = 0, off = r->offset, end = r->offset + r->width;
    if (r->op == OP_CFG_READ) { /* the capabilities' bytes, from the image */
        PyObject *caps = PyTuple_GET_ITEM(a->reads, 0);
        const unsigned char *image = (const unsigned char *)PyByteArray_AS_STRING(a->image);
        unsigned long long size = (unsigned long long)PyByteArray_GET_SIZE(a->image);
        for (Py_ssize_t c = 0; c < PyTuple_GET_SIZE(caps); c++) {
            PyObject *cap = PyTuple_GET_ITEM(caps, c);
            unsigned long long lo = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(cap, 0));
            unsigned long long hi = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(cap, 1));
            if (hi > size) return 1; /* (reads_valid saw it inside; the image never shrinks) */
            if (lo < off) lo = off;
            if (hi > end) hi = end;
            for (unsigned long long b = lo; b < hi; b++) {
                m |= 0xFFULL << (8 * (b - off));
                v |= (unsigned long long)image[b] << (8 * (b - off));
            }
        }
    } else if (a->in_msix && (long long)r->bar == a->bir &&
               end > (unsigned long long)a->msix_start && off < (unsigned long long)a->msix_end) {
        /* the ST bytes (bits 31:16) of each Vector Control word, from the guest's tags */
        for (unsigned long long b = off; b < end; b++) {
            if (b < (unsigned long long)a->msix_start) continue;
            unsigned long long rel = b - (unsigned long long)a->msix_start;
            if (rel >= 16 * (unsigned long long)a->n || rel % 16 < 14) continue;
            if ((Py_ssize_t)(rel / 16) >= PyList_GET_SIZE(a->guest_tag)) return 1;
            PyObject *tag = PyList_GET_ITEM(a->guest_tag, (Py_ssize_t)(rel / 16));
            if (!PyLong_CheckExact(tag)) return 1;
            unsigned long long t = PyLong_AsUnsignedLongLong(tag);
            if (PyErr_Occurred()) return -1;
            if (t >> 16) return 1;
            m |= 0xFFULL << (8 * (b - off));
            v |= ((t >> (8 * (rel % 16 - 14))) & 0xFF) << (8 * (b - off));
        }
    }
    *mask = m;
    *view = v;
    return 0;
}

/* A read of an armed session: passed (its bytes are the device's), or served from the guest's
 * view, counted and audited as Engine._served and the audit do. */
static PyObject *read_reply(Armed *a, const Req *r, int passes) {
    unsigned long long mask, view;
    int rc = read_view(a, r, &mask, &view);
    if (rc) return rc < 0 ? NULL : Py_NewRef(Py_None);
    int served = mask != 0;
    if (!served && !passes) Py_RETURN_NONE; /* passes are audited: the Python path's */
    PyObject *templates = PyTuple_GET_ITEM(a->reads, 4);
    Text rep, aud;
    rep.n = aud.n = 0;
    put_template(&rep, PyTuple_GET_ITEM(templates, served), r, view, mask);
    PyObject *reply = text_bytes(&rep), *audit = Py_NewRef(Py_None), *out = NULL;
    if (reply == NULL) goto done;
    if (served) {
        put_template(&aud, PyTuple_GET_ITEM(templates, r->op == OP_CFG_READ ? 2 : 3), r, view,
                     mask);
        Py_SETREF(audit, text_bytes(&aud));
        if (audit == NULL) goto done;
    }
    out = PyTuple_Pack(5, reply, audit, r->op == OP_CFG_READ ? S_CFG_READ : S_MSIX_READ,
                       PyTuple_GET_ITEM(PyTuple_GET_ITEM(a->reads, 2), served),
                       PyTuple_GET_ITEM(PyTuple_GET_ITEM(a->reads, 3), served));
    if (out != NULL && bump(a->counts, PyTuple_GET_ITEM(PyTuple_GET_ITEM(a->reads, 1), served)))
        Py_CLEAR(out);
done:
    Py_XDECREF(reply);
    Py_XDECREF(audit);
    return out;
}

/* Whether a byte of the MSI-X table write [off, off + w) is in a Vector Control word (bytes
 * 12-15 of an entry): the engine passes any other write of the table untouched, and keeps
 * nothing of it (Session.msix_write). Unknown bounds: yes (the Python path decides). */
static int in_vector_control(const Armed *a, unsigned long long off, unsigned long long w) {
    if (a->msix_start < 0 || a->msix_end < a->msix_start) return 1;
    unsigned long long start = (unsigned long long)a->msix_start;
    unsigned long long end = (unsigned long long)a->msix_end;
    for (unsigned long long p = off; p < off + w; p++)
        if (p >= start && p < end && (p - start) % 16 >= 12) return 1;
    return 0;
}

/* One line: (reply, audit line or None, op, verdict, reason), None, or the key of a session
 * to arm first. */
static PyObject *decide(PyObject *armed, int passes, const char *line, Py_ssize_t len) {
    Req r;
    if (len > MAX_LINE || parse(line, len, &r)) Py_RETURN_NONE;
    char key[MAX_NAME_LEN + 1 + 256];
    if (r.bdf_len > 256) Py_RETURN_NONE;
    memcpy(key, r.vm, (size_t)r.vm_len);
    key[r.vm_len] = 0;
    memcpy(key + r.vm_len + 1, r.bdf, (size_t)r.bdf_len);
    PyObject *k = PyBytes_FromStringAndSize(key, r.vm_len + 1 + r.bdf_len);
    if (k == NULL) return NULL;
    PyObject *found = PyDict_GetItemWithError(armed, k);
    if (found == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(k);
            return NULL;
        }
        return k; /* not armed: its key, for the caller to arm it */
    }
    if (Py_TYPE(found) != &ArmedType) {
        Py_DECREF(k);
        PyErr_SetString(PyExc_TypeError, "armed: values are Armed");
        return NULL;
    }
    Armed *a = (Armed *)Py_NewRef(found); /* (held across the Python it may call) */
    PyObject *out;
    unsigned long long off = r.offset, w = r.width;
    Py_ssize_t i = -1;
    int pass;
    if (r.op == OP_CFG_READ || r.op == OP_MSIX_READ) {
        out = a->reads_ok ? read_reply(a, &r, passes)
                          : Py_NewRef(a->entries == E_STALE ? k : Py_None); /* armed again first */
        Py_DECREF(k);
        Py_DECREF(a);
        return out;
    }
    if (r.op == OP_CFG)
        pass = (long long)(off + w) <= a->watch_lo || (long long)off >= a->watch_hi;
    else
        pass = !a->in_msix || (long long)r.bar != a->bir || !in_vector_control(a, off, w);
    int control_write = r.op == OP_CFG && w == 4 && (long long)off == a->ctrl_off;
    if (!pass && !control_write) {
        if (r.op == OP_CFG) {
            if (!a->in_msix && w == 2 && (long long)off >= a->first &&
                (long long)off < a->first + 2 * a->n && ((long long)off - a->first) % 2 == 0)
                i = (Py_ssize_t)(((long long)off - a->first) / 2);
        } else {
            unsigned long long rel = off - (unsigned long long)a->msix_start;
            if (w == 4 && rel % 16 == 12 && a->n > 0 && rel / 16 < (unsigned long long)a->n)
                i = (Py_ssize_t)(rel / 16);
        }
    }
    if (pass) {
        out = passes ? pass_reply(a, &r, r.op == OP_CFG ? S_CFG : S_MSIX) : Py_NewRef(Py_None);
    } else if (!control_write && i < 0) {
        out = Py_NewRef(Py_None); /* never this path's: not worth arming again for */
    } else if (a->entries == E_STALE) {
        out = Py_NewRef(k); /* armed again first */
    } else if (control_write) {
        out = control(a, &r, S_CFG);
    } else {
        out = a->entries == E_NONE ? Py_NewRef(Py_None)
                                   : entry(a, &r, r.op == OP_CFG ? S_CFG : S_MSIX, i);
    }
    Py_DECREF(k);
    Py_DECREF(a);
    return out;
}

static PyObject *handle(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3 || !PyDict_CheckExact(args[0]) || !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "handle(armed: dict, passes: bool, line: bytes)");
        return NULL;
    }
    int passes = PyObject_IsTrue(args[1]);
    if (passes < 0) return NULL;
    return decide(args[0], passes, PyBytes_AS_STRING(args[2]), PyBytes_GET_SIZE(args[2]));
}

/* --- the serve loop's common case ----------------------------------------------------------
 * pump(in_fd, out_fd, wake_fd, audit_fd, armed, passes, ops, verdicts, reasons) reads standard
 * input and answers line after line as long as every line is one decide() answers, each
 * audit line written to audit_fd before the replies of the read go out; it returns to the
 * Python loop (tphtrap.serve.serve_forever) with what it has not done:
 *   (unread, pending, woke, eof, failed, why, answered, audited)
 * unread: the input from the first line it did not answer on (that line, the ones after it,
 * an unfinished line); pending: replies the pipe did not take; woke: the signal pipe is
 * readable (or a signal interrupted the wait); eof; failed and why: "audit" and (the OSError
 * of an audit write, its line), a line decided and counted but not answered (unread starts
 * after it), or "native" and the exception of a fault here (unread starts at its line);
 * answered/audited: lines decided and audit lines written. An error reading or writing the
 * pipes is raised, as os.read/os.write would. */
#include <errno.h>
#include <poll.h>
#include <unistd.h>

#define READ_SIZE 65536

typedef struct { char *p; size_t n, cap; } Buf;

static int buf_put(Buf *b, const char *s, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n) cap *= 2;
        char *p = PyMem_Realloc(b->p, cap);
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w, n -= (size_t)w;
    }
    return 0;
}

static int is_blank(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!strchr(" \t\n\r\v\f", p[i]) || p[i] == 0) return 0;
    return 1;
}

static PyObject *pump(PyObject *module, PyObject *args) {
    (void)module;
    int in_fd, out_fd, wake_fd, audit_fd, passes;
    PyObject *armed, *ops, *verdicts, *reasons;
    if (!PyArg_ParseTuple(args, "iiiiO!pO!O!O!:pump", &in_fd, &out_fd, &wake_fd, &audit_fd,
                          &PyDict_Type, &armed, &passes, &PyDict_Type, &ops, &PyDict_Type,
                          &verdicts, &PyDict_Type, &reasons))
        return NULL;
    char *in = PyMem_Malloc(READ_SIZE);
    if (in == NULL) return PyErr_NoMemory();
    Buf out = {NULL, 0, 0};
    PyObject *failed = Py_NewRef(Py_None);
    const char *why = "";
    long answered = 0, audited = 0;
    int woke = 0, eof = 0;
    size_t at = 0, got = 0;
    PyObject *result = NULL;
    for (;;) {
        struct pollfd fds[2] = {{in_fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
        int ready, err;
        /* the wait without the GIL: a thread of the embedding process may be the one that
         * writes the next request (or wakes the loop) */
        Py_BEGIN_ALLOW_THREADS
        ready = poll(fds, 2, -1);
        err = errno;
        Py_END_ALLOW_THREADS
        errno = err;
        if (ready < 0) {
            if (errno != EINTR) goto io_error;
            woke = 1;
            break;
        }
        if (fds[1].revents) {
            woke = 1;
            break;
        }
        ssize_t r = read(in_fd, in, READ_SIZE);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            goto io_error;
        }
        if (r == 0) {
            eof = 1;
            break;
        }
        got = (size_t)r;
        at = 0;
        for (;;) {
            char *nl = memchr(in + at, '\n', got - at);
            if (nl == NULL) break;
            size_t len = (size_t)(nl - (in + at));
            size_t line_len = len && in[at + len - 1] == '\r' ? len - 1 : len;
            if (line_len == 0 || is_blank(in + at, line_len)) {
                at += len + 1;
                continue;
            }
            PyObject *d = decide(armed, passes, in + at, (Py_ssize_t)line_len);
            if (d == NULL) { /* a fault of the native path: this line on, the Python path's */
                why = "native";
                PyObject *type, *tb;
                Py_DECREF(failed);
                PyErr_Fetch(&type, &failed, &tb);
                PyErr_NormalizeException(&type, &failed, &tb);
                Py_XDECREF(type);
                Py_XDECREF(tb);
                if (failed == NULL) failed = Py_NewRef(Py_None);
                goto finish;
            }
            if (!PyTuple_CheckExact(d)) {
                Py_DECREF(d);
                break; /* the Python path's, from this line on */
            }
            /* counted as the Python path counts a decision, before its audit line */
            answered++;
            if (bump(ops, PyTuple_GET_ITEM(d, 2)) || bump(verdicts, PyTuple_GET_ITEM(d, 3)) ||
                bump(reasons, PyTuple_GET_ITEM(d, 4))) {
                Py_DECREF(d);
                goto error;
            }
            PyObject *audit = PyTuple_GET_ITEM(d, 1);
            if (audit != Py_None) {
                if (write_all(audit_fd, PyBytes_AS_STRING(audit),
                              (size_t)PyBytes_GET_SIZE(audit))) {
                    /* decided, neither audited nor answered: the Python path's answer to a
                     * failed audit write follows the replies before it */
                    int e = errno;
                    Py_DECREF(d);
                    why = "audit";
                    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", e, strerror(e));
                    Py_SETREF(failed, exc ? Py_BuildValue("(Ny#)", exc, in + at,
                                                          (Py_ssize_t)line_len)
                                          : NULL);
                    if (failed == NULL) goto error;
                    at += len + 1;
                    goto flush;
                }
                audited++;
            }
            PyObject *reply = PyTuple_GET_ITEM(d, 0);
            int rc = buf_put(&out, PyBytes_AS_STRING(reply), (size_t)PyBytes_GET_SIZE(reply));
            Py_DECREF(d);
            at += len + 1;
            if (rc) goto error;
        }
    flush:; /* the replies of this read, written at once (the pipe is non-blocking) */
        size_t sent = 0;
        while (sent < out.n) {
            ssize_t w = write(out_fd, out.p + sent, out.n - sent);
            if (w < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) break;
                goto io_error;
            }
            sent += (size_t)w;
        }
        if (sent) { /* (out.p is NULL while nothing was put) */
            memmove(out.p, out.p + sent, out.n - sent);
            out.n -= sent;
        }
        if (at < got || out.n || failed != Py_None) break;
        got = at = 0;
    }
finish:
    result = Py_BuildValue("(y#y#iiOsll)", in + at, (Py_ssize_t)(got - at),
                           out.p ? out.p : "", (Py_ssize_t)out.n, woke, eof, failed, why,
                           answered, audited);
    goto done;
io_error: /* standard input or output: as the Python loop's os.read/os.write would raise */
    PyErr_SetFromErrno(errno == EPIPE ? PyExc_BrokenPipeError : PyExc_OSError);
error:
done:
    PyMem_Free(in);
    PyMem_Free(out.p);
    Py_XDECREF(failed);
    return result;
}

static PyMethodDef methods[] = {
    {"handle", (PyCFunction)(void (*)(void))handle, METH_FASTCALL,
     "handle(armed, passes, line) -> (reply, audit line or None, op, verdict, reason), None (not\n"
     "decided here), or the key of a session not in armed"},
    {"pump", pump, METH_VARARGS,
     "pump(in_fd, out_fd, wake_fd, audit_fd, armed, passes, ops, verdicts, reasons) -> (unread,\n"
     "pending, woke, eof, failed, why, answered, audited): the serve loop while lines are native"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tphtrap.native._steady",
    "The native steady path of tphtrap serve (see tphtrap/native/__init__.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__steady(void) {
    if (PyType_Ready(&ArmedType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    S_CFG = PyUnicode_InternFromString("cfg_write");
    S_MSIX = PyUnicode_InternFromString("msix_write");
    S_CFG_READ = PyUnicode_InternFromString("cfg_read");
    S_MSIX_READ = PyUnicode_InternFromString("msix_read");
    S_PASS = PyUnicode_InternFromString("pass");
    S_NOT_TPH = PyUnicode_InternFromString("not-tph");
    S_PASS_KEY = S_PASS;
    N_image = PyUnicode_InternFromString("image");
    N_checker = PyUnicode_InternFromString("checker");
    N_dirty = PyUnicode_InternFromString("dirty");
    N_rules = PyUnicode_InternFromString("rules");
    N_dev_ctrl = PyUnicode_InternFromString("dev_ctrl");
    N_ctrl = PyUnicode_InternFromString("ctrl");
    N_backend = PyUnicode_InternFromString("backend");
    N_ent = PyUnicode_InternFromString("ent");
    Py_INCREF(&ArmedType);
    if (!S_CFG || !S_MSIX || !S_CFG_READ || !S_MSIX_READ || !S_PASS || !S_NOT_TPH || !N_image || !N_checker || !N_dirty ||
        !N_rules || !N_dev_ctrl || !N_ctrl || !N_backend || !N_ent ||
        PyModule_AddObject(m, "Armed", (PyObject *)&ArmedType) < 0 ||
        PyModule_AddIntConstant(m, "TAGS", TAGS) < 0 ||
        PyModule_AddIntConstant(m, "UNKNOWN", UNKNOWN) < 0 ||
        PyModule_AddIntConstant(m, "IN_USE", E_IN_USE) < 0 ||
        PyModule_AddIntConstant(m, "UNUSED", E_UNUSED) < 0 ||
        PyModule_AddIntConstant(m, "MAX_TEXT", MAX_TEXT) < 0 ||
        PyModule_AddIntConstant(m, "MAX_LINE", MAX_LINE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
