/*
 * The C client against a real `tphtrap serve`: a Linux-like TPH bring-up on a device with its
 * ST table in the TPH capability and on one with the table in MSI-X, with both backends.
 *
 * Every decision is carried out on a simulated device (backend writes: its config space and
 * MSI-X table; backend host: a model of the Linux kernel's drivers/pci/tph.c, refusing what
 * the kernel refuses), and after each write or host operation the device is checked: a TPH
 * enable only ever uses tags of the VM's own CPUs. With the host backend there must be only
 * tph_enable / tph_disable / st_set, naming CPUs of the VM, and no raw write of a TPH register
 * or a steering tag. The guest reads back exactly what it wrote. Then the reader's fail-closed
 * behaviour on lines it must refuse.
 *
 *   test_tphtrap TPHTRAP_EXECUTABLE REPOSITORY_ROOT
 */
#define _POSIX_C_SOURCE 200809L

#include "tphtrap.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks;
static int op_count[3]; /* by enum tphtrap_op_kind */

static void check(int ok, const char *fmt, ...) {
    checks++;
    if (ok)
        return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

/* --- the world: policies/two-tenants.yaml and two devices ------------------------------- */
#define TPH 0x148
#define CTRL (TPH + 8)
#define TABLE (TPH + 0xc)
#define MSIX_BAR 2
#define MSIX_TABLE 0x4000

struct device {
    const char *vm, *bdf, *dump;
    bool in_msix;
    unsigned n;         /* ST entries */
    uint16_t own[2];    /* the VM's tag at 8 and 16 bits */
    unsigned tph_end;   /* the TPH capability's end (dword-rounded) */
    /* the simulated device */
    uint32_t ctrl;
    uint16_t ent[32];   /* capability entries, or the tag half of Vector Control */
    uint16_t vc_low[32];
    /* the host kernel (backend host) */
    bool host, k_enabled;
    unsigned k_req;
    bool allocated[32];
    /* the guest's own view */
    uint32_t g_ctrl;
    uint16_t g_ent[32];
};

static bool cpu_of_vm(const struct device *d, int32_t cpu) {
    bool socket0 = (cpu >= 0 && cpu <= 15) || (cpu >= 32 && cpu <= 47);
    bool socket1 = (cpu >= 16 && cpu <= 31) || (cpu >= 48 && cpu <= 63);
    return d->own[0] == 0x01 ? socket0 : socket1;
}

static bool allowed(const struct device *d, uint16_t tag, unsigned bits) {
    uint16_t t = bits == 8 ? (uint16_t)(tag & 0xff) : tag;
    return t == 0 || t == d->own[bits == 16]; /* tag 0 is neutral in the policy */
}

/* After every step: Requester Enable on means every entry holds an allowed tag. */
static void check_device(const struct device *d, const char *where) {
    unsigned en = (d->ctrl >> 8) & 3, mode = d->ctrl & 7;
    if (!en)
        return;
    check(en == 1 || en == 3, "%s %s: Requester Enable %u", d->bdf, where, en);
    check(mode == 1, "%s %s: mode %u enabled", d->bdf, where, mode);
    unsigned bits = en == 3 ? 16 : 8;
    for (unsigned i = 0; i < d->n; i++)
        check(allowed(d, d->ent[i], bits), "%s %s: entry %u holds %#x at %u bits", d->bdf, where,
              i, d->ent[i], bits);
}

/* --- carrying a decision out ------------------------------------------------------------- */
static void raw_write(struct device *d, const struct tphtrap_write *w) {
    if (w->space == TPHTRAP_CONFIG) {
        if (d->host)
            check(w->offset + w->width <= TPH || w->offset >= d->tph_end,
                  "%s: a raw config write at %#llx with the host backend", d->bdf,
                  (unsigned long long)w->offset);
        for (unsigned b = 0; b < w->width; b++) {
            uint64_t pos = w->offset + b;
            uint8_t byte = (uint8_t)(w->value >> (8 * b));
            if (pos >= CTRL && pos < CTRL + 4) {
                unsigned sh = 8 * (unsigned)(pos - CTRL);
                d->ctrl = (d->ctrl & ~(0xffu << sh)) | ((uint32_t)byte << sh);
            } else if (!d->in_msix && pos >= TABLE && pos < TABLE + 2 * d->n) {
                unsigned i = (unsigned)(pos - TABLE) / 2, sh = 8 * ((unsigned)(pos - TABLE) % 2);
                d->ent[i] = (uint16_t)((d->ent[i] & ~(0xff << sh)) | (byte << sh));
            }
        }
    } else {
        check(w->bar == MSIX_BAR, "a BAR write to BAR %u", w->bar);
        for (unsigned b = 0; b < w->width; b++) {
            uint64_t rel = w->offset + b - MSIX_TABLE;
            uint8_t byte = (uint8_t)(w->value >> (8 * b));
            if (rel >= 16 * 32 || rel % 16 < 12)
                continue;
            unsigned i = (unsigned)(rel / 16), k = (unsigned)(rel % 16) - 12;
            if (k >= 2) {
                check(!(d->host && d->in_msix), "%s: a raw steering-tag write (host)", d->bdf);
                if (d->in_msix)
                    d->ent[i] = (uint16_t)((d->ent[i] & ~(0xff << (8 * (k - 2)))) |
                                           (byte << (8 * (k - 2))));
            } else {
                d->vc_low[i] = (uint16_t)((d->vc_low[i] & ~(0xff << (8 * k))) | (byte << (8 * k)));
            }
        }
    }
    check_device(d, "after a write");
}

/* The host kernel, as drivers/pci/tph.c does it. */
static void host_op(struct device *d, const struct tphtrap_op *op) {
    op_count[op->op]++;
    if (op->op == TPHTRAP_TPH_ENABLE) {
        check(!d->k_enabled, "tph_enable while enabled: the kernel says -EBUSY");
        check(op->iv, "tph_enable in No ST mode in this bring-up");
        unsigned req = d->in_msix ? 3 : 1; /* Extended TPH only on the MSI-X device; completer 3 */
        check(op->width == (req == 3 ? 16 : 8), "tph_enable predicts %u bits", op->width);
        d->ctrl = (d->ctrl & ~0x307u) | 1u | (req << 8);
        d->k_enabled = true;
        d->k_req = req;
    } else if (op->op == TPHTRAP_TPH_DISABLE) {
        d->ctrl = 0;
        d->k_enabled = false;
    } else {
        unsigned bits = d->k_req == 3 ? 16 : 8;
        check(d->k_enabled, "st_set while disabled: the kernel says -EINVAL");
        check(op->index < d->n, "st_set past the table: -ENXIO");
        check(!d->in_msix || d->allocated[op->index], "st_set of an unallocated vector");
        if (op->cpu >= 0) {
            check(cpu_of_vm(d, op->cpu), "st_set names CPU %d, not the VM's", op->cpu);
            check(op->tag == d->own[bits == 16], "st_set tag %#x is not CPU %d's", op->tag,
                  op->cpu);
        } else {
            check(op->tag == 0, "st_set without a CPU for tag %#x", op->tag);
        }
        d->ctrl &= ~0x300u; /* pcie_tph_set_st_entry: Requester Enable off around the write */
        check_device(d, "st_set: enable cleared");
        d->ent[op->index] = op->tag;
        d->ctrl |= d->k_req << 8;
    }
    check_device(d, "after a host operation");
}

static void perform(struct device *d, const struct tphtrap_decision *dec) {
    check(dec->has_ops == d->host, "%s: ops %s with backend %s", d->bdf,
          dec->has_ops ? "present" : "absent", d->host ? "host" : "writes");
    for (size_t k = 0; k < dec->n_ops; k++)
        host_op(d, &dec->ops[k]);
    for (size_t k = 0; k < dec->n_writes; k++)
        raw_write(d, &dec->writes[k]);
}

static struct tphtrap_client *client;
static struct device *devices[2];
static int corrections;

static void on_event(void *user, const char *event, const char *vm, const char *bdf,
                     const struct tphtrap_decision *dec) {
    (void)user;
    check(strcmp(event, "corrections") == 0, "event %s", event);
    for (int k = 0; k < 2; k++)
        if (devices[k] && strcmp(devices[k]->vm, vm) == 0 && strcmp(devices[k]->bdf, bdf) == 0) {
            perform(devices[k], dec);
            corrections++;
        }
}

static const struct tphtrap_decision *ok(int got, struct tphtrap_reply *r, const char *what) {
    check(got == 0, "%s: %s", what, tphtrap_error(client));
    check(r->ok, "%s: error %s: %s", what, r->error_code, r->error_message);
    check(r->has_decision, "%s: no decision", what);
    return &r->decision;
}

/* --- the guest, as Linux does it --------------------------------------------------------- */
static void guest_cfg_write(struct device *d, uint16_t off, uint8_t width, uint32_t value) {
    struct tphtrap_reply r;
    const struct tphtrap_decision *dec =
        ok(tphtrap_cfg_write(client, d->vm, d->bdf, off, width, value, &r), &r, "cfg_write");
    if (d->host)
        check(dec->verdict != TPHTRAP_PASS, "a TPH write passed raw with the host backend");
    perform(d, dec);
    if (off == CTRL)
        d->g_ctrl = value;
    else
        d->g_ent[(off - TABLE) / 2] = (uint16_t)value;
    check(dec->read_mask == ((1ull << (8 * width)) - 1) && dec->guest_value == value,
          "the guest's view of its write at %#x", off);
}

static void guest_vc_write(struct device *d, unsigned i, uint16_t tag) {
    struct tphtrap_reply r;
    uint64_t off = MSIX_TABLE + 16 * i + 12;
    uint32_t value = (uint32_t)tag << 16; /* unmasked */
    const struct tphtrap_decision *dec = ok(
        tphtrap_msix_write(client, d->vm, d->bdf, MSIX_BAR, off, 4, value, &r), &r, "msix_write");
    perform(d, dec);
    d->g_ent[i] = tag;
    check(dec->read_mask == 0xffff0000 && dec->guest_value == value, "the view of a VC write");
}

/* pcie_enable_tph(IV), then per entry pcie_tph_set_st_entry: clear Requester Enable, write the
 * entry (the ST table, or the MSI-X tag), restore Requester Enable. */
static void linux_bring_up(struct device *d, unsigned req, const uint16_t *tags) {
    struct tphtrap_reply r;
    const struct tphtrap_decision *dec =
        ok(tphtrap_cfg_read(client, d->vm, d->bdf, CTRL, 4, &r), &r, "cfg_read");
    check(dec->read_mask == 0xffffffff, "control read from the guest's view");
    uint32_t ctrl = ((uint32_t)dec->guest_value & ~0x307u) | 1u | (req << 8);
    guest_cfg_write(d, CTRL, 4, ctrl);
    for (unsigned i = 0; i < d->n; i++) {
        guest_cfg_write(d, CTRL, 4, ctrl & ~0x300u);
        if (d->in_msix)
            guest_vc_write(d, i, tags[i]);
        else
            guest_cfg_write(d, (uint16_t)(TABLE + 2 * i), 2, tags[i]);
        guest_cfg_write(d, CTRL, 4, ctrl);
    }
    check((d->ctrl >> 8) & 3, "%s: TPH is enabled after the bring-up", d->bdf);
    for (unsigned i = 0; i < d->n; i++) {
        if (d->in_msix)
            dec = ok(tphtrap_msix_read(client, d->vm, d->bdf, MSIX_BAR, MSIX_TABLE + 16 * i + 12,
                                       4, &r),
                     &r, "msix_read");
        else
            dec = ok(tphtrap_cfg_read(client, d->vm, d->bdf, (uint16_t)(TABLE + 2 * i), 2, &r),
                     &r, "cfg_read");
        uint64_t seen = d->in_msix ? (dec->guest_value >> 16) : dec->guest_value;
        check(dec->read_mask && seen == tags[i], "%s: entry %u reads %#llx, the guest wrote %#x",
              d->bdf, i, (unsigned long long)seen, tags[i]);
    }
}

static bool has_range(const struct tphtrap_trap_map *t, const char *what, uint64_t off) {
    for (size_t k = 0; k < t->n_config; k++)
        if (strcmp(t->config[k].what, what) == 0 && t->config[k].offset == off)
            return true;
    for (size_t k = 0; k < t->n_bar; k++)
        if (strcmp(t->bar[k].what, what) == 0 && t->bar[k].offset == off)
            return true;
    return false;
}

static void session(const char *root, bool host) {
    char path[2][4096];
    struct device a = {"tenant-a", "0000:3b:00.0", "nic-st-in-cap.lspci", false, 8, {0x01, 0x0101},
                       TPH + 0x1c, 0, {0}, {0}, host, false, 0, {0}, 0, {0}};
    struct device b = {"tenant-b", "0000:3b:00.1", "nic-st-in-msix.lspci", true, 32, {0x02, 0x0202},
                       TPH + 0xc, 0, {0}, {0}, host, false, 0, {0}, 0, {0}};
    for (unsigned i = 0; i < 32; i++)
        b.vc_low[i] = 1;
    struct device *devs[2] = {&a, &b};
    devices[0] = &a;
    devices[1] = &b;
    struct tphtrap_reply r;
    for (int k = 0; k < 2; k++) {
        snprintf(path[k], sizeof path[k], "%s/fixtures/devices/%s", root, devs[k]->dump);
        enum tphtrap_backend be = host ? TPHTRAP_BACKEND_HOST : TPHTRAP_BACKEND_WRITES;
        perform(devs[k], ok(tphtrap_attach(client, devs[k]->vm, devs[k]->bdf, path[k], be, 3, &r),
                            &r, "attach"));
        check(r.has_trap && has_range(&r.trap, "tph", TPH), "the trap map names TPH");
        check(has_range(&r.trap, "pcie-devctl", 0xa8) && has_range(&r.trap, "pmcsr", 0x44),
              "the trap map names the reset registers");
        check(r.host_width == (host ? (k ? 16 : 8) : -1), "the predicted width: %d",
              r.host_width);
    }
    check(has_range(&r.trap, "msix-vector-control", MSIX_TABLE + 12) && r.trap.bar[0].count == 32 &&
              r.trap.bar[0].stride == 16,
          "the trap map names the Vector Control dwords");

    /* tenant-a: entry 5 gets tenant-b's tag, which its policy rewrites to the fallback */
    uint16_t tags_a[8] = {0x01, 0x01, 0x00, 0x01, 0x01, 0x02, 0x01, 0x01};
    linux_bring_up(&a, 1, tags_a);
    check(a.ent[5] == 0x01, "the foreign tag of entry 5 became the fallback: %#x", a.ent[5]);
    if (host) {
        /* QEMU enables the host's MSI-X when the guest does: 4 vectors, every tag cleared */
        uint16_t allocated[4] = {0, 1, 2, 3};
        for (unsigned i = 0; i < 32; i++)
            b.ent[i] = 0;
        for (unsigned i = 0; i < 4; i++)
            b.allocated[i] = true;
        perform(&b, ok(tphtrap_vectors(client, b.vm, b.bdf, allocated, 4, true, &r), &r,
                       "vectors"));
    }
    /* tenant-b: vector 2 gets tenant-a's tag, which its policy drops */
    uint16_t tags_b[32];
    for (unsigned i = 0; i < 32; i++)
        tags_b[i] = 0x0202;
    tags_b[2] = 0x0101;
    b.n = host ? 4 : 32; /* the guest programs the vectors it uses */
    linux_bring_up(&b, 3, tags_b);
    check(b.ent[2] != 0x0101, "the foreign tag of vector 2 never reached the device");
    b.n = 32;
    check_device(&b, "after the bring-up");

    /* a reload: corrections arrive as event lines, one per device, before the reply */
    corrections = 0;
    check(tphtrap_reload(client, &r) == 0 && r.ok, "reload");
    check(corrections == 2, "%d corrections for 2 devices", corrections);

    for (int k = 0; k < 2; k++) {
        perform(devs[k], ok(tphtrap_reset(client, devs[k]->vm, devs[k]->bdf, &r), &r, "reset"));
        check(((devs[k]->ctrl >> 8) & 3) == 0, "TPH off after the reset");
        ok(tphtrap_detach(client, devs[k]->vm, devs[k]->bdf, &r), &r, "detach");
    }
    devices[0] = devices[1] = NULL;
    printf("%s backend: Linux-like bring-up on both devices checked", host ? "host" : "writes");
    if (host)
        printf(" (host operations: %d tph_enable, %d st_set, %d tph_disable)", op_count[0],
               op_count[2], op_count[1]);
    printf("\n");
}

/* --- failing closed -------------------------------------------------------------------- */
static void refuses(const char *line, const char *why) {
    struct tphtrap_client *c = tphtrap_open_fds(-1, -1);
    struct tphtrap_reply r;
    check(c != NULL, "a client for parsing");
    int got = tphtrap_parse_reply(c, line, strlen(line), &r);
    check(got < 0 && r.has_decision && r.decision.verdict == TPHTRAP_DROP, "accepted %s: %s", why,
          line);
    check(tphtrap_cfg_read(c, "v", "0000:00:00.0", 0, 4, &r) < 0, "usable after a bad line");
    tphtrap_close(c);
}

static void fail_closed(void) {
    refuses("not json", "a line that is not JSON");
    refuses("{\"id\":1,\"ok\":true,\"ok\":false}", "a repeated key");
    refuses("{\"id\":1,\"ok\":true,\"decision\":{\"verdict\":\"pass\",\"reason\":\"x\"}}",
            "a decision without writes");
    refuses("{\"id\":1,\"ok\":true,\"decision\":{\"verdict\":\"maybe\",\"reason\":\"x\","
            "\"writes\":[]}}",
            "an unknown verdict");
    refuses("{\"id\":1,\"ok\":true,\"decision\":{\"verdict\":\"rewrite\",\"reason\":\"x\","
            "\"writes\":[{\"space\":\"config\",\"offset\":1,\"width\":1,\"value\":256}]}}",
            "a value wider than its write");
    refuses("{\"id\":1,\"ok\":true,\"decision\":{\"verdict\":\"pass\",\"reason\":\"x\","
            "\"writes\":[],\"ops\":[{\"op\":\"tph_disable\"}]}}",
            "a pass with ops");
    refuses("{\"id\":1,\"ok\":true,\"decision\":{\"verdict\":\"rewrite\",\"reason\":\"x\","
            "\"writes\":[],\"ops\":[{\"op\":\"st_set\",\"first\":2047,\"count\":2,\"cpu\":0,"
            "\"tag\":1}]}}",
            "an st_set run past entry 2047");
    refuses("{\"id\":1,\"ok\":true,\"decision\":{\"verdict\":\"rewrite\",\"reason\":\"x\","
            "\"writes\":[],\"ops\":[{\"op\":\"pcie_reset\"}]}}",
            "an unknown op");
    refuses("{\"id\":1,\"ok\":false,\"error\":{\"code\":\"bad-json\"},\"decision\":{\"verdict\":"
            "\"rewrite\",\"reason\":\"x\",\"writes\":[]}}",
            "an error that is not a drop");
    refuses("{\"id\":1,\"ok\":true,\"decision\":{\"verdict\":\"rewrite\",\"reason\":\"x\","
            "\"writes\":[{\"space\":\"config\",\"offset\":1.5,\"width\":1,\"value\":0}]}}",
            "a fractional offset");
    refuses("{\"id\":1,\"ok\":true,\"decision\":{\"verdict\":\"drop\",\"reason\":\"x\","
            "\"writes\":[]}", "a truncated line");
    refuses("{\"id\":null,\"event\":\"corrections\",\"corrections\":[{\"vm\":\"a\",\"bdf\":\"b\","
            "\"decision\":{\"verdict\":\"pass\",\"reason\":\"x\",\"writes\":[]}}]}",
            "a correction with no event handler to carry it out");

    /* and a run it must expand */
    struct tphtrap_client *c = tphtrap_open_fds(-1, -1);
    struct tphtrap_reply r;
    const char *line =
        "{\"id\":3,\"ok\":true,\"decision\":{\"verdict\":\"rewrite\",\"reason\":\"tag-fallback\","
        "\"reasons\":[\"tag-fallback\"],\"detail\":\"\\u0041\",\"writes\":[{\"space\":\"bar\","
        "\"bar\":2,\"offset\":16396,\"width\":4,\"value\":33686017,\"count\":31,\"stride\":16}],"
        "\"ops\":[{\"op\":\"tph_enable\",\"mode\":\"iv\",\"width\":16},{\"op\":\"st_set\","
        "\"first\":0,\"count\":2048,\"cpu\":16,\"tag\":514}],\"guest_value\":"
        "18446744073709551615,\"read_mask\":18446744073709551615}}";
    check(tphtrap_parse_reply(c, line, strlen(line), &r) == 0, "a good line refused: %s",
          tphtrap_error(c));
    check(r.decision.n_writes == 31 && r.decision.writes[30].offset == 16396 + 30 * 16,
          "a write run expanded");
    check(r.decision.n_ops == 2049 && r.decision.ops[2048].index == 2047 &&
              r.decision.ops[2048].cpu == 16,
          "an st_set run expanded");
    check(r.decision.guest_value == UINT64_MAX, "64-bit values read as integers");
    tphtrap_close(c);
    printf("the reader fails closed on 12 kinds of bad lines\n");
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s TPHTRAP REPOSITORY_ROOT\n", argv[0]);
        return 2;
    }
    char policy[4096], err[256];
    snprintf(policy, sizeof policy, "%s/policies/two-tenants.yaml", argv[2]);
    const char *cmd[] = {argv[1], "serve", "--policy", policy, "--audit", "/dev/null", NULL};
    client = tphtrap_spawn(cmd, err, sizeof err);
    check(client != NULL, "spawn: %s", err);
    tphtrap_on_event(client, on_event, NULL);
    struct tphtrap_reply r;
    check(tphtrap_hello(client, "test_tphtrap.c", &r) == 0 && r.ok, "hello: %s",
          tphtrap_error(client));
    check(r.version == 2 && r.max_reply == TPHTRAP_MAX_REPLY && r.max_line == TPHTRAP_MAX_LINE,
          "the handshake's limits");
    session(argv[2], false);
    session(argv[2], true);
    check(tphtrap_close(client) == 0, "serve exits 0 after shutdown");
    fail_closed();
    printf("ok: %d checks\n", checks);
    return 0;
}
