/*
 * tphtrap client library: transport, requests, a small JSON reader, replies into structs.
 * See tphtrap.h. C11 plus POSIX (fork, pipe, execvp, read, write, waitpid).
 */
#define _POSIX_C_SOURCE 200809L

#include "tphtrap.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* The JSON reader: one pass over the line into an array of nodes (no allocation per value).  */

enum jtype { J_NULL, J_FALSE, J_TRUE, J_NUM, J_STR, J_ARR, J_OBJ };

struct jnode {
    enum jtype type;
    unsigned next;  /* the node after this one and its children (siblings walk) */
    unsigned count; /* members or elements */
    const char *s;  /* J_STR: the raw text between the quotes; J_NUM: the digits */
    size_t len;
    bool neg, is_int, escaped;
    uint64_t u; /* J_NUM: the magnitude when is_int */
};

#define MAX_NODES 40000 /* 2048 single st_set ops are about 10,300 nodes */
#define MAX_DEPTH 32

struct jparser {
    const char *p, *end;
    struct jnode *nodes;
    unsigned n;
    const char *err;
};

static void skip_ws(struct jparser *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int jfail(struct jparser *j, const char *why) {
    if (!j->err)
        j->err = why;
    return -1;
}

static int parse_value(struct jparser *j, int depth);

static int parse_string(struct jparser *j, struct jnode *node) {
    const char *start = ++j->p;
    node->escaped = false;
    while (j->p < j->end) {
        unsigned char ch = (unsigned char)*j->p;
        if (ch == '"') {
            node->s = start;
            node->len = (size_t)(j->p - start);
            j->p++;
            return 0;
        }
        if (ch < 0x20)
            return jfail(j, "control character in a string");
        if (ch == '\\') {
            node->escaped = true;
            if (++j->p >= j->end)
                break;
            if (*j->p == 'u') {
                for (int k = 1; k <= 4; k++)
                    if (j->p + k >= j->end || !strchr("0123456789abcdefABCDEF", j->p[k]) ||
                        j->p[k] == '\0')
                        return jfail(j, "bad \\u escape");
                j->p += 4;
            } else if (!strchr("\"\\/bfnrt", *j->p) || *j->p == '\0') {
                return jfail(j, "bad escape");
            }
        }
        j->p++;
    }
    return jfail(j, "unterminated string");
}

static int parse_number(struct jparser *j, struct jnode *node) {
    const char *start = j->p;
    node->neg = *j->p == '-';
    if (node->neg)
        j->p++;
    if (j->p >= j->end || *j->p < '0' || *j->p > '9')
        return jfail(j, "bad number");
    if (*j->p == '0' && j->p + 1 < j->end && j->p[1] >= '0' && j->p[1] <= '9')
        return jfail(j, "leading zero");
    node->is_int = true;
    node->u = 0;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
        unsigned digit = (unsigned)(*j->p - '0');
        if (node->u > (UINT64_MAX - digit) / 10)
            node->is_int = false; /* beyond 64 bits: not an integer the protocol uses */
        else
            node->u = node->u * 10 + digit;
        j->p++;
    }
    if (j->p < j->end && *j->p == '.') {
        node->is_int = false;
        j->p++;
        if (j->p >= j->end || *j->p < '0' || *j->p > '9')
            return jfail(j, "bad fraction");
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
            j->p++;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        node->is_int = false;
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        if (j->p >= j->end || *j->p < '0' || *j->p > '9')
            return jfail(j, "bad exponent");
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
            j->p++;
    }
    node->s = start;
    node->len = (size_t)(j->p - start);
    return 0;
}

static bool same_key(const struct jnode *a, const struct jnode *b) {
    return a->len == b->len && a->escaped == b->escaped && memcmp(a->s, b->s, a->len) == 0;
}

static int parse_value(struct jparser *j, int depth) {
    skip_ws(j);
    if (j->p >= j->end)
        return jfail(j, "unexpected end");
    if (j->n >= MAX_NODES)
        return jfail(j, "too many values");
    if (depth > MAX_DEPTH)
        return jfail(j, "nested too deeply");
    unsigned me = j->n++;
    struct jnode *node = &j->nodes[me];
    memset(node, 0, sizeof *node);
    char ch = *j->p;
    if (ch == '{' || ch == '[') {
        bool obj = ch == '{';
        node->type = obj ? J_OBJ : J_ARR;
        j->p++;
        skip_ws(j);
        if (j->p < j->end && *j->p == (obj ? '}' : ']')) {
            j->p++;
        } else {
            for (;;) {
                if (obj) {
                    skip_ws(j);
                    if (j->p >= j->end || *j->p != '"')
                        return jfail(j, "a member name must be a string");
                    unsigned key = j->n;
                    if (parse_value(j, depth + 1) < 0)
                        return -1;
                    /* refuse a repeated key, as the server does */
                    for (unsigned k = me + 1; k < key; k = j->nodes[j->nodes[k].next].next)
                        if (same_key(&j->nodes[k], &j->nodes[key]))
                            return jfail(j, "repeated key");
                    skip_ws(j);
                    if (j->p >= j->end || *j->p != ':')
                        return jfail(j, "':' expected");
                    j->p++;
                }
                if (parse_value(j, depth + 1) < 0)
                    return -1;
                j->nodes[me].count++;
                skip_ws(j);
                if (j->p < j->end && *j->p == ',') {
                    j->p++;
                    continue;
                }
                if (j->p < j->end && *j->p == (obj ? '}' : ']')) {
                    j->p++;
                    break;
                }
                return jfail(j, "',' or a closing bracket expected");
            }
        }
    } else if (ch == '"') {
        node->type = J_STR;
        if (parse_string(j, node) < 0)
            return -1;
    } else if (ch == '-' || (ch >= '0' && ch <= '9')) {
        node->type = J_NUM;
        if (parse_number(j, node) < 0)
            return -1;
    } else if ((size_t)(j->end - j->p) >= 4 && memcmp(j->p, "true", 4) == 0) {
        node->type = J_TRUE;
        j->p += 4;
    } else if ((size_t)(j->end - j->p) >= 5 && memcmp(j->p, "false", 5) == 0) {
        node->type = J_FALSE;
        j->p += 5;
    } else if ((size_t)(j->end - j->p) >= 4 && memcmp(j->p, "null", 4) == 0) {
        node->type = J_NULL;
        j->p += 4;
    } else {
        return jfail(j, "not a JSON value");
    }
    j->nodes[me].next = j->n;
    return 0;
}

/* The member `name` of object node `obj`, or 0 (node 0 is never a member). */
static unsigned jget(const struct jparser *j, unsigned obj, const char *name) {
    if (j->nodes[obj].type != J_OBJ)
        return 0;
    size_t len = strlen(name);
    unsigned k = obj + 1;
    for (unsigned m = 0; m < j->nodes[obj].count; m++) {
        const struct jnode *key = &j->nodes[k];
        unsigned value = key->next;
        if (!key->escaped && key->len == len && memcmp(key->s, name, len) == 0)
            return value;
        k = j->nodes[value].next;
    }
    return 0;
}

/* Element i of array node arr (i < count). */
static unsigned jfirst(unsigned arr) { return arr + 1; }
static unsigned jnext(const struct jparser *j, unsigned node) { return j->nodes[node].next; }

/* ------------------------------------------------------------------------------------------ */
/* The client                                                                                  */

struct tphtrap_client {
    int rfd, wfd;
    pid_t child;
    bool broken;
    int64_t next_id;
    tphtrap_event_fn on_event;
    void *user;
    char *in;      /* TPHTRAP_MAX_REPLY + 2: the line being read and what followed it */
    size_t in_len; /* bytes in `in` */
    char *out;     /* a request line */
    struct jnode *nodes;
    struct tphtrap_write *writes;
    size_t cap_writes;
    struct tphtrap_op *ops;
    size_t cap_ops;
    char err[256];
};

#define OUT_SIZE (TPHTRAP_MAX_LINE + 2)

static void client_free(struct tphtrap_client *c) {
    free(c->in);
    free(c->out);
    free(c->nodes);
    free(c->writes);
    free(c->ops);
    free(c);
}

static struct tphtrap_client *client_new(int rfd, int wfd, pid_t child) {
    struct tphtrap_client *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->rfd = rfd;
    c->wfd = wfd;
    c->child = child;
    c->next_id = 1;
    c->in = malloc(TPHTRAP_MAX_REPLY + 2);
    c->out = malloc(OUT_SIZE);
    c->nodes = malloc(sizeof(struct jnode) * MAX_NODES);
    c->cap_writes = 64;
    c->writes = malloc(sizeof(struct tphtrap_write) * c->cap_writes);
    c->cap_ops = 64;
    c->ops = malloc(sizeof(struct tphtrap_op) * c->cap_ops);
    if (!c->in || !c->out || !c->nodes || !c->writes || !c->ops) {
        client_free(c);
        return NULL;
    }
    return c;
}

struct tphtrap_client *tphtrap_open_fds(int rfd, int wfd) { return client_new(rfd, wfd, -1); }

struct tphtrap_client *tphtrap_spawn(const char *const argv[], char *err, size_t errlen) {
    int to_child[2], from_child[2];
    if (pipe(to_child) < 0) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        return NULL;
    }
    if (pipe(from_child) < 0) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        close(to_child[0]);
        close(to_child[1]);
        return NULL;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(err, errlen, "fork: %s", strerror(errno));
        close(to_child[0]);
        close(to_child[1]);
        close(from_child[0]);
        close(from_child[1]);
        return NULL;
    }
    if (pid == 0) {
        dup2(to_child[0], 0);
        dup2(from_child[1], 1);
        close(to_child[0]);
        close(to_child[1]);
        close(from_child[0]);
        close(from_child[1]);
        execvp(argv[0], (char *const *)argv);
        fprintf(stderr, "tphtrap client: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(to_child[0]);
    close(from_child[1]);
    struct tphtrap_client *c = client_new(from_child[0], to_child[1], pid);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        close(from_child[0]);
        close(to_child[1]);
        kill(pid, SIGTERM);
        waitpid(pid, NULL, 0);
    }
    return c;
}

void tphtrap_on_event(struct tphtrap_client *c, tphtrap_event_fn fn, void *user) {
    c->on_event = fn;
    c->user = user;
}

const char *tphtrap_error(const struct tphtrap_client *c) { return c->err; }

/* Fail closed: the reply is a drop, the client unusable. */
static int fail(struct tphtrap_client *c, struct tphtrap_reply *r, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    c->broken = true;
    memset(r, 0, sizeof *r);
    r->id = -1;
    r->host_width = -1;
    snprintf(r->error_code, sizeof r->error_code, "client-error");
    snprintf(r->error_message, sizeof r->error_message, "%s", c->err);
    r->has_decision = true;
    r->decision.verdict = TPHTRAP_DROP;
    snprintf(r->decision.reason, sizeof r->decision.reason, "client-error");
    return -1;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The next line from the server (without its newline) in c->in[0..*len). */
static int read_line(struct tphtrap_client *c, size_t *len, size_t *consumed) {
    size_t scanned = 0;
    for (;;) {
        char *nl = memchr(c->in + scanned, '\n', c->in_len - scanned);
        if (nl) {
            *len = (size_t)(nl - c->in);
            *consumed = *len + 1;
            if (*len && c->in[*len - 1] == '\r')
                (*len)--;
            return 0;
        }
        scanned = c->in_len;
        if (c->in_len >= TPHTRAP_MAX_REPLY + 1) {
            snprintf(c->err, sizeof c->err, "a line longer than max_reply (%d bytes)",
                     TPHTRAP_MAX_REPLY);
            return -1;
        }
        ssize_t n = read(c->rfd, c->in + c->in_len, TPHTRAP_MAX_REPLY + 2 - c->in_len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            snprintf(c->err, sizeof c->err, "%s", n == 0 ? "the server closed its output"
                                                         : strerror(errno));
            return -1;
        }
        c->in_len += (size_t)n;
    }
}

static void copy_str(const struct jparser *j, unsigned node, char *dst, size_t size) {
    const struct jnode *n = &j->nodes[node];
    size_t len = n->len < size - 1 ? n->len : size - 1;
    memcpy(dst, n->s, len);
    dst[len] = '\0';
}

static bool get_u64(const struct jparser *j, unsigned obj, const char *name, uint64_t *out) {
    unsigned v = jget(j, obj, name);
    if (!v || j->nodes[v].type != J_NUM || !j->nodes[v].is_int || j->nodes[v].neg)
        return false;
    *out = j->nodes[v].u;
    return true;
}

static bool get_code(const struct jparser *j, unsigned obj, const char *name, char *dst,
                     size_t size) {
    unsigned v = jget(j, obj, name);
    if (!v || j->nodes[v].type != J_STR || j->nodes[v].escaped || j->nodes[v].len >= size)
        return false;
    copy_str(j, v, dst, size);
    return true;
}

static int grow(void **buf, size_t *cap, size_t need, size_t size) {
    if (need <= *cap)
        return 0;
    size_t cap2 = *cap;
    while (cap2 < need)
        cap2 *= 2;
    void *p = realloc(*buf, cap2 * size);
    if (!p)
        return -1;
    *buf = p;
    *cap = cap2;
    return 0;
}

/* A write object (or a run of them) appended to c->writes. */
static const char *take_write(struct tphtrap_client *c, const struct jparser *j, unsigned w,
                              size_t *n) {
    char space[8];
    uint64_t offset, width, value, bar = 0, count = 1, stride = 0;
    if (j->nodes[w].type != J_OBJ || !get_code(j, w, "space", space, sizeof space) ||
        !get_u64(j, w, "offset", &offset) || !get_u64(j, w, "width", &width) ||
        !get_u64(j, w, "value", &value))
        return "a write without space, offset, width and value";
    bool is_bar = strcmp(space, "bar") == 0;
    if (!is_bar && strcmp(space, "config") != 0)
        return "a write to an unknown space";
    if (is_bar && (!get_u64(j, w, "bar", &bar) || bar > 5))
        return "a BAR write without a BAR 0-5";
    if (width != 1 && width != 2 && width != 4 && width != 8)
        return "a write of a width other than 1, 2, 4, 8";
    if (width < 8 && value >> (8 * width))
        return "a write value wider than its width";
    if (jget(j, w, "count")) {
        if (!get_u64(j, w, "count", &count) || !get_u64(j, w, "stride", &stride) || count < 2 ||
            count > TPHTRAP_MAX_ENTRIES || stride == 0)
            return "a write run without a count of 2-2048 and a stride";
    }
    if (!is_bar && offset + (count - 1) * stride + width > 4096)
        return "a config write past 4096";
    if (grow((void **)&c->writes, &c->cap_writes, *n + count, sizeof *c->writes) < 0)
        return "out of memory";
    for (uint64_t k = 0; k < count; k++) {
        struct tphtrap_write *out = &c->writes[(*n)++];
        out->space = is_bar ? TPHTRAP_BAR : TPHTRAP_CONFIG;
        out->bar = (uint8_t)bar;
        out->width = (uint8_t)width;
        out->offset = offset + k * stride;
        out->value = value;
    }
    return NULL;
}

/* An op object (or an st_set run) appended to c->ops. */
static const char *take_op(struct tphtrap_client *c, const struct jparser *j, unsigned o,
                           size_t *n) {
    char name[16];
    if (j->nodes[o].type != J_OBJ || !get_code(j, o, "op", name, sizeof name))
        return "an op without a name";
    struct tphtrap_op op;
    memset(&op, 0, sizeof op);
    op.cpu = -1;
    uint64_t first = 0, count = 1, tag = 0, cpu, width;
    if (strcmp(name, "tph_disable") == 0) {
        op.op = TPHTRAP_TPH_DISABLE;
    } else if (strcmp(name, "tph_enable") == 0) {
        char mode[4];
        op.op = TPHTRAP_TPH_ENABLE;
        if (!get_code(j, o, "mode", mode, sizeof mode) || !get_u64(j, o, "width", &width) ||
            (strcmp(mode, "iv") != 0 && strcmp(mode, "ns") != 0) || (width != 8 && width != 16))
            return "tph_enable without mode iv|ns and width 8|16";
        op.iv = mode[0] == 'i';
        op.width = (uint8_t)width;
    } else if (strcmp(name, "st_set") == 0) {
        op.op = TPHTRAP_ST_SET;
        bool run = jget(j, o, "first") != 0;
        if (!get_u64(j, o, run ? "first" : "index", &first) || !get_u64(j, o, "tag", &tag) ||
            tag > 0xffff)
            return "st_set without its entry and a 16-bit tag";
        if (run && (!get_u64(j, o, "count", &count) || count < 2))
            return "an st_set run without a count of 2 or more";
        if (first + count > TPHTRAP_MAX_ENTRIES)
            return "st_set past entry 2047";
        unsigned v = jget(j, o, "cpu");
        if (!v)
            return "st_set without cpu";
        if (j->nodes[v].type != J_NULL) {
            if (!get_u64(j, o, "cpu", &cpu) || cpu > INT32_MAX)
                return "st_set with a cpu that is not a CPU number or null";
            op.cpu = (int32_t)cpu;
        }
        op.tag = (uint16_t)tag;
    } else {
        return "an unknown op";
    }
    if (grow((void **)&c->ops, &c->cap_ops, *n + count, sizeof *c->ops) < 0)
        return "out of memory";
    for (uint64_t k = 0; k < count; k++) {
        op.index = (uint16_t)(first + k);
        c->ops[(*n)++] = op;
        if (op.op != TPHTRAP_ST_SET)
            break;
    }
    return NULL;
}

/* A decision object; writes and ops are appended after `*nw`/`*no` entries already taken. */
static const char *take_decision(struct tphtrap_client *c, const struct jparser *j, unsigned d,
                                 struct tphtrap_decision *out, size_t *nw, size_t *no) {
    memset(out, 0, sizeof *out);
    char verdict[12];
    if (j->nodes[d].type != J_OBJ || !get_code(j, d, "verdict", verdict, sizeof verdict) ||
        !get_code(j, d, "reason", out->reason, sizeof out->reason))
        return "a decision without verdict and reason";
    if (strcmp(verdict, "pass") == 0)
        out->verdict = TPHTRAP_PASS;
    else if (strcmp(verdict, "rewrite") == 0)
        out->verdict = TPHTRAP_REWRITE;
    else if (strcmp(verdict, "drop") == 0)
        out->verdict = TPHTRAP_DROP;
    else
        return "an unknown verdict";
    unsigned reasons = jget(j, d, "reasons");
    if (reasons && j->nodes[reasons].type == J_ARR) {
        unsigned e = jfirst(reasons);
        for (unsigned k = 0; k < j->nodes[reasons].count; k++, e = jnext(j, e)) {
            if (j->nodes[e].type != J_STR)
                return "a reason that is not a string";
            if (out->n_reasons < TPHTRAP_MAX_REASONS)
                copy_str(j, e, out->reasons[out->n_reasons++], TPHTRAP_CODE_LEN);
        }
    }
    unsigned writes = jget(j, d, "writes");
    if (!writes || j->nodes[writes].type != J_ARR)
        return "a decision without its writes";
    size_t first_w = *nw;
    unsigned e = jfirst(writes);
    for (unsigned k = 0; k < j->nodes[writes].count; k++, e = jnext(j, e)) {
        const char *why = take_write(c, j, e, nw);
        if (why)
            return why;
    }
    out->n_writes = *nw - first_w;
    unsigned ops = jget(j, d, "ops");
    size_t first_o = *no;
    if (ops) {
        if (j->nodes[ops].type != J_ARR)
            return "ops is not a list";
        out->has_ops = true;
        e = jfirst(ops);
        for (unsigned k = 0; k < j->nodes[ops].count; k++, e = jnext(j, e)) {
            const char *why = take_op(c, j, e, no);
            if (why)
                return why;
        }
    }
    out->n_ops = *no - first_o;
    /* the arrays may still move: the pointers are set by the caller (set_pointers) */
    if (jget(j, d, "read_mask")) {
        if (!get_u64(j, d, "read_mask", &out->read_mask))
            return "a read_mask that is not an unsigned integer";
        unsigned gv = jget(j, d, "guest_value");
        if (!gv || (j->nodes[gv].type != J_NULL && !get_u64(j, d, "guest_value", &out->guest_value)))
            return "a read_mask without a guest_value";
    }
    if (out->verdict == TPHTRAP_PASS && out->n_ops)
        return "a pass with host operations";
    if (out->verdict == TPHTRAP_DROP && (out->n_ops || out->n_writes))
        return "a drop with something to perform";
    return NULL;
}

static void set_pointers(struct tphtrap_client *c, struct tphtrap_decision *d, size_t w0,
                         size_t o0) {
    d->writes = c->writes + w0;
    d->ops = c->ops + o0;
}

static const char *take_range(const struct jparser *j, unsigned r, bool bar,
                              struct tphtrap_range *out) {
    uint64_t offset, length, v;
    memset(out, 0, sizeof *out);
    out->bar = 0xff;
    out->count = 1;
    if (j->nodes[r].type != J_OBJ || !get_u64(j, r, "offset", &offset) ||
        !get_u64(j, r, "length", &length) || length == 0 || length > 4096 ||
        !get_code(j, r, "what", out->what, sizeof out->what))
        return "a trap range without offset, length and what";
    unsigned reads = jget(j, r, "reads");
    if (!reads || (j->nodes[reads].type != J_TRUE && j->nodes[reads].type != J_FALSE))
        return "a trap range without reads";
    out->reads = j->nodes[reads].type == J_TRUE;
    out->offset = offset;
    out->length = (uint32_t)length;
    if (bar) {
        if (!get_u64(j, r, "bar", &v) || v > 5)
            return "a BAR trap range without a BAR 0-5";
        out->bar = (uint8_t)v;
        if (!get_u64(j, r, "count", &v) || v == 0 || v > TPHTRAP_MAX_ENTRIES)
            return "a BAR trap range without a count";
        out->count = (uint32_t)v;
        if (!get_u64(j, r, "stride", &v) || v > 4096)
            return "a BAR trap range without a stride";
        out->stride = (uint32_t)v;
    } else if (offset + length > 4096) {
        return "a config trap range past 4096";
    }
    return NULL;
}

static const char *take_trap(const struct jparser *j, unsigned t, struct tphtrap_trap_map *out) {
    unsigned lists[2] = {jget(j, t, "config"), jget(j, t, "bar")};
    for (int b = 0; b < 2; b++) {
        unsigned list = lists[b];
        if (!list || j->nodes[list].type != J_ARR || j->nodes[list].count > TPHTRAP_MAX_RANGES)
            return "a trap map without config and bar lists";
        unsigned e = jfirst(list);
        for (unsigned k = 0; k < j->nodes[list].count; k++, e = jnext(j, e)) {
            struct tphtrap_range *r = b ? &out->bar[out->n_bar++] : &out->config[out->n_config++];
            const char *why = take_range(j, e, b == 1, r);
            if (why)
                return why;
        }
    }
    return NULL;
}

/* An event line: hand each correction to the callback. */
static const char *take_event(struct tphtrap_client *c, const struct jparser *j) {
    char event[TPHTRAP_CODE_LEN];
    if (!get_code(j, 0, "event", event, sizeof event))
        return "an id-less line that is not an event";
    unsigned list = jget(j, 0, "corrections");
    if (!list || j->nodes[list].type != J_ARR)
        return "an event without corrections";
    size_t nw = 0, no = 0;
    unsigned e = jfirst(list);
    for (unsigned k = 0; k < j->nodes[list].count; k++, e = jnext(j, e)) {
        char vm[72] = "", bdf[24] = "";
        struct tphtrap_decision d;
        unsigned dn = jget(j, e, "decision");
        if (!dn || !get_code(j, e, "vm", vm, sizeof vm) || !get_code(j, e, "bdf", bdf, sizeof bdf))
            return "a correction without vm, bdf and decision";
        nw = no = 0;
        const char *why = take_decision(c, j, dn, &d, &nw, &no);
        if (why)
            return why;
        set_pointers(c, &d, 0, 0);
        if (!c->on_event)
            return "a correction and no event handler to carry it out";
        c->on_event(c->user, event, vm, bdf, &d);
    }
    return NULL;
}

static const char *take_reply(struct tphtrap_client *c, const struct jparser *j,
                              struct tphtrap_reply *r) {
    unsigned id = jget(j, 0, "id"), ok = jget(j, 0, "ok");
    if (!ok || (j->nodes[ok].type != J_TRUE && j->nodes[ok].type != J_FALSE))
        return "a reply without ok";
    r->ok = j->nodes[ok].type == J_TRUE;
    if (!id)
        return "a reply without id";
    if (j->nodes[id].type == J_NULL)
        r->id = -1;
    else if (j->nodes[id].type == J_NUM && j->nodes[id].is_int && !j->nodes[id].neg &&
             j->nodes[id].u <= INT64_MAX)
        r->id = (int64_t)j->nodes[id].u;
    else
        return "a reply id that is not one of this client's";
    size_t nw = 0, no = 0;
    unsigned d = jget(j, 0, "decision");
    if (d) {
        const char *why = take_decision(c, j, d, &r->decision, &nw, &no);
        if (why)
            return why;
        r->has_decision = true;
        set_pointers(c, &r->decision, 0, 0);
    }
    if (!r->ok) {
        unsigned e = jget(j, 0, "error");
        if (!e || !get_code(j, e, "code", r->error_code, sizeof r->error_code))
            return "an error reply without a code";
        if (!r->has_decision || r->decision.verdict != TPHTRAP_DROP)
            return "an error reply without a drop decision";
        get_code(j, e, "field", r->error_field, sizeof r->error_field);
        unsigned m = jget(j, e, "message");
        if (m && j->nodes[m].type == J_STR)
            copy_str(j, m, r->error_message, sizeof r->error_message);
        return NULL;
    }
    uint64_t v;
    if (get_u64(j, 0, "version", &v))
        r->version = (unsigned)v;
    if (get_u64(j, 0, "max_line", &v))
        r->max_line = (uint32_t)v;
    if (get_u64(j, 0, "max_reply", &v))
        r->max_reply = (uint32_t)v;
    unsigned t = jget(j, 0, "trap");
    if (t) {
        const char *why = take_trap(j, t, &r->trap);
        if (why)
            return why;
        r->has_trap = true;
    }
    unsigned b = jget(j, 0, "backend");
    if (b) {
        char name[8];
        if (!get_code(j, b, "name", name, sizeof name))
            return "a backend without a name";
        if (strcmp(name, "host") == 0) {
            unsigned w = jget(j, b, "width");
            if (!w)
                return "a host backend without its width";
            r->host_width = j->nodes[w].type == J_NULL ? 0 : get_u64(j, b, "width", &v) ? (int)v : -2;
            if (r->host_width != 0 && r->host_width != 8 && r->host_width != 16)
                return "a host width other than 8, 16 or null";
        }
    }
    return NULL;
}

int tphtrap_parse_reply(struct tphtrap_client *c, const char *line, size_t len,
                        struct tphtrap_reply *r) {
    memset(r, 0, sizeof *r);
    r->host_width = -1;
    struct jparser j = {line, line + len, c->nodes, 0, NULL};
    if (parse_value(&j, 0) < 0)
        return fail(c, r, "unreadable reply: %s", j.err);
    skip_ws(&j);
    if (j.p != j.end)
        return fail(c, r, "unreadable reply: data after the JSON value");
    if (c->nodes[0].type != J_OBJ)
        return fail(c, r, "a reply that is not an object");
    unsigned id = jget(&j, 0, "id");
    if (id && c->nodes[id].type == J_NULL && jget(&j, 0, "event")) {
        const char *why = take_event(c, &j);
        if (why)
            return fail(c, r, "bad event line: %s", why);
        return 1; /* an event: read on */
    }
    const char *why = take_reply(c, &j, r);
    if (why)
        return fail(c, r, "bad reply: %s", why);
    return 0;
}

/* Send the request in c->out[0..len) and read its reply (events first, to the callback). */
static int roundtrip(struct tphtrap_client *c, size_t len, int64_t id, struct tphtrap_reply *r) {
    if (c->broken)
        return fail(c, r, "the client failed before: %s", c->err);
    if (write_all(c->wfd, c->out, len) < 0)
        return fail(c, r, "cannot send: %s", strerror(errno));
    for (;;) {
        size_t n, used;
        if (read_line(c, &n, &used) < 0)
            return fail(c, r, "%s", c->err);
        int got = tphtrap_parse_reply(c, c->in, n, r);
        memmove(c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
        if (got < 0)
            return -1;
        if (got == 1)
            continue;
        if (r->id != id)
            return fail(c, r, "a reply for request %lld, expected %lld", (long long)r->id,
                        (long long)id);
        return 0;
    }
}

/* Escape a string into the request buffer; false when it does not fit. */
static bool put_str(char *buf, size_t size, size_t *len, const char *s) {
    if (*len + 1 >= size)
        return false;
    buf[(*len)++] = '"';
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        char esc[8];
        int n;
        if (ch == '"' || ch == '\\')
            n = snprintf(esc, sizeof esc, "\\%c", ch);
        else if (ch < 0x20)
            n = snprintf(esc, sizeof esc, "\\u%04x", ch);
        else
            n = snprintf(esc, sizeof esc, "%c", ch);
        if (*len + (size_t)n + 2 >= size)
            return false;
        memcpy(buf + *len, esc, (size_t)n);
        *len += (size_t)n;
    }
    buf[(*len)++] = '"';
    return true;
}

static bool put_fmt(char *buf, size_t size, size_t *len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *len, size - *len, fmt, ap);
    va_end(ap);
    if (n < 0 || *len + (size_t)n + 2 >= size)
        return false;
    *len += (size_t)n;
    return true;
}

/* {"id":N,"op":"op","vm":"...","bdf":"..." + rest + "}\n" */
static int device_request(struct tphtrap_client *c, const char *op, const char *vm,
                          const char *bdf, const char *rest, struct tphtrap_reply *r) {
    size_t len = 0;
    int64_t id = c->next_id++;
    bool ok = put_fmt(c->out, OUT_SIZE, &len, "{\"id\":%lld,\"op\":\"%s\"", (long long)id, op);
    if (vm)
        ok = ok && put_fmt(c->out, OUT_SIZE, &len, ",\"vm\":") &&
             put_str(c->out, OUT_SIZE, &len, vm) && put_fmt(c->out, OUT_SIZE, &len, ",\"bdf\":") &&
             put_str(c->out, OUT_SIZE, &len, bdf);
    ok = ok && put_fmt(c->out, OUT_SIZE, &len, "%s%s}\n", rest && *rest ? "," : "", rest ? rest : "");
    if (!ok)
        return fail(c, r, "request longer than max_line");
    return roundtrip(c, len, id, r);
}

int tphtrap_request(struct tphtrap_client *c, const char *op, const char *fields,
                    struct tphtrap_reply *r) {
    return device_request(c, op, NULL, NULL, fields, r);
}

int tphtrap_hello(struct tphtrap_client *c, const char *name, struct tphtrap_reply *r) {
    char rest[200];
    size_t len = 0;
    if (!put_fmt(rest, sizeof rest, &len, "\"versions\":[%d],\"client\":", TPHTRAP_PROTOCOL) ||
        !put_str(rest, sizeof rest, &len, name ? name : "tphtrap.c"))
        return fail(c, r, "client name too long");
    rest[len] = '\0';
    if (device_request(c, "hello", NULL, NULL, rest, r) < 0)
        return -1;
    if (r->ok && (r->version != TPHTRAP_PROTOCOL || r->max_reply > TPHTRAP_MAX_REPLY))
        return fail(c, r, "the server speaks version %u with max_reply %u", r->version,
                    r->max_reply);
    return 0;
}

int tphtrap_attach(struct tphtrap_client *c, const char *vm, const char *bdf, const char *path,
                   enum tphtrap_backend backend, int completer, struct tphtrap_reply *r) {
    char rest[4200];
    size_t len = 0;
    bool ok = put_fmt(rest, sizeof rest, &len, "\"path\":") && put_str(rest, sizeof rest, &len, path);
    if (backend == TPHTRAP_BACKEND_HOST) {
        if (completer < 0)
            ok = ok && put_fmt(rest, sizeof rest, &len, ",\"backend\":\"host\",\"rciep\":true");
        else
            ok = ok && put_fmt(rest, sizeof rest, &len, ",\"backend\":\"host\",\"completer\":%d",
                               completer);
    }
    if (!ok)
        return fail(c, r, "path too long");
    rest[len] = '\0';
    return device_request(c, "attach", vm, bdf, rest, r);
}

int tphtrap_detach(struct tphtrap_client *c, const char *vm, const char *bdf,
                   struct tphtrap_reply *r) {
    return device_request(c, "detach", vm, bdf, NULL, r);
}

int tphtrap_cfg_write(struct tphtrap_client *c, const char *vm, const char *bdf, uint16_t offset,
                      uint8_t width, uint32_t value, struct tphtrap_reply *r) {
    char rest[80];
    snprintf(rest, sizeof rest, "\"offset\":%u,\"width\":%u,\"value\":%lu", (unsigned)offset,
             (unsigned)width, (unsigned long)value);
    return device_request(c, "cfg_write", vm, bdf, rest, r);
}

int tphtrap_cfg_read(struct tphtrap_client *c, const char *vm, const char *bdf, uint16_t offset,
                     uint8_t width, struct tphtrap_reply *r) {
    char rest[60];
    snprintf(rest, sizeof rest, "\"offset\":%u,\"width\":%u", (unsigned)offset, (unsigned)width);
    return device_request(c, "cfg_read", vm, bdf, rest, r);
}

int tphtrap_msix_write(struct tphtrap_client *c, const char *vm, const char *bdf, uint8_t bar,
                       uint64_t offset, uint8_t width, uint64_t value, struct tphtrap_reply *r) {
    char rest[120];
    snprintf(rest, sizeof rest, "\"bar\":%u,\"offset\":%llu,\"width\":%u,\"value\":%llu",
             (unsigned)bar, (unsigned long long)offset, (unsigned)width,
             (unsigned long long)value);
    return device_request(c, "msix_write", vm, bdf, rest, r);
}

int tphtrap_msix_read(struct tphtrap_client *c, const char *vm, const char *bdf, uint8_t bar,
                      uint64_t offset, uint8_t width, struct tphtrap_reply *r) {
    char rest[90];
    snprintf(rest, sizeof rest, "\"bar\":%u,\"offset\":%llu,\"width\":%u", (unsigned)bar,
             (unsigned long long)offset, (unsigned)width);
    return device_request(c, "msix_read", vm, bdf, rest, r);
}

int tphtrap_reset(struct tphtrap_client *c, const char *vm, const char *bdf,
                  struct tphtrap_reply *r) {
    return device_request(c, "reset", vm, bdf, NULL, r);
}

int tphtrap_vectors(struct tphtrap_client *c, const char *vm, const char *bdf,
                    const uint16_t *allocated, size_t n, bool tags_cleared,
                    struct tphtrap_reply *r) {
    char *rest = malloc(16 + 6 * TPHTRAP_MAX_ENTRIES + 40);
    if (!rest)
        return fail(c, r, "out of memory");
    size_t size = 16 + 6 * TPHTRAP_MAX_ENTRIES + 40, len = 0;
    bool ok = n <= TPHTRAP_MAX_ENTRIES && put_fmt(rest, size, &len, "\"allocated\":[");
    for (size_t k = 0; ok && k < n; k++)
        ok = put_fmt(rest, size, &len, "%s%u", k ? "," : "", (unsigned)allocated[k]);
    ok = ok && put_fmt(rest, size, &len, "],\"tags_cleared\":%s", tags_cleared ? "true" : "false");
    int got = ok ? device_request(c, "vectors", vm, bdf, rest, r) : fail(c, r, "too many vectors");
    free(rest);
    return got;
}

int tphtrap_host_result(struct tphtrap_client *c, const char *vm, const char *bdf,
                        const struct tphtrap_op *failed, int err, struct tphtrap_reply *r) {
    static const char *const names[] = {"tph_enable", "tph_disable", "st_set"};
    char rest[120];
    if (failed->op == TPHTRAP_ST_SET)
        snprintf(rest, sizeof rest, "\"failed\":{\"op\":\"st_set\",\"index\":%u},\"errno\":%d",
                 (unsigned)failed->index, err);
    else
        snprintf(rest, sizeof rest, "\"failed\":{\"op\":\"%s\"},\"errno\":%d", names[failed->op],
                 err);
    return device_request(c, "host_result", vm, bdf, rest, r);
}

int tphtrap_reload(struct tphtrap_client *c, struct tphtrap_reply *r) {
    return device_request(c, "reload", NULL, NULL, NULL, r);
}

int tphtrap_close(struct tphtrap_client *c) {
    int status = 0;
    if (!c)
        return -1;
    if (!c->broken) {
        struct tphtrap_reply r;
        device_request(c, "shutdown", NULL, NULL, NULL, &r);
    }
    close(c->wfd);
    close(c->rfd);
    if (c->child > 0) {
        int st;
        if (waitpid(c->child, &st, 0) < 0)
            status = -1;
        else
            status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    }
    client_free(c);
    return status;
}
