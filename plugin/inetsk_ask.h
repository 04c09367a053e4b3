/* Asking the planner (inetsk_ask.c): the plugin's configuration, the request, and the one
 * exchange with the agent or the CLI, every wait by one deadline (docs/plugin.md). */
#ifndef INETSK_ASK_H
#define INETSK_ASK_H

#include <limits.h>
#include <stddef.h>
#include <sys/un.h>

#include "inetsk_wire.h"

#define INETSK_REPLY_FDS_MAX 4 /* room to see that a reply carried more than its one fd */

/* The defaults, then the config file beside the .so, then CRIU's environment. */
struct inetsk_conf {
	char path[PATH_MAX];  /* the config file beside this .so ("" when unknown) */
	char cli[PATH_MAX];   /* the CLI to run when no agent answers; "" = none */
	char sock[sizeof(((struct sockaddr_un *)0)->sun_path)];
	int timeout_ms;
};

/* One reply: its text (NUL-terminated) and every fd that came with it. */
struct inetsk_reply {
	char text[INETSK_WIRE_REPLY_MAX + 1];
	size_t len;
	int fds[INETSK_REPLY_FDS_MAX];
	int nfds;
};

/* CLOCK_MONOTONIC, in ms (deadlines) and in us (the log's timings). */
long inetsk_now_ms(void);
long inetsk_now_us(void);
/* 0, or -1 with one log line (a config file it may not trust, a bad setting). */
int inetsk_load_conf(struct inetsk_conf *c);
/* The request for this restore; -1 with one log line when it does not fit. */
int inetsk_build_request(char *buf, size_t cap, long deadline, int hook, size_t *out);
/* The agent; with none, the CLI if one can run here; else the agent again until the
 * deadline. 1 with the reply in rep, or -1 (logged once). */
int inetsk_ask_planner(const struct inetsk_conf *cf, int imgfd, int netnsfd, const char *req,
		      size_t reqlen, long deadline, struct inetsk_reply *rep);
void inetsk_close_reply_fds(struct inetsk_reply *rep);

#endif
