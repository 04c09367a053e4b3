/* SPDX-License-Identifier: MIT */
/*
 * TEST-ONLY plugin for tests/integration/test_criu_hook.py: proves what a CRIU does with
 * UPDATE_INETSK. Built twice (-DHT_NAME="hooktest-a" -DHT_ENV="HOOKTEST_A_", and b) so two
 * plugins can share one lib dir. Environment (read in init):
 *   <HT_ENV>LOG    file to append one line per event:
 *                    "<name> init stage=<n> criu_hooks=<n> hook=<0|1>"
 *                    "<name> call family=<n> state=<n> src=<addr> dst=<addr> -> <ret>"
 *   <HT_ENV>RULES  ';'-separated: "OLD=NEW" moves src and dst equal to OLD (same family)
 *                  and returns 0; "!OLD" returns -EPERM for a socket whose src is OLD.
 *                  A socket no rule matches gets -ENOTSUP.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "criu_hook_abi.h"

#ifndef HT_NAME
#define HT_NAME "hooktest"
#endif
#ifndef HT_ENV
#define HT_ENV "HOOKTEST_"
#endif

#define MAX_RULES 16

struct rule {
	int family, fail;
	uint32_t old[4], new_[4];
};

static struct rule rules[MAX_RULES];
static int nr_rules;
static FILE *events;

static int parse_addr(const char *s, uint32_t *w, int *family)
{
	memset(w, 0, 16);
	if (inet_pton(AF_INET, s, w) == 1) {
		*family = AF_INET;
		return 0;
	}
	if (inet_pton(AF_INET6, s, w) == 1) {
		*family = AF_INET6;
		return 0;
	}
	return -1;
}

static int parse_rules(const char *spec)
{
	char buf[1024], *save = NULL, *tok;

	if (!spec)
		return 0;
	snprintf(buf, sizeof(buf), "%s", spec);
	for (tok = strtok_r(buf, ";", &save); tok; tok = strtok_r(NULL, ";", &save)) {
		struct rule *r = &rules[nr_rules];
		char *eq = strchr(tok, '=');
		int fam2;

		if (nr_rules == MAX_RULES)
			return -1;
		if (tok[0] == '!') {
			r->fail = 1;
			if (parse_addr(tok + 1, r->old, &r->family))
				return -1;
		} else {
			if (!eq)
				return -1;
			*eq = '\0';
			if (parse_addr(tok, r->old, &r->family) || parse_addr(eq + 1, r->new_, &fam2) ||
			    fam2 != r->family)
				return -1;
		}
		nr_rules++;
	}
	return 0;
}

static int hooktest_init(int stage)
{
	const char *path = getenv(HT_ENV "LOG");

	if (path && !events) {
		events = fopen(path, "a");
		if (!events)
			return -1;
		setvbuf(events, NULL, _IOLBF, 0);
	}
	if (events)
		fprintf(events, "%s init stage=%d criu_hooks=%u hook=%d\n", HT_NAME, stage,
			inetsk_criu_hook_count(), inetsk_criu_calls_update_inetsk());
	if (parse_rules(getenv(HT_ENV "RULES")))
		return -1;
	return 0;
}

static void hooktest_fini(int stage, int ret)
{
	(void)stage;
	(void)ret;
	if (events)
		fclose(events);
	events = NULL;
}

static size_t nwords(uint32_t family)
{
	return family == AF_INET6 ? 4 : 1;
}

static const char *fmt(uint32_t family, const uint32_t *w, char *buf)
{
	return inet_ntop(family == AF_INET6 ? AF_INET6 : AF_INET, w, buf, INET6_ADDRSTRLEN);
}

static int hooktest_update_inetsk(uint32_t family, uint32_t state, uint32_t *src_ip, uint32_t *dst_ip)
{
	char s[INET6_ADDRSTRLEN], d[INET6_ADDRSTRLEN];
	size_t n = nwords(family), len = n * sizeof(uint32_t);
	int ret = -ENOTSUP, i;

	fmt(family, src_ip, s);
	fmt(family, dst_ip, d);
	for (i = 0; i < nr_rules; i++) {
		struct rule *r = &rules[i];

		if ((uint32_t)r->family != family)
			continue;
		if (r->fail) {
			if (!memcmp(src_ip, r->old, len)) {
				ret = -EPERM;
				break;
			}
			continue;
		}
		if (!memcmp(src_ip, r->old, len)) {
			memcpy(src_ip, r->new_, len);
			ret = 0;
		}
		if (!memcmp(dst_ip, r->old, len)) {
			memcpy(dst_ip, r->new_, len);
			ret = 0;
		}
	}
	if (events)
		fprintf(events, "%s call family=%u state=%u src=%s dst=%s -> %d\n", HT_NAME, family, state, s,
			d, ret);
	return ret;
}

INETSK_PLUGIN_REGISTER(HT_NAME, hooktest_init, hooktest_fini, hooktest_update_inetsk)
