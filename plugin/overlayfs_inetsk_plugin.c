/*
 * overlayfs-inetsk CRIU plugin: at restore init, hand CRIU a per-node view of its images
 * dir, with the inet socket addresses rewritten by the project's own planner (Python).
 *
 * The C side is only plumbing (docs/plugin.md):
 *   1. fast path (inetsk_scan.c): no inet socket entry in files.img / inetsk.img ->
 *      nothing to do;
 *   2. find the restore's target network namespace (runc's extRootNetNS: a netns fd of
 *      ours that is not our own netns), else our own;
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

/* The restore's network namespace: a netns fd we hold that is not our own netns (runc's
 * extRootNetNS), else our own. Returns an fd of our own (O_CLOEXEC) or -1. */
static int open_target_netns(void)
{
	struct stat own, st;
	struct dirent *de;
	DIR *d;
	int found = -1;

	if (stat("/proc/self/ns/net", &own))
		return -1;
	d = opendir("/proc/self/fd");
	if (d) {
		while ((de = readdir(d)) != NULL) {
			char path[64];
			int fd;

			if (de->d_name[0] < '0' || de->d_name[0] > '9')
				continue;
			fd = atoi(de->d_name);
			if (fd == dirfd(d) || fstat(fd, &st))
				continue;
			/* nsfs files share one device; only then ask for the namespace type */
			if (st.st_dev != own.st_dev || st.st_ino == own.st_ino)
				continue;
			if (ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET)
				continue;
			snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
			found = open(path, O_RDONLY | O_CLOEXEC);
			if (found >= 0) {
				pr_info("target network namespace: fd %d (net:[%lu])\n", fd,
					(unsigned long)st.st_ino);
				break;
			}
		}
		closedir(d);
	}
	if (found < 0) {
		found = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
		if (found >= 0)
			pr_info("target network namespace: criu's own (net:[%lu])\n",
				(unsigned long)own.st_ino);
	}
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
	if (netnsfd < 0) {
		pr_perror("cannot open a network namespace");
		return -1;
	}
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
