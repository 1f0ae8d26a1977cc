/*
 * The physical floor for a plugin of tphtrap's shape: a C child on the same pipes that answers
 * every request line with a fixed decision of the size and shape serve gives a granted TPH
 * control write, under the request's id. No JSON parsing beyond finding the id.
 *
 *   echo [--audit FILE]   (reads standard input, writes standard output, exits at EOF)
 *
 * With --audit, the floor of a plugin that audits to a file, write-ahead: before the replies
 * of each read go out, one line per request of the size and shape of serve's access.decided
 * line for that decision (its id, a fresh timestamp) is appended to FILE, one write each, as
 * serve writes its audit lines.
 */
#define _POSIX_C_SOURCE 200809L

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char DECISION[] =
    "\"decision\":{\"verdict\":\"pass\",\"reason\":\"control-granted\",\"reasons\":["
    "\"control-granted\"],\"detail\":\"TPH control write allowed as requested\",\"writes\":["
    "{\"space\":\"config\",\"offset\":336,\"width\":4,\"value\":257}],\"guest_value\":257,"
    "\"read_mask\":4294967295,\"rule\":\"vms.tenant-a.devices.0000:3b:00.0\"}}\n";

static const char AUDIT_HEAD[] =
    "{\"vm\":\"tenant-a\",\"bdf\":\"0000:3b:00.0\",\"region\":\"config\",\"op\":\"write\","
    "\"offset\":336,\"width\":4,\"guest_value\":257,\"verdict\":\"pass\",\"reason\":"
    "\"control-granted\",\"reasons\":[\"control-granted\"],\"rule\":"
    "\"vms.tenant-a.devices.0000:3b:00.0\",\"device_writes\":[{\"space\":\"config\","
    "\"offset\":336,\"width\":4,\"value\":257}],\"guest_view\":257,\"read_mask\":4294967295,"
    "\"id\":";

/* The audit line of request ``rid``, appended to ``fd``: 0, or -1 when it is not written. */
static int audit(int fd, long long rid) {
    char line[1024], stamp[32];
    struct timespec now;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    int len = snprintf(line, sizeof line,
                       "%s%lld,\"event\":\"access.decided\",\"level\":\"info\","
                       "\"timestamp\":\"%s.%06ldZ\"}\n",
                       AUDIT_HEAD, rid, stamp, now.tv_nsec / 1000);
    return write(fd, line, (size_t)len) == len ? 0 : -1;
}

int main(int argc, char **argv) {
    static char in[1 << 17], out[1 << 17];
    size_t have = 0;
    int audit_fd = -1;
    if (argc == 3 && strcmp(argv[1], "--audit") == 0) {
        audit_fd = open(argv[2], O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (audit_fd < 0) {
            perror(argv[2]);
            return 1;
        }
    } else if (argc != 1) {
        fprintf(stderr, "usage: echo [--audit FILE]\n");
        return 2;
    }
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
            if (audit_fd >= 0 && audit(audit_fd, rid))
                return 1;
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
