/*
 * Asking the planner, for overlayfs_inetsk_plugin.c: the plugin's configuration file, the
 * request, and the one exchange (request with [images dir, netns] fds, reply with the
 * view's fd) with the node agent or, when none answers and one is configured, the CLI on
 * a socketpair. Every wait counts against one deadline. Limits and names: inetsk_wire.h,
 * generated from overlayfs_inetsk/plugin/wire.py. docs/plugin.md says the rest.
 */
#define LOG_PREFIX "overlayfs-inetsk: "

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "criu-log.h"
#include "inetsk_ask.h"
#include "inetsk_wire.h"

#define DEFAULT_CLI "overlayfs-inetsk" /* on PATH, when no config file names one */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define STR_(x) #x
#define STR(x) STR_(x)

extern char **environ;

/* ---------------------------------------------------------------- time ----------- */

long inetsk_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

long inetsk_now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000L + ts.tv_nsec / 1000L;
}

static void sleep_ms(long ms)
{
	if (ms > 0)
		poll(NULL, 0, ms > INT_MAX ? INT_MAX : (int)ms);
}

/* poll one fd until `events` or the deadline: 1 ready, 0 timed out, -1 error */
static int wait_fd(int fd, short events, long deadline)
{
	for (;;) {
		struct pollfd pfd = { .fd = fd, .events = events };
		long left = deadline - inetsk_now_ms();
		int r;

		if (left <= 0)
			return 0;
		r = poll(&pfd, 1, left > INT_MAX ? INT_MAX : (int)left);
		if (r > 0)
			return 1;
		if (r < 0 && errno != EINTR)
			return -1;
	}
}

/* ---------------------------------------------------------------- configuration -- */


static int parse_timeout(const char *v, const char *where, int *out)
{
	char *end;
	long n;

	errno = 0;
	n = (*v >= '0' && *v <= '9') ? strtol(v, &end, 10) : -1;
	if (n <= 0 || errno || *end || n > INETSK_WIRE_TIMEOUT_MAX_MS) {
		pr_err("%s: timeout-ms must be 1 to %d, not '%.40s'\n", where,
		       INETSK_WIRE_TIMEOUT_MAX_MS, v);
		return -1;
	}
	*out = (int)n;
	return 0;
}

static int set_sock(struct inetsk_conf *c, const char *v, const char *where)
{
	if (*v != '/' || strlen(v) >= sizeof(c->sock)) {
		pr_err("%s: agent-socket must be an absolute path shorter than %zu bytes\n", where,
		       sizeof(c->sock));
		return -1;
	}
	strcpy(c->sock, v);
	return 0;
}

/* One `key value` line of the config file (comments and blanks already gone). */
static int conf_line(struct inetsk_conf *c, char *line, const char *where, unsigned *seen)
{
	static const char *const keys[] = { "cli", "agent-socket", "timeout-ms" };
	char *v = line + strcspn(line, " \t");
	unsigned k;

	if (*v)
		*v++ = '\0';
	v += strspn(v, " \t");
	for (k = 0; k < 3 && strcmp(line, keys[k]); k++)
		;
	if (k == 3) {
		pr_err("%s: unknown setting '%.40s' (cli, agent-socket, timeout-ms)\n", where, line);
		return -1;
	}
	if (*seen & (1u << k)) {
		pr_err("%s: %s is set twice\n", where, keys[k]);
		return -1;
	}
	*seen |= 1u << k;
	if (!*v) {
		pr_err("%s: %s needs a value\n", where, keys[k]);
		return -1;
	}
	if (k == 0) {
		if (!strcmp(v, "none")) {
			c->cli[0] = '\0';
			return 0;
		}
		if (*v != '/' || strlen(v) >= sizeof(c->cli)) {
			pr_err("%s: cli must be an absolute path or none, not '%.60s'\n", where, v);
			return -1;
		}
		strcpy(c->cli, v);
		return 0;
	}
	if (k == 1)
		return set_sock(c, v, where);
	return parse_timeout(v, where, &c->timeout_ms);
}

/* The config file beside this .so, read only when it is a regular root-owned file that
 * neither group nor others may write (it names a program run as root), never through a
 * symlink. Absent: the defaults. 0, or -1 with one log line. */
static int read_conf(struct inetsk_conf *c)
{
	char dir[PATH_MAX], buf[INETSK_WIRE_CONF_MAX + 1], where[PATH_MAX + 16], *line, *next;
	unsigned seen = 0, n = 0;
	size_t len = 0;
	struct stat st;
	Dl_info info;
	int fd;

	if (!dladdr((void *)read_conf, &info) || !info.dli_fname)
		return 0;
	snprintf(dir, sizeof(dir), "%s", info.dli_fname);
	if (snprintf(c->path, sizeof(c->path), "%s/%s", dirname(dir), INETSK_WIRE_CONF_NAME) >=
	    (int)sizeof(c->path)) {
		c->path[0] = '\0';
		return 0;
	}
	fd = open(c->path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0) {
		if (errno == ENOENT)
			return 0;
		pr_err("%s: %s%s\n", c->path, strerror(errno),
		       errno == ELOOP ? " (a symlink is not followed)" : "");
		return -1;
	}
	if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
		pr_err("%s: not a regular file\n", c->path);
		goto fail;
	}
	if (st.st_uid != 0 || (st.st_mode & 022)) {
		pr_err("%s: must be owned by root and not writable by group or others (uid %u, mode %04o)\n",
		       c->path, (unsigned)st.st_uid, (unsigned)(st.st_mode & 07777));
		goto fail;
	}
	for (;;) {
		ssize_t r = read(fd, buf + len, sizeof(buf) - len);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			pr_err("%s: %s\n", c->path, strerror(errno));
			goto fail;
		}
		if (r == 0)
			break;
		len += r;
		if (len == sizeof(buf)) {
			pr_err("%s: larger than %d bytes\n", c->path, INETSK_WIRE_CONF_MAX);
			goto fail;
		}
	}
	close(fd);
	buf[len] = '\0';
	if (strlen(buf) != len) {
		pr_err("%s: holds a NUL byte\n", c->path);
		return -1;
	}
	for (line = buf; line; line = next) {
		char *end;

		next = strchr(line, '\n');
		if (next)
			*next++ = '\0';
		n++;
		line[strcspn(line, "#")] = '\0';
		line += strspn(line, " \t\r");
		end = line + strlen(line);
		while (end > line && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
			*--end = '\0';
		if (!*line)
			continue;
		snprintf(where, sizeof(where), "%s:%u", c->path, n);
		if (conf_line(c, line, where, &seen))
			return -1;
	}
	return 0;
fail:
	close(fd);
	return -1;
}

/* The defaults, the config file, then CRIU's environment (plain `criu restore`). */
int inetsk_load_conf(struct inetsk_conf *c)
{
	const char *v;

	memset(c, 0, sizeof(*c));
	snprintf(c->cli, sizeof(c->cli), "%s", DEFAULT_CLI);
	strcpy(c->sock, INETSK_WIRE_AGENT_SOCKET);
	c->timeout_ms = INETSK_WIRE_TIMEOUT_MS;
	if (read_conf(c))
		return -1;
	v = getenv(INETSK_WIRE_ENV_CLI);
	if (v && *v) {
		if (strlen(v) >= sizeof(c->cli)) {
			pr_err("$%s is longer than a path may be\n", INETSK_WIRE_ENV_CLI);
			return -1;
		}
		strcpy(c->cli, strcmp(v, "none") ? v : "");
	}
	v = getenv(INETSK_WIRE_ENV_AGENT_SOCKET);
	if (v && *v && set_sock(c, v, "$" INETSK_WIRE_ENV_AGENT_SOCKET))
		return -1;
	v = getenv(INETSK_WIRE_ENV_TIMEOUT);
	if (v && *v && parse_timeout(v, "$" INETSK_WIRE_ENV_TIMEOUT, &c->timeout_ms))
		return -1;
	return 0;
}

/* The CLI as a path we can execute (a bare name is looked up on PATH), or 0. */
static int cli_usable(const struct inetsk_conf *c, char *out, size_t cap)
{
	const char *path = getenv("PATH");
	char dirs[4096], *dir, *save = NULL;
	struct stat st;

	if (!c->cli[0])
		return 0;
	if (strchr(c->cli, '/')) {
		snprintf(out, cap, "%s", c->cli);
		return !access(out, X_OK) && !stat(out, &st) && S_ISREG(st.st_mode);
	}
	snprintf(dirs, sizeof(dirs), "%s", path && *path ? path : DEFAULT_PATH);
	for (dir = strtok_r(dirs, ":", &save); dir; dir = strtok_r(NULL, ":", &save)) {
		if (snprintf(out, cap, "%s/%s", dir, c->cli) >= (int)cap)
			continue;
		if (!access(out, X_OK) && !stat(out, &st) && S_ISREG(st.st_mode))
			return 1;
	}
	return 0;
}

/* ---------------------------------------------------------------- the request ---- */

/* The request: the header line, then NUL-separated KEY=VALUE of our variables in CRIU's
 * environment, each whole: one that does not fit fails the restore (a map cut short, or
 * left out, would be another map). 0, or -1 with one log line. */
int inetsk_build_request(char *buf, size_t cap, long deadline, int hook, size_t *out)
{
	size_t len;
	char **e;
	int n;

	n = snprintf(buf, cap, "%s %d pid=%d deadline=%ld%s", INETSK_WIRE_MAGIC,
		     INETSK_WIRE_PROTOCOL, (int)getpid(), deadline,
		     hook ? " hook=1" : "");
	if (n < 0 || (size_t)n >= cap)
		return -1;
	len = n + 1;
	for (e = environ; e && *e; e++) {
		size_t l = strlen(*e) + 1;

		if (strncmp(*e, INETSK_WIRE_ENV_PREFIX_0, strlen(INETSK_WIRE_ENV_PREFIX_0)) &&
		    strncmp(*e, INETSK_WIRE_ENV_PREFIX_1, strlen(INETSK_WIRE_ENV_PREFIX_1)))
			continue;
		if (len + l > cap) {
			pr_err("the request to the planner does not fit in %d bytes: $%.*s is %zu bytes "
			       "(OVERLAYFS_INETSK_* and INETSK_* variables are sent whole or not at all; "
			       "put a long map in a map file)\n",
			       INETSK_WIRE_REQUEST_MAX, (int)strcspn(*e, "="), *e,
			       l - 2 - strcspn(*e, "="));
			return -1;
		}
		memcpy(buf + len, *e, l);
		len += l;
	}
	*out = len;
	return 0;
}

/* ---------------------------------------------------------------- the exchange --- */


void inetsk_close_reply_fds(struct inetsk_reply *rep)
{
	int i;

	for (i = 0; i < rep->nfds; i++)
		close(rep->fds[i]);
	rep->nfds = 0;
}

/* Send the request with [imgfd, netnsfd] on sk and take the one reply, all by the
 * deadline. 1: a reply in rep; 0: the peer went away without one; -1: failed (logged). */
static int exchange(int sk, const char *who, int imgfd, int netnsfd, const char *req,
		    size_t reqlen, long deadline, int ms, struct inetsk_reply *rep)
{
	union {
		char buf[CMSG_SPACE(INETSK_REPLY_FDS_MAX * sizeof(int))];
		struct cmsghdr align;
	} u;
	int fds[INETSK_WIRE_REQUEST_FDS] = { imgfd, netnsfd }, size = INETSK_WIRE_REQUEST_MAX + 4096;
	struct iovec iov = { .iov_base = (void *)req, .iov_len = reqlen };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *c;
	ssize_t n;

	rep->nfds = 0;
	rep->len = 0;
	setsockopt(sk, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
	mh.msg_control = u.buf;
	mh.msg_controllen = CMSG_SPACE(sizeof(fds));
	c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(fds));
	memcpy(CMSG_DATA(c), fds, sizeof(fds));
	while (sendmsg(sk, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
		if (errno == EINTR)
			continue;
		if (errno == EPIPE || errno == ECONNRESET)
			return 0;
		if (errno != EAGAIN || wait_fd(sk, POLLOUT, deadline) < 0) {
			pr_err("%s: cannot send the request: %s\n", who, strerror(errno));
			return -1;
		}
		if (inetsk_now_ms() >= deadline) {
			pr_err("%s did not take the request within %d ms (stopped or overloaded?)\n", who, ms);
			return -1;
		}
	}
	for (;;) {
		int r = wait_fd(sk, POLLIN, deadline);

		if (r == 0) {
			pr_err("%s gave no answer within %d ms (stopped or overloaded? its log says more)\n",
			       who, ms);
			return -1;
		}
		iov.iov_base = rep->text;
		iov.iov_len = INETSK_WIRE_REPLY_MAX;
		mh.msg_control = u.buf;
		mh.msg_controllen = sizeof(u.buf);
		mh.msg_flags = 0;
		n = r < 0 ? -1 : recvmsg(sk, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n >= 0)
			break;
		if (errno == EINTR || errno == EAGAIN)
			continue;
		if (errno == ECONNRESET)
			return 0;
		pr_err("%s: cannot read the reply: %s\n", who, strerror(errno));
		return -1;
	}
	for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		size_t k, cnt;

		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (k = 0; k < cnt && rep->nfds < INETSK_REPLY_FDS_MAX; k++)
			memcpy(&rep->fds[rep->nfds++], CMSG_DATA(c) + k * sizeof(int), sizeof(int));
	}
	if (n == 0 && rep->nfds == 0) {
		if (inetsk_now_ms() < deadline)
			return 0; /* went away: another planner may answer */
		pr_err("%s gave no answer within %d ms (stopped or overloaded? its log says more)\n",
		       who, ms);
		return -1;
	}
	if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
		pr_err("%s: refused its reply: %s\n", who, mh.msg_flags & MSG_TRUNC ?
		       "larger than " STR(INETSK_WIRE_REPLY_MAX) " bytes" : "more fds than a reply carries");
		inetsk_close_reply_fds(rep);
		return -1;
	}
	rep->text[n] = '\0';
	rep->len = n;
	if (strlen(rep->text) != (size_t)n) {
		pr_err("%s: refused its reply: it holds a NUL byte\n", who);
		inetsk_close_reply_fds(rep);
		return -1;
	}
	return 1;
}

/* The node agent. 1: its reply in rep; 0: no agent answers (*why: the errno, or 0 when it
 * closed without an answer); -1: failed, with one log line. */
static int ask_agent(const struct inetsk_conf *cf, int imgfd, int netnsfd, const char *req,
		     size_t reqlen, long deadline, struct inetsk_reply *rep, int *why)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	char who[sizeof(sun.sun_path) + 16];
	struct ucred cred;
	socklen_t cl = sizeof(cred);
	int sk, r;

	strcpy(sun.sun_path, cf->sock);
	snprintf(who, sizeof(who), "the agent at %s", cf->sock);
	for (;;) {
		sk = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (sk < 0) {
			pr_perror("socket");
			return -1;
		}
		if (!connect(sk, (struct sockaddr *)&sun, sizeof(sun)))
			break;
		*why = errno;
		close(sk);
		if (errno == EINTR)
			continue;
		if (errno == ENOENT || errno == ECONNREFUSED)
			return 0;
		if (errno != EAGAIN) {
			pr_err("cannot connect to %s: %s\n", who, strerror(errno));
			return -1;
		}
		/* a full backlog: the agent is stopped or overloaded; retry until the deadline */
		if (inetsk_now_ms() >= deadline) {
			pr_err("%s took no connection within %d ms (its backlog is full: stopped or overloaded?)\n",
			       who, cf->timeout_ms);
			return -1;
		}
		sleep_ms(10);
	}
	if (getsockopt(sk, SOL_SOCKET, SO_PEERCRED, &cred, &cl) || cl != sizeof(cred)) {
		pr_err("%s: cannot tell who answers (SO_PEERCRED): %s\n", who, strerror(errno));
		close(sk);
		return -1;
	}
	if (cred.uid != 0) {
		pr_err("refused %s: it runs as uid %u, not root (the agent runs as root; is that its socket?)\n",
		       who, (unsigned)cred.uid);
		close(sk);
		return -1;
	}
	r = exchange(sk, who, imgfd, netnsfd, req, reqlen, deadline, cf->timeout_ms, rep);
	close(sk);
	*why = 0;
	return r;
}

/* Close every fd from `low` up (CRIU's service fds must not reach the CLI): close_range,
 * else one by one up to the fd limit. 0, or -1. In the child: no malloc, no stdio. */
static int close_from(int low)
{
	struct rlimit rl;
	long fd, max;

	if (syscall(SYS_close_range, (unsigned)low, ~0U, 0) == 0)
		return 0;
	if (getrlimit(RLIMIT_NOFILE, &rl) || rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > INT_MAX)
		return -1;
	max = (long)rl.rlim_cur;
	for (fd = low; fd < max; fd++)
		if (close((int)fd) && errno != EBADF && errno != EINTR)
			return -1;
	return 0;
}

static void child_exec(const char *cli, int sk)
{
	sigset_t none;
	int a, null, nn, sig;

	setpgid(0, 0);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (sig = 1; sig < NSIG; sig++) /* an ignored signal stays ignored across exec */
		if (sig != SIGKILL && sig != SIGSTOP)
			signal(sig, SIG_DFL);
	/* fd 3 is the socket; 0, 1, 2 /dev/null (the reply goes over the socket) */
	a = fcntl(sk, F_DUPFD_CLOEXEC, 10);
	null = open("/dev/null", O_RDWR | O_CLOEXEC);
	nn = null < 0 ? -1 : fcntl(null, F_DUPFD_CLOEXEC, 10);
	if (a < 0 || nn < 0 || dup2(nn, 0) < 0 || dup2(nn, 1) < 0 || dup2(nn, 2) < 0 ||
	    dup2(a, INETSK_WIRE_CLI_FD) < 0 || close_from(INETSK_WIRE_CLI_FD + 1))
		_exit(126);
	execl(cli, cli, "plugin-view", "--socket-fd", STR(INETSK_WIRE_CLI_FD), (char *)NULL);
	_exit(127);
}

/* After the exchange: wait (by the deadline) for the CLI to exit, keeping its zombie so
 * that its process group id stays its own; then kill whatever is left of the group, and
 * reap it (bounded too). Returns its wait status, or -1 when it could not be reaped. */
static int finish_child(pid_t pid, long deadline)
{
	int status = -1, pfd;
	long end;

	/* a pidfd turns readable when the CLI exits: no polling interval added to the wait
	 * (Linux 5.3); without one, waitid every 2 ms */
#ifdef SYS_pidfd_open
	pfd = (int)syscall(SYS_pidfd_open, pid, 0);
#else
	pfd = -1;
#endif
	if (pfd >= 0) {
		wait_fd(pfd, POLLIN, deadline);
		close(pfd);
	}
	while (inetsk_now_ms() < deadline) {
		siginfo_t si;

		memset(&si, 0, sizeof(si));
		if (waitid(P_PID, pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid)
			break;
		if (errno == ECHILD)
			break;
		sleep_ms(2);
	}
	kill(-pid, SIGKILL); /* the CLI's group: the CLI, if it hangs, and its children */
	end = inetsk_now_ms() + 2000;
	for (;;) {
		pid_t r = waitpid(pid, &status, WNOHANG);

		if (r == pid)
			return status;
		if (r < 0 && errno != EINTR) {
			return -1;
		}
		if (inetsk_now_ms() >= end) {
			pr_warn("the CLI (pid %d) did not go after SIGKILL: left unreaped\n", (int)pid);
			return -1;
		}
		sleep_ms(2);
	}
}

/* `CLI plugin-view --socket-fd 3` on a socketpair: the same request, reply and checks as
 * with the agent. 1 with the reply, -1 on failure (logged). */
static int run_cli(const struct inetsk_conf *cf, const char *cli, int imgfd, int netnsfd,
		   const char *req, size_t reqlen, long deadline, struct inetsk_reply *rep)
{
	char who[PATH_MAX + 32];
	int sv[2], r, status;
	pid_t pid;

	snprintf(who, sizeof(who), "%s plugin-view", cli);
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv)) {
		pr_perror("socketpair");
		return -1;
	}
	pid = fork();
	if (pid < 0) {
		pr_perror("fork");
		close(sv[0]);
		close(sv[1]);
		return -1;
	}
	if (pid == 0)
		child_exec(cli, sv[1]);
	setpgid(pid, pid); /* as the child does: whichever runs first */
	close(sv[1]);
	r = exchange(sv[0], who, imgfd, netnsfd, req, reqlen, deadline, cf->timeout_ms, rep);
	close(sv[0]);
	status = finish_child(pid, deadline);
	if (r == 0) {
		if (status != -1 && WIFEXITED(status) && WEXITSTATUS(status) >= 126)
			pr_err("cannot run %s (exit %d): set cli in %s (overlayfs-inetsk plugin install --cli PATH)\n",
			       cli, WEXITSTATUS(status), cf->path[0] ? cf->path : INETSK_WIRE_CONF_NAME);
		else
			pr_err("%s gave no answer (status 0x%x)\n", who, (unsigned)status);
		return -1;
	}
	return r;
}

/* The agent; with none, the CLI if one can run here; with no CLI either, the agent again
 * until the deadline (a restore that starts while the agent restarts waits for it). */
int inetsk_ask_planner(const struct inetsk_conf *cf, int imgfd, int netnsfd, const char *req,
		      size_t reqlen, long deadline, struct inetsk_reply *rep)
{
	char cli[PATH_MAX];
	int have_cli = cli_usable(cf, cli, sizeof(cli)), waiting = 0, why = 0, r;

	for (;;) {
		r = ask_agent(cf, imgfd, netnsfd, req, reqlen, deadline, rep, &why);
		if (r != 0)
			return r;
		if (have_cli) {
			pr_info("no agent at %s (%s): running the CLI\n", cf->sock,
				why ? strerror(why) : "it closed the connection without an answer");
			return run_cli(cf, cli, imgfd, netnsfd, req, reqlen, deadline, rep);
		}
		if (!waiting) {
			pr_info("no agent at %s (%s), and no CLI to run (%s%s): waiting for the agent\n",
				cf->sock, why ? strerror(why) : "it closed the connection without an answer",
				cf->cli[0] ? cf->cli : "cli none", cf->cli[0] ? " is not executable here" : "");
			waiting = 1;
		}
		if (inetsk_now_ms() >= deadline) {
			pr_err("no agent answered at %s within %d ms, and no CLI can run instead (%s%s): start the agent (its systemd unit or DaemonSet), or install the plugin with --cli PATH\n",
			       cf->sock, cf->timeout_ms, cf->cli[0] ? cf->cli : "cli none",
			       cf->cli[0] ? " is not executable here" : "");
			return -1;
		}
		sleep_ms(deadline - inetsk_now_ms() < 100 ? deadline - inetsk_now_ms() : 100);
	}
}

