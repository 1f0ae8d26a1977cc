/*
 * The physical floor for a plugin of tphtrap's shape: a C child on the same pipes that answers
 * every request line with a fixed decision of the size and shape serve gives a granted TPH
 * control write, under the request's id. No JSON parsing beyond finding the id.
 *
 *   echo   (reads standard input, writes standard output, exits at EOF)
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char DECISION[] =
    "\"decision\":{\"verdict\":\"pass\",\"reason\":\"control-granted\",\"reasons\":["
    "\"control-granted\"],\"detail\":\"TPH control write allowed as requested\",\"writes\":["
    "{\"space\":\"config\",\"offset\":336,\"width\":4,\"value\":257}],\"guest_value\":257,"
    "\"read_mask\":4294967295,\"rule\":\"vms.tenant-a.devices.0000:3b:00.0\"}}\n";

int main(void) {
    static char in[1 << 17], out[1 << 17];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(0, in + have, sizeof in - have);
        if (n <= 0)
            return 0;
        have += (size_t)n;
        size_t start = 0, used = 0;
        for (;;) {
            char *nl = memchr(in + start, '\n', have - start);
            if (!nl)
                break;
            *nl = '\0';
            const char *id = strstr(in + start, "\"id\":");
            long long rid = id ? strtoll(id + 5, NULL, 10) : -1;
            int len = snprintf(out + used, sizeof out - used, "{\"id\":%lld,\"ok\":true,%s", rid,
                               DECISION);
            used += (size_t)len;
            start = (size_t)(nl - in) + 1;
        }
        for (size_t off = 0; off < used;) {
            ssize_t w = write(1, out + off, used - off);
            if (w <= 0)
                return 1;
            off += (size_t)w;
        }
        memmove(in, in + start, have - start);
        have -= start;
    }
}
