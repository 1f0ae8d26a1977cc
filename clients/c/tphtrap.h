/*
 * tphtrap: a C11 client library for the tphtrap plugin protocol, version 2 (docs/protocol.md).
 *
 * No dependencies beyond POSIX: it spawns `tphtrap serve` (or uses two file descriptors the
 * caller connected), does the handshake, sends requests, and parses every reply with its own
 * JSON reader into the structs below: the decision (writes and host operations, runs
 * expanded), the guest's view, the trap map of an attach. Event lines (`"id": null`) go to a
 * callback. It fails closed: a reply it cannot read completely, or that breaks the protocol,
 * makes the call return -1 with `reply->decision` a drop, and the client unusable (every
 * later call returns -1 at once): the VMM must then stop forwarding and keep TPH off.
 *
 * Thread safety: one client per thread (no locking inside). Pointers inside a reply (writes,
 * ops) stay valid until the next call on the same client.
 */
#ifndef TPHTRAP_H
#define TPHTRAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TPHTRAP_PROTOCOL 2
#define TPHTRAP_MAX_LINE 65536    /* request lines (max_line) */
#define TPHTRAP_MAX_REPLY 262144  /* reply and event lines (max_reply) */
#define TPHTRAP_MAX_ENTRIES 2048  /* ST entries a device can have (MSI-X) */
#define TPHTRAP_MAX_REASONS 8
#define TPHTRAP_CODE_LEN 40
#define TPHTRAP_MAX_RANGES 16

enum tphtrap_verdict {
    TPHTRAP_PASS,    /* perform the guest's access as is (writes[0] is exactly it) */
    TPHTRAP_REWRITE, /* perform ops[], then writes[], instead */
    TPHTRAP_DROP,    /* perform nothing; also the meaning of every error */
};

enum tphtrap_space { TPHTRAP_CONFIG, TPHTRAP_BAR };

enum tphtrap_backend { TPHTRAP_BACKEND_WRITES, TPHTRAP_BACKEND_HOST };

enum tphtrap_op_kind {
    TPHTRAP_TPH_ENABLE,  /* pcie_enable_tph(pdev, mode) */
    TPHTRAP_TPH_DISABLE, /* pcie_disable_tph(pdev) */
    TPHTRAP_ST_SET,      /* pcie_tph_set_st_entry(pdev, index, tag) */
};

/* One device write, in decision order. */
struct tphtrap_write {
    enum tphtrap_space space;
    uint8_t bar;   /* with TPHTRAP_BAR */
    uint8_t width; /* 1, 2, 4 or 8 */
    uint64_t offset;
    uint64_t value; /* little-endian register value */
};

/* One host kernel operation (backend host), in decision order. */
struct tphtrap_op {
    enum tphtrap_op_kind op;
    bool iv;        /* tph_enable: Interrupt Vector mode (else No ST) */
    uint8_t width;  /* tph_enable: 8 or 16, the request type the host will choose */
    uint16_t index; /* st_set: the entry */
    int32_t cpu;    /* st_set: a host CPU of the VM whose tag it is, -1: none (neutral tag) */
    uint16_t tag;   /* st_set: the tag at the width in force */
};

struct tphtrap_decision {
    enum tphtrap_verdict verdict;
    char reason[TPHTRAP_CODE_LEN];
    unsigned n_reasons;
    char reasons[TPHTRAP_MAX_REASONS][TPHTRAP_CODE_LEN];
    size_t n_writes;
    const struct tphtrap_write *writes;
    bool has_ops; /* the device is attached with the host backend */
    size_t n_ops;
    const struct tphtrap_op *ops;
    /* guest sees (device & ~read_mask) | (guest_value & read_mask); read_mask 0: no view */
    uint64_t guest_value;
    uint64_t read_mask;
};

/* One range of the trap map: bytes [offset, offset + length), and with count > 1 the same at
 * offset + k * stride. Config ranges have bar 0xff. */
struct tphtrap_range {
    uint8_t bar;
    bool reads; /* reads must be answered from tphtrap's view too */
    uint32_t length, stride, count;
    uint64_t offset;
    char what[24]; /* "tph", "pcie-devctl", "af-ctrl", "pmcsr", "msix-vector-control" */
};

struct tphtrap_trap_map {
    size_t n_config, n_bar;
    struct tphtrap_range config[TPHTRAP_MAX_RANGES];
    struct tphtrap_range bar[TPHTRAP_MAX_RANGES];
};

struct tphtrap_reply {
    int64_t id; /* the client's request ids are integers */
    bool ok;
    char error_code[TPHTRAP_CODE_LEN]; /* when !ok */
    char error_field[TPHTRAP_CODE_LEN];
    char error_message[256];
    bool has_decision;
    struct tphtrap_decision decision;
    /* hello */
    unsigned version;
    uint32_t max_line, max_reply;
    /* attach */
    bool has_trap;
    struct tphtrap_trap_map trap;
    int host_width; /* backend host: 8, 16, or 0 when the host will not enable TPH; -1: writes */
};

/* An event line: a reload's correction for one device (vm, bdf may be ""), already parsed. */
typedef void (*tphtrap_event_fn)(void *user, const char *event, const char *vm, const char *bdf,
                                 const struct tphtrap_decision *decision);

struct tphtrap_client;

/* Spawn `argv` (e.g. {"tphtrap", "serve", "--policy", "p.yaml", NULL}) on two pipes. NULL on
 * failure, with a message in err. */
struct tphtrap_client *tphtrap_spawn(const char *const argv[], char *err, size_t errlen);
/* Use connected descriptors: replies are read from rfd, requests written to wfd. */
struct tphtrap_client *tphtrap_open_fds(int rfd, int wfd);
void tphtrap_on_event(struct tphtrap_client *c, tphtrap_event_fn fn, void *user);
/* Why the last call failed ("" if it did not). */
const char *tphtrap_error(const struct tphtrap_client *c);

/* Every call returns 0 when a reply was read (look at reply->ok: an error reply is a drop),
 * -1 when none could be (I/O, an unparsable or off-protocol line): then reply->decision is a
 * drop and the client is unusable. */
int tphtrap_hello(struct tphtrap_client *c, const char *name, struct tphtrap_reply *reply);
/* completer: 0, 1 or 3, or -1 for a root-complex integrated endpoint (backend host only). */
int tphtrap_attach(struct tphtrap_client *c, const char *vm, const char *bdf, const char *path,
                   enum tphtrap_backend backend, int completer, struct tphtrap_reply *reply);
int tphtrap_detach(struct tphtrap_client *c, const char *vm, const char *bdf,
                   struct tphtrap_reply *reply);
int tphtrap_cfg_write(struct tphtrap_client *c, const char *vm, const char *bdf, uint16_t offset,
                      uint8_t width, uint32_t value, struct tphtrap_reply *reply);
int tphtrap_cfg_read(struct tphtrap_client *c, const char *vm, const char *bdf, uint16_t offset,
                     uint8_t width, struct tphtrap_reply *reply);
int tphtrap_msix_write(struct tphtrap_client *c, const char *vm, const char *bdf, uint8_t bar,
                       uint64_t offset, uint8_t width, uint64_t value, struct tphtrap_reply *reply);
int tphtrap_msix_read(struct tphtrap_client *c, const char *vm, const char *bdf, uint8_t bar,
                      uint64_t offset, uint8_t width, struct tphtrap_reply *reply);
int tphtrap_reset(struct tphtrap_client *c, const char *vm, const char *bdf,
                  struct tphtrap_reply *reply);
int tphtrap_vectors(struct tphtrap_client *c, const char *vm, const char *bdf,
                    const uint16_t *allocated, size_t n, bool tags_cleared,
                    struct tphtrap_reply *reply);
int tphtrap_host_result(struct tphtrap_client *c, const char *vm, const char *bdf,
                        const struct tphtrap_op *failed, int err, struct tphtrap_reply *reply);
int tphtrap_reload(struct tphtrap_client *c, struct tphtrap_reply *reply);
/* Any request: `fields` is the JSON members after "id" and "op" (e.g. "\"policy\":\"p\""),
 * or NULL. */
int tphtrap_request(struct tphtrap_client *c, const char *op, const char *fields,
                    struct tphtrap_reply *reply);
/* Parse one reply line (no newline) as the client would; for tests and custom transports. */
int tphtrap_parse_reply(struct tphtrap_client *c, const char *line, size_t len,
                        struct tphtrap_reply *reply);
/* Send shutdown (when still usable), close the descriptors, reap a spawned child. Returns the
 * child's exit status, 0 for given descriptors, -1 on failure. */
int tphtrap_close(struct tphtrap_client *c);

#endif /* TPHTRAP_H */
