/*
 * overlayfs-inetsk CRIU plugin: at restore init, hand CRIU a per-node view of its images
 * dir, with the inet socket addresses rewritten by the project's own planner (Python).
 *
 * The C side is only plumbing, and trusts nothing it did not check (docs/plugin.md,
 * docs/security.md):
 *   1. fast path: no inet socket entry in files.img / inetsk.img -> nothing to do;
 *   2. find the restore's target network namespace (runc's extRootNetNS: a netns fd of
 *      ours that is not our own netns), else our own;
 *   3. ask the planner, one request and one reply over SOCK_SEQPACKET (inetsk_wire.h,
 *      generated from overlayfs_inetsk/plugin/wire.py): the node agent on its socket (its
 *      peer must be root), else, when one is configured, `CLI plugin-view --socket-fd 3`
 *      run as a child on a socketpair, which serves the request with the agent's own
 *      handler. The request carries the images dir fd and the netns fd; the reply is
 *      NONE | ERR <message> | TABLE <n> | VIEW view-<hex> with that view dir's fd;
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
#include <sys/resource.h>
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
#include "inetsk_wire.h"

#ifndef NS_GET_NSTYPE
#define NS_GET_NSTYPE _IO(0xb7, 0x3)
#endif
#ifndef CLONE_NEWNET
#define CLONE_NEWNET 0x40000000
#endif

#define IMG_COMMON 0x54564319u
#define FILES_MAGIC 0x56303138u
#define INETSK_MAGIC 0x56443851u
#define FD_TYPES_INETSK 4

#define DEFAULT_CLI "overlayfs-inetsk" /* on PATH, when no config file names one */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define REPLY_FDS_MAX 4 /* room to see that a reply carried more than its one fd */
#define STR_(x) #x
#define STR(x) STR_(x)

extern char **environ;

/* ---------------------------------------------------------------- fast path ------ */

/* One protobuf varint at *p (< end); -1 when truncated or too long. */
static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
	uint64_t v = 0;
	int shift;

	for (shift = 0; shift < 64; shift += 7) {
		if (*p >= end)
			return -1;
		v |= (uint64_t)(**p & 0x7f) << shift;
		if (!(*(*p)++ & 0x80)) {
			*out = v;
			return 0;
		}
	}
	return -1;
}

/* The last value of top-level field 1 (file_entry.type) in one entry: 1 = INETSK,
 * 0 = something else, -1 = not parseable (then the planner decides and names the fault). */
static int entry_is_inet(const uint8_t *p, const uint8_t *end)
{
	uint64_t key, v, type = 0;

	while (p < end) {
		if (read_varint(&p, end, &key))
			return -1;
		switch (key & 7) {
		case 0:
			if (read_varint(&p, end, &v))
				return -1;
			if (key >> 3 == 1)
				type = v;
			break;
		case 1:
			if (end - p < 8)
				return -1;
			p += 8;
			break;
		case 2:
			if (read_varint(&p, end, &v) || v > (uint64_t)(end - p))
				return -1;
			p += v;
			break;
		case 5:
			if (end - p < 4)
				return -1;
			p += 4;
			break;
		default:
			return -1;
		}
	}
	return type == FD_TYPES_INETSK;
}

/* 1: the image holds an inet socket entry (or cannot be read: let the planner say why);
 * 0: it holds none, or is absent. */
static int image_has_inet(int dirfd, const char *name, uint32_t want_magic)
{
	uint8_t *buf = NULL;
	size_t len = 0, cap = 0;
	uint32_t hdr[2], n;
	size_t off;
	int fd, ret = 1;

	fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : 1;
	for (;;) {
		ssize_t r;

		if (len == cap) {
			uint8_t *nb;

			cap = cap ? cap * 2 : 1 << 16;
			nb = realloc(buf, cap);
			if (!nb)
				goto out;
			buf = nb;
		}
		r = read(fd, buf + len, cap - len);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			goto out;
		}
		if (r == 0)
			break;
		len += r;
	}
	if (len < sizeof(hdr))
		goto out;
	memcpy(hdr, buf, sizeof(hdr));
	if (hdr[0] != IMG_COMMON || hdr[1] != want_magic)
		goto out;
	for (off = sizeof(hdr); off < len;) {
		if (len - off < sizeof(n))
			goto out;
		memcpy(&n, buf + off, sizeof(n));
		off += sizeof(n);
		if (n > len - off)
			goto out;
		if (want_magic == INETSK_MAGIC)
			goto out; /* legacy inetsk.img: every entry is an inet socket */
		if (entry_is_inet(buf + off, buf + off + n) != 0)
			goto out;
		off += n;
	}
	ret = 0;
out:
	free(buf);
	close(fd);
	return ret;
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

/* ---------------------------------------------------------------- time ----------- */

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
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
		long left = deadline - now_ms();
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

struct conf {
	char path[PATH_MAX];  /* the config file beside this .so ("" when unknown) */
	char cli[PATH_MAX];   /* the CLI to run when no agent answers; "" = none */
	char sock[sizeof(((struct sockaddr_un *)0)->sun_path)];
	int timeout_ms;
};

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

static int set_sock(struct conf *c, const char *v, const char *where)
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
static int conf_line(struct conf *c, char *line, const char *where, unsigned *seen)
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
static int read_conf(struct conf *c)
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
static int load_conf(struct conf *c)
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
static int cli_usable(const struct conf *c, char *out, size_t cap)
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
static int build_request(char *buf, size_t cap, long deadline, size_t *out)
{
	size_t len;
	char **e;
	int n;

	n = snprintf(buf, cap, "%s %d pid=%d deadline=%ld%s", INETSK_WIRE_MAGIC,
		     INETSK_WIRE_PROTOCOL, (int)getpid(), deadline,
		     inetsk_criu_calls_update_inetsk() ? " hook=1" : "");
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

struct reply {
	char text[INETSK_WIRE_REPLY_MAX + 1];
	size_t len;
	int fds[REPLY_FDS_MAX];
	int nfds;
};

static void close_reply_fds(struct reply *rep)
{
	int i;

	for (i = 0; i < rep->nfds; i++)
		close(rep->fds[i]);
	rep->nfds = 0;
}

/* Send the request with [imgfd, netnsfd] on sk and take the one reply, all by the
 * deadline. 1: a reply in rep; 0: the peer went away without one; -1: failed (logged). */
static int exchange(int sk, const char *who, int imgfd, int netnsfd, const char *req,
		    size_t reqlen, long deadline, int ms, struct reply *rep)
{
	union {
		char buf[CMSG_SPACE(REPLY_FDS_MAX * sizeof(int))];
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
		if (now_ms() >= deadline) {
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
		for (k = 0; k < cnt && rep->nfds < REPLY_FDS_MAX; k++)
			memcpy(&rep->fds[rep->nfds++], CMSG_DATA(c) + k * sizeof(int), sizeof(int));
	}
	if (n == 0 && rep->nfds == 0) {
		if (now_ms() < deadline)
			return 0; /* went away: another planner may answer */
		pr_err("%s gave no answer within %d ms (stopped or overloaded? its log says more)\n",
		       who, ms);
		return -1;
	}
	if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
		pr_err("%s: refused its reply: %s\n", who, mh.msg_flags & MSG_TRUNC ?
		       "larger than " STR(INETSK_WIRE_REPLY_MAX) " bytes" : "more fds than a reply carries");
		close_reply_fds(rep);
		return -1;
	}
	rep->text[n] = '\0';
	rep->len = n;
	if (strlen(rep->text) != (size_t)n) {
		pr_err("%s: refused its reply: it holds a NUL byte\n", who);
		close_reply_fds(rep);
		return -1;
	}
	return 1;
}

/* The node agent. 1: its reply in rep; 0: no agent answers (*why: the errno, or 0 when it
 * closed without an answer); -1: failed, with one log line. */
static int ask_agent(const struct conf *cf, int imgfd, int netnsfd, const char *req,
		     size_t reqlen, long deadline, struct reply *rep, int *why)
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
		if (now_ms() >= deadline) {
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
	int status = -1;
	long end;

	while (now_ms() < deadline) {
		siginfo_t si;

		memset(&si, 0, sizeof(si));
		if (waitid(P_PID, pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid)
			break;
		if (errno == ECHILD)
			break;
		sleep_ms(2);
	}
	kill(-pid, SIGKILL); /* the CLI's group: the CLI, if it hangs, and its children */
	end = now_ms() + 2000;
	for (;;) {
		pid_t r = waitpid(pid, &status, WNOHANG);

		if (r == pid)
			return status;
		if (r < 0 && errno != EINTR) {
			return -1;
		}
		if (now_ms() >= end) {
			pr_warn("the CLI (pid %d) did not go after SIGKILL: left unreaped\n", (int)pid);
			return -1;
		}
		sleep_ms(2);
	}
}

/* `CLI plugin-view --socket-fd 3` on a socketpair: the same request, reply and checks as
 * with the agent. 1 with the reply, -1 on failure (logged). */
static int run_cli(const struct conf *cf, const char *cli, int imgfd, int netnsfd,
		   const char *req, size_t reqlen, long deadline, struct reply *rep)
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
static int ask_planner(const struct conf *cf, int imgfd, int netnsfd, const char *req,
		       size_t reqlen, long deadline, struct reply *rep)
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
		if (now_ms() >= deadline) {
			pr_err("no agent answered at %s within %d ms, and no CLI can run instead (%s): start the agent (its systemd unit or DaemonSet), or install the plugin with --cli PATH\n",
			       cf->sock, cf->timeout_ms, cf->cli[0] ? cf->cli : "cli none");
			return -1;
		}
		sleep_ms(deadline - now_ms() < 100 ? deadline - now_ms() : 100);
	}
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
static int use_view(int imgfd, const char *name, struct reply *rep)
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
static int take_reply(int imgfd, struct reply *rep, long t0)
{
	char *text = rep->text, shown[1001];
	int ret = -1;

	if (rep->len && text[rep->len - 1] == '\n')
		text[--rep->len] = '\0';
	if (!strncmp(text, "TABLE ", 6)) {
		if (rep->nfds)
			pr_err("refused the planner's TABLE reply: it came with %d fds\n", rep->nfds);
		else if (!inetsk_criu_calls_update_inetsk())
			pr_err("the planner answered a hook table, but this CRIU has no UPDATE_INETSK\n");
		else if (inetsk_hook_load(text) == 0) {
			pr_info("no view: the plan goes through CRIU's UPDATE_INETSK hook, %.*s keys (%ld ms)\n",
				(int)strcspn(text + 6, "\n"), text + 6, now_ms() - t0);
			ret = 0;
		}
	} else if (!strncmp(text, "ERR ", 4)) {
		pr_err("%s\n", printable(text + 4, shown, sizeof(shown)));
	} else if (!strcmp(text, "NONE") || !strncmp(text, "NONE ", 5)) {
		if (rep->nfds || strchr(text, '\n'))
			pr_err("refused the planner's NONE reply: it came with fds or more lines\n");
		else {
			pr_info("nothing to change%s%s (%ld ms)\n", text[4] ? ":" : "", text + 4,
				now_ms() - t0);
			ret = 0;
		}
	} else if (!strncmp(text, "VIEW ", 5)) {
		if (use_view(imgfd, text + 5, rep) == 0) {
			pr_info("view ready (%ld ms)\n", now_ms() - t0);
			ret = 0;
		}
	} else {
		pr_err("unexpected answer from the planner: %s\n", printable(text, shown, 201));
	}
	close_reply_fds(rep);
	return ret;
}

/* ---------------------------------------------------------------- init / fini ----- */

static char request[INETSK_WIRE_REQUEST_MAX];
static struct reply rep;

static int overlayfs_inetsk_init(int stage)
{
	struct conf cf;
	int imgfd, netnsfd, r;
	long t0, deadline;
	size_t len;

	if (stage != CR_PLUGIN_STAGE__RESTORE)
		return 0;
	t0 = now_ms();
	view_name[0] = '\0';
	inetsk_hook_clear();
	imgfd = criu_get_image_dir();
	if (imgfd < 0) {
		pr_err("no images dir fd\n");
		return -1;
	}
	if (!image_has_inet(imgfd, "files.img", FILES_MAGIC) &&
	    !image_has_inet(imgfd, "inetsk.img", INETSK_MAGIC)) {
		pr_info("no inet socket in this checkpoint: nothing to do\n");
		return 0;
	}
	if (load_conf(&cf))
		return -1;
	deadline = t0 + cf.timeout_ms;
	if (build_request(request, sizeof(request), deadline, &len))
		return -1;
	netnsfd = open_target_netns();
	if (netnsfd < 0) {
		pr_perror("cannot open a network namespace");
		return -1;
	}
	pr_info("criu pid %d: asking the planner for a per-node view%s\n", (int)getpid(),
		inetsk_criu_calls_update_inetsk() ? " or a table for CRIU's UPDATE_INETSK hook" : "");
	r = ask_planner(&cf, imgfd, netnsfd, request, len, deadline, &rep);
	close(netnsfd);
	if (r < 0)
		return -1;
	return take_reply(imgfd, &rep, t0);
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
