/* The per-entry loops of a big decision, in C: the same results as the Python functions they
 * stand for, which stay the reference (each caller keeps its Python loop and uses this one
 * when it is built; tests/test_bulk.py compares the two on generated inputs).
 *
 * A decision that re-writes every entry of a 2048-vector table runs each loop 2048 times;
 * in Python they cost about 2 us an entry. Every function here either does all of its work
 * or returns None before changing anything, and the caller then runs its Python loop: what
 * the C side does not recognise (a value that is not a plain int below 2**64, a write that is
 * not a DeviceWrite) is never guessed at.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

static PyTypeObject *Write; /* tphtrap.events.DeviceWrite, from bind() */
static PyObject *D[5]; /* its member descriptors, in the order the Python loops read them */
#define D_space D[0]
#define D_bar D[1]
#define D_offset D[2]
#define D_width D[3]
#define D_value D[4]
static PyObject *S_config, *S_bar, *I_zero, *I_four;

static int is_write(PyObject *w) { return Write && Py_TYPE(w) == Write; }

static PyObject *field(PyObject *d, PyObject *w) { /* new reference or NULL (unset: error) */
    return Py_TYPE(d)->tp_descr_get(d, w, (PyObject *)Write);
}

static int set_field(PyObject *w, PyObject *d, PyObject *v) {
    return Py_TYPE(d)->tp_descr_set(d, w, v);
}

/* A DeviceWrite, built as its __init__ builds it: each field set (bar None for config). */
static PyObject *new_write(PyObject *space, PyObject *offset, PyObject *width, PyObject *value,
                           PyObject *bar) {
    PyObject *w = Write->tp_alloc(Write, 0);
    if (!w) return NULL;
    if (set_field(w, D_space, space) || set_field(w, D_offset, offset) ||
        set_field(w, D_width, width) || set_field(w, D_value, value) ||
        set_field(w, D_bar, bar)) {
        Py_DECREF(w);
        return NULL;
    }
    return w;
}

static PyObject *descriptor(PyTypeObject *type, const char *name) {
    PyObject *d = PyDict_GetItemString(type->tp_dict, name); /* borrowed */
    if (!d || !Py_TYPE(d)->tp_descr_get || !Py_TYPE(d)->tp_descr_set) {
        PyErr_Format(PyExc_TypeError, "bind: %s.%s is not a slot", type->tp_name, name);
        return NULL;
    }
    Py_INCREF(d);
    return d;
}

static PyObject *bind(PyObject *module, PyObject *type) {
    (void)module;
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "bind: DeviceWrite expected");
        return NULL;
    }
    PyTypeObject *t = (PyTypeObject *)type;
    PyObject *d[5];
    const char *names[5] = {"space", "bar", "offset", "width", "value"};
    for (int k = 0; k < 5; k++) {
        d[k] = descriptor(t, names[k]);
        if (!d[k]) {
            for (int j = 0; j < k; j++) Py_DECREF(d[j]);
            return NULL;
        }
    }
    for (int k = 0; k < 5; k++) Py_XSETREF(D[k], d[k]);
    Py_INCREF(type);
    Py_XSETREF(Write, t);
    Py_RETURN_NONE;
}

/* --- text ----------------------------------------------------------------------------------- */
typedef struct {
    char *p;
    size_t n, cap;
} Text;

static int put(Text *t, const char *s, size_t n) {
    if (t->n + n > t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 4096;
        while (cap < t->n + n) cap *= 2;
        char *p = PyMem_Realloc(t->p, cap);
        if (!p) {
            PyErr_NoMemory();
            return -1;
        }
        t->p = p;
        t->cap = cap;
    }
    memcpy(t->p + t->n, s, n);
    t->n += n;
    return 0;
}

static int put_u(Text *t, unsigned long long v) {
    char b[24];
    int k = 24;
    do {
        b[--k] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return put(t, b + k, (size_t)(24 - k));
}

/* A plain int's value in [0, 2**64): 1; anything else 0 (no error set). */
static int plain(PyObject *o, unsigned long long *v) {
    if (!PyLong_CheckExact(o)) return 0;
    int overflow;
    long long s = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (s == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (overflow > 0) {
        *v = PyLong_AsUnsignedLongLong(o);
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    if (overflow < 0 || s < 0) return 0;
    *v = (unsigned long long)s;
    return 1;
}

#define PUT(t, lit) put((t), (lit), sizeof(lit) - 1)

/* A list or tuple as it is (a new reference), a range as a new list; anything else NULL, no
 * error set: an iterator is never consumed (the Python loop would then find it empty). */
static PyObject *sequence(PyObject *o) {
    if (PyList_CheckExact(o) || PyTuple_CheckExact(o)) return Py_NewRef(o);
    if (PyRange_Check(o)) return PySequence_List(o);
    return NULL;
}

/* The first n fields of a write (D's order), new references: 0; or -1 with the error of the
 * first unset one (what Python's attribute reads raise) and none kept. */
static int fields(PyObject *w, PyObject **f, int n) {
    for (int k = 0; k < n; k++) {
        if (!(f[k] = field(D[k], w))) {
            while (k--) Py_DECREF(f[k]);
            return -1;
        }
    }
    return 0;
}

/* wire.writes_text: each write as {"space":..,["bar":..,]"offset":..,"width":..,"value":..}. */
static PyObject *writes_text(PyObject *module, PyObject *writes) {
    (void)module;
    PyObject *seq = sequence(writes);
    if (!seq) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Text t = {NULL, 0, 0};
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *w = items[i];
        if (!is_write(w)) goto decline;
        PyObject *f[5];
        if (fields(w, f, 5)) goto done;
        unsigned long long bar = 0, u[3];
        int space = !PyUnicode_CheckExact(f[0])                ? 0 /* 1 config, 2 bar */
                    : PyUnicode_Compare(f[0], S_config) == 0 ? 1
                    : PyUnicode_Compare(f[0], S_bar) == 0    ? 2
                                                             : 0;
        int ok = space && (f[1] == Py_None || plain(f[1], &bar)) && plain(f[2], &u[0]) &&
                 plain(f[3], &u[1]) && plain(f[4], &u[2]);
        int has_bar = f[1] != Py_None;
        for (int k = 0; k < 5; k++) Py_DECREF(f[k]);
        if (!ok) goto decline;
        if ((i && PUT(&t, ",")) || (space == 1 ? PUT(&t, "{\"space\":\"config\"")
                                               : PUT(&t, "{\"space\":\"bar\"")))
            goto done;
        if (has_bar && (PUT(&t, ",\"bar\":") || put_u(&t, bar))) goto done;
        if (PUT(&t, ",\"offset\":") || put_u(&t, u[0]) || PUT(&t, ",\"width\":") ||
            put_u(&t, u[1]) || PUT(&t, ",\"value\":") || put_u(&t, u[2]) || PUT(&t, "}"))
            goto done;
    }
    result = PyUnicode_DecodeASCII(t.p ? t.p : "", (Py_ssize_t)t.n, NULL);
    goto done;
decline:
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(t.p);
    Py_DECREF(seq);
    return result;
}

/* wire._run_starts: the indices i whose write i + 1 has the same value. The values are read
 * first (no Python code runs: slot reads of exact DeviceWrites, exact ints), the list made
 * after, the writes no longer looked at. */
static PyObject *run_starts(PyObject *module, PyObject *writes) {
    (void)module;
    PyObject *seq = sequence(writes);
    if (!seq) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    unsigned long long *v = PyMem_Malloc(sizeof *v * (size_t)(n ? n : 1));
    PyObject *out = NULL;
    if (!v) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = is_write(items[i]) ? field(D_value, items[i]) : NULL;
        int ok = f && plain(f, &v[i]);
        Py_XDECREF(f);
        if (!ok) { /* (an unset value: the Python loop's error to raise) */
            PyErr_Clear();
            out = Py_NewRef(Py_None);
            goto done;
        }
    }
    out = PyList_New(0);
    for (Py_ssize_t i = 0; out && i + 1 < n; i++) {
        if (v[i] != v[i + 1]) continue;
        PyObject *at = PyLong_FromSsize_t(i);
        if (!at || PyList_Append(out, at)) Py_CLEAR(out);
        Py_XDECREF(at);
    }
done:
    PyMem_Free(v);
    Py_DECREF(seq);
    return out;
}

/* --- renderings ----------------------------------------------------------------------------- */
/* RawWrites.writes: the steps as DeviceWrites (see render.py).
 * raw_writes(steps, ctrl_at, msix, guest_low, dev_low, where, bir, shift, vc_low, ctrl_size,
 *            entry_size) */
static PyObject *raw_writes(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 11 || !PyList_CheckExact(args[0]) || !PyTuple_CheckExact(args[1]) ||
        !PyBool_Check(args[2]) || !PyList_CheckExact(args[3]) || !PyList_CheckExact(args[4]) ||
        !Write) {
        Py_RETURN_NONE;
    }
    PyObject *steps = args[0], *ctrl_at = args[1], *guest_low = args[3], *dev_low = args[4];
    PyObject *where = args[5], *bir = args[6], *ctrl_size = args[9], *entry_size = args[10];
    int msix = args[2] == Py_True;
    unsigned long long shift, vc_low;
    if (!plain(args[7], &shift) || !plain(args[8], &vc_low) || shift > 32 ||
        !PyTuple_CheckExact(where))
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(steps), cells = PyTuple_GET_SIZE(where);
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *s = PyList_GET_ITEM(steps, k);
        if (!PyTuple_CheckExact(s) || PyTuple_GET_SIZE(s) != 3) goto decline;
        unsigned long long what, index, value;
        PyObject *v = PyTuple_GET_ITEM(s, 2);
        if (!plain(PyTuple_GET_ITEM(s, 0), &what) || !plain(PyTuple_GET_ITEM(s, 1), &index) ||
            !plain(v, &value))
            goto decline;
        PyObject *w;
        if (what == 0) {
            if (index >= (unsigned long long)PyTuple_GET_SIZE(ctrl_at)) goto decline;
            w = new_write(S_config, PyTuple_GET_ITEM(ctrl_at, index), ctrl_size, v, Py_None);
        } else if (index >= (unsigned long long)cells) {
            goto decline;
        } else if (!msix) {
            w = new_write(S_config, PyTuple_GET_ITEM(where, index), entry_size, v, Py_None);
        } else {
            if (index >= (unsigned long long)PyList_GET_SIZE(guest_low) ||
                index >= (unsigned long long)PyList_GET_SIZE(dev_low))
                goto decline;
            PyObject *low = PyList_GET_ITEM(guest_low, index);
            if (low == Py_None) low = PyList_GET_ITEM(dev_low, index);
            unsigned long long l;
            if (!plain(low, &l) || (value << shift) >> shift != value) goto decline;
            PyObject *word = PyLong_FromUnsignedLongLong((l & vc_low) | (value << shift));
            if (!word) goto fail;
            w = new_write(S_bar, PyTuple_GET_ITEM(where, index), I_four, word, bir);
            Py_DECREF(word);
        }
        if (!w) goto fail;
        PyList_SET_ITEM(out, k, w);
    }
    return out;
decline:
    Py_DECREF(out);
    Py_RETURN_NONE;
fail:
    Py_DECREF(out);
    return NULL;
}

/* --- the self-check ------------------------------------------------------------------------- */
/* Checker._entry_indices: entry_at.get((space, bar, offset, width)) of each write, then None.
 * A dict key's __eq__ may change the writes: each is read afresh (and held) as Python's map
 * reads it. */
static PyObject *entry_indices(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyDict_CheckExact(args[0])) Py_RETURN_NONE;
    PyObject *at = args[0], *seq = sequence(args[1]);
    if (!seq) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *out = PyList_New(0), *key = NULL, *w = NULL;
    if (!out) goto fail;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        Py_XSETREF(w, Py_NewRef(PySequence_Fast_GET_ITEM(seq, i)));
        if (!is_write(w)) {
            Py_DECREF(w);
            Py_XDECREF(key);
            Py_DECREF(out);
            Py_DECREF(seq);
            Py_RETURN_NONE;
        }
        PyObject *f[4];
        if (fields(w, f, 4)) goto fail;
        /* One key, its items replaced while none kept it; a new one where tuples keep their
         * hash (3.14 on). */
        if (!key || Py_REFCNT(key) != 1 || PY_VERSION_HEX >= 0x030E0000) {
            Py_XSETREF(key, PyTuple_New(4));
            if (!key) {
                for (int k = 0; k < 4; k++) Py_DECREF(f[k]);
                goto fail;
            }
        }
        for (int k = 0; k < 4; k++) {
            PyObject *old = PyTuple_GET_ITEM(key, k);
            PyTuple_SET_ITEM(key, k, f[k]);
            Py_XDECREF(old);
        }
        PyObject *got = PyDict_GetItemWithError(at, key); /* borrowed */
        if (!got && PyErr_Occurred()) goto fail;
        if (PyList_Append(out, got ? got : Py_None)) goto fail;
    }
    if (PyList_Append(out, Py_None)) goto fail;
    Py_XDECREF(w);
    Py_XDECREF(key);
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(w);
    Py_XDECREF(key);
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

/* Checker._apply_run with every control register disabled: undo records (ent, i, old) kept,
 * then ent[i] = writes[start + k].value & mask for the run's entries. Only plain ints (the
 * values, the mask, the run's indices in range): no Python code runs, nothing can change
 * the lists under the loop.
 * apply_disabled(undo, ent, writes, start, run, mask) */
static PyObject *apply_disabled(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 6 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[1]) ||
        !(PyList_CheckExact(args[2]) || PyTuple_CheckExact(args[2])) ||
        !PyLong_CheckExact(args[3]) || !PyList_CheckExact(args[4]) || !PyLong_CheckExact(args[5]))
        Py_RETURN_NONE;
    PyObject *undo = args[0], *ent = args[1], *writes = args[2], *run = args[4], *mask = args[5];
    int overflow;
    long long start = PyLong_AsLongLongAndOverflow(args[3], &overflow);
    Py_ssize_t n = PyList_GET_SIZE(run), size = PyList_GET_SIZE(ent);
    if (overflow || start < 0 || start > PySequence_Fast_GET_SIZE(writes) - n) Py_RETURN_NONE;
    PyObject **items = PySequence_Fast_ITEMS(writes) + start;
    PyObject *values = PyList_New(n);
    if (!values) return NULL;
    for (Py_ssize_t k = 0; k < n; k++) { /* everything checked before anything changes */
        PyObject *i = PyList_GET_ITEM(run, k);
        if (!is_write(items[k]) || !PyLong_CheckExact(i)) goto decline;
        long long at = PyLong_AsLongLongAndOverflow(i, &overflow);
        if (overflow || at < 0 || at >= size) goto decline;
        PyObject *v = field(D_value, items[k]);
        if (!v) {
            PyErr_Clear(); /* the Python loop's to raise */
            goto decline;
        }
        int plain_value = PyLong_CheckExact(v); /* (then & runs no Python code) */
        PyObject *masked = plain_value ? PyNumber_And(v, mask) : NULL;
        Py_DECREF(v);
        if (!plain_value) goto decline;
        if (!masked) goto fail;
        PyList_SET_ITEM(values, k, masked);
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *i = PyList_GET_ITEM(run, k);
        PyObject *rec = PyTuple_Pack(3, ent, i, PyList_GET_ITEM(ent, PyLong_AsSsize_t(i)));
        if (!rec) goto fail;
        int bad = PyList_Append(undo, rec);
        Py_DECREF(rec);
        if (bad) goto fail;
    }
    for (Py_ssize_t k = 0; k < n; k++) { /* (each old value is held by its undo record) */
        PyObject *v = Py_NewRef(PyList_GET_ITEM(values, k));
        PyList_SetItem(ent, PyLong_AsSsize_t(PyList_GET_ITEM(run, k)), v); /* steals */
    }
    Py_DECREF(values);
    Py_RETURN_TRUE;
decline:
    Py_DECREF(values);
    Py_RETURN_NONE;
fail:
    Py_DECREF(values);
    return NULL;
}

/* --- the session ---------------------------------------------------------------------------- */
/* Session.commit: the device now holds what the steps wrote. Only lists and steps of plain
 * ints (an index in range) are taken, all checked first: no Python code then runs until the
 * last write (the values replaced are let go after it, their finalizers free to run).
 * commit(steps, dev_ctrl, dev_ent, msix, guest_low, dev_low) */
static PyObject *commit(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 6 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[1]) ||
        !PyList_CheckExact(args[2]) || !PyBool_Check(args[3]) || !PyList_CheckExact(args[4]) ||
        !PyList_CheckExact(args[5]))
        Py_RETURN_NONE;
    PyObject *steps = args[0], *dev_ctrl = args[1], *dev_ent = args[2];
    PyObject *guest_low = args[4], *dev_low = args[5];
    int msix = args[3] == Py_True;
    Py_ssize_t n = PyList_GET_SIZE(steps), moves = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *s = PyList_GET_ITEM(steps, k);
        if (!PyTuple_CheckExact(s) || PyTuple_GET_SIZE(s) != 3) Py_RETURN_NONE;
        unsigned long long what, index;
        if (!plain(PyTuple_GET_ITEM(s, 0), &what) || !plain(PyTuple_GET_ITEM(s, 1), &index))
            Py_RETURN_NONE;
        PyObject *to = what == 0 ? dev_ctrl : dev_ent;
        if (index >= (unsigned long long)PyList_GET_SIZE(to)) Py_RETURN_NONE;
        if (what != 0 && msix &&
            (index >= (unsigned long long)PyList_GET_SIZE(guest_low) ||
             index >= (unsigned long long)PyList_GET_SIZE(dev_low)))
            Py_RETURN_NONE;
        moves += what != 0 && msix ? 2 : 1;
    }
    PyObject **old = PyMem_New(PyObject *, moves ? moves : 1);
    if (!old) return PyErr_NoMemory();
    Py_ssize_t m = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *s = PyList_GET_ITEM(steps, k);
        unsigned long long what, index;
        plain(PyTuple_GET_ITEM(s, 0), &what); /* (both checked above) */
        plain(PyTuple_GET_ITEM(s, 1), &index);
        int ctrl = what == 0;
        PyObject *to = ctrl ? dev_ctrl : dev_ent;
        old[m++] = PyList_GET_ITEM(to, index);
        PyList_SET_ITEM(to, index, Py_NewRef(PyTuple_GET_ITEM(s, 2)));
        if (ctrl || !msix) continue;
        PyObject *low = PyList_GET_ITEM(guest_low, index);
        if (low == Py_None) continue;
        old[m++] = PyList_GET_ITEM(dev_low, index);
        PyList_SET_ITEM(dev_low, index, Py_NewRef(low));
    }
    for (Py_ssize_t k = 0; k < m; k++) Py_XDECREF(old[k]);
    PyMem_Free(old);
    Py_RETURN_TRUE;
}

/* A plain int or a bool below 2**63 in magnitude: 1 with *v; None: 0; anything else: -1, no
 * error set (an int subclass's == is its own, which the Python loop asks). */
static int num(PyObject *o, long long *v) {
    if (o == Py_None) return 0;
    if (!PyLong_CheckExact(o) && !PyBool_Check(o)) return -1;
    int overflow;
    *v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (*v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return overflow ? -1 : 1;
}

/* list[i] for i >= 0, borrowed; or NULL with the IndexError Python raises (a callback may
 * have shortened the list). */
static PyObject *item(PyObject *list, Py_ssize_t i) {
    if (i < PyList_GET_SIZE(list)) return PyList_GET_ITEM(list, i);
    PyErr_SetString(PyExc_IndexError, "list index out of range");
    return NULL;
}

/* changes[found[k]] = made[k] for each k, then the codes appended to reasons. */
static int apply(PyObject *found, PyObject *made, PyObject *codes, PyObject *changes,
                 PyObject *reasons) {
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(found); k++)
        if (PyDict_SetItem(changes, PyList_GET_ITEM(found, k), PyList_GET_ITEM(made, k)))
            return -1;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(codes); k++)
        if (PyList_Append(reasons, PyList_GET_ITEM(codes, k))) return -1;
    return 0;
}

enum { KEEP = -1 }; /* target.KEEP; REFUSE and LATCH (the other negatives) are declined */

/* Session._resolve in its usual case: every tag resolves to a value or KEEP, and no MSI-X
 * entry's low bits are unknown where they matter. Returns False, having filled ``changes``
 * and ``reasons`` as the Python loop does, or None with neither touched (the Python loop then
 * runs, and meets what this one declined: a latch, a refusal, unknown low bits; ``resolved``,
 * which that loop clears first, may hold what this one found). An error is raised where the
 * Python loop raises, the entries before it applied as that loop leaves them.
 * resolve(entries, guest_of, written, dev_ent, guest_low, dev_low, msix, width, in_use, rules,
 *         resolver, resolved, touched, changes, reasons) */
static PyObject *resolve(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 15 || !PyList_CheckExact(args[2]) || !PyList_CheckExact(args[3]) ||
        !PyList_CheckExact(args[4]) || !PyList_CheckExact(args[5]) || !PyBool_Check(args[6]) ||
        !PyDict_CheckExact(args[11]) || !PyAnySet_CheckExact(args[12]) ||
        !PyDict_CheckExact(args[13]) || !PyList_CheckExact(args[14]))
        Py_RETURN_NONE;
    PyObject *guest_of = args[1], *written = args[2], *dev_ent = args[3];
    PyObject *guest_low = args[4], *dev_low = args[5], *width = args[7], *in_use = args[8];
    PyObject *rules = args[9], *resolver = args[10], *resolved = args[11];
    PyObject *touched = args[12], *changes = args[13], *reasons = args[14];
    int msix = args[6] == Py_True;
    int tags = PyList_CheckExact(guest_of); /* else a function of the entry */
    Py_ssize_t size = PyList_GET_SIZE(dev_ent);
    if (PyList_GET_SIZE(written) != size ||
        (msix && (PyList_GET_SIZE(guest_low) != size || PyList_GET_SIZE(dev_low) != size)) ||
        (tags && PyList_GET_SIZE(guest_of) != size))
        Py_RETURN_NONE;
    PyObject *seq = sequence(args[0]);
    if (!seq) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *found = PyList_New(0), *made = PyList_New(0); /* changes to make: entry, value */
    PyObject *codes = PyList_New(0);  /* reasons to add, in order */
    /* Held, not borrowed: the callbacks (guest_of, the resolver, rules.fallback, the __eq__
     * of what reasons or touched hold) may drop what the lists and ``resolved`` hold. */
    PyObject *io = NULL, *guest = NULL, *key = NULL, *got = NULL, *fallback = NULL;
    PyObject *result = NULL;
    if (!found || !made || !codes) goto fail;
    PyDict_Clear(resolved);
    for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(seq); k++) { /* as Python iterates */
        Py_XSETREF(io, Py_NewRef(PySequence_Fast_GET_ITEM(seq, k)));
        int overflow = 0;
        long long i = PyLong_CheckExact(io) ? PyLong_AsLongLongAndOverflow(io, &overflow) : -1;
        if (overflow || i < 0 || i >= size) goto decline;
        Py_XSETREF(guest, tags ? Py_XNewRef(item(guest_of, i)) : PyObject_CallOneArg(guest_of, io));
        if (!guest) goto fail;
        PyObject *dev = item(dev_ent, i), *wr = dev ? item(written, i) : NULL; /* key holds */
        if (!wr) goto fail;
        if (!key || PyTuple_GET_ITEM(key, 0) != guest || PyTuple_GET_ITEM(key, 1) != wr ||
            PyTuple_GET_ITEM(key, 2) != dev) { /* (entries alike in a row: one lookup) */
            Py_CLEAR(got);
            Py_XSETREF(key, PyTuple_Pack(3, guest, wr, dev));
            if (!key) goto fail;
            got = Py_XNewRef(PyDict_GetItemWithError(resolved, key));
            if (!got) {
                if (PyErr_Occurred()) goto fail;
                got = PyObject_CallFunctionObjArgs(resolver, guest, wr, dev, width, in_use,
                                                   rules, NULL);
                if (!got || PyDict_SetItem(resolved, key, got)) goto fail;
            }
        }
        if (!PyTuple_CheckExact(got) || PyTuple_GET_SIZE(got) != 2) goto decline;
        PyObject *value = PyTuple_GET_ITEM(got, 0), *code = PyTuple_GET_ITEM(got, 1);
        long long v, d = 0, low = 0, dlow = 0;
        int has_dev = num(dev, &d);
        if (num(value, &v) != 1 || has_dev < 0 || (v < 0 && v != KEEP)) goto decline;
        if (code != Py_None) { /* in reasons (those added so far last), then the rule */
            if (!PyUnicode_CheckExact(code)) goto decline;
            int seen = PySequence_Contains(reasons, code);
            if (seen == 0) seen = PySequence_Contains(codes, code);
            if (seen < 0) goto fail;
            if (!seen && (!has_dev || v != d ||
                          PyUnicode_CompareWithASCIIString(code, "tag-fallback") != 0) &&
                PyList_Append(codes, code))
                goto fail;
        }
        PyObject *out = value; /* borrowed from got, key or fallback: the value to write */
        if (msix) {
            PyObject *lo = item(guest_low, i), *dlo = lo ? item(dev_low, i) : NULL;
            if (!dlo) goto fail;
            if (lo == Py_None) lo = dlo;
            int has_low = num(lo, &low), has_dlow = num(dlo, &dlow);
            if (has_low < 0 || has_dlow < 0) goto decline;
            int same_low = has_low == has_dlow && (!has_low || low == dlow);
            if (v == KEEP) {
                if (same_low || !has_low) continue;
                if (has_dev) {
                    out = dev;
                } else if (code == Py_None) {
                    out = guest;
                } else {
                    if (!fallback) {
                        PyObject *table = PyObject_GetAttrString(rules, "fallback");
                        if (!table) goto fail;
                        fallback = PyObject_GetItem(table, width);
                        Py_DECREF(table);
                        if (!fallback) goto fail;
                        int truth = PyObject_IsTrue(fallback);
                        if (truth < 0) goto fail;
                        if (!truth) Py_SETREF(fallback, Py_NewRef(I_zero));
                    }
                    out = fallback;
                }
                if (num(out, &v) != 1) goto decline;
            }
            if (!has_low) goto decline; /* msix-state-unknown: the Python loop's */
            if (has_dev && v == d && same_low) { /* (`i in touched` asked last, as Python) */
                int in = PySet_Contains(touched, io);
                if (in < 0) goto fail;
                if (!in) continue;
            }
        } else if (v == KEEP) {
            continue;
        } else if (has_dev && v == d) {
            int in = PySet_Contains(touched, io);
            if (in < 0) goto fail;
            if (!in) continue;
        }
        if (PyList_Append(found, io) || PyList_Append(made, out)) goto fail;
    }
    result = apply(found, made, codes, changes, reasons) ? NULL : Py_NewRef(Py_False);
    goto done;
decline:
    result = Py_NewRef(Py_None);
    goto done;
fail: /* the Python loop raises here, the entries before applied: so are they */
    if (found && made && codes) {
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *exc = PyErr_GetRaisedException();
        if (apply(found, made, codes, changes, reasons)) PyErr_Clear();
        PyErr_SetRaisedException(exc);
#else
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        if (apply(found, made, codes, changes, reasons)) PyErr_Clear();
        PyErr_Restore(type, exc, tb);
#endif
    }
done:
    Py_XDECREF(io);
    Py_XDECREF(guest);
    Py_XDECREF(key);
    Py_XDECREF(got);
    Py_XDECREF(fallback);
    Py_XDECREF(found);
    Py_XDECREF(made);
    Py_XDECREF(codes);
    Py_DECREF(seq);
    return result;
}

/* Checker._unsafe's pass over every entry: is each entry's tag ((v >> shift) & mask) in
 * ``allowed``? True: all are; False: one is not; None: an entry that is not one plain int
 * (unknown, or several possible values: the Python loop's). Every tag is taken first, as
 * Python makes its list before issuperset asks (a member's __eq__ may change ent); a
 * TypeError asking is _all_allowed's False. tags_allowed(allowed, ent, shift, mask) */
static PyObject *tags_allowed(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    unsigned long long shift, mask;
    if (nargs != 4 || !PyAnySet_CheckExact(args[0]) || !PyList_CheckExact(args[1]) ||
        !plain(args[2], &shift) || !plain(args[3], &mask) || shift > 63)
        Py_RETURN_NONE;
    PyObject *allowed = args[0], *ent = args[1];
    Py_ssize_t n = PyList_GET_SIZE(ent);
    unsigned long long *tag = PyMem_New(unsigned long long, n ? n : 1);
    if (!tag) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long v;
        if (!plain(PyList_GET_ITEM(ent, i), &v)) {
            PyMem_Free(tag);
            Py_RETURN_NONE;
        }
        tag[i] = (v >> shift) & mask;
    }
    PyObject *result = Py_True;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i && tag[i] == tag[i - 1]) continue; /* entries alike in a row: asked once */
        PyObject *t = PyLong_FromUnsignedLongLong(tag[i]);
        int in = t ? PySet_Contains(allowed, t) : -1;
        Py_XDECREF(t);
        if (in < 0 && t && PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            in = 0;
        }
        if (in < 0) {
            result = NULL;
            break;
        }
        if (!in) {
            result = Py_False;
            break;
        }
    }
    PyMem_Free(tag);
    return Py_XNewRef(result);
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_O, "bind(DeviceWrite): the type the functions build and read."},
    {"writes_text", writes_text, METH_O,
     "writes_text(writes) -> str | None: wire.writes_text's text (None: not plain writes)."},
    {"run_starts", run_starts, METH_O,
     "run_starts(writes) -> list | None: wire._run_starts (None: not plain writes)."},
    {"raw_writes", (PyCFunction)(void (*)(void))raw_writes, METH_FASTCALL,
     "raw_writes(steps, ctrl_at, msix, guest_low, dev_low, where, bir, shift, vc_low, "
     "ctrl_size, entry_size) -> list | None: RawWrites.writes."},
    {"entry_indices", (PyCFunction)(void (*)(void))entry_indices, METH_FASTCALL,
     "entry_indices(entry_at, writes) -> list | None: Checker._entry_indices."},
    {"apply_disabled", (PyCFunction)(void (*)(void))apply_disabled, METH_FASTCALL,
     "apply_disabled(undo, ent, writes, start, run, mask) -> True | None: "
     "Checker._apply_run's disabled case."},
    {"tags_allowed", (PyCFunction)(void (*)(void))tags_allowed, METH_FASTCALL,
     "tags_allowed(allowed, ent, shift, mask) -> bool | None: Checker._unsafe's pass."},
    {"commit", (PyCFunction)(void (*)(void))commit, METH_FASTCALL,
     "commit(steps, dev_ctrl, dev_ent, msix, guest_low, dev_low) -> True | None: "
     "Session.commit."},
    {"resolve", (PyCFunction)(void (*)(void))resolve, METH_FASTCALL,
     "resolve(entries, guest_of, written, dev_ent, guest_low, dev_low, msix, width, in_use, "
     "rules, resolver, resolved, touched, changes, reasons) -> False | None: "
     "Session._resolve."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bulk",
                                    "The per-entry loops of a big decision.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bulk(void) {
    S_config = PyUnicode_InternFromString("config");
    S_bar = PyUnicode_InternFromString("bar");
    I_zero = PyLong_FromLong(0);
    I_four = PyLong_FromLong(4);
    if (!S_config || !S_bar || !I_zero || !I_four) return NULL;
    return PyModule_Create(&module);
}
