/*
 * fio external ioengine for nvmed, on top of libnvmed.
 *
 *   fio --ioengine=external:/path/to/libfio_nvmed.so --filename=/run/nvmed.sock --nsid=1 \
 *       --rw=randread --bs=4k --iodepth=32 --size=64m --name=job
 *
 * The filename is the broker's socket (fio splits filenames at ':', so the socket is the
 * filename and the namespace an engine option). Each fio thread or process opens its own ring
 * (in ->init, which runs after fio forked the job), and fio's I/O buffers (iomem) are one memfd
 * per job registered with the broker, so the device moves data straight to and from them.
 *
 * Engine options:
 *   nsid=N          namespace id (default 1)
 *   busy_poll       reap completions by polling the ring only (a CPU spins, like io_uring's
 *                   hipri); without it fio waits in nvmed_wait: a short spin (spin_us), then
 *                   asleep on the ring's completion doorbell
 *   spin_us=N       longest spin before sleeping in the waiting mode (default 50)
 *   sq_entries=N    ring size (default: the next power of two >= iodepth, at least 64)
 *
 * Built by scripts/build_capi.sh against the headers of the fio version the machine runs.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fio.h"
#include "optgroup.h"

#include "nvmed.h"

struct nvmed_fio_options {
	void *pad; /* fio needs option offsets above 0 */
	unsigned int nsid;
	unsigned int busy_poll;
	unsigned int spin_us;
	unsigned int sq_entries;
};

static struct fio_option options[] = {
	{
		.name = "nsid",
		.lname = "nvmed namespace id",
		.type = FIO_OPT_INT,
		.off1 = offsetof(struct nvmed_fio_options, nsid),
		.def = "1",
		.help = "Namespace id on the nvmed broker",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = "busy_poll",
		.lname = "nvmed busy polling",
		.type = FIO_OPT_STR_SET,
		.off1 = offsetof(struct nvmed_fio_options, busy_poll),
		.help = "Reap completions by polling the ring only (never sleep on the eventfd)",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = "spin_us",
		.lname = "nvmed spin before sleeping",
		.type = FIO_OPT_INT,
		.off1 = offsetof(struct nvmed_fio_options, spin_us),
		.def = "50",
		.help = "Microseconds a wait spins before sleeping on the completion doorbell",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = "sq_entries",
		.lname = "nvmed ring entries",
		.type = FIO_OPT_INT,
		.off1 = offsetof(struct nvmed_fio_options, sq_entries),
		.def = "0",
		.help = "Submission queue entries (0: from iodepth)",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = NULL,
	},
};

struct nvmed_fio_data {
	nvmed_ring *ring;
	nvmed_namespace ns;
	nvmed_buffer iomem;
	int have_iomem;
	/* Requests prepared since the last commit (for their issue times). */
	struct io_u **queued;
	unsigned int nr_queued;
	/* Completions of the last getevents, for ->event(). */
	struct io_u **events;
	nvmed_completion *cqes;
	unsigned int entries;
};

static unsigned int next_pow2(unsigned int v)
{
	unsigned int p = 1;
	while (p < v)
		p <<= 1;
	return p;
}

/* Looks up the namespace of the job's nsid option. */
static int find_namespace(nvmed_ring *ring, unsigned int nsid, nvmed_namespace *out)
{
	int n = nvmed_namespace_count(ring);

	for (int i = 0; i < n; i++) {
		if (nvmed_namespace_get(ring, (uint32_t)i, out) == 0 && out->nsid == nsid)
			return 0;
	}
	return -1;
}

/* The job's block sizes, alignment and direction against what the namespace takes: refused
 * at start with the reason, not as an error on every I/O. */
static int check_job(struct thread_data *td, const nvmed_namespace *ns)
{
	for (int ddir = DDIR_READ; ddir <= DDIR_TRIM; ddir++) {
		unsigned long long min = td->o.min_bs[ddir], max = td->o.max_bs[ddir], ba = td->o.ba[ddir];
		if (!max)
			continue;
		if (min % ns->lba_size || max % ns->lba_size || (ba && ba % ns->lba_size)) {
			log_err("nvmed: bs %llu-%llu (alignment %llu) is not a multiple of namespace %u's %u-byte blocks\n",
				min, max, ba, ns->nsid, ns->lba_size);
			td_verror(td, EINVAL, "nvmed block size");
			return 1;
		}
		if (ddir != DDIR_TRIM && max > ns->max_transfer) {
			log_err("nvmed: bs %llu is above namespace %u's largest request, %u bytes\n", max, ns->nsid,
				ns->max_transfer);
			td_verror(td, EINVAL, "nvmed block size");
			return 1;
		}
	}
	if (ns->read_only && (td_write(td) || td_trim(td))) {
		log_err("nvmed: namespace %u is read-only for this client: a job that writes or trims cannot run\n",
			ns->nsid);
		td_verror(td, EROFS, "nvmed read-only namespace");
		return 1;
	}
	return 0;
}

static int open_ring(struct thread_data *td, const char *socket, unsigned int entries, nvmed_ring **ring,
		     nvmed_namespace *ns)
{
	struct nvmed_fio_options *o = td->eo;
	nvmed_ring_opts opts;
	char name[128];
	int rc;

	nvmed_ring_opts_init(&opts);
	if (entries) {
		opts.sq_entries = entries;
		/* (No overflow: a size the broker refuses anyway stays as asked, for its message.) */
		opts.cq_entries = entries <= 0x40000000u ? 2 * entries : entries;
	}
	opts.spin_us = o->spin_us;
	snprintf(name, sizeof(name), "fio/%s", td->o.name ? td->o.name : "job");
	opts.client_name = name;
	rc = nvmed_open(socket, &opts, ring);
	if (rc) {
		log_err("nvmed: cannot open %s: %s\n", socket, nvmed_last_error());
		td_verror(td, rc == NVMED_E_CONNECT ? ECONNREFUSED : EINVAL, "nvmed_open");
		return 1;
	}
	if (find_namespace(*ring, o->nsid, ns)) {
		log_err("nvmed: namespace %u is not one this client may use on %s\n", o->nsid, socket);
		td_verror(td, ENODEV, "nvmed namespace");
		nvmed_close(*ring);
		*ring = NULL;
		return 1;
	}
	if (check_job(td, ns)) {
		nvmed_close(*ring);
		*ring = NULL;
		return 1;
	}
	return 0;
}

static int fio_nvmed_init(struct thread_data *td)
{
	struct nvmed_fio_options *o = td->eo;
	struct nvmed_fio_data *d;
	struct fio_file *f;
	unsigned int i, entries;

	if (!td->files_index) {
		log_err("nvmed: the job needs filename=<the broker's socket>\n");
		return 1;
	}
	/* Offload's submit workers each init the engine without fio's buffers: their I/O would
	 * name memory registered on another ring. */
	if (td->o.io_submit_mode == IO_MODE_OFFLOAD) {
		log_err("nvmed: io_submit_mode=offload is not supported\n");
		return 1;
	}
	/* Every file of the job is the same broker: one ring serves them. */
	for_each_file(td, f, i) {
		if (strcmp(f->file_name, td->files[0]->file_name)) {
			log_err("nvmed: all files of a job must be the same socket (%s, %s)\n",
				td->files[0]->file_name, f->file_name);
			return 1;
		}
	}
	entries = o->sq_entries ? o->sq_entries : next_pow2(td->o.iodepth < 64 ? 64 : td->o.iodepth);
	if (entries < td->o.iodepth) {
		log_err("nvmed: sq_entries=%u is below iodepth=%u\n", entries, td->o.iodepth);
		return 1;
	}
	d = calloc(1, sizeof(*d));
	if (!d)
		return 1;
	d->entries = td->o.iodepth;
	d->queued = calloc(d->entries, sizeof(*d->queued));
	d->events = calloc(d->entries, sizeof(*d->events));
	d->cqes = calloc(d->entries, sizeof(*d->cqes));
	if (!d->queued || !d->events || !d->cqes ||
	    open_ring(td, td->files[0]->file_name, entries, &d->ring, &d->ns)) {
		free(d->queued);
		free(d->events);
		free(d->cqes);
		free(d);
		return 1;
	}
	td->io_ops_data = d;
	return 0;
}

static void fio_nvmed_cleanup(struct thread_data *td)
{
	struct nvmed_fio_data *d = td->io_ops_data;

	if (!d)
		return;
	nvmed_close(d->ring);
	free(d->queued);
	free(d->events);
	free(d->cqes);
	free(d);
	td->io_ops_data = NULL;
}

/* fio's I/O buffers: one memfd per job, registered with the broker (zero copy). */
static int fio_nvmed_iomem_alloc(struct thread_data *td, size_t total_mem)
{
	struct nvmed_fio_data *d = td->io_ops_data;

	if (!d)
		return 1;
	if (nvmed_buffer_alloc(d->ring, total_mem, &d->iomem)) {
		log_err("nvmed: registering %zu bytes of I/O buffers: %s\n", total_mem, nvmed_last_error());
		return 1;
	}
	d->have_iomem = 1;
	td->orig_buffer = d->iomem.addr;
	return 0;
}

static void fio_nvmed_iomem_free(struct thread_data *td)
{
	struct nvmed_fio_data *d = td->io_ops_data;

	if (d && d->have_iomem) {
		if (nvmed_buffer_unregister(d->ring, d->iomem.id))
			log_err("nvmed: unregistering the I/O buffers: %s\n", nvmed_last_error());
		d->have_iomem = 0;
	}
	td->orig_buffer = NULL;
}

static int fio_nvmed_get_file_size(struct thread_data *td, struct fio_file *f)
{
	struct nvmed_fio_data *d = td->io_ops_data;
	nvmed_namespace ns;

	if (fio_file_size_known(f))
		return 0;
	if (d) {
		ns = d->ns;
	} else {
		/* fio sizes files before the job starts (and before ->init): ask on a short-lived
		 * session of our own. */
		nvmed_ring *ring = NULL;
		if (open_ring(td, f->file_name, 0, &ring, &ns))
			return 1;
		nvmed_close(ring);
	}
	f->real_file_size = ns.size_bytes;
	fio_file_set_size_known(f);
	return 0;
}

static int fio_nvmed_open_file(struct thread_data *td, struct fio_file *f)
{
	return 0;
}

static int fio_nvmed_close_file(struct thread_data *td, struct fio_file *f)
{
	return 0;
}

/* unlink=1 must not delete the broker's socket (fio's default unlinks the file name). */
static int fio_nvmed_unlink_file(struct thread_data *td, struct fio_file *f)
{
	return 0;
}

/* errno for a request nvmed_prep_* refused (nvmed_last_error has the words). */
static int prep_errno(int rc)
{
	switch (rc) {
	case NVMED_E_BROKER_GONE:
		return ENOTCONN;
	case NVMED_E_RING_FAULTED:
	case NVMED_E_PANIC:
		return EIO;
	case NVMED_E_NO_NAMESPACE:
		return ENODEV;
	default:
		return EINVAL;
	}
}

static enum fio_q_status fio_nvmed_queue(struct thread_data *td, struct io_u *io_u)
{
	struct nvmed_fio_data *d = td->io_ops_data;
	uint64_t ud = (uint64_t)(uintptr_t)io_u;
	uint64_t buf_off = 0;
	int rc;

	fio_ro_check(td, io_u);
	if (d->nr_queued == d->entries)
		return FIO_Q_BUSY;
	io_u->engine_data = NULL;
	if (io_u->ddir == DDIR_READ || io_u->ddir == DDIR_WRITE) {
		char *base = d->iomem.addr;
		char *p = io_u->xfer_buf;
		if (!d->have_iomem || p < base || p + io_u->xfer_buflen > base + d->iomem.len) {
			log_err("nvmed: I/O buffer %p is not in the registered iomem\n", io_u->xfer_buf);
			io_u->error = EFAULT;
			return FIO_Q_COMPLETED;
		}
		buf_off = (uint64_t)(p - base);
	}
	if (io_u->xfer_buflen > UINT32_MAX) {
		log_err("nvmed: a request of %llu bytes is above 4 GiB - 1\n", io_u->xfer_buflen);
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	switch (io_u->ddir) {
	case DDIR_READ:
		rc = nvmed_prep_read(d->ring, d->ns.nsid, io_u->offset, (uint32_t)io_u->xfer_buflen, d->iomem.id,
				     buf_off, ud);
		break;
	case DDIR_WRITE:
		rc = nvmed_prep_write(d->ring, d->ns.nsid, io_u->offset, (uint32_t)io_u->xfer_buflen,
				      d->iomem.id, buf_off, ud, 0);
		break;
	case DDIR_TRIM:
		rc = nvmed_prep_deallocate(d->ring, d->ns.nsid, io_u->offset, (uint32_t)io_u->xfer_buflen, ud);
		break;
	case DDIR_SYNC:
	case DDIR_DATASYNC:
	case DDIR_SYNC_FILE_RANGE:
		rc = nvmed_prep_flush(d->ring, d->ns.nsid, ud);
		break;
	default:
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	if (rc == NVMED_E_SQ_FULL)
		return FIO_Q_BUSY;
	if (rc) {
		log_err("nvmed: %s\n", nvmed_last_error());
		io_u->error = prep_errno(rc);
		return FIO_Q_COMPLETED;
	}
	d->queued[d->nr_queued++] = io_u;
	return FIO_Q_QUEUED;
}

static int fio_nvmed_commit(struct thread_data *td)
{
	struct nvmed_fio_data *d = td->io_ops_data;
	struct timespec now;
	int rc;

	if (!d->nr_queued)
		return 0;
	rc = nvmed_submit(d->ring);
	if (rc < 0) {
		log_err("nvmed: submit: %s\n", nvmed_last_error());
		td_verror(td, EIO, "nvmed_submit");
		return -EIO;
	}
	if (fio_fill_issue_time(td)) {
		fio_gettime(&now, NULL);
		for (unsigned int i = 0; i < d->nr_queued; i++) {
			memcpy(&d->queued[i]->issue_time, &now, sizeof(now));
			io_u_queued(td, d->queued[i]);
		}
	}
	io_u_mark_submit(td, d->nr_queued);
	d->nr_queued = 0;
	return 0;
}

/* errno for a failed completion's status word (nvmed_status_string has the words). */
static int status_errno(uint32_t status)
{
	switch (status) {
	case NVMED_STATUS_NOT_PERMITTED: /* e.g. a grant made read-only meanwhile */
		return EPERM;
	case NVMED_STATUS_OUT_OF_RANGE:
	case NVMED_STATUS_MISALIGNED:
	case NVMED_STATUS_TOO_LARGE:
	case NVMED_STATUS_INVALID_NAMESPACE:
		return EINVAL;
	case NVMED_STATUS_DEVICE_GONE:
		return ENODEV;
	default:
		return EIO;
	}
}

static int fio_nvmed_getevents(struct thread_data *td, unsigned int min, unsigned int max,
			       const struct timespec *t)
{
	struct nvmed_fio_data *d = td->io_ops_data;
	struct nvmed_fio_options *o = td->eo;
	int64_t timeout_us = t ? (int64_t)t->tv_sec * 1000000 + t->tv_nsec / 1000 : -1;
	unsigned int got = 0;
	int n;

	if (max > d->entries)
		max = d->entries;
	if (min > max)
		min = max;
	struct timespec begin;

	if (o->busy_poll && t)
		clock_gettime(CLOCK_MONOTONIC, &begin);
	do {
		if (o->busy_poll)
			n = nvmed_poll(d->ring, d->cqes + got, max - got);
		else
			n = nvmed_wait(d->ring, d->cqes + got, max - got, min > got ? min - got : 0, timeout_us);
		if (n == NVMED_E_TIMEOUT)
			break;
		if (n < 0 && got) {
			/* Hand fio what was reaped; the error comes again on the next call. */
			break;
		}
		if (n < 0) {
			log_err("nvmed: reaping completions: %s\n", nvmed_last_error());
			td_verror(td, EIO, "nvmed_wait");
			return -EIO;
		}
		got += (unsigned int)n;
		if (o->busy_poll && t && got < min) {
			/* Polling still ends when fio's timeout does. */
			struct timespec now;

			clock_gettime(CLOCK_MONOTONIC, &now);
			if ((int64_t)(now.tv_sec - begin.tv_sec) * 1000000 + (now.tv_nsec - begin.tv_nsec) / 1000 >=
			    timeout_us)
				break;
		}
	} while (got < min && !(t && !o->busy_poll));

	for (unsigned int i = 0; i < got; i++) {
		struct io_u *io_u = (struct io_u *)(uintptr_t)d->cqes[i].user_data;
		if (d->cqes[i].status) {
			io_u->error = status_errno(d->cqes[i].status);
			/* Kept for ->errdetails, which prints nvmed's words for it. */
			io_u->engine_data = (void *)(uintptr_t)d->cqes[i].status;
			io_u->resid = io_u->xfer_buflen;
		} else {
			io_u->error = 0;
			io_u->resid = io_u->xfer_buflen - d->cqes[i].result;
			if (io_u->ddir != DDIR_READ && io_u->ddir != DDIR_WRITE)
				io_u->resid = 0;
		}
		d->events[i] = io_u;
	}
	return (int)got;
}

static struct io_u *fio_nvmed_event(struct thread_data *td, int event)
{
	struct nvmed_fio_data *d = td->io_ops_data;

	return d->events[event];
}

/* nvmed's description of a failed request (fio prints it after its own "io_u error" line).
 * fio 3.38 (ioengine ops version 36) passes the thread too. */
#if FIO_IOOPS_VERSION >= 36
static char *fio_nvmed_errdetails(struct thread_data *td, struct io_u *io_u)
#else
static char *fio_nvmed_errdetails(struct io_u *io_u)
#endif
{
	uint32_t status = (uint32_t)(uintptr_t)io_u->engine_data;
	char text[256];
	char *msg = malloc(320);

	if (!msg)
		return NULL;
	if (status) {
		nvmed_status_string(status, text, sizeof(text));
		snprintf(msg, 320, "nvmed: %s", text);
	} else {
		snprintf(msg, 320, "nvmed: %s", strerror(io_u->error));
	}
	return msg;
}

struct ioengine_ops ioengine = {
	.name = "nvmed",
	.version = FIO_IOOPS_VERSION,
	.flags = FIO_DISKLESSIO | FIO_NOEXTEND | FIO_NODISKUTIL,
	.init = fio_nvmed_init,
	.cleanup = fio_nvmed_cleanup,
	.queue = fio_nvmed_queue,
	.commit = fio_nvmed_commit,
	.getevents = fio_nvmed_getevents,
	.event = fio_nvmed_event,
	.errdetails = fio_nvmed_errdetails,
	.open_file = fio_nvmed_open_file,
	.close_file = fio_nvmed_close_file,
	.unlink_file = fio_nvmed_unlink_file,
	.get_file_size = fio_nvmed_get_file_size,
	.iomem_alloc = fio_nvmed_iomem_alloc,
	.iomem_free = fio_nvmed_iomem_free,
	.option_struct_size = sizeof(struct nvmed_fio_options),
	.options = options,
};
