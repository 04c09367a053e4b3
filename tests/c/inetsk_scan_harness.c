/*
 * Test harness for the plugin's fast-path scanner (plugin/inetsk_scan.c), built with
 * AddressSanitizer and UBSan by tests/c/Makefile, run by tests/test_scan.py.
 *
 * The reference is CRIU's own reading of a socket image: the magic pair, then u32-length
 * entries, each unpacked by protobuf-c (Debian's libprotobuf-c, CRIU 4.2.1's generated
 * file_entry / inet_sk_entry code from its build tree) as criu/protobuf.c do_pb_read_one
 * does. The property: the scanner says NONE only when that reading refuses the file or
 * finds no INETSK entry; and its answer does not depend on its buffer size.
 *
 *   inetsk_scan_harness check FILE...     one line per file: scanner and reference
 *   inetsk_scan_harness scan DIR NAME     inetsk_scan_image() on DIR/NAME, as the plugin
 *   inetsk_scan_harness gen N SEED OUT SEEDFILE...   N mutated inputs written to OUT
 *   inetsk_scan_harness fuzz SECONDS CRASHDIR SEEDFILE...
 *        mutate the seeds for SECONDS; every disagreement and every crash is saved to
 *        CRASHDIR; prints one line of figures; exit 1 when anything was found.
 * A seed or input whose name holds "inetsk" is a legacy inetsk.img, else a files.img.
 * FUZZ_SEED=N makes a fuzz run repeatable (the seed used is printed).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <sanitizer/common_interface_defs.h>

#include "fdinfo.pb-c.h"
#include "sk-inet.pb-c.h"
#include "inetsk_scan.h"

#define INPUT_MAX (256 * 1024)
#define MAX_FIELDS 64

static const char *const VERDICT[] = { "NONE", "INET", "ASK" };

/* ------------------------------------------------------------------ reference ------ */

enum ref { REF_REFUSE, REF_NONE, REF_INET };
static const char *const REF[] = { "refuse", "none", "inet" };

/* CRIU's reading. Offsets of INETSK entries (their length prefix) go to inet[] (up to
 * max_inet), their count to *n_inet. */
static enum ref reference(const uint8_t *d, size_t len, uint32_t magic, char *why, size_t wl,
			  uint64_t *inet, size_t max_inet, size_t *n_inet)
{
	uint32_t h[2], n;
	size_t off = 8;

	*n_inet = 0;
	if (len < 4) {
		snprintf(why, wl, "no head magic");
		return REF_REFUSE;
	}
	memcpy(&h[0], d, 4);
	if (h[0] != INETSK_IMG_COMMON) {
		snprintf(why, wl, "Head magic doesn't match");
		return REF_REFUSE;
	}
	if (len < 8) {
		snprintf(why, wl, "no magic");
		return REF_REFUSE;
	}
	memcpy(&h[1], d + 4, 4);
	if (h[1] != magic) {
		snprintf(why, wl, "Magic doesn't match");
		return REF_REFUSE;
	}
	while (off < len) {
		size_t at = off;
		int is_inet;

		if (len - off < 4) {
			snprintf(why, wl, "Read %zu bytes while 4 expected", len - off);
			return REF_REFUSE;
		}
		memcpy(&n, d + off, 4);
		off += 4;
		if (n > len - off) {
			snprintf(why, wl, "Read %zu bytes while %u expected", len - off, n);
			return REF_REFUSE;
		}
		if (magic == INETSK_FILES_MAGIC) {
			FileEntry *fe = file_entry__unpack(NULL, n, d + off);

			if (!fe) {
				snprintf(why, wl, "Failed unpacking the entry at offset %zu", at);
				return REF_REFUSE;
			}
			is_inet = fe->type == FD_TYPES__INETSK;
			file_entry__free_unpacked(fe, NULL);
		} else {
			InetSkEntry *e = inet_sk_entry__unpack(NULL, n, d + off);

			if (!e) {
				snprintf(why, wl, "Failed unpacking the entry at offset %zu", at);
				return REF_REFUSE;
			}
			is_inet = 1;
			inet_sk_entry__free_unpacked(e, NULL);
		}
		if (is_inet) {
			if (*n_inet < max_inet)
				inet[*n_inet] = at;
			(*n_inet)++;
		}
		off += n;
	}
	snprintf(why, wl, "read whole");
	return *n_inet ? REF_INET : REF_NONE;
}

/* ------------------------------------------------------------------ the scanner ---- */

static int memfd = -1;
static const size_t BUF_SIZES[] = { 1, 2, 3, 5, 8, 13, 64, 4096, INETSK_SCAN_BUF };
#define N_BUF_SIZES (sizeof(BUF_SIZES) / sizeof(BUF_SIZES[0]))

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static void load_memfd(const uint8_t *d, size_t len)
{
	if (memfd < 0) {
		memfd = memfd_create("inetsk-scan-input", MFD_CLOEXEC);
		if (memfd < 0)
			die("memfd_create");
	}
	if (ftruncate(memfd, 0) || (len && pwrite(memfd, d, len, 0) != (ssize_t)len))
		die("memfd write");
}

/* The scanner on the bytes loaded by load_memfd() (a memfd: a regular file), with a
 * buffer of exactly BUFLEN bytes on the heap, so that ASan sees any overrun. */
static enum inetsk_scan_verdict scan_loaded(uint32_t magic, size_t buflen, char *why,
					    size_t wl)
{
	static uint8_t *bufs[N_BUF_SIZES];
	size_t k;

	for (k = 0; k < N_BUF_SIZES - 1 && BUF_SIZES[k] != buflen; k++)
		;
	if (BUF_SIZES[k] != buflen)
		die("buffer size");
	if (!bufs[k] && !(bufs[k] = malloc(buflen)))
		die("malloc");
	return inetsk_scan_fd(memfd, magic, bufs[k], buflen, why, wl);
}

static uint32_t magic_for(const char *name)
{
	const char *base = strrchr(name, '/');

	return strstr(base ? base : name, "inetsk") ? INETSK_LEGACY_MAGIC : INETSK_FILES_MAGIC;
}

/* ------------------------------------------------------------------ check / scan --- */

static int read_file(const char *path, uint8_t **out, size_t *len)
{
	FILE *f = fopen(path, "rb");
	uint8_t *d = malloc(INPUT_MAX + 1);
	size_t n;

	if (!f || !d) {
		fprintf(stderr, "%s: %s\n", path, strerror(errno));
		if (f)
			fclose(f);
		free(d);
		return -1;
	}
	n = fread(d, 1, INPUT_MAX + 1, f);
	fclose(f);
	if (n > INPUT_MAX) {
		fprintf(stderr, "%s: over %d bytes\n", path, INPUT_MAX);
		free(d);
		return -1;
	}
	*out = d;
	*len = n;
	return 0;
}

/* path, scanner verdict, reference, INETSK entry offsets, reasons; tab-separated. Exit 1
 * when the scanner's answer depends on its buffer size or breaks the property. */
static int cmd_check(int argc, char **argv)
{
	int i, bad = 0;

	for (i = 0; i < argc; i++) {
		char why[256], why2[256], rwhy[128];
		uint64_t inet[64];
		size_t n_inet, j, k, len;
		enum inetsk_scan_verdict v;
		enum ref r;
		uint8_t *d;
		uint32_t magic = magic_for(argv[i]);

		if (read_file(argv[i], &d, &len))
			return 2;
		r = reference(d, len, magic, rwhy, sizeof(rwhy), inet, 64, &n_inet);
		load_memfd(d, len);
		v = scan_loaded(magic, INETSK_SCAN_BUF, why, sizeof(why));
		for (k = 0; k < N_BUF_SIZES; k++) {
			if (scan_loaded(magic, BUF_SIZES[k], why2, sizeof(why2)) != v ||
			    strcmp(why, why2)) {
				printf("BUFDIFF\t%s\tbuffer %zu: %s\n", argv[i], BUF_SIZES[k], why2);
				bad = 1;
			}
		}
		printf("%s\tscan=%s\tref=%s\tinet=", argv[i], VERDICT[v], REF[r]);
		for (j = 0; j < n_inet && j < 64; j++)
			printf("%s%" PRIu64, j ? "," : "", inet[j]);
		printf("\tscan_why=%s\tref_why=%s\n", why, rwhy);
		if (r == REF_INET && v == INETSK_SCAN_NONE)
			bad = 1;
		free(d);
	}
	return bad;
}

static int cmd_scan(const char *dir, const char *name)
{
	char why[256];
	enum inetsk_scan_verdict v;
	int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (dfd < 0)
		die(dir);
	v = inetsk_scan_image(dfd, name, magic_for(name), why, sizeof(why));
	printf("%s\t%s\n", VERDICT[v], why);
	close(dfd);
	return 0;
}

/* ------------------------------------------------------------------ mutations ------ */

static uint64_t rng_state;

static uint64_t rnd(void)
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t below(uint64_t n)
{
	return n ? rnd() % n : 0;
}

struct buf {
	uint8_t d[INPUT_MAX];
	size_t len;
};

static int put(struct buf *b, const void *p, size_t n)
{
	if (n > INPUT_MAX - b->len)
		return -1;
	memcpy(b->d + b->len, p, n);
	b->len += n;
	return 0;
}

/* the varint of V in exactly N bytes (N >= its minimal length; up to 11: over-long ones
 * beyond 10 are what protobuf-c refuses) */
static size_t varint_n(uint8_t *out, uint64_t v, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++) {
		out[i] = (v & 0x7f) | (i + 1 < n ? 0x80 : 0);
		v = i < 9 ? v >> 7 : 0;
	}
	return n;
}

static size_t varint_len(uint64_t v)
{
	size_t n = 1;

	while (v >= 0x80) {
		v >>= 7;
		n++;
	}
	return n;
}

static size_t varint(uint8_t *out, uint64_t v)
{
	return varint_n(out, v, varint_len(v));
}

static const uint64_t INTERESTING[] = {
	0, 1, 2, 3, 4, 5, 7, 20, 0x7f, 0x80, 0xff, 0x7fffffff, 0x80000000ull, 0x80000004ull,
	0xfffffffcull, 0xffffffffull, 0x100000000ull, 0x100000004ull, 0x200000004ull,
	0xffffffff00000004ull, 0xfffffffffffffffcull, 0xffffffffffffffffull, 0x8000000000000004ull,
};
#define N_INTERESTING (sizeof(INTERESTING) / sizeof(INTERESTING[0]))

static uint64_t interesting(void)
{
	if (below(4) == 0)
		return rnd() >> below(64);
	return INTERESTING[below(N_INTERESTING)];
}

/* one top-level field of an entry: its key, then its value: own[0, own_len) followed by
 * ext[0, ext_len) (ext points into the entry being edited) */
struct field {
	uint8_t key[8];
	size_t key_len;
	uint8_t own[16];
	size_t own_len;
	uint8_t *ext;
	size_t ext_len;
	uint64_t num; /* field number and wire type, as the key says */
	unsigned wire;
};

/* a varint of at most MAX bytes at p[*off] (< len); -1 when unterminated */
static int get_var(const uint8_t *p, size_t len, size_t *off, unsigned max, uint64_t *v)
{
	unsigned i;

	*v = 0;
	for (i = 0; i < max && *off < len; i++) {
		uint8_t b = p[(*off)++];

		*v |= (uint64_t)(b & 0x7f) << (7 * i);
		if (!(b & 0x80))
			return 0;
	}
	return -1;
}

/* Split an entry into fields as a permissive protobuf reader would; -1 when it cannot. */
static int split(uint8_t *p, size_t len, struct field *f, size_t *nf)
{
	size_t off = 0;

	*nf = 0;
	while (off < len) {
		struct field *x;
		uint64_t key, v;
		size_t start;

		if (*nf == MAX_FIELDS)
			return -1;
		x = &f[(*nf)++];
		if (get_var(p, len, &off, 5, &key))
			return -1;
		x->key_len = varint(x->key, key);
		x->num = key >> 3;
		x->wire = key & 7;
		x->own_len = 0;
		start = off;
		switch (x->wire) {
		case 0:
			if (get_var(p, len, &off, 10, &v))
				return -1;
			break;
		case 1:
		case 5:
			if (len - off < (x->wire == 1 ? 8u : 4u))
				return -1;
			off += x->wire == 1 ? 8 : 4;
			break;
		case 2:
			if (get_var(p, len, &off, 5, &v) || v > len - off)
				return -1;
			off += v;
			break;
		default:
			return -1;
		}
		x->ext = p + start;
		x->ext_len = off - start;
	}
	return 0;
}

static void set_key(struct field *x, uint64_t num, unsigned wire, size_t n)
{
	uint64_t key = num << 3 | wire;

	if (n < varint_len(key))
		n = varint_len(key);
	if (n > 6)
		n = 6;
	x->key_len = varint_n(x->key, key, n);
	x->num = num;
	x->wire = wire;
}

static void set_varint(struct field *x, uint64_t v, size_t n)
{
	if (n < varint_len(v))
		n = varint_len(v);
	if (n > 11)
		n = 11;
	x->own_len = varint_n(x->own, v, n);
	x->ext_len = 0;
}

static struct field *pick(struct field *f, size_t nf, int prefer_type)
{
	size_t i;

	if (!nf)
		return NULL;
	if (prefer_type && below(2))
		for (i = 0; i < nf; i++)
			if (f[i].num == 1)
				return &f[i];
	return &f[below(nf)];
}

/* a field to add: field 1 (a type), an unknown or known field of any wire type */
static void new_field(struct field *x)
{
	static const uint64_t NUMS[] = { 0, 1, 1, 1, 2, 3, 4, 16, 20, 21, 100, 2047,
					 (1u << 29) - 1, 1u << 29, 1u << 31, 0xffffffffull };
	uint64_t num = NUMS[below(sizeof(NUMS) / sizeof(NUMS[0]))];
	unsigned wire = below(3) ? 0 : below(8);
	size_t i, n;

	set_key(x, num, wire, 1 + below(2) * below(6));
	x->ext_len = 0;
	switch (wire) {
	case 0:
		set_varint(x, num == 1 && below(2) ? (below(2) ? 4 : 4 + (below(4) << 32)) :
			   interesting(), 1 + below(2) * below(11));
		break;
	case 1:
	case 5:
		n = wire == 1 ? 8 : 4;
		for (i = 0; i < n; i++)
			x->own[i] = rnd();
		x->own_len = n - below(2) * below(2) * below(n); /* sometimes cut short */
		break;
	case 2:
		n = below(8);
		i = varint(x->own, n);
		for (; i < 1 + n; i++)
			x->own[i] = below(2) ? 0x08 : rnd();
		x->own_len = i - below(2) * below(2) * below(2);
		break;
	default: /* a group, or an undefined wire type: nothing after the key */
		x->own_len = 0;
		break;
	}
}

/* Edit one entry field by field; the result (re-encoded, with its length) goes to out. */
static int mutate_entry(uint8_t *p, size_t len, struct buf *out)
{
	static uint8_t tmp[INPUT_MAX];
	struct field f[MAX_FIELDS + 1], *x;
	size_t nf, i, k, tl = 0;
	uint64_t v;
	uint32_t n;

	if (split(p, len, f, &nf))
		return -1;
	switch (below(9)) {
	case 0: /* a key re-encoded over-long, maybe with another wire type */
		x = pick(f, nf, 1);
		if (!x)
			return -1;
		set_key(x, x->num, below(3) ? x->wire : below(8), 1 + below(6));
		break;
	case 1: /* a varint re-encoded over-long, maybe with another value */
		x = pick(f, nf, 1);
		if (!x || x->wire != 0)
			return -1;
		k = 0;
		get_var(x->ext, x->ext_len, &k, 10, &v);
		set_varint(x, below(2) ? v : interesting(), 1 + below(11));
		break;
	case 2: /* a field added (often a type) */
	case 3:
		if (nf == MAX_FIELDS)
			return -1;
		k = below(nf + 1);
		memmove(&f[k + 1], &f[k], (nf - k) * sizeof(f[0]));
		new_field(&f[k]);
		nf++;
		break;
	case 4: /* a field dropped (often the type) */
		x = pick(f, nf, 1);
		if (!x)
			return -1;
		k = x - f;
		memmove(&f[k], &f[k + 1], (nf - k - 1) * sizeof(f[0]));
		nf--;
		break;
	case 5: /* a length prefix re-encoded over-long, or with bits above 32 */
		x = pick(f, nf, 0);
		if (!x || x->wire != 2)
			return -1;
		k = 0;
		if (get_var(x->ext, x->ext_len, &k, 5, &v))
			return -1;
		if (below(3) == 0)
			v += (uint64_t)(1 + below(8)) << 32;
		else if (below(2))
			v = interesting();
		i = 1 + below(7);
		x->own_len = varint_n(x->own, v, i > varint_len(v) ? i : varint_len(v));
		x->ext += k;
		x->ext_len -= k;
		break;
	case 6: /* two fields swapped */
		if (nf < 2)
			return -1;
		{
			struct field t;
			size_t a = below(nf), b = below(nf);

			t = f[a];
			f[a] = f[b];
			f[b] = t;
		}
		break;
	case 7: /* a byte of a value flipped (often inside a sub-message) */
		x = pick(f, nf, 0);
		if (!x || !x->ext_len)
			return -1;
		x->ext[below(x->ext_len)] ^= 1 + below(255);
		break;
	default: /* nothing left: a zero-length entry */
		nf = 0;
		break;
	}
	for (i = 0; i < nf; i++) {
		if (tl + f[i].key_len + f[i].own_len + f[i].ext_len > sizeof(tmp))
			return -1;
		memcpy(tmp + tl, f[i].key, f[i].key_len);
		tl += f[i].key_len;
		memcpy(tmp + tl, f[i].own, f[i].own_len);
		tl += f[i].own_len;
		if (f[i].ext_len)
			memcpy(tmp + tl, f[i].ext, f[i].ext_len);
		tl += f[i].ext_len;
	}
	n = tl;
	return put(out, &n, 4) || put(out, tmp, tl) ? -1 : 0;
}

struct frame {
	size_t off, start, end;
};

static size_t frames(const struct buf *b, struct frame *fr, size_t max)
{
	size_t n = 0, pos = 8;

	while (n < max && b->len >= 4 && pos <= b->len - 4) {
		uint32_t len;

		memcpy(&len, b->d + pos, 4);
		if (len > b->len - pos - 4)
			break;
		fr[n].off = pos;
		fr[n].start = pos + 4;
		fr[n].end = pos + 4 + len;
		pos = fr[n++].end;
	}
	return n;
}

static void mutate(struct buf *b)
{
	static struct buf tmp;
	struct frame fr[256];
	size_t nfr = frames(b, fr, 256), i, k;
	uint32_t v;

	switch (below(18)) {
	case 0: /* bytes flipped */
		if (!b->len)
			return;
		for (k = 1 + below(4); k; k--)
			b->d[below(b->len)] ^= 1 + below(255);
		break;
	case 1: /* a length prefix edited */
		if (!nfr)
			return;
		i = below(nfr);
		v = below(2) ? (uint32_t)interesting() : (uint32_t)(fr[i].end - fr[i].start +
								   below(9) - 4);
		memcpy(b->d + fr[i].off, &v, 4);
		break;
	case 2: /* truncated */
		b->len = below(b->len + 1);
		break;
	case 3: /* bytes inserted */
		k = 1 + below(16);
		if (b->len + k > INPUT_MAX)
			return;
		i = below(b->len + 1);
		memmove(b->d + i + k, b->d + i, b->len - i);
		for (v = 0; v < k; v++)
			b->d[i + v] = rnd();
		b->len += k;
		break;
	case 4: /* a range deleted */
		if (!b->len)
			return;
		i = below(b->len);
		k = 1 + below(16);
		if (k > b->len - i)
			k = b->len - i;
		memmove(b->d + i, b->d + i + k, b->len - i - k);
		b->len -= k;
		break;
	case 5: /* an entry duplicated at an entry boundary */
		if (!nfr)
			return;
		i = below(nfr);
		k = fr[i].end - fr[i].off;
		if (b->len + k > INPUT_MAX)
			return;
		{
			size_t at = below(2) ? fr[below(nfr)].off : b->len;

			memcpy(tmp.d, b->d + fr[i].off, k);
			memmove(b->d + at + k, b->d + at, b->len - at);
			memcpy(b->d + at, tmp.d, k);
			b->len += k;
		}
		break;
	case 6: /* garbage appended */
		for (k = 1 + below(12); k && b->len < INPUT_MAX; k--)
			b->d[b->len++] = rnd();
		break;
	case 7: /* a header word */
		{
			static const uint32_t W[] = { INETSK_IMG_COMMON, INETSK_FILES_MAGIC,
						      INETSK_LEGACY_MAGIC, 0, 0xffffffff };

			v = W[below(5)];
			i = below(2) * 4;
			if (b->len >= i + 4)
				memcpy(b->d + i, &v, 4);
		}
		break;
	case 8: /* a crafted entry inserted: a type (often INETSK, often over-long), an id */
		{
			struct field f;
			uint8_t e[64], lenbuf[4];
			size_t el = 0, at = nfr && below(2) ? fr[below(nfr)].off : b->len;
			uint32_t n;

			set_key(&f, 1, 0, 1 + below(2) * below(5));
			set_varint(&f, below(2) ? 4 : 4 + (below(4) << 32), 1 + below(2) * below(10));
			memcpy(e, f.key, f.key_len);
			el += f.key_len;
			memcpy(e + el, f.own, f.own_len);
			el += f.own_len;
			e[el++] = 0x10;
			e[el++] = 1 + below(100);
			n = el;
			memcpy(lenbuf, &n, 4);
			if (b->len < 8 || b->len + 4 + el > INPUT_MAX)
				return;
			memmove(b->d + at + 4 + el, b->d + at, b->len - at);
			memcpy(b->d + at, lenbuf, 4);
			memcpy(b->d + at + 4, e, el);
			b->len += 4 + el;
		}
		break;
	default: /* one entry edited field by field */
		if (!nfr)
			return;
		i = below(nfr);
		tmp.len = 0;
		if (put(&tmp, b->d, fr[i].off) ||
		    mutate_entry(b->d + fr[i].start, fr[i].end - fr[i].start, &tmp) ||
		    put(&tmp, b->d + fr[i].end, b->len - fr[i].end))
			return;
		if (below(10) == 0) { /* the old length prefix kept */
			uint32_t old = fr[i].end - fr[i].start;

			memcpy(tmp.d + fr[i].off, &old, 4);
		}
		memcpy(b->d, tmp.d, tmp.len);
		b->len = tmp.len;
		break;
	}
}

/* ------------------------------------------------------------------ fuzz / gen ----- */

struct seed {
	uint8_t *d;
	size_t len;
	uint32_t magic;
};

static struct buf cur;
static uint32_t cur_magic;
static const char *crash_dir;

static uint64_t fnv(const uint8_t *d, size_t n)
{
	uint64_t h = 1469598103934665603ull;

	while (n--)
		h = (h ^ *d++) * 1099511628211ull;
	return h;
}

static void save(const char *kind, char *path, size_t pl)
{
	int fd;

	snprintf(path, pl, "%s/%s-%016" PRIx64 "-%s", crash_dir, kind, fnv(cur.d, cur.len),
		 cur_magic == INETSK_LEGACY_MAGIC ? "inetsk.img" : "files.img");
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || write(fd, cur.d, cur.len) != (ssize_t)cur.len)
		perror(path);
	if (fd >= 0)
		close(fd);
}

/* ASan and UBSan (no recovery) end here: the input that did it is kept */
static void on_death(void)
{
	char path[4096];

	save("crash", path, sizeof(path));
	fprintf(stderr, "scan_fuzz: crash; input kept in %s\n", path);
}

static int load_seeds(int argc, char **argv, struct seed *s)
{
	int i;

	for (i = 0; i < argc; i++) {
		if (read_file(argv[i], &s[i].d, &s[i].len))
			return -1;
		s[i].magic = magic_for(argv[i]);
	}
	return 0;
}

static void next_input(struct seed *s, int ns)
{
	int k = below(ns), m;

	memcpy(cur.d, s[k].d, s[k].len);
	cur.len = s[k].len;
	cur_magic = s[k].magic;
	for (m = below(3) ? 1 : 1 + below(4); m; m--)
		mutate(&cur);
}

static uint64_t seed_from_env(void)
{
	const char *e = getenv("FUZZ_SEED");
	struct timespec ts;

	if (e && *e)
		return strtoull(e, NULL, 0);
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000007ull ^ (uint64_t)ts.tv_nsec ^ (uint64_t)getpid();
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmd_fuzz(double seconds, int argc, char **argv)
{
	struct seed s[256];
	uint64_t seed = seed_from_env(), n = 0;
	uint64_t count[3][3] = { { 0 } }, found = 0, bufdiff = 0;
	double t0 = now(), t;

	if (argc < 1 || argc > 256 || load_seeds(argc, argv, s))
		return 2;
	rng_state = seed;
	__sanitizer_set_death_callback(on_death);
	do {
		char why[256], why2[256], rwhy[128], path[4096];
		uint64_t inet[1];
		size_t n_inet;
		enum inetsk_scan_verdict v, v2;
		enum ref r;
		int b;

		for (b = 0; b < 64; b++, n++) {
			next_input(s, argc);
			r = reference(cur.d, cur.len, cur_magic, rwhy, sizeof(rwhy), inet, 1, &n_inet);
			load_memfd(cur.d, cur.len);
			v = scan_loaded(cur_magic, INETSK_SCAN_BUF, why, sizeof(why));
			v2 = scan_loaded(cur_magic, BUF_SIZES[below(8) ? 5 + below(N_BUF_SIZES - 5) :
							 below(5)], why2, sizeof(why2));
			count[r][v]++;
			if (v != v2 || strcmp(why, why2)) {
				bufdiff++;
				save("bufdiff", path, sizeof(path));
				fprintf(stderr, "scan_fuzz: the answer depends on the buffer size: %s | %s "
					"(input kept in %s)\n", why, why2, path);
			}
			if (r == REF_INET && v == INETSK_SCAN_NONE) {
				found++;
				save("disagree", path, sizeof(path));
				fprintf(stderr, "scan_fuzz: protobuf-c reads an INETSK entry, the scanner "
					"says none (%s; input kept in %s)\n", why, path);
			}
		}
		t = now() - t0;
	} while (t < seconds && found + bufdiff < 10);
	printf("scan_fuzz: %" PRIu64 " inputs in %.1f s (%.0f/s), seed %" PRIu64 "; protobuf-c "
	       "read %" PRIu64 " with an inet socket, %" PRIu64 " without, refused %" PRIu64
	       "; the scanner said none for %" PRIu64 ", asked for %" PRIu64 " of those without "
	       "(%" PRIu64 " inet), %" PRIu64 " disagreements, %" PRIu64 " buffer-size "
	       "differences\n", n, t, n / (t > 0 ? t : 1e-9), seed,
	       count[REF_INET][0] + count[REF_INET][1] + count[REF_INET][2],
	       count[REF_NONE][0] + count[REF_NONE][1] + count[REF_NONE][2],
	       count[REF_REFUSE][0] + count[REF_REFUSE][1] + count[REF_REFUSE][2],
	       count[REF_NONE][0] + count[REF_REFUSE][0] + count[REF_INET][0],
	       count[REF_NONE][2], count[REF_NONE][1], found, bufdiff);
	fflush(stdout);
	while (argc--)
		free(s[argc].d);
	return found || bufdiff;
}

static int cmd_gen(uint64_t n, uint64_t seed, const char *out, int argc, char **argv)
{
	struct seed s[256];
	uint64_t i;

	if (argc < 1 || argc > 256 || load_seeds(argc, argv, s))
		return 2;
	rng_state = seed;
	crash_dir = out;
	for (i = 0; i < n; i++) {
		char kind[32], path[4096];

		next_input(s, argc);
		snprintf(kind, sizeof(kind), "gen%06" PRIu64, i);
		save(kind, path, sizeof(path));
	}
	while (argc--)
		free(s[argc].d);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "check"))
		return cmd_check(argc - 2, argv + 2);
	if (argc == 4 && !strcmp(argv[1], "scan"))
		return cmd_scan(argv[2], argv[3]);
	if (argc >= 6 && !strcmp(argv[1], "gen"))
		return cmd_gen(strtoull(argv[2], NULL, 0), strtoull(argv[3], NULL, 0), argv[4],
			       argc - 5, argv + 5);
	if (argc >= 5 && !strcmp(argv[1], "fuzz")) {
		crash_dir = argv[3];
		return cmd_fuzz(strtod(argv[2], NULL), argc - 4, argv + 4);
	}
	fprintf(stderr, "usage: %s check FILE... | scan DIR NAME | gen N SEED OUT SEEDFILE... | "
		"fuzz SECONDS CRASHDIR SEEDFILE...\n", argv[0]);
	return 2;
}
