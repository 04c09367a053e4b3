/* The UPDATE_INETSK side of the plugin (inetsk_hook.c; docs/upstream-hook.md). */
#ifndef INETSK_HOOK_H
#define INETSK_HOOK_H

#include <stdint.h>

/* Load the planner's "TABLE <n>\n<lines>" answer; from then on the hook applies it.
 * 0, or -1 with one log line. */
int inetsk_hook_load(const char *answer);
/* Forget the table: the hook answers -ENOTSUP to every socket. */
void inetsk_hook_clear(void);
/* CR_PLUGIN_HOOK__UPDATE_INETSK (upstream id 15). */
int inetsk_update_inetsk(uint32_t family, uint32_t state, uint32_t *src_ip, uint32_t *dst_ip);

#endif
