/*
 * The floor of a cross-core request/completion round trip on this machine, whatever the
 * software: two threads pinned to CPUs 0 and 1 exchange
 *   - "one line": a counter in one cache line, each side writing the value the other waits for
 *     (a ping-pong), and
 *   - "ring": a 64-byte request written into a ring slot (its last word a sequence tag) and a
 *     16-byte completion written into another ring (its last word a tag), as nvmed's rings do:
 *     the request and the completion travel in different cache lines.
 *   - "ring at QD32": the same ring with the requester keeping 32 requests outstanding (it
 *     writes a request whenever fewer are, and takes completions as they come): the
 *     throughput a ring of 64-byte requests can reach at depth on this machine.
 * Prints the median over batches of 10000 rounds of each one's mean round trip (and of the
 * QD32 ring's time per request), in ns (one thread on CPU 0, the other on CPU 1: both must
 * exist). Used by scripts/bench.sh part 1 (see BENCHMARKS.md section 1: what a ring of
 * separate request and completion lines can reach at QD1 and at QD32).
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
#define DEPTH 32

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

static void pin_to(pthread_attr_t *attr, int cpu)
{
	cpu_set_t s;

	CPU_ZERO(&s);
	CPU_SET(cpu, &s);
	if ((attr ? pthread_attr_setaffinity_np(attr, sizeof(s), &s)
		  : pthread_setaffinity_np(pthread_self(), sizeof(s), &s)) != 0) {
		fprintf(stderr, "ring_floor: cannot pin a thread to CPU %d\n", cpu);
		exit(1);
	}
}

static volatile int server_ready;

static void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

static void *server(void *arg)
{
	(void)arg;
	__atomic_store_n(&server_ready, 1, __ATOMIC_RELEASE);
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

#define BATCH 10000

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* The median of the batches' mean round trips (a batch a preemption hit does not count much). */
static double run(int m)
{
	static double batch[100000];
	struct timespec a, b;
	pthread_attr_t attr;
	pthread_t t;
	long n = 0;

	mode = m;
	line = 0;
	for (int k = 0; k < SLOTS; k++)
		sq[k].w[7] = 0;
	for (int k = 0; k < 2 * SLOTS; k++)
		cq[k].w[3] = 0;
	server_ready = 0;
	pthread_attr_init(&attr);
	pin_to(&attr, 1);
	if (pthread_create(&t, &attr, server, NULL) != 0) {
		fprintf(stderr, "ring_floor: cannot start the second thread\n");
		exit(1);
	}
	while (!__atomic_load_n(&server_ready, __ATOMIC_ACQUIRE))
		relax();
	if (m == 2) {
		/* Up to DEPTH requests outstanding; request i completes as completion i (the server
		 * answers in order), so `done` is also the next completion slot's index. */
		long sub = 0, done = 0;

		clock_gettime(CLOCK_MONOTONIC, &a);
		while (done < rounds) {
			while (sub - done < DEPTH && sub < rounds) {
				struct sqe *s = &sq[sub % SLOTS];

				for (int w = 0; w < 7; w++)
					s->w[w] = (uint64_t)sub;
				__atomic_store_n(&s->w[7], (uint64_t)sub + 1, __ATOMIC_RELEASE);
				sub++;
			}
			while (done < sub && __atomic_load_n(&cq[done % (2 * SLOTS)].w[3], __ATOMIC_ACQUIRE) ==
						     (uint32_t)(done + 1)) {
				done++;
				if (done % BATCH == 0 && n < 100000) {
					clock_gettime(CLOCK_MONOTONIC, &b);
					batch[n++] = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / BATCH;
					a = b;
				}
			}
		}
	}
	for (long i = 0; m != 2 && i < rounds; i++) {
		if (i % BATCH == 0)
			clock_gettime(CLOCK_MONOTONIC, &a);
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
		if (i % BATCH == BATCH - 1 && n < 100000) {
			clock_gettime(CLOCK_MONOTONIC, &b);
			batch[n++] = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / BATCH;
		}
	}
	pthread_join(t, NULL);
	pthread_attr_destroy(&attr);
	if (n == 0)
		return 0;
	qsort(batch, n, sizeof(batch[0]), cmp);
	return batch[n / 2];
}

int main(int argc, char **argv)
{
	if (argc > 1)
		rounds = atol(argv[1]);
	if (rounds < BATCH)
		rounds = BATCH;
	pin_to(NULL, 0);
	double one = run(0), ring = run(1), deep = run(2);

	printf("round trip (median of %ld-round batches): one line %.0f ns, ring (request and completion lines) %.0f ns;"
	       " ring at QD%d: %.1f ns per request (%.1f M/s)\n",
	       (long)BATCH, one, ring, DEPTH, deep, deep > 0 ? 1e3 / deep : 0.0);
	return 0;
}
