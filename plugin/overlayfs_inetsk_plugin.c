/*
 * overlayfs-inetsk CRIU plugin: at restore init, hand CRIU a per-node view of its images
 * dir, with the inet socket addresses rewritten by the project's own planner (Python).
 *
 * The C side is only plumbing (docs/plugin.md):
 *   1. fast path (inetsk_scan.c): no inet socket entry in files.img / inetsk.img ->
 *      nothing to do;
 *   2. find the restore's target network namespace: the one CRIU was handed as
 *      extRootNetNS (named on its command line, else the only foreign one it holds), else
 *      its own; more than one and none named: refused;
 *   3. ask the planner: the node agent on a unix socket, else `overlayfs-inetsk
 *      plugin-view` run as a child; both get the images dir fd and the netns fd and answer
 *      one line: NONE | VIEW <abs dir> | ERR <message>;
 *   4. VIEW: dup2 the view dir onto CRIU's images dir fd; fini(RESTORE) removes the view.
 * No address map logic here: one decision logic for FUSE, offline rewrite and plugin.
 */
#define LOG_PREFIX "overlayfs-inetsk: "

#include <dirent.h>
#include <dlfcn.h>
#include <libgen.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* criu-plugin.h, and a descriptor that registers UPDATE_INETSK only on a CRIU that has it */
#include "criu_hook_abi.h"
#include "criu-log.h"
#include "inetsk_hook.h"
#include "inetsk_scan.h"

#ifndef NS_GET_NSTYPE
#define NS_GET_NSTYPE _IO(0xb7, 0x3)
#endif
#ifndef CLONE_NEWNET
#define CLONE_NEWNET 0x40000000
#endif

#define DEFAULT_AGENT_SOCK "/run/overlayfs-inetsk/agent.sock"
#define CLI_CONF_NAME "overlayfs-inetsk-plugin.cli" /* beside the .so; CRIU loads only *.so */
#define DEFAULT_CLI "overlayfs-inetsk"
#define VIEW_ROOT "/run/overlayfs-inetsk/plugin/"
#define REPLY_MAX (128 * 1024) /* a hook table is up to 512 lines */
#define REQ_MAX 16384
#define DEFAULT_TIMEOUT_MS 30000

extern char **environ;

static char view_path[PATH_MAX]; /* the view made for this restore, removed in fini */

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

/* ---------------------------------------------------------------- the planner ----- */

static int timeout_ms(void)
{
	const char *t = getenv("OVERLAYFS_INETSK_TIMEOUT_MS");
	int v = t ? atoi(t) : 0;

	return v > 0 ? v : DEFAULT_TIMEOUT_MS;
}

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* The request: a header line, then NUL-separated KEY=VALUE of our variables in CRIU's
 * environment (OVERLAYFS_INETSK_* and INETSK_*). */
static size_t build_request(char *buf, size_t cap)
{
	size_t len;
	char **e;

	len = snprintf(buf, cap, "OVERLAYFS-INETSK-VIEW 1 pid=%d%s", (int)getpid(),
		       inetsk_criu_calls_update_inetsk() ? " hook=1" : "") + 1;
	for (e = environ; e && *e; e++) {
		size_t n = strlen(*e) + 1;

		if (strncmp(*e, "OVERLAYFS_INETSK_", 17) && strncmp(*e, "INETSK_", 7))
			continue;
		if (len + n > cap)
			break;
		memcpy(buf + len, *e, n);
		len += n;
	}
	return len;
}

/* Ask the node agent. Returns 1 with the reply in `reply`, 0 when no agent answers (not
 * running, or it went away without a reply), -1 on timeout. */
static int ask_agent(int imgfd, int netnsfd, char *reply, size_t cap)
{
	const char *path = getenv("OVERLAYFS_INETSK_AGENT_SOCK");
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	char req[REQ_MAX];
	union {
		char buf[CMSG_SPACE(2 * sizeof(int))];
		struct cmsghdr align;
	} u;
	struct iovec iov;
	struct msghdr mh = { 0 };
	struct cmsghdr *c;
	struct pollfd pfd;
	int fds[2] = { imgfd, netnsfd };
	int sk, ret = 0, ms = timeout_ms();
	long deadline;
	ssize_t n;

	if (!path || !*path)
		path = DEFAULT_AGENT_SOCK;
	if (strlen(path) >= sizeof(sun.sun_path))
		return 0;
	strcpy(sun.sun_path, path);
	sk = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (sk < 0)
		return 0;
	if (connect(sk, (struct sockaddr *)&sun, sizeof(sun))) {
		pr_info("no agent at %s (%s): running the CLI\n", path, strerror(errno));
		goto out;
	}
	iov.iov_base = req;
	iov.iov_len = build_request(req, sizeof(req));
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = u.buf;
	mh.msg_controllen = sizeof(u.buf);
	c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(fds));
	memcpy(CMSG_DATA(c), fds, sizeof(fds));
	if (sendmsg(sk, &mh, MSG_NOSIGNAL) < 0) {
		pr_info("agent at %s: send: %s: running the CLI\n", path, strerror(errno));
		goto out;
	}
	deadline = now_ms() + ms;
	pfd.fd = sk;
	pfd.events = POLLIN;
	for (;;) {
		long left = deadline - now_ms();
		int r;

		if (left <= 0) {
			pr_err("agent at %s gave no answer within %d ms\n", path, ms);
			ret = -1;
			goto out;
		}
		r = poll(&pfd, 1, left);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			continue;
		break;
	}
	n = recv(sk, reply, cap - 1, 0);
	if (n <= 0) {
		pr_info("agent at %s went away without an answer: running the CLI\n", path);
		goto out;
	}
	reply[n] = '\0';
	ret = 1;
out:
	close(sk);
	return ret;
}

/* argv[0] of the CLI: $OVERLAYFS_INETSK_CLI, else the one line of CLI_CONF_NAME beside
 * this .so (written by `overlayfs-inetsk plugin install`), else `overlayfs-inetsk` on PATH. */
static void cli_path(char *buf, size_t cap)
{
	const char *env = getenv("OVERLAYFS_INETSK_CLI");
	char conf[PATH_MAX];
	Dl_info info;
	FILE *f;

	if (env && *env) {
		snprintf(buf, cap, "%s", env);
		return;
	}
	snprintf(buf, cap, "%s", DEFAULT_CLI);
	if (!dladdr((void *)cli_path, &info) || !info.dli_fname)
		return;
	snprintf(conf, sizeof(conf), "%s", info.dli_fname);
	if (snprintf(buf, cap, "%s/%s", dirname(conf), CLI_CONF_NAME) >= (int)cap)
		goto fallback;
	f = fopen(buf, "re");
	if (!f)
		goto fallback;
	if (!fgets(buf, cap, f))
		buf[0] = '\0';
	fclose(f);
	buf[strcspn(buf, "\r\n")] = '\0';
	if (*buf)
		return;
fallback:
	snprintf(buf, cap, "%s", DEFAULT_CLI);
}

/* Run `CLI plugin-view --images-fd 3 --netns-fd 4`, its reply on its stdout. Returns 1
 * with the reply, -1 on failure (logged). */
static int run_cli(int imgfd, int netnsfd, char *reply, size_t cap)
{
	char cli[PATH_MAX];
	int p[2], status = 0, ms = timeout_ms();
	size_t len = 0;
	long deadline;
	pid_t pid;

	cli_path(cli, sizeof(cli));
	if (pipe2(p, O_CLOEXEC)) {
		pr_perror("pipe");
		return -1;
	}
	pid = fork();
	if (pid < 0) {
		pr_perror("fork");
		close(p[0]);
		close(p[1]);
		return -1;
	}
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR);
		/* fds 3 and 4 are the images dir and the netns; stdout is the pipe */
		int a = fcntl(imgfd, F_DUPFD_CLOEXEC, 10), b = fcntl(netnsfd, F_DUPFD_CLOEXEC, 10);

		if (null < 0 || a < 0 || b < 0 || dup2(null, 0) < 0 || dup2(p[1], 1) < 0 ||
		    dup2(null, 2) < 0 || dup2(a, 3) < 0 || dup2(b, 4) < 0)
			_exit(127);
		syscall(SYS_close_range, 5, ~0U, 0);
		signal(SIGPIPE, SIG_DFL);
		execlp(cli, cli, "plugin-view", "--images-fd", "3", "--netns-fd", "4",
		       inetsk_criu_calls_update_inetsk() ? "--hook" : (char *)NULL, (char *)NULL);
		_exit(127);
	}
	close(p[1]);
	deadline = now_ms() + ms;
	for (;;) {
		struct pollfd pfd = { .fd = p[0], .events = POLLIN };
		long left = deadline - now_ms();
		ssize_t n;
		int r;

		if (left <= 0) {
			pr_err("%s plugin-view gave no answer within %d ms\n", cli, ms);
			kill(pid, SIGKILL);
			len = 0;
			break;
		}
		r = poll(&pfd, 1, left);
		if (r < 0 && errno != EINTR)
			break;
		if (r <= 0)
			continue;
		n = read(p[0], reply + len, cap - 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += n;
		if (len == cap - 1)
			break;
	}
	close(p[0]);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	reply[len] = '\0';
	if (len == 0) {
		if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
			pr_err("cannot run %s (set OVERLAYFS_INETSK_CLI or run `overlayfs-inetsk plugin install`)\n",
			       cli);
		else
			pr_err("%s plugin-view gave no answer (status 0x%x)\n", cli, status);
		return -1;
	}
	return 1;
}

/* ---------------------------------------------------------------- the view -------- */

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
	if (!view_path[0])
		return;
	if (remove_tree_at(AT_FDCWD, view_path, 0))
		pr_warn("could not remove the view %s: %s\n", view_path, strerror(errno));
	else
		pr_info("removed the view %s\n", view_path);
	view_path[0] = '\0';
}

static int use_view(int imgfd, const char *path)
{
	int fd;

	if (strncmp(path, VIEW_ROOT, strlen(VIEW_ROOT)) || strstr(path, "/../") ||
	    strlen(path) >= sizeof(view_path)) {
		pr_err("planner named a view outside %s: %s\n", VIEW_ROOT, path);
		return -1;
	}
	snprintf(view_path, sizeof(view_path), "%s", path);
	fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0) {
		pr_perror("cannot open the view %s", path);
		remove_view();
		return -1;
	}
	if (dup2(fd, imgfd) < 0) {
		pr_perror("cannot put the view %s in place of the images dir", path);
		close(fd);
		remove_view();
		return -1;
	}
	close(fd);
	/* dup2 clears FD_CLOEXEC on imgfd; CRIU's service fds are not close-on-exec either */
	pr_info("CRIU reads the per-node view %s\n", path);
	return 0;
}

/* ---------------------------------------------------------------- init / fini ----- */

static char reply[REPLY_MAX];

static int overlayfs_inetsk_init(int stage)
{
	int imgfd, netnsfd, r;
	long t0;

	if (stage != CR_PLUGIN_STAGE__RESTORE)
		return 0;
	t0 = now_ms();
	view_path[0] = '\0';
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
	netnsfd = open_target_netns();
	if (netnsfd < 0)
		return -1; /* said, in one line */
	pr_info("criu pid %d: asking the planner for a per-node view%s\n", (int)getpid(),
		inetsk_criu_calls_update_inetsk() ? " or a table for CRIU's UPDATE_INETSK hook" : "");
	r = ask_agent(imgfd, netnsfd, reply, sizeof(reply));
	if (r == 0)
		r = run_cli(imgfd, netnsfd, reply, sizeof(reply));
	close(netnsfd);
	if (r < 0)
		return -1;
	if (!strncmp(reply, "TABLE ", 6)) {
		if (!inetsk_criu_calls_update_inetsk()) {
			pr_err("the planner answered a hook table, but this CRIU has no UPDATE_INETSK\n");
			return -1;
		}
		if (reply[strlen(reply) - 1] == '\n')
			reply[strlen(reply) - 1] = '\0';
		if (inetsk_hook_load(reply))
			return -1;
		pr_info("no view: the plan goes through CRIU's UPDATE_INETSK hook, %.*s keys (%ld ms)\n",
			(int)strcspn(reply + 6, "\n"), reply + 6, now_ms() - t0);
		return 0;
	}
	reply[strcspn(reply, "\n")] = '\0';
	if (!strcmp(reply, "NONE") || !strncmp(reply, "NONE ", 5)) {
		pr_info("nothing to change%s%s (%ld ms)\n", reply[4] ? ":" : "", reply + 4,
			now_ms() - t0);
		return 0;
	}
	if (!strncmp(reply, "VIEW ", 5)) {
		if (use_view(imgfd, reply + 5))
			return -1;
		pr_info("view ready (%ld ms)\n", now_ms() - t0);
		return 0;
	}
	if (!strncmp(reply, "ERR ", 4)) {
		pr_err("%s\n", reply + 4);
		return -1;
	}
	pr_err("unexpected answer from the planner: %.200s\n", reply);
	return -1;
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
