/*
 * tphtrap plugin protocol, version 2: message layout for C integrations with their own JSON
 * code. A complete client library (spawn, handshake, a JSON reader, replies into structs) is
 * in clients/c/tphtrap.h.
 *
 * The wire format is JSON lines (docs/protocol.md); this header names the operations, fields,
 * verdicts and limits, and shows the structures a hypervisor typically decodes replies into.
 * Parse integers as unsigned 64-bit (strtoull): BAR values may exceed 2^53. Writes and st_set
 * ops may come as runs ("count"/"stride", "first"/"count"): expand them in order.
 *
 * Request examples (one line each, '\n' terminated):
 *   {"id":0,"op":"hello","versions":[2]}
 *   {"id":1,"op":"attach","vm":"tenant-a","bdf":"0000:3b:00.0","path":"/sys/bus/pci/devices/0000:3b:00.0"}
 *   {"id":2,"op":"cfg_write","vm":"tenant-a","bdf":"0000:3b:00.0","offset":336,"width":4,"value":257}
 *   {"id":3,"op":"msix_write","vm":"tenant-a","bdf":"0000:3b:00.0","bar":0,"offset":8204,"width":4,"value":0}
 */
#ifndef TPHTRAP_PROTO_H
#define TPHTRAP_PROTO_H

#include <stdint.h>

#define TPHTRAP_PROTO_VERSION 2
#define TPHTRAP_MAX_LINE      65536  /* request bytes, newline excluded */
#define TPHTRAP_MAX_REPLY     262144 /* reply and event line bytes, newline excluded */
#define TPHTRAP_MAX_WRITES    4104   /* upper bound of writes in one decision, runs expanded */

/* "op" values */
#define TPHTRAP_OP_HELLO      "hello"
#define TPHTRAP_OP_ATTACH     "attach"     /* vm, bdf, config (hex) | path [, source_bdf] [, replace]
                                              [, backend "writes"|"host", completer 0|1|3 | rciep] */
#define TPHTRAP_OP_DETACH     "detach"     /* vm, bdf */
#define TPHTRAP_OP_CFG_WRITE  "cfg_write"  /* vm, bdf, offset 0..4095, width 1|2|4, value */
#define TPHTRAP_OP_CFG_READ   "cfg_read"   /* vm, bdf, offset, width */
#define TPHTRAP_OP_MSIX_WRITE "msix_write" /* vm, bdf, bar 0..5, offset, width 1|2|4|8, value */
#define TPHTRAP_OP_MSIX_READ  "msix_read"  /* vm, bdf, bar, offset, width */
#define TPHTRAP_OP_RESET      "reset"      /* vm, bdf */
#define TPHTRAP_OP_VECTORS    "vectors"    /* vm, bdf, allocated [, tags_cleared] (backend host) */
#define TPHTRAP_OP_HOST_RESULT "host_result" /* vm, bdf, failed {op[, index]}, errno (host) */

/* "ops" of a decision with the host backend */
#define TPHTRAP_HOST_TPH_ENABLE  "tph_enable"  /* mode "iv"|"ns", width 8|16 */
#define TPHTRAP_HOST_TPH_DISABLE "tph_disable"
#define TPHTRAP_HOST_ST_SET      "st_set"      /* index (or first, count), cpu (or null), tag */
#define TPHTRAP_OP_RELOAD     "reload"     /* [policy] */
#define TPHTRAP_OP_STATS      "stats"
#define TPHTRAP_OP_SHUTDOWN   "shutdown"

enum tphtrap_verdict {
    TPHTRAP_PASS,    /* "pass": perform the guest's access as is (writes[0] is exactly it) */
    TPHTRAP_REWRITE, /* "rewrite": perform writes[] instead, in order */
    TPHTRAP_DROP,    /* "drop": perform nothing; also the meaning of every error reply */
};

enum tphtrap_space {
    TPHTRAP_SPACE_CONFIG, /* "config": offset in config space */
    TPHTRAP_SPACE_BAR,    /* "bar": offset inside memory BAR 'bar' */
};

/* One element of "writes". Perform them in array order, before forwarding anything else. */
struct tphtrap_write {
    enum tphtrap_space space;
    uint8_t bar;      /* valid when space == TPHTRAP_SPACE_BAR */
    uint8_t width;    /* 1, 2, 4 or 8 bytes */
    uint64_t offset;
    uint64_t value;   /* little-endian register value */
};

/* The "decision" object of a reply. */
struct tphtrap_decision {
    enum tphtrap_verdict verdict;
    char reason[32];            /* main reason code, e.g. "foreign-tag" */
    uint32_t n_writes;
    struct tphtrap_write *writes;
    /* Reads (and the guest's view after a write): the guest sees
     *   (device_value & ~read_mask) | (guest_value & read_mask)
     * read_mask == 0 means "no virtualized bytes: use the device value". */
    uint64_t guest_value;
    uint64_t read_mask;
};

/* A reply: {"id":N,"ok":true,"decision":{...}} or
 *          {"id":N,"ok":false,"error":{"code":"...","message":"...","field":"..."},"decision":{...drop...}} */
struct tphtrap_reply {
    int64_t id;                 /* or a string id; -1 here when the reply id is null */
    int ok;
    char error_code[32];        /* when !ok: "bad-json", "out-of-range", "unknown-vm", ... */
    struct tphtrap_decision decision;
};

#endif /* TPHTRAP_PROTO_H */
