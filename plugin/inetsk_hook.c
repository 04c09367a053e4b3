/*
 * UPDATE_INETSK: apply, socket by socket, the plan the planner made at init, when CRIU has
 * the hook and the planner answered with a table instead of a view (docs/upstream-hook.md).
 *
 * The table holds one line per distinct (family, state, src words, dst words) key of the
 * checkpoint's inet sockets; the planner sends it only when every socket with a key gets the
 * same address-only change. Answers, as the hook defines them:
 *   - key moved by the plan: the new addresses written in place, 0;
 *   - key the plan leaves alone: -ENOTSUP (another plugin may take the socket);
 *   - no table (the view path, stock CRIU, or nothing to change): -ENOTSUP for every
 *     socket, so nothing is ever applied twice;
 *   - key not in the table (files.img is not what was planned): -ENOENT and one log line.
 */
#define LOG_PREFIX "overlayfs-inetsk: "

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "criu-log.h"
#include "inetsk_hook.h"
#include "inetsk_wire.h"

#define TABLE_MAX INETSK_WIRE_TABLE_MAX

struct hook_entry {
	uint32_t family, state, src[4], dst[4];
	int move;
	uint32_t new_src[4], new_dst[4];
};

static struct hook_entry *table;
static size_t table_len;
static int table_active;

void inetsk_hook_clear(void)
{
	free(table);
	table = NULL;
	table_len = 0;
	table_active = 0;
}

static int parse_line(const char *line, struct hook_entry *e)
{
	char act = 0;
	int n = 0;

	memset(e, 0, sizeof(*e));
	if (sscanf(line, "%x %x %x %x %x %x %x %x %x %x %c%n", &e->family, &e->state, &e->src[0],
		   &e->src[1], &e->src[2], &e->src[3], &e->dst[0], &e->dst[1], &e->dst[2],
		   &e->dst[3], &act, &n) != 11)
		return -1;
	if (e->family != AF_INET && e->family != AF_INET6)
		return -1;
	if (act == 'L')
		return line[n] == '\0' ? 0 : -1;
	if (act != 'M')
		return -1;
	e->move = 1;
	line += n;
	n = 0;
	if (sscanf(line, " %x %x %x %x %x %x %x %x%n", &e->new_src[0], &e->new_src[1],
		   &e->new_src[2], &e->new_src[3], &e->new_dst[0], &e->new_dst[1], &e->new_dst[2],
		   &e->new_dst[3], &n) != 8 || line[n] != '\0')
		return -1;
	return 0;
}

int inetsk_hook_load(const char *answer)
{
	const char *p = answer;
	unsigned long n;
	char *end;
	size_t i;

	inetsk_hook_clear();
	if (strncmp(p, "TABLE ", 6))
		goto bad;
	n = strtoul(p + 6, &end, 10);
	if (end == p + 6 || *end != '\n' || n == 0 || n > TABLE_MAX)
		goto bad;
	table = calloc(n, sizeof(*table));
	if (!table) {
		pr_err("out of memory for the hook table (%lu entries)\n", n);
		return -1;
	}
	p = end + 1;
	for (i = 0; i < n; i++) {
		char line[INETSK_WIRE_TABLE_LINE_MAX];
		size_t len = strcspn(p, "\n");

		if (len == 0 || len >= sizeof(line))
			goto bad;
		memcpy(line, p, len);
		line[len] = '\0';
		if (parse_line(line, &table[i]))
			goto bad;
		p += len;
		if (*p == '\n')
			p++;
	}
	if (*p != '\0')
		goto bad;
	table_len = n;
	table_active = 1;
	return 0;
bad:
	inetsk_hook_clear();
	pr_err("malformed hook table from the planner near: %.80s\n", p);
	return -1;
}

static const char *fmt(uint32_t family, const uint32_t *w, char *buf, size_t cap)
{
	if (!inet_ntop(family == AF_INET6 ? AF_INET6 : AF_INET, w, buf, cap))
		snprintf(buf, cap, "?");
	return buf;
}

int inetsk_update_inetsk(uint32_t family, uint32_t state, uint32_t *src_ip, uint32_t *dst_ip)
{
	char s[INET6_ADDRSTRLEN], d[INET6_ADDRSTRLEN], ns[INET6_ADDRSTRLEN], nd[INET6_ADDRSTRLEN];
	size_t words, i;

	if (!table_active || (family != AF_INET && family != AF_INET6))
		return -ENOTSUP;
	words = family == AF_INET6 ? 4 : 1;
	for (i = 0; i < table_len; i++) {
		struct hook_entry *e = &table[i];

		if (e->family != family || e->state != state ||
		    memcmp(e->src, src_ip, words * sizeof(uint32_t)) ||
		    memcmp(e->dst, dst_ip, words * sizeof(uint32_t)))
			continue;
		if (!e->move)
			return -ENOTSUP;
		pr_debug("hook: %s -> %s (state %u) becomes %s -> %s\n",
			 fmt(family, src_ip, s, sizeof(s)), fmt(family, dst_ip, d, sizeof(d)), state,
			 fmt(family, e->new_src, ns, sizeof(ns)), fmt(family, e->new_dst, nd, sizeof(nd)));
		memcpy(src_ip, e->new_src, words * sizeof(uint32_t));
		memcpy(dst_ip, e->new_dst, words * sizeof(uint32_t));
		return 0;
	}
	pr_err("inet socket %s -> %s (family %u, state %u) is not in the plan made at init "
	       "(files.img changed?): refusing to guess\n",
	       fmt(family, src_ip, s, sizeof(s)), fmt(family, dst_ip, d, sizeof(d)), family, state);
	return -ENOENT;
}
