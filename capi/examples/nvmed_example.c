/*
 * libnvmed from C: open the broker, register buffers (one the library allocates, one memfd of
 * the caller's), write, flush, read back (plain and vectored), write zeroes, deallocate,
 * verify every byte, and show what failures look like.
 *
 *   nvmed --emulate --socket /tmp/nvmed.sock --size 256M &
 *   cc -std=c11 -Wall -o nvmed_example capi/examples/nvmed_example.c \
 *       $(pkg-config --cflags --libs nvmed)      # or -Icapi/include -Ltarget/debug -lnvmed
 *   ./nvmed_example /tmp/nvmed.sock
 *
 * Exit status 0 when everything was verified.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "nvmed.h"

#define LEN (64 * 1024)

static int check(int rc, const char *what)
{
	if (rc < 0) {
		fprintf(stderr, "%s failed: %s (%d): %s\n", what, nvmed_strerror(rc), rc, nvmed_last_error());
		exit(1);
	}
	return rc;
}

/* Submits what is queued and waits for `n` completions; every one must succeed. */
static void run(nvmed_ring *ring, unsigned n, const char *what)
{
	nvmed_completion done[8];
	unsigned got = 0;

	check(nvmed_submit(ring), "submit");
	while (got < n) {
		int k = check(nvmed_wait(ring, done, 8, 1, 5 * 1000 * 1000), "wait");
		for (int i = 0; i < k; i++) {
			if (done[i].status != 0) {
				char text[256];
				nvmed_status_string(done[i].status, text, sizeof(text));
				fprintf(stderr, "%s: request %" PRIu64 " failed: %s\n", what, done[i].user_data, text);
				exit(1);
			}
		}
		got += (unsigned)k;
	}
}

int main(int argc, char **argv)
{
	const char *path = argc > 1 ? argv[1] : "/run/nvmed.sock";

	if (nvmed_version() != NVMED_VERSION) {
		fprintf(stderr, "header %s does not match the library (%#x)\n", NVMED_VERSION_STRING, nvmed_version());
		return 1;
	}

	nvmed_ring_opts opts;
	nvmed_ring_opts_init(&opts);
	opts.client_name = "nvmed_example.c";
	nvmed_ring *ring = NULL;
	check(nvmed_open(path, &opts, &ring), "nvmed_open");

	nvmed_namespace ns;
	if (check(nvmed_namespace_count(ring), "namespace count") < 1) {
		fprintf(stderr, "the broker offers no namespace\n");
		return 1;
	}
	check(nvmed_namespace_get(ring, 0, &ns), "namespace");
	printf("namespace %u: %" PRIu64 " MiB, %u-byte blocks, max transfer %u KiB%s\n", ns.nsid,
	       ns.size_bytes >> 20, ns.lba_size, ns.max_transfer >> 10, ns.read_only ? ", read-only" : "");

	/* A buffer the library allocates: [0, LEN) to write from, [LEN, 2 LEN) to read into. */
	nvmed_buffer buf;
	check(nvmed_buffer_alloc(ring, 2 * LEN, &buf), "buffer alloc");
	unsigned char *mem = buf.addr;
	for (size_t i = 0; i < LEN; i++)
		mem[i] = (unsigned char)(i * 7 + i / 4096);

	/* A memfd of our own, sealed against shrinking, registered from offset 4096. */
	int fd = memfd_create("example", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0 || ftruncate(fd, LEN + 4096) || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK)) {
		perror("memfd");
		return 1;
	}
	nvmed_buffer mine;
	check(nvmed_buffer_register_memfd(ring, fd, 4096, LEN, &mine), "register memfd");
	unsigned char *own = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 4096);
	if (own == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	close(fd);

	/* Write, flush, then read back in one batch each. */
	uint64_t off = 1 << 20;
	check(nvmed_prep_write(ring, ns.nsid, off, LEN, buf.id, 0, 1, 0), "prep write");
	run(ring, 1, "write");
	check(nvmed_prep_flush(ring, ns.nsid, 2), "prep flush");
	check(nvmed_prep_read(ring, ns.nsid, off, LEN, buf.id, LEN, 3), "prep read");
	run(ring, 2, "flush + read");
	if (memcmp(mem, mem + LEN, LEN) != 0) {
		fprintf(stderr, "read-back data differs\n");
		return 1;
	}
	printf("write/read: %d bytes verified\n", LEN);

	/* A vectored read into two pieces of our own memfd: its second half, then its first. The
	 * library writes the segment list (2 x NVMED_SEGMENT_LIST_ENTRY_SIZE = 48 bytes) at offset 0
	 * of the library's buffer, so those bytes of the written data are saved and put back around
	 * it. */
	nvmed_segment segs[2] = {
		{.buf_id = mine.id, .offset = LEN / 2, .len = LEN / 2},
		{.buf_id = mine.id, .offset = 0, .len = LEN / 2},
	};
	memset(own, 0, LEN);
	unsigned char saved[512];
	memcpy(saved, mem, sizeof(saved));
	check(nvmed_prep_readv(ring, ns.nsid, off, segs, 2, buf.id, 0, 4), "prep readv");
	run(ring, 1, "readv");
	memcpy(mem, saved, sizeof(saved));
	if (memcmp(own + LEN / 2, mem, LEN / 2) != 0 || memcmp(own, mem + LEN / 2, LEN / 2) != 0) {
		fprintf(stderr, "vectored read-back data differs\n");
		return 1;
	}
	printf("readv: 2 segments verified (caller's memfd)\n");

	/* Write zeroes over the second half, read it back. */
	check(nvmed_prep_write_zeroes(ring, ns.nsid, off + LEN / 2, LEN / 2, 5, NVMED_PREP_FUA), "prep write zeroes");
	run(ring, 1, "write zeroes");
	check(nvmed_prep_read(ring, ns.nsid, off, LEN, buf.id, LEN, 6), "prep read");
	run(ring, 1, "read");
	for (size_t i = 0; i < LEN; i++) {
		unsigned char want = i < LEN / 2 ? mem[i] : 0;
		if (mem[LEN + i] != want) {
			fprintf(stderr, "byte %zu after write zeroes: %u, expected %u\n", i, mem[LEN + i], want);
			return 1;
		}
	}
	printf("write zeroes: verified\n");
	check(nvmed_prep_deallocate(ring, ns.nsid, off, LEN, 7), "prep deallocate");
	run(ring, 1, "deallocate");

	/* An event loop's way: sleep in poll(2) on the completion doorbell instead of nvmed_wait. */
	int efd = check(nvmed_completion_fd(ring), "completion fd");
	check(nvmed_prep_read(ring, ns.nsid, off, 4096, buf.id, LEN, 12), "prep read");
	check(nvmed_submit(ring), "submit");
	nvmed_completion ev;
	int got = 0, sleeps = 0;
	while (!got) {
		got = check(nvmed_arm_completion_fd(ring, &ev, 1), "arm");
		if (got)
			break; /* it completed before we slept: the ring is disarmed already */
		struct pollfd pfd = {.fd = efd, .events = POLLIN};
		if (poll(&pfd, 1, 5000) != 1) {
			fprintf(stderr, "no wakeup from the completion fd\n");
			return 1;
		}
		sleeps++;
		check(nvmed_disarm_completion_fd(ring), "disarm");
		got = check(nvmed_poll(ring, &ev, 1), "poll");
	}
	if (ev.user_data != 12 || ev.status != 0) {
		fprintf(stderr, "event loop: unexpected completion %" PRIu64 " status %#x\n", ev.user_data, ev.status);
		return 1;
	}
	printf("event loop: completion %" PRIu64 " after %d sleep(s) on fd %d\n", ev.user_data, sleeps, efd);

	/* Failures: a typed code and the text of what went wrong. */
	int rc = nvmed_prep_read(ring, 99, 0, 4096, buf.id, 0, 8);
	printf("bad nsid: %d %s: %s\n", rc, nvmed_strerror(rc), nvmed_last_error());
	if (rc != NVMED_E_NO_NAMESPACE)
		return 1;
	rc = nvmed_prep_write(ring, ns.nsid, 0, 4096, 12345, 0, 9, 0);
	printf("unregistered buffer: %d %s: %s\n", rc, nvmed_strerror(rc), nvmed_last_error());
	if (rc != NVMED_E_UNKNOWN_BUFFER)
		return 1;
	rc = nvmed_prep_read(ring, ns.nsid, 0, 4096, buf.id, 2 * LEN - 100, 10);
	printf("out of buffer: %d %s: %s\n", rc, nvmed_strerror(rc), nvmed_last_error());
	if (rc != NVMED_E_OUT_OF_BUFFER)
		return 1;
	/* A request the broker itself fails: past the end of the namespace. */
	check(nvmed_prep_read(ring, ns.nsid, ns.size_bytes, 4096, buf.id, 0, 11), "prep read");
	check(nvmed_submit(ring), "submit");
	nvmed_completion c;
	check(nvmed_wait(ring, &c, 1, 1, -1), "wait");
	char text[256];
	nvmed_status_string(c.status, text, sizeof(text));
	printf("past the end: status %#x: %s\n", c.status, text);
	if (c.status == 0)
		return 1;

	nvmed_stats st;
	check(nvmed_stats_get(ring, &st), "stats");
	printf("stats: %" PRIu64 " submitted, %" PRIu64 " completed, %" PRIu64 " errors, %" PRIu64
	       " bytes read, %" PRIu64 " bytes written, %" PRIu64 " buffers\n",
	       st.submitted, st.completed, st.errors, st.bytes_read, st.bytes_written, st.buffers);

	check(nvmed_buffer_unregister(ring, mine.id), "unregister");
	munmap(own, LEN);
	nvmed_close(ring);
	printf("ok\n");
	return 0;
}
