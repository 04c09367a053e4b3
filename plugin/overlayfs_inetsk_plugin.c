/*
 * overlayfs-inetsk CRIU plugin: at restore init, hand CRIU a per-node view of its images
 * dir, with the inet socket addresses rewritten by the project's own planner (Python).
 *
 * The C side is only plumbing, and trusts nothing it did not check (docs/plugin.md,
 * docs/security.md):
 *   1. fast path (inetsk_scan.c): no inet socket entry in files.img / inetsk.img ->
 *      nothing to do;
 *   2. find the restore's target network namespace: the one CRIU was handed as
 *      extRootNetNS (named on its command line, else the only foreign one it holds), else
 *      its own; more than one and none named: refused;
 *   3. ask the planner (inetsk_ask.c), one request and one reply over SOCK_SEQPACKET
 *      (inetsk_wire.h, generated from overlayfs_inetsk/plugin/wire.py): the node agent on
 *      its socket (its peer must be root), else, when one is configured,
 *      `CLI plugin-view --socket-fd 3` run as a child on a socketpair, which serves the
 *      request with the agent's own handler. The request carries the images dir fd and the
 *      netns fd; the reply is NONE | ERR <message> | TABLE <n> | VIEW view-<hex> with that
 *      view dir's fd;
 *   4. VIEW: the named entry of the view root, opened relative to the checked root without
 *      following links, must be the very dir whose fd came with the reply; that fd (on
 *      which the planner took a shared flock: the view lives while CRIU holds it) is
 *      dup2()ed onto CRIU's images dir fd; fini(RESTORE) removes the entry, relative to the
 *      same root fd.
 * Every wait has a deadline (timeout-ms). The plugin's configuration: the file
 * overlayfs-inetsk-plugin.conf beside this .so (root-owned, not group/other-writable),
 * overridden by CRIU's environment. No address map logic here: one decision logic for
 * FUSE, offline rewrite and plugin.
 */
#define LOG_PREFIX "overlayfs-inetsk: "

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

/* criu-plugin.h, and a descriptor that registers UPDATE_INETSK only on a CRIU that has it */
#include "criu_hook_abi.h"
#include "criu-log.h"
#include "inetsk_ask.h"
#include "inetsk_hook.h"
#include "inetsk_scan.h"
#include "inetsk_wire.h"

#ifndef NS_GET_NSTYPE
#define NS_GET_NSTYPE _IO(0xb7, 0x3)
#endif
#ifndef CLONE_NEWNET
#define CLONE_NEWNET 0x40000000
#endif


/* ---------------------------------------------------------------- fast path ------ */

/* 1: the image holds an inet socket entry, or the scanner will not read it (then the
 * planner reads it and names the fault); 0: it holds none, or is absent. The scanner
 * (inetsk_scan.c) reads a regular file only, capped and streamed. */
static int image_has_inet(int dirfd, const char *name, uint32_t want_magic)
{
	char why[256];

	switch (inetsk_scan_image(dirfd, name, want_magic, why, sizeof(why))) {
	case INETSK_SCAN_NONE:
		return 0;
	case INETSK_SCAN_INET:
		pr_info("%s: %s\n", name, why);
		return 1;
	default:
		pr_info("%s: not read by the fast path (%s): the planner reads it\n", name, why);
		return 1;
	}
}

/* ---------------------------------------------------------------- target netns --- */

#define NETNS_SEEN_MAX 8 /* foreign network namespaces named in the refusal line */

/* Is fd a network namespace? Its inode in *ino. nsfs files share one device (OWN's). */
static int is_netns_fd(int fd, const struct stat *own, unsigned long *ino)
{
	struct stat st;

	if (fstat(fd, &st) || st.st_dev != own->st_dev || ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET)
		return 0;
	*ino = (unsigned long)st.st_ino;
	return 1;
}

/* The fd criu's command line hands over as extRootNetNS (`--inherit-fd fd[N]:extRootNetNS`,
 * parsed as criu's inherit_fd_parse does, in any form getopt_long takes: `--inherit-fd=`,
 * an abbreviation): N, -1 when none is named, -2 when two different fds are. A restore
 * driven over RPC (`criu swrk`, as runc and crun run it) has none on its command line. */
static int cmdline_ext_root_netns(void)
{
	static char buf[65536];
	const char *opt = "--inherit-fd";
	size_t len = 0;
	char *a, *next;
	int fd, named = -1, want_value = 0;

	fd = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	while (len < sizeof(buf) - 1) {
		ssize_t n = read(fd, buf + len, sizeof(buf) - 1 - len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += n;
	}
	close(fd);
	buf[len] = '\0';
	for (a = buf; a < buf + len; a = next) {
		const char *val = NULL;
		int n = -1;

		next = a + strlen(a) + 1;
		if (want_value) {
			val = a;
			want_value = 0;
		} else if (!strcmp(a, "--")) {
			break;
		} else if (!strncmp(a, "--inh", 5)) {
			size_t k = strcspn(a, "=");

			if (k > strlen(opt) || strncmp(a, opt, k))
				continue;
			if (a[k] == '=')
				val = a + k + 1;
			else
				want_value = 1;
		}
		if (!val || strncmp(val, "fd[", 3) || sscanf(val + 2, "[%d]:", &n) != 1 || n < 0 ||
		    !strchr(val, ':') || strcmp(strchr(val, ':') + 1, "extRootNetNS"))
			continue;
		if (named >= 0 && named != n)
			return -2;
		named = n;
	}
	return named;
}

/* The restore's network namespace, as an fd of our own (O_CLOEXEC), or -1 (said, in one
 * line). The one CRIU was handed, never a guess (docs/plugin.md):
 *   - the fd criu's command line names extRootNetNS (`--inherit-fd fd[N]:extRootNetNS`);
 *   - else the one network namespace other than criu's own that criu holds an fd of (runc
 *     and crun hand it so, an inherited fd registered over RPC as extRootNetNS);
 *   - none: criu's own (plain `criu restore` run inside the node's namespace);
 *   - more than one, none named: refused, naming them. */
static int open_target_netns(void)
{
	unsigned long seen[NETNS_SEEN_MAX], ino;
	int seen_fd[NETNS_SEEN_MAX], n_seen = 0, i, named, found = -1, from = -1;
	char path[64], list[NETNS_SEEN_MAX * 40];
	struct stat own;
	struct dirent *de;
	DIR *d;

	if (stat("/proc/self/ns/net", &own)) {
		pr_perror("cannot stat /proc/self/ns/net");
		return -1;
	}
	named = cmdline_ext_root_netns();
	if (named == -2) {
		pr_err("criu's command line names more than one fd as extRootNetNS: not guessing "
		       "which network namespace is the restore's\n");
		return -1;
	}
	if (named >= 0) {
		if (!is_netns_fd(named, &own, &ino)) {
			pr_err("criu's command line names fd %d as extRootNetNS, but it is not a "
			       "network namespace\n", named);
			return -1;
		}
		from = named;
	} else {
		d = opendir("/proc/self/fd");
		if (!d) {
			pr_perror("cannot list /proc/self/fd");
			return -1;
		}
		while ((de = readdir(d)) != NULL) {
			int fd;

			if (de->d_name[0] < '0' || de->d_name[0] > '9')
				continue;
			fd = atoi(de->d_name);
			if (fd == dirfd(d) || !is_netns_fd(fd, &own, &ino) ||
			    ino == (unsigned long)own.st_ino)
				continue;
			for (i = 0; i < n_seen && i < NETNS_SEEN_MAX && seen[i] != ino; i++)
				;
			if (i < n_seen && i < NETNS_SEEN_MAX)
				continue; /* another fd of one already seen */
			if (n_seen < NETNS_SEEN_MAX) {
				seen[n_seen] = ino;
				seen_fd[n_seen] = fd;
			}
			n_seen++;
		}
		closedir(d);
		if (n_seen > 1) {
			size_t at = 0;

			for (i = 0; i < n_seen && i < NETNS_SEEN_MAX; i++)
				at += snprintf(list + at, sizeof(list) - at, "%snet:[%lu] on fd %d",
					       i ? ", " : "", seen[i], seen_fd[i]);
			pr_err("criu holds %d network namespaces besides its own (%s%s) and its command "
			       "line names none with --inherit-fd fd[N]:extRootNetNS: not guessing which "
			       "one is the restore's\n", n_seen, list, n_seen > NETNS_SEEN_MAX ? ", ..." : "");
			return -1;
		}
		if (n_seen == 1) {
			from = seen_fd[0];
			ino = seen[0];
		}
	}
	if (from >= 0) {
		snprintf(path, sizeof(path), "/proc/self/fd/%d", from);
		found = open(path, O_RDONLY | O_CLOEXEC);
		if (found < 0) {
			pr_perror("cannot open the network namespace on fd %d", from);
			return -1;
		}
		pr_info("target network namespace: fd %d (net:[%lu]), %s\n", from, ino,
			named >= 0 ? "named extRootNetNS on criu's command line" :
				     "the only one criu holds besides its own");
		return found;
	}
	found = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
	if (found < 0) {
		pr_perror("cannot open /proc/self/ns/net");
		return -1;
	}
	pr_info("target network namespace: criu's own (net:[%lu])\n", (unsigned long)own.st_ino);
	return found;
}

/* ---------------------------------------------------------------- the view -------- */

static int view_root_fd = -1, view_fd = -1;
static char view_name[sizeof(INETSK_WIRE_VIEW_PREFIX) + INETSK_WIRE_VIEW_HEX];

static int remove_tree_at(int parent, const char *name, int depth)
{
	struct dirent *de;
	DIR *d;
	int fd, ret = 0;

	fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return -1;
	d = fdopendir(fd);
	if (!d) {
		close(fd);
		return -1;
	}
	while ((de = readdir(d)) != NULL) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		if (unlinkat(dirfd(d), de->d_name, 0) == 0)
			continue;
		if ((errno == EISDIR || errno == EPERM) && depth < 8 &&
		    remove_tree_at(dirfd(d), de->d_name, depth + 1) == 0)
			continue;
		ret = -1;
	}
	closedir(d);
	if (unlinkat(parent, name, AT_REMOVEDIR))
		ret = -1;
	return ret;
}

static void remove_view(void)
{
	if (view_name[0]) {
		if (remove_tree_at(view_root_fd, view_name, 0) && errno != ENOENT)
			pr_warn("could not remove the view %s/%s: %s\n", INETSK_WIRE_VIEW_ROOT, view_name,
				strerror(errno));
		else
			pr_info("removed the view %s/%s\n", INETSK_WIRE_VIEW_ROOT, view_name);
	}
	view_name[0] = '\0';
	if (view_root_fd >= 0)
		close(view_root_fd);
	if (view_fd >= 0)
		close(view_fd); /* our hold on the view's lock: the sweeper may have what is left */
	view_root_fd = view_fd = -1;
}

/* root-owned, and not writable by group or others (a sticky root-owned parent, as /tmp,
 * may be) */
static int dir_ok(int fd, const char *path, int last)
{
	struct stat st;

	if (fstat(fd, &st)) {
		pr_err("view root %s: %s: %s\n", INETSK_WIRE_VIEW_ROOT, path, strerror(errno));
		return -1;
	}
	if (st.st_uid != 0) {
		pr_err("view root %s: %s is owned by uid %u, not root: refused\n", INETSK_WIRE_VIEW_ROOT,
		       path, (unsigned)st.st_uid);
		return -1;
	}
	if ((st.st_mode & 022) && (last || !(st.st_mode & S_ISVTX))) {
		pr_err("view root %s: %s is writable by group or others (mode %04o): refused\n",
		       INETSK_WIRE_VIEW_ROOT, path, (unsigned)(st.st_mode & 07777));
		return -1;
	}
	return 0;
}

/* The view root, opened component by component from / without following links, each
 * component checked. An fd (O_CLOEXEC; restored tasks close it), or -1 (logged). */
static int open_view_root(void)
{
	char path[] = INETSK_WIRE_VIEW_ROOT, *comp, *save = NULL;
	int fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC), nfd;

	if (fd < 0 || dir_ok(fd, "/", 0)) {
		if (fd >= 0)
			close(fd);
		return -1;
	}
	for (comp = strtok_r(path, "/", &save); comp; comp = strtok_r(NULL, "/", &save)) {
		nfd = openat(fd, comp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		close(fd);
		if (nfd < 0) {
			pr_err("view root %s: cannot open %s: %s\n", INETSK_WIRE_VIEW_ROOT, comp,
			       strerror(errno));
			return -1;
		}
		fd = nfd;
		if (dir_ok(fd, comp, save == NULL || *save == '\0'))
			goto bad;
	}
	return fd;
bad:
	close(fd);
	return -1;
}

/* A copy of s for one log line: at most cap - 1 bytes, control bytes as '?'. */
static const char *printable(const char *s, char *buf, size_t cap)
{
	size_t i;

	for (i = 0; s[i] && i + 1 < cap; i++)
		buf[i] = (unsigned char)s[i] < 0x20 || (unsigned char)s[i] == 0x7f ? '?' : s[i];
	buf[i] = '\0';
	return buf;
}

/* view-<VIEW_HEX lowercase hex digits>, and nothing else */
static int view_name_ok(const char *s)
{
	size_t p = strlen(INETSK_WIRE_VIEW_PREFIX), i;

	if (strncmp(s, INETSK_WIRE_VIEW_PREFIX, p) || strlen(s) != p + INETSK_WIRE_VIEW_HEX)
		return 0;
	for (i = p; s[i]; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return 0;
	return 1;
}

/* `VIEW <name>` with its one fd: checked, then put in place of the images dir. */
static int use_view(int imgfd, const char *name, struct inetsk_reply *rep)
{
	struct stat got, entry;
	char shown[81];
	int rootfd, e;

	if (rep->nfds != 1) {
		pr_err("refused the planner's VIEW reply: it came with %d fds, not 1\n", rep->nfds);
		return -1;
	}
	if (!view_name_ok(name)) {
		pr_err("refused the planner's VIEW reply: '%s' is not an entry %sXXX of %s\n",
		       printable(name, shown, sizeof(shown)), INETSK_WIRE_VIEW_PREFIX,
		       INETSK_WIRE_VIEW_ROOT);
		return -1;
	}
	if (fstat(rep->fds[0], &got) || !S_ISDIR(got.st_mode)) {
		pr_err("refused the planner's VIEW reply: the fd that came with it is not a directory\n");
		return -1;
	}
	rootfd = open_view_root();
	if (rootfd < 0)
		return -1;
	e = openat(rootfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (e < 0 || fstat(e, &entry)) {
		pr_err("refused the planner's VIEW reply: cannot open %s/%s: %s%s\n",
		       INETSK_WIRE_VIEW_ROOT, name, strerror(errno),
		       errno == ENOTDIR || errno == ELOOP ? " (a symlink is not followed)" : "");
		goto bad;
	}
	close(e);
	e = -1;
	if (entry.st_dev != got.st_dev || entry.st_ino != got.st_ino) {
		pr_err("refused the planner's VIEW reply: the fd that came with it is not %s/%s\n",
		       INETSK_WIRE_VIEW_ROOT, name);
		goto bad;
	}
	if (entry.st_uid != 0 || (entry.st_mode & 022)) {
		pr_err("refused the planner's VIEW reply: %s/%s is not root's, or writable by others\n",
		       INETSK_WIRE_VIEW_ROOT, name);
		goto bad;
	}
	/* dup2 clears FD_CLOEXEC on imgfd; CRIU's service fds are not close-on-exec either.
	 * The planner's shared flock is on this open file: it lives while CRIU holds imgfd. */
	if (dup2(rep->fds[0], imgfd) < 0) {
		pr_perror("cannot put the view %s/%s in place of the images dir", INETSK_WIRE_VIEW_ROOT,
			  name);
		goto bad;
	}
	/* CRIU closes imgfd at the end, before fini: keep the lock until fini removes it */
	view_fd = rep->fds[0];
	rep->fds[0] = rep->fds[--rep->nfds];
	view_root_fd = rootfd;
	snprintf(view_name, sizeof(view_name), "%s", name);
	pr_info("CRIU reads the per-node view %s/%s\n", INETSK_WIRE_VIEW_ROOT, name);
	return 0;
bad:
	if (e >= 0)
		close(e);
	close(rootfd);
	return -1;
}

/* What the planner answered, checked: 0 (nothing to do, a table, or the view in place)
 * or -1 (logged once). Every fd that came with it is closed. */
static int take_reply(int imgfd, struct inetsk_reply *rep, const long t[3])
{
	char *text = rep->text, shown[1001], took[96];
	int ret = -1;
	long now = inetsk_now_us();

	/* the plugin's time, and its two parts: reading files.img, and the planner's answer */
	snprintf(took, sizeof(took), "%ld ms: files.img read in %.1f ms, the planner's answer in %.1f ms",
		 (now - t[0] + 500) / 1000, (t[1] - t[0]) / 1000.0, (t[2] - t[1]) / 1000.0);

	if (rep->len && text[rep->len - 1] == '\n')
		text[--rep->len] = '\0';
	if (!strncmp(text, "TABLE ", 6)) {
		if (rep->nfds)
			pr_err("refused the planner's TABLE reply: it came with %d fds\n", rep->nfds);
		else if (!inetsk_criu_calls_update_inetsk())
			pr_err("the planner answered a hook table, but this CRIU has no UPDATE_INETSK\n");
		else if (inetsk_hook_load(text) == 0) {
			pr_info("no view: the plan goes through CRIU's UPDATE_INETSK hook, %.*s keys (%s)\n",
				(int)strcspn(text + 6, "\n"), text + 6, took);
			ret = 0;
		}
	} else if (!strncmp(text, "ERR ", 4)) {
		pr_err("%s\n", printable(text + 4, shown, sizeof(shown)));
	} else if (!strcmp(text, "NONE") || !strncmp(text, "NONE ", 5)) {
		if (rep->nfds || strchr(text, '\n'))
			pr_err("refused the planner's NONE reply: it came with fds or more lines\n");
		else {
			pr_info("nothing to change%s%s (%s)\n", text[4] ? ":" : "", text + 4, took);
			ret = 0;
		}
	} else if (!strncmp(text, "VIEW ", 5)) {
		if (use_view(imgfd, text + 5, rep) == 0) {
			pr_info("view ready (%s)\n", took);
			ret = 0;
		}
	} else {
		pr_err("unexpected answer from the planner: %s\n", printable(text, shown, 201));
	}
	inetsk_close_reply_fds(rep);
	return ret;
}

/* ---------------------------------------------------------------- init / fini ----- */

static char request[INETSK_WIRE_REQUEST_MAX];
static struct inetsk_reply rep;

static int overlayfs_inetsk_init(int stage)
{
	struct inetsk_conf cf;
	int imgfd, netnsfd, r;
	long t[3], deadline;
	size_t len;

	if (stage != CR_PLUGIN_STAGE__RESTORE)
		return 0;
	t[0] = inetsk_now_us();
	view_name[0] = '\0';
	inetsk_hook_clear();
	imgfd = criu_get_image_dir();
	if (imgfd < 0) {
		pr_err("no images dir fd\n");
		return -1;
	}
	if (!image_has_inet(imgfd, "files.img", INETSK_FILES_MAGIC) &&
	    !image_has_inet(imgfd, "inetsk.img", INETSK_LEGACY_MAGIC)) {
		pr_info("no inet socket in this checkpoint: nothing to do\n");
		return 0;
	}
	t[1] = inetsk_now_us();
	if (inetsk_load_conf(&cf))
		return -1;
	deadline = t[0] / 1000 + cf.timeout_ms;
	if (inetsk_build_request(request, sizeof(request), deadline,
				 inetsk_criu_calls_update_inetsk(), &len))
		return -1;
	netnsfd = open_target_netns();
	if (netnsfd < 0)
		return -1; /* said, in one line */
	pr_info("criu pid %d: asking the planner for a per-node view%s\n", (int)getpid(),
		inetsk_criu_calls_update_inetsk() ? " or a table for CRIU's UPDATE_INETSK hook" : "");
	r = inetsk_ask_planner(&cf, imgfd, netnsfd, request, len, deadline, &rep);
	close(netnsfd);
	if (r < 0)
		return -1;
	t[2] = inetsk_now_us();
	return take_reply(imgfd, &rep, t);
}

static void overlayfs_inetsk_fini(int stage, int ret)
{
	(void)ret;
	if (stage == CR_PLUGIN_STAGE__RESTORE)
		remove_view();
	inetsk_hook_clear();
}

INETSK_PLUGIN_REGISTER("overlayfs-inetsk", overlayfs_inetsk_init, overlayfs_inetsk_fini,
		       inetsk_update_inetsk)
