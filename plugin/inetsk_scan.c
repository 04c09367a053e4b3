/*
 * The plugin's fast path: does files.img (or the legacy inetsk.img) hold an inet socket
 * entry as CRIU 4.2.1 reads it? "No" lets the restore go on with no planner at all, so
 * this must never say "no" when CRIU's protobuf-c parse finds an INETSK entry (docs/plugin.md,
 * "What happens at a restore"). When unsure it says "ask": the planner reads the image and
 * names any fault.
 *
 * How CRIU reads a socket image (criu/image.c img_check_magic, criu/protobuf.c
 * do_pb_read_one, criu/files.c collect_one_file): two u32 magics, then entries of a u32
 * length (host order) and a packed message, each unpacked by protobuf-c on its own; any
 * entry that fails to unpack fails the restore. What protobuf-c 1.4 does with a
 * file_entry, as relied on here (protobuf-c.c: parse_tag_and_wiretype, scan_varint,
 * scan_length_prefixed_data, parse_required_member, parse_uint32):
 *   - a key is a varint of at most 5 bytes (longer: the unpack fails); its field number is
 *     the key shifted right by 3, at most 32 bits; field 1 is `type` only when that number
 *     is exactly 1, whatever over-long form the key takes;
 *   - `type` (required enum) must come with wire type 0, else the unpack fails; its value is
 *     the low 32 bits of a varint of at most 10 bytes; given more than once, the last wins;
 *     missing, the unpack fails (required);
 *   - wire types 1 and 5 take 8 and 4 bytes; 2 takes a length varint of at most 5 bytes
 *     and that many bytes; 3, 4, 6 and 7 (groups, undefined) fail the unpack; fields it
 *     does not know are kept as unknown fields (so they are skipped here).
 * So this scanner walks every top-level field of each entry and keeps the last `type`;
 * everything protobuf-c would refuse, and everything it cannot read whole, is "ask".
 * tests/test_scan.py runs it against protobuf-c itself (CRIU's generated file_entry code)
 * over mutated images; tests/c/ holds the sanitizer-built harness.
 *
 * Reading: a regular file only (no symlink followed, no FIFO or device opened or read), at
 * most INETSK_SOCKET_IMAGE_MAX bytes, through one fixed buffer: the header, then one
 * entry after another, never the whole file or a whole entry; it stops at the first inet
 * entry.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "inetsk_scan.h"

struct reader {
	int fd;
	uint8_t *buf;
	size_t cap, pos, len; /* buf[pos, len) not consumed yet */
	uint64_t off;         /* file offset of buf[pos] */
	uint64_t size;        /* the file's size (fstat): nothing past it is read */
	char *why;
	size_t whylen;
};

static void say(struct reader *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void say(struct reader *r, const char *fmt, ...)
{
	va_list ap;

	if (!r->why || !r->whylen)
		return;
	va_start(ap, fmt);
	vsnprintf(r->why, r->whylen, fmt, ap);
	va_end(ap);
}

/* One byte, or -1 (read error, or the file ended before its size: said). Callers never
 * ask past r->size. */
static int get_byte(struct reader *r, uint8_t *b)
{
	if (r->pos == r->len) {
		uint64_t left = r->size - r->off;
		size_t want = left < r->cap ? (size_t)left : r->cap;
		ssize_t n;

		do
			n = pread(r->fd, r->buf, want, (off_t)r->off);
		while (n < 0 && errno == EINTR);
		if (n <= 0) {
			if (n < 0)
				say(r, "read error at offset %llu: %s", (unsigned long long)r->off,
				    strerror(errno));
			else
				say(r, "the file ended at offset %llu, before its size (%llu bytes)",
				    (unsigned long long)r->off, (unsigned long long)r->size);
			return -1;
		}
		r->pos = 0;
		r->len = (size_t)n;
	}
	*b = r->buf[r->pos++];
	r->off++;
	return 0;
}

static int skip(struct reader *r, uint64_t n)
{
	while (n) {
		uint8_t b;
		size_t have = r->len - r->pos;

		if (!have) {
			if (get_byte(r, &b))
				return -1;
			n--;
			continue;
		}
		if (have > n)
			have = (size_t)n;
		r->pos += have;
		r->off += have;
		n -= have;
	}
	return 0;
}

static int get_u32(struct reader *r, uint32_t *v)
{
	uint8_t b[4];
	int i;

	for (i = 0; i < 4; i++)
		if (get_byte(r, &b[i]))
			return -1;
	memcpy(v, b, 4); /* host order, as CRIU writes it */
	return 0;
}

/* A varint of at most MAX bytes, all before END. 0, or -1 with the fault said (WHAT names
 * the varint). */
static int get_varint(struct reader *r, uint64_t end, unsigned max, const char *what,
		      uint64_t entry, uint64_t *out)
{
	uint64_t v = 0;
	unsigned i;

	for (i = 0; i < max; i++) {
		uint8_t b;

		if (r->off >= end) {
			say(r, "entry at offset %llu: %s runs past the end of the entry",
			    (unsigned long long)entry, what);
			return -1;
		}
		if (get_byte(r, &b))
			return -1;
		v |= (uint64_t)(b & 0x7f) << (7 * i);
		if (!(b & 0x80)) {
			*out = v;
			return 0;
		}
	}
	say(r, "entry at offset %llu: %s longer than %u bytes (protobuf-c refuses it)",
	    (unsigned long long)entry, what, max);
	return -1;
}

/* The top-level fields of one file_entry, [r->off, end). 1: the last `type` is INETSK;
 * 0: it is something else; -1: protobuf-c would refuse the entry, or it is unreadable
 * (said). */
static int scan_entry(struct reader *r, uint64_t end, uint64_t entry)
{
	uint32_t type = 0;
	int have_type = 0;

	while (r->off < end) {
		uint64_t key, v;
		unsigned wire;

		if (get_varint(r, end, 5, "a field key", entry, &key))
			return -1;
		wire = key & 7;
		if (key >> 3 == 1 && wire != 0) {
			say(r, "entry at offset %llu: field 1 (type) with wire type %u, not a varint "
			    "(protobuf-c refuses it)", (unsigned long long)entry, wire);
			return -1;
		}
		switch (wire) {
		case 0:
			if (get_varint(r, end, 10, "a varint", entry, &v))
				return -1;
			if (key >> 3 == 1) {
				type = (uint32_t)v; /* protobuf-c keeps an enum's low 32 bits */
				have_type = 1;
			}
			break;
		case 1:
		case 5:
			v = wire == 1 ? 8 : 4;
			if (end - r->off < v) {
				say(r, "entry at offset %llu: a %u-byte field runs past the end of the "
				    "entry", (unsigned long long)entry, (unsigned)v);
				return -1;
			}
			if (skip(r, v))
				return -1;
			break;
		case 2:
			if (get_varint(r, end, 5, "a field length", entry, &v))
				return -1;
			if (v > end - r->off) {
				say(r, "entry at offset %llu: a field of %llu bytes runs past the end of "
				    "the entry (%llu bytes left)", (unsigned long long)entry,
				    (unsigned long long)v, (unsigned long long)(end - r->off));
				return -1;
			}
			if (skip(r, v))
				return -1;
			break;
		default:
			say(r, "entry at offset %llu: wire type %u (a group or undefined; protobuf-c "
			    "refuses it)", (unsigned long long)entry, wire);
			return -1;
		}
	}
	if (!have_type) {
		say(r, "entry at offset %llu: no type (field 1), which CRIU requires",
		    (unsigned long long)entry);
		return -1;
	}
	return type == INETSK_FD_TYPES_INETSK;
}

static const char *kind_of(mode_t m)
{
	if (S_ISLNK(m))
		return "a symlink (not followed)";
	if (S_ISDIR(m))
		return "a directory";
	if (S_ISFIFO(m))
		return "a FIFO";
	if (S_ISCHR(m))
		return "a character device";
	if (S_ISBLK(m))
		return "a block device";
	if (S_ISSOCK(m))
		return "a socket";
	return "not a regular file";
}

enum inetsk_scan_verdict inetsk_scan_fd(int fd, uint32_t magic, uint8_t *buf, size_t buflen,
					char *why, size_t whylen)
{
	struct reader r = { .fd = fd, .buf = buf, .cap = buflen, .why = why, .whylen = whylen };
	uint32_t hdr[2], n;
	unsigned long entries = 0;
	struct stat st;

	if (fstat(fd, &st)) {
		say(&r, "cannot stat: %s", strerror(errno));
		return INETSK_SCAN_ASK;
	}
	if (!S_ISREG(st.st_mode)) {
		say(&r, "%s, not a regular file", kind_of(st.st_mode));
		return INETSK_SCAN_ASK;
	}
	if (!buf || !buflen) {
		say(&r, "no read buffer");
		return INETSK_SCAN_ASK;
	}
	if ((uint64_t)st.st_size > INETSK_SOCKET_IMAGE_MAX) {
		say(&r, "%llu bytes, over the limit of %u bytes", (unsigned long long)st.st_size,
		    INETSK_SOCKET_IMAGE_MAX);
		return INETSK_SCAN_ASK;
	}
	r.size = (uint64_t)st.st_size;
	if (r.size < sizeof(hdr)) {
		say(&r, "%llu bytes, shorter than the 8-byte image magic",
		    (unsigned long long)r.size);
		return INETSK_SCAN_ASK;
	}
	if (get_u32(&r, &hdr[0]) || get_u32(&r, &hdr[1]))
		return INETSK_SCAN_ASK;
	if (hdr[0] != INETSK_IMG_COMMON || hdr[1] != magic) {
		say(&r, "magic 0x%08x 0x%08x, expected 0x%08x 0x%08x", hdr[0], hdr[1],
		    INETSK_IMG_COMMON, magic);
		return INETSK_SCAN_ASK;
	}
	while (r.off < r.size) {
		uint64_t at = r.off;
		int inet;

		if (r.size - r.off < sizeof(n)) {
			say(&r, "%llu trailing bytes at offset %llu, too short for an entry length",
			    (unsigned long long)(r.size - r.off), (unsigned long long)at);
			return INETSK_SCAN_ASK;
		}
		if (get_u32(&r, &n))
			return INETSK_SCAN_ASK;
		if (n > r.size - r.off) {
			say(&r, "entry at offset %llu: length %u runs past the end of the file "
			    "(%llu bytes left)", (unsigned long long)at, n,
			    (unsigned long long)(r.size - r.off));
			return INETSK_SCAN_ASK;
		}
		if (magic == INETSK_LEGACY_MAGIC) {
			say(&r, "entry at offset %llu: the legacy inetsk.img holds inet sockets only",
			    (unsigned long long)at);
			return INETSK_SCAN_INET;
		}
		inet = scan_entry(&r, r.off + n, at);
		if (inet < 0)
			return INETSK_SCAN_ASK;
		if (inet) {
			say(&r, "entry at offset %llu is an inet socket", (unsigned long long)at);
			return INETSK_SCAN_INET;
		}
		entries++;
	}
	/* the size came from fstat: a file that grew since holds entries not seen here */
	{
		uint8_t b;
		ssize_t got;

		do
			got = pread(fd, &b, 1, (off_t)r.size);
		while (got < 0 && errno == EINTR);
		if (got != 0) {
			say(&r, "the file changed while it was read (%s at offset %llu)",
			    got > 0 ? "more data" : strerror(errno), (unsigned long long)r.size);
			return INETSK_SCAN_ASK;
		}
	}
	say(&r, "%lu entries, none an inet socket", entries);
	return INETSK_SCAN_NONE;
}

enum inetsk_scan_verdict inetsk_scan_image(int dirfd, const char *name, uint32_t magic,
					   char *why, size_t whylen)
{
	enum inetsk_scan_verdict v;
	struct stat lst, st;
	uint8_t *buf;
	int fd;

	if (why && whylen)
		why[0] = '\0';
	/* nothing but a regular file is opened: opening a device can do things of its own */
	if (fstatat(dirfd, name, &lst, AT_SYMLINK_NOFOLLOW)) {
		if (errno == ENOENT) {
			if (why && whylen)
				snprintf(why, whylen, "absent");
			return INETSK_SCAN_NONE;
		}
		if (why && whylen)
			snprintf(why, whylen, "cannot stat: %s", strerror(errno));
		return INETSK_SCAN_ASK;
	}
	if (!S_ISREG(lst.st_mode)) {
		if (why && whylen)
			snprintf(why, whylen, "%s, not a regular file", kind_of(lst.st_mode));
		return INETSK_SCAN_ASK;
	}
	fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	if (fd < 0) {
		if (why && whylen)
			snprintf(why, whylen, "cannot open: %s", strerror(errno));
		return INETSK_SCAN_ASK;
	}
	if (fstat(fd, &st) || st.st_dev != lst.st_dev || st.st_ino != lst.st_ino) {
		if (why && whylen)
			snprintf(why, whylen, "replaced while it was opened");
		close(fd);
		return INETSK_SCAN_ASK;
	}
	buf = malloc(INETSK_SCAN_BUF);
	if (!buf) {
		if (why && whylen)
			snprintf(why, whylen, "out of memory");
		close(fd);
		return INETSK_SCAN_ASK;
	}
	v = inetsk_scan_fd(fd, magic, buf, INETSK_SCAN_BUF, why, whylen);
	free(buf);
	close(fd);
	return v;
}
