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
static PyObject *D_space, *D_bar, *D_offset, *D_width, *D_value; /* its member descriptors */
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
    Py_XSETREF(D_space, d[0]);
    Py_XSETREF(D_bar, d[1]);
    Py_XSETREF(D_offset, d[2]);
    Py_XSETREF(D_width, d[3]);
    Py_XSETREF(D_value, d[4]);
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

/* wire.writes_text: each write as {"space":..,["bar":..,]"offset":..,"width":..,"value":..}. */
static PyObject *writes_text(PyObject *module, PyObject *writes) {
    (void)module;
    PyObject *seq = PySequence_Fast(writes, "writes_text: a sequence of writes");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Text t = {NULL, 0, 0};
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *w = items[i];
        if (!is_write(w)) goto decline;
        PyObject *f[5] = {field(D_space, w), field(D_bar, w), field(D_offset, w),
                          field(D_width, w), field(D_value, w)};
        unsigned long long bar = 0, u[3];
        int ok = f[0] && f[1] && f[2] && f[3] && f[4];
        int space = 0; /* 1 config, 2 bar */
        if (ok) {
            space = PyUnicode_CheckExact(f[0])
                        ? (PyUnicode_Compare(f[0], S_config) == 0 ? 1
                           : PyUnicode_Compare(f[0], S_bar) == 0  ? 2
                                                                  : 0)
                        : 0;
            ok = space && (f[1] == Py_None || plain(f[1], &bar)) && plain(f[2], &u[0]) &&
                 plain(f[3], &u[1]) && plain(f[4], &u[2]);
        }
        int has_bar = ok && f[1] != Py_None;
        for (int k = 0; k < 5; k++) Py_XDECREF(f[k]);
        if (PyErr_Occurred()) goto done;
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

/* --- renderings ----------------------------------------------------------------------------- */
/* RawWrites.writes: the steps as DeviceWrites (see render.py).
 * raw_writes(steps, ctrl_at, msix, guest_low, dev_low, where, bir, shift, vc_low, ctrl_size,
 *            entry_size) */
static PyObject *raw_writes(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 11 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[1]) ||
        !PyList_CheckExact(args[3]) || !PyList_CheckExact(args[4]) || !Write) {
        Py_RETURN_NONE;
    }
    PyObject *steps = args[0], *ctrl_at = args[1], *guest_low = args[3], *dev_low = args[4];
    PyObject *where = args[5], *bir = args[6], *ctrl_size = args[9], *entry_size = args[10];
    int msix = PyObject_IsTrue(args[2]);
    unsigned long long shift, vc_low;
    if (msix < 0) return NULL;
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
            if (index >= (unsigned long long)PyList_GET_SIZE(ctrl_at)) goto decline;
            w = new_write(S_config, PyList_GET_ITEM(ctrl_at, index), ctrl_size, v, Py_None);
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
/* Checker._entry_indices: entry_at.get((space, bar, offset, width)) of each write, then None. */
static PyObject *entry_indices(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyDict_CheckExact(args[0])) Py_RETURN_NONE;
    PyObject *at = args[0];
    PyObject *seq = PySequence_Fast(args[1], "entry_indices: a sequence of writes");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(n + 1), *key = NULL;
    if (!out) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *w = items[i];
        if (!is_write(w)) {
            Py_XDECREF(key);
            Py_DECREF(out);
            Py_DECREF(seq);
            Py_RETURN_NONE;
        }
        if (!key || Py_REFCNT(key) != 1) { /* one key, its items replaced: none kept it */
            Py_XSETREF(key, PyTuple_New(4));
            if (!key) goto fail;
        }
        PyObject *f[4] = {field(D_space, w), field(D_bar, w), field(D_offset, w),
                          field(D_width, w)};
        for (int k = 0; k < 4; k++) {
            if (!f[k]) {
                for (int j = k + 1; j < 4; j++) Py_XDECREF(f[j]);
                goto fail;
            }
            PyObject *old = PyTuple_GET_ITEM(key, k);
            PyTuple_SET_ITEM(key, k, f[k]);
            Py_XDECREF(old);
        }
        PyObject *got = PyDict_GetItemWithError(at, key); /* borrowed */
        if (!got && PyErr_Occurred()) goto fail;
        PyList_SET_ITEM(out, i, Py_NewRef(got ? got : Py_None));
    }
    PyList_SET_ITEM(out, n, Py_NewRef(Py_None));
    Py_XDECREF(key);
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(key);
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

/* Checker._apply_run with every control register disabled: undo records (ent, i, old) kept,
 * then ent[i] = writes[start + k].value & mask for the run's entries.
 * apply_disabled(undo, ent, writes, start, run, mask) */
static PyObject *apply_disabled(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 6 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[1]) ||
        !PyList_CheckExact(args[4]))
        Py_RETURN_NONE;
    PyObject *undo = args[0], *ent = args[1], *run = args[4], *mask = args[5];
    PyObject *seq = PySequence_Fast(args[2], "apply_disabled: a sequence of writes");
    PyObject *values = NULL;
    if (!seq) return NULL;
    Py_ssize_t start = PyLong_AsSsize_t(args[3]);
    Py_ssize_t n = PyList_GET_SIZE(run), size = PyList_GET_SIZE(ent);
    if (start == -1 && PyErr_Occurred()) goto fail;
    if (start < 0 || start + n > PySequence_Fast_GET_SIZE(seq)) goto decline;
    PyObject **items = PySequence_Fast_ITEMS(seq) + start;
    for (Py_ssize_t k = 0; k < n; k++) { /* everything checked before anything changes */
        PyObject *i = PyList_GET_ITEM(run, k);
        if (!is_write(items[k]) || !PyLong_CheckExact(i)) goto decline;
        Py_ssize_t at = PyLong_AsSsize_t(i);
        if (at == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            goto decline;
        }
        if (at < 0 || at >= size) goto decline;
    }
    values = PyList_New(n);
    if (!values) goto fail;
    for (Py_ssize_t k = 0; k < n; k++) { /* the values first, as the Python loop takes them */
        PyObject *v = field(D_value, items[k]);
        if (!v) goto fail;
        PyObject *masked = PyNumber_And(v, mask);
        Py_DECREF(v);
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
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *v = Py_NewRef(PyList_GET_ITEM(values, k));
        PyList_SetItem(ent, PyLong_AsSsize_t(PyList_GET_ITEM(run, k)), v); /* steals */
    }
    Py_DECREF(values);
    Py_DECREF(seq);
    Py_RETURN_TRUE;
decline:
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(values);
    Py_DECREF(seq);
    return NULL;
}

/* --- the session ---------------------------------------------------------------------------- */
/* Session.commit: the device now holds what the steps wrote.
 * commit(steps, dev_ctrl, dev_ent, msix, guest_low, dev_low) */
static PyObject *commit(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 6 || !PyList_CheckExact(args[0])) Py_RETURN_NONE;
    PyObject *steps = args[0], *dev_ctrl = args[1], *dev_ent = args[2];
    PyObject *guest_low = args[4], *dev_low = args[5];
    int msix = PyObject_IsTrue(args[3]);
    if (msix < 0) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(steps);
    for (Py_ssize_t k = 0; k < n; k++) { /* every step a (what, index, value) tuple first */
        PyObject *s = PyList_GET_ITEM(steps, k);
        if (!PyTuple_CheckExact(s) || PyTuple_GET_SIZE(s) != 3) Py_RETURN_NONE;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *s = PyList_GET_ITEM(steps, k);
        PyObject *what = PyTuple_GET_ITEM(s, 0), *index = PyTuple_GET_ITEM(s, 1);
        PyObject *value = PyTuple_GET_ITEM(s, 2);
        int ctrl = PyObject_RichCompareBool(what, I_zero, Py_EQ);
        if (ctrl < 0) return NULL;
        if (ctrl) {
            if (PyObject_SetItem(dev_ctrl, index, value)) return NULL;
            continue;
        }
        if (PyObject_SetItem(dev_ent, index, value)) return NULL;
        if (msix) {
            PyObject *low = PyObject_GetItem(guest_low, index);
            if (!low) return NULL;
            int bad = low != Py_None && PyObject_SetItem(dev_low, index, low);
            Py_DECREF(low);
            if (bad) return NULL;
        }
    }
    Py_RETURN_TRUE;
}


/* An int below 2**63 in magnitude: 1 with *v; None: 0; anything else: -1 (no error set). */
static int num(PyObject *o, long long *v) {
    if (o == Py_None) return 0;
    if (!PyLong_Check(o)) return -1;
    int overflow;
    *v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (*v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return overflow ? -1 : 1;
}

enum { KEEP = -1 }; /* target.KEEP; REFUSE and LATCH (the other negatives) are declined */

/* Session._resolve in its usual case: every tag resolves to a value or KEEP, and no MSI-X
 * entry's low bits are unknown where they matter. Returns False, having filled ``changes``
 * and ``reasons`` as the Python loop does, or None with neither touched (the Python loop then
 * runs, and meets what this one declined: a latch, a refusal, unknown low bits).
 * resolve(entries, guest_of, written, dev_ent, guest_low, dev_low, msix, width, in_use, rules,
 *         resolver, resolved, touched, changes, reasons) */
static PyObject *resolve(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 15 || !PyList_CheckExact(args[2]) || !PyList_CheckExact(args[3]) ||
        !PyList_CheckExact(args[4]) || !PyList_CheckExact(args[5]) ||
        !PyDict_CheckExact(args[11]) || !PyAnySet_Check(args[12]) ||
        !PyDict_CheckExact(args[13]) || !PyList_CheckExact(args[14]))
        Py_RETURN_NONE;
    PyObject *guest_of = args[1], *written = args[2], *dev_ent = args[3];
    PyObject *guest_low = args[4], *dev_low = args[5], *width = args[7], *in_use = args[8];
    PyObject *rules = args[9], *resolver = args[10], *resolved = args[11];
    PyObject *touched = args[12], *changes = args[13], *reasons = args[14];
    int msix = PyObject_IsTrue(args[6]);
    if (msix < 0) return NULL;
    int tags = PyList_CheckExact(guest_of); /* else a function of the entry */
    PyObject *seq = PySequence_Fast(args[0], "resolve: a sequence of entries");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t size = PyList_GET_SIZE(dev_ent);
    if (PyList_GET_SIZE(written) != size ||
        (msix && (PyList_GET_SIZE(guest_low) != size || PyList_GET_SIZE(dev_low) != size)) ||
        (tags && PyList_GET_SIZE(guest_of) != size)) {
        Py_DECREF(seq);
        Py_RETURN_NONE;
    }
    PyObject *found = PyList_New(0), *made = PyList_New(0); /* changes to make: entry, value */
    PyObject *codes = PyList_New(0);  /* reasons to add, in order */
    PyObject *fallback = NULL, *result = NULL;
    PyObject *last_key = NULL, *last_got = NULL; /* entries alike in a row: one lookup */
    if (!found || !made || !codes) goto fail;
    PyDict_Clear(resolved);
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *io = items[k];
        Py_ssize_t i = PyLong_Check(io) ? PyLong_AsSsize_t(io) : -1;
        if (i == -1 && PyErr_Occurred()) goto fail;
        if (i < 0 || i >= size) goto decline;
        PyObject *guest = tags ? Py_NewRef(PyList_GET_ITEM(guest_of, i))
                               : PyObject_CallOneArg(guest_of, io);
        if (!guest) goto fail;
        PyObject *wr = PyList_GET_ITEM(written, i), *dev = PyList_GET_ITEM(dev_ent, i);
        PyObject *got;
        if (last_key && PyTuple_GET_ITEM(last_key, 1) == wr &&
            PyTuple_GET_ITEM(last_key, 2) == dev && PyTuple_GET_ITEM(last_key, 0) == guest) {
            got = last_got;
            Py_DECREF(guest);
        } else {
            PyObject *key = PyTuple_Pack(3, guest, wr, dev);
            Py_DECREF(guest);
            if (!key) goto fail;
            got = PyDict_GetItemWithError(resolved, key); /* borrowed */
            if (!got) {
                if (PyErr_Occurred() ||
                    !(got = PyObject_CallFunctionObjArgs(resolver, PyTuple_GET_ITEM(key, 0), wr,
                                                         dev, width, in_use, rules, NULL))) {
                    Py_DECREF(key);
                    goto fail;
                }
                int bad = PyDict_SetItem(resolved, key, got);
                Py_DECREF(got); /* the dict holds it */
                if (bad) {
                    Py_DECREF(key);
                    goto fail;
                }
            }
            Py_XSETREF(last_key, key);
            last_got = got;
        }
        if (!PyTuple_CheckExact(got) || PyTuple_GET_SIZE(got) != 2) goto decline;
        PyObject *value = PyTuple_GET_ITEM(got, 0), *code = PyTuple_GET_ITEM(got, 1);
        long long v, d = 0, low = 0, dlow = 0;
        int has_dev = num(dev, &d);
        if (num(value, &v) != 1 || has_dev < 0 || (v < 0 && v != KEEP)) goto decline;
        if (code != Py_None) {
            if (!PyUnicode_CheckExact(code)) goto decline;
            int fb = PyUnicode_CompareWithASCIIString(code, "tag-fallback") == 0;
            if (!fb || !has_dev || v != d) {
                int seen = PySequence_Contains(reasons, code);
                if (seen == 0) seen = PySequence_Contains(codes, code);
                if (seen < 0) goto fail;
                if (!seen && PyList_Append(codes, code)) goto fail;
            }
        }
        PyObject *out = value; /* borrowed: the value to write */
        if (msix) {
            PyObject *lo = PyList_GET_ITEM(guest_low, i), *dlo = PyList_GET_ITEM(dev_low, i);
            if (lo == Py_None) lo = dlo;
            int has_low = num(lo, &low), has_dlow = num(dlo, &dlow);
            if (has_low < 0 || has_dlow < 0) goto decline;
            int same_low = has_low == has_dlow && (!has_low || low == dlow);
            if (v == KEEP) {
                if (same_low || !has_low) continue;
                if (has_dev) {
                    out = dev;
                } else if (code == Py_None) {
                    out = tags ? PyList_GET_ITEM(guest_of, i) : NULL;
                    if (!out) goto decline;
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
            int in = PySet_Contains(touched, io);
            if (in < 0) goto fail;
            if (!(!has_dev || v != d) && same_low && !in) continue;
        } else {
            if (v == KEEP) continue;
            int in = PySet_Contains(touched, io);
            if (in < 0) goto fail;
            if (has_dev && v == d && !in) continue;
        }
        if (PyList_Append(found, io) || PyList_Append(made, out)) goto fail;
    }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(found); k++)
        if (PyDict_SetItem(changes, PyList_GET_ITEM(found, k), PyList_GET_ITEM(made, k)))
            goto fail;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(codes); k++)
        if (PyList_Append(reasons, PyList_GET_ITEM(codes, k))) goto fail;
    result = Py_NewRef(Py_False);
    goto done;
decline:
    result = Py_NewRef(Py_None);
    goto done;
fail:
    result = NULL;
done:
    Py_XDECREF(last_key);
    Py_XDECREF(fallback);
    Py_XDECREF(found);
    Py_XDECREF(made);
    Py_XDECREF(codes);
    Py_DECREF(seq);
    return result;
}


/* Checker._unsafe's pass over every entry: is each entry's tag ((v >> shift) & mask) in
 * ``allowed``? True: all are; False: one is not; None: an entry that is not one plain int
 * (unknown, or several possible values: the Python loop's). tags_allowed(allowed, ent, shift,
 * mask) */
static PyObject *tags_allowed(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    unsigned long long shift, mask;
    if (nargs != 4 || !PyAnySet_Check(args[0]) || !PyList_CheckExact(args[1]) ||
        !plain(args[2], &shift) || !plain(args[3], &mask) || shift > 63)
        Py_RETURN_NONE;
    PyObject *allowed = args[0], *ent = args[1];
    Py_ssize_t n = PyList_GET_SIZE(ent);
    long long last = -1; /* the last tag found allowed: entries alike in a row ask once */
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long v;
        if (!plain(PyList_GET_ITEM(ent, i), &v)) Py_RETURN_NONE;
        long long tag = (long long)((v >> shift) & mask);
        if (tag == last) continue;
        PyObject *t = PyLong_FromLongLong(tag);
        if (!t) return NULL;
        int in = PySet_Contains(allowed, t);
        Py_DECREF(t);
        if (in < 0) return NULL;
        if (!in) Py_RETURN_FALSE;
        last = tag;
    }
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_O, "bind(DeviceWrite): the type the functions build and read."},
    {"writes_text", writes_text, METH_O,
     "writes_text(writes) -> str | None: wire.writes_text's text (None: not plain writes)."},
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
