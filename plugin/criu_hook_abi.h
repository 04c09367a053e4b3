/* SPDX-License-Identifier: MIT */
/*
 * One plugin .so that loads on CRIU 4.2.1 (13 hooks, no UPDATE_INETSK) AND registers
 * UPDATE_INETSK (upstream's hook id 15) on a CRIU that has it.
 *
 * CRIU's loader (criu/plugin.c, verify_plugin) refuses a plugin whose descriptor says
 * max_hooks > its own CR_PLUGIN_HOOK__MAX ("Corrupted plugin": the restore fails), and it
 * reads hooks[i] only for i < max_hooks. So the descriptor's max_hooks is chosen when the
 * .so is loaded (a constructor runs inside dlopen(), before CRIU looks at the descriptor):
 *   - CRIU's own CR_PLUGIN_HOOK__MAX is read from the size of its exported hook table
 *     `cr_plugin_ctl` (criu is linked -rdynamic; struct { list_head head;
 *     list_head hook_chain[CR_PLUGIN_HOOK__MAX]; }): 224 bytes on 4.2.1 (13 hooks), 272 on a
 *     CRIU with hooks 13..15;
 *   - more than 15 hooks: max_hooks = 16 and hooks[15] = the UPDATE_INETSK function. Every
 *     CRIU with more than 15 hooks has UPDATE_INETSK at 15: upstream's enum only grows.
 *   - otherwise (4.2.1, or the size cannot be read): max_hooks = 0. The plugin registers no
 *     hook at all, so it loads on any CRIU, and init() knows the hook will never be called.
 * An unreadable size can only make us choose the view (always correct), never a hook that
 * CRIU would not call or a descriptor CRIU would refuse.
 *
 * Use: #define _GNU_SOURCE first, #include this INSTEAD of CR_PLUGIN_REGISTER, then
 *   INETSK_PLUGIN_REGISTER("name", init, fini, update_inetsk_fn)
 * and read inetsk_criu_calls_update_inetsk() in init().
 */
#ifndef INETSK_HOOK_ABI_H
#define INETSK_HOOK_ABI_H

#ifndef _GNU_SOURCE
#error "define _GNU_SOURCE before any #include (dladdr1, RTLD_DL_SYMENT)"
#endif
#include <dlfcn.h>
#include <link.h>
#include <stddef.h>
#include <stdint.h>

/* Keep criu-plugin.h's `extern cr_plugin_desc_t CR_PLUGIN_DESC` out of the way: ours has
 * room for hook 15 whatever header (4.2.1's has 13 slots) this is compiled against. */
#define CR_PLUGIN_DESC inetsk_hdr_unused_desc
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter" /* its dummy init/exit, with -Wextra */
#include "criu-plugin.h"
#pragma GCC diagnostic pop
#undef CR_PLUGIN_DESC

/* upstream: CR_PLUGIN_HOOK__UPDATE_INETSK = 15 (13 RESTORE_INIT, 14 DUMP_DEVICES_LATE) */
#define INETSK_HOOK_UPDATE_INETSK 15u

typedef int(inetsk_update_inetsk_t)(uint32_t family, uint32_t state, uint32_t *src_ip,
				    uint32_t *dst_ip);

struct inetsk_plugin_desc {
	const char *name;
	int (*init)(int stage);
	void (*exit)(int stage, int ret);
	unsigned int version;
	unsigned int max_hooks;
	void *hooks[INETSK_HOOK_UPDATE_INETSK + 1];
};

/* The layout CRIU reads must be cr_plugin_desc_t's. */
_Static_assert(offsetof(struct inetsk_plugin_desc, max_hooks) == offsetof(cr_plugin_desc_t, max_hooks),
	       "descriptor layout");
_Static_assert(offsetof(struct inetsk_plugin_desc, hooks) == offsetof(cr_plugin_desc_t, hooks),
	       "descriptor layout");

extern struct inetsk_plugin_desc CR_PLUGIN_DESC;

/* The number of hooks of the CRIU we are loaded into; 0 when it cannot be told. */
static inline unsigned int inetsk_criu_hook_count(void)
{
	const ElfW(Sym) *sym = NULL;
	Dl_info info;
	void *ctl = dlsym(RTLD_DEFAULT, "cr_plugin_ctl");
	size_t list_head = 2 * sizeof(void *);

	if (!ctl || !dladdr1(ctl, &info, (void **)&sym, RTLD_DL_SYMENT) || !sym)
		return 0;
	if (sym->st_size < 2 * list_head || sym->st_size % list_head)
		return 0;
	return (unsigned int)(sym->st_size / list_head - 1);
}

/* True when this CRIU calls our UPDATE_INETSK function (decided at load time). */
static inline int inetsk_criu_calls_update_inetsk(void)
{
	return CR_PLUGIN_DESC.max_hooks > INETSK_HOOK_UPDATE_INETSK;
}

/*
 * Defines the descriptor. max_hooks starts at 0 (no hook: loads on any CRIU); the
 * constructor, run inside CRIU's dlopen() before CRIU reads the descriptor, registers
 * update_ when this CRIU has hook 15.
 */
#define INETSK_PLUGIN_REGISTER(name_, init_, exit_, update_)                                  \
	struct inetsk_plugin_desc CR_PLUGIN_DESC = {                                           \
		.name = (name_), .init = (init_), .exit = (exit_),                             \
		.version = CRIU_PLUGIN_VERSION, .max_hooks = 0,                                 \
	};                                                                                      \
	static inetsk_update_inetsk_t *const inetsk_update_fn = (update_);                      \
	static void __attribute__((constructor)) inetsk_register_update_inetsk(void)            \
	{                                                                                       \
		if (inetsk_criu_hook_count() > INETSK_HOOK_UPDATE_INETSK) {                     \
			CR_PLUGIN_DESC.hooks[INETSK_HOOK_UPDATE_INETSK] = (void *)inetsk_update_fn; \
			CR_PLUGIN_DESC.max_hooks = INETSK_HOOK_UPDATE_INETSK + 1;               \
		}                                                                               \
	}

#endif /* INETSK_HOOK_ABI_H */
