/*
 * The floor of a cross-core request/completion round trip on this machine, whatever the
 * software: two threads pinned to CPUs 0 and 1 exchange
 *   - "one line": a counter in one cache line, each side writing the value the other waits for
 *     (a ping-pong), and
 *   - "ring": a 64-byte request written into a ring slot (its last word a sequence tag) and a
 *     16-byte completion written into another ring (its last word a tag), as nvmed's rings do:
 *     the request and the completion travel in different cache lines.
 * Prints the mean round trip of each, in ns. Used by scripts/bench.sh part 1 (see BENCHMARKS.md
 * section 1: what a ring of separate request and completion lines can reach at QD1).
 *   cc -O2 -pthread scripts/ring_floor.c -o ring_floor && ./ring_floor [ROUNDS]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define SLOTS 64

struct sqe {
	volatile uint64_t w[8];
} __attribute__((aligned(64)));
struct cqe {
	volatile uint32_t w[4];
};

static struct sqe sq[SLOTS];
static struct cqe cq[2 * SLOTS] __attribute__((aligned(64)));
static volatile uint64_t line __attribute__((aligned(128)));
static long rounds = 1000000;
static int mode;

static void pin(int cpu)
{
	cpu_set_t s;

	CPU_ZERO(&s);
	CPU_SET(cpu, &s);
	pthread_setaffinity_np(pthread_self(), sizeof(s), &s);
}

static void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

static void *server(void *arg)
{
	(void)arg;
	pin(1);
	for (long i = 0; i < rounds; i++) {
		if (mode == 0) {
			while (line != (uint64_t)(2 * i + 1))
				relax();
			line = 2 * i + 2;
		} else {
			struct sqe *s = &sq[i % SLOTS];
			struct cqe *c = &cq[i % (2 * SLOTS)];

			while (__atomic_load_n(&s->w[7], __ATOMIC_ACQUIRE) != (uint64_t)i + 1)
				relax();
			c->w[0] = (uint32_t)s->w[0];
			c->w[1] = 0;
			__atomic_store_n(&c->w[3], (uint32_t)(i + 1), __ATOMIC_RELEASE);
		}
	}
	return NULL;
}

static double run(int m)
{
	struct timespec a, b;
	pthread_t t;

	mode = m;
	line = 0;
	for (int k = 0; k < SLOTS; k++)
		sq[k].w[7] = 0;
	for (int k = 0; k < 2 * SLOTS; k++)
		cq[k].w[3] = 0;
	pthread_create(&t, NULL, server, NULL);
	pin(0);
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < rounds; i++) {
		if (m == 0) {
			line = 2 * i + 1;
			while (line != (uint64_t)(2 * i + 2))
				relax();
		} else {
			struct sqe *s = &sq[i % SLOTS];

			for (int w = 0; w < 7; w++)
				s->w[w] = (uint64_t)i;
			__atomic_store_n(&s->w[7], (uint64_t)i + 1, __ATOMIC_RELEASE);
			while (__atomic_load_n(&cq[i % (2 * SLOTS)].w[3], __ATOMIC_ACQUIRE) != (uint32_t)(i + 1))
				relax();
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	pthread_join(t, NULL);
	return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / rounds;
}

int main(int argc, char **argv)
{
	if (argc > 1)
		rounds = atol(argv[1]);
	double one = run(0), ring = run(1);

	printf("one line %.0f ns, ring (request and completion lines) %.0f ns\n", one, ring);
	return 0;
}
