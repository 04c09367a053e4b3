/* The plugin's fast path (inetsk_scan.c): does a socket image hold an inet socket entry,
 * as CRIU's protobuf-c would read it? Pure C, no CRIU headers: the sanitizer-built harness
 * (tests/c/) links this file alone. */
#ifndef INETSK_SCAN_H
#define INETSK_SCAN_H

#include <stddef.h>
#include <stdint.h>

#define INETSK_IMG_COMMON 0x54564319u
#define INETSK_FILES_MAGIC 0x56303138u  /* files.img: file_entry messages */
#define INETSK_LEGACY_MAGIC 0x56443851u /* inetsk.img (CRIU <= 3.3): inet_sk_entry messages */
#define INETSK_FD_TYPES_INETSK 4u       /* file_entry.type (field 1) of an inet socket */

#include "inetsk_wire.h" /* INETSK_WIRE_SOCKET_IMAGE_MAX: the planner's cap, the same number */

/* The largest socket image either side reads (bytes): core/imagedir.py's SOCKET_IMAGE_MAX,
 * carried by the generated header. 256 MiB is about 2.4 million inet sockets. */
#define INETSK_SOCKET_IMAGE_MAX INETSK_WIRE_SOCKET_IMAGE_MAX

/* The scanner's read buffer: one entry is never held whole, so this bounds its memory. */
#define INETSK_SCAN_BUF 65536

enum inetsk_scan_verdict {
	INETSK_SCAN_NONE = 0, /* no inet socket entry (or no such file) */
	INETSK_SCAN_INET = 1, /* an inet socket entry: the planner is asked */
	INETSK_SCAN_ASK = 2,  /* not read (not a regular file, too big, bad magic, truncated,
			       * unparsable): the planner is asked and names the fault */
};

/* Scan NAME in DIRFD: opened without following a symlink and without blocking (a FIFO),
 * read only if it is a regular file of at most INETSK_SOCKET_IMAGE_MAX bytes, streamed
 * (the header, then one entry after another) and left at the first inet entry. MAGIC is
 * INETSK_FILES_MAGIC or INETSK_LEGACY_MAGIC. `why` (may be NULL) gets one line saying
 * what was found, naming the entry's offset where there is one. */
enum inetsk_scan_verdict inetsk_scan_image(int dirfd, const char *name, uint32_t magic,
					   char *why, size_t whylen);

/* The same on an open fd (checked to be a regular file; read from its current offset),
 * reading through BUF of BUFLEN bytes (>= 1; the harness uses tiny ones to hit every
 * refill boundary). */
enum inetsk_scan_verdict inetsk_scan_fd(int fd, uint32_t magic, uint8_t *buf, size_t buflen,
					char *why, size_t whylen);

#endif
