// SPDX-License-Identifier: (GPL-2.0 OR MIT)
/*
 * vibgrant: grants a range of the calling process's own pages, where they
 * are, to another domain (vib's back-end), so that registering memory never
 * copies or moves the application's pages (docs/frontend.md, issue 13).
 *
 * Each GRANT ioctl pins the pages long-term (as an RDMA device driver pins a
 * user memory region: FOLL_LONGTERM, FOLL_WRITE only when the grantee may
 * write, counted in the process's pinned_vm against RLIMIT_MEMLOCK unless it
 * has CAP_IPC_LOCK), grants each 4 KiB frame and returns the refs. RELEASE,
 * or closing the file (which process exit does), ends the grants and unpins.
 * A grant the other side still maps when it is ended keeps its page
 * referenced until Xen reports it unused (gnttab_end_foreign_access), so a
 * page is never reused while a remote domain can still reach it.
 *
 * The same file binds event channels (VIBGRANT_IOCTL_EVTCHN_*, read, poll)
 * like /dev/xen/evtchn, with one difference that matters: its bindings
 * outlive a save/restore of the guest harmlessly, where closing a port of
 * /dev/xen/evtchn bound before the restore hits a BUG_ON in Linux.
 *
 * The caller is untrusted: sizes, counts and addresses are bounded
 * (VIBGRANT_MAX_PAGES per set, VIBGRANT_MAX_SETS per file, RLIMIT_MEMLOCK
 * per process), and every failure leaves nothing granted or pinned.
 *
 * Interface: vib/vibgrant.h (shared with libvib's platform layer).
 */
#define pr_fmt(fmt) "vibgrant: " fmt

#include <linux/capability.h>
#include <linux/fs.h>
#include <linux/interrupt.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/wait.h>
#include <linux/xarray.h>

#include <asm/xen/hypercall.h>
#include <xen/events.h>
#include <xen/grant_table.h>
#include <xen/interface/event_channel.h>
#include <xen/page.h>
#include <xen/xen.h>

#include <vib/vibgrant.h>

/* Pages pinned per pin_user_pages_fast call (and between reschedules). */
#define VIBGRANT_PIN_CHUNK 512

static atomic64_t vibgrant_grants_held = ATOMIC64_INIT(0);

/* One GRANT's pages: pinned, each granted to `domid`. */
struct vibgrant_set {
	struct mm_struct *mm; /* whose pinned_vm holds the pages (mmgrab-ed) */
	struct page **pages;
	grant_ref_t *refs;
	unsigned long npages;
	bool writable;
};

struct vibgrant_file;

/* One event channel bound through a file. `irq` is kept rather than looked
 * up by port: after a restore the port number means nothing (Xen may give it
 * to another binding), while the irq stays ours until we free it, and
 * Linux's resume has already cut it from any event channel. */
struct vibgrant_evtchn {
	struct vibgrant_file *file;
	evtchn_port_t port;
	int irq;
	bool notify_on_close; /* VIBGRANT_EVTCHN_NOTIFY_ON_CLOSE */
	bool masked; /* raised, and not unmasked since (the irq awaits its EOI) */
	bool queued; /* in file->ev_ring */
};

/* An open file: its sets, by handle, and its event channels, by port. */
struct vibgrant_file {
	struct xarray sets;
	atomic64_t pinned_pages;

	struct mutex ev_mutex; /* bind, unbind, and every lookup of ev_bindings */
	struct xarray ev_bindings;
	unsigned int ev_count;
	spinlock_t ev_lock; /* the ring and each binding's masked/queued */
	wait_queue_head_t ev_wait;
	/* Raised bindings not yet read; each at most once, so never more
	 * than VIBGRANT_MAX_EVTCHNS (a power of two) entries. */
	struct vibgrant_evtchn *ev_ring[VIBGRANT_MAX_EVTCHNS];
	unsigned int ev_prod, ev_cons;
};

/* Counts `npages` in mm's pinned_vm if RLIMIT_MEMLOCK allows (as RDMA's
 * user memory registration does); -ENOMEM otherwise. */
static int vibgrant_charge(struct mm_struct *mm, unsigned long npages)
{
	unsigned long limit = rlimit(RLIMIT_MEMLOCK) >> PAGE_SHIFT;
	s64 pinned = atomic64_add_return(npages, &mm->pinned_vm);

	if (pinned > limit && !capable(CAP_IPC_LOCK)) {
		atomic64_sub(npages, &mm->pinned_vm);
		return -ENOMEM;
	}
	return 0;
}

/* Ends the grants of the set's first `granted` pages and unpins its first
 * `pinned` pages. A grant still mapped by the grantee takes a page
 * reference that Xen's deferred release drops once the grant is unused. */
static void vibgrant_undo(struct vibgrant_set *set, unsigned long granted, unsigned long pinned)
{
	unsigned long i;

	for (i = 0; i < granted; i++) {
		get_page(set->pages[i]);
		gnttab_end_foreign_access(set->refs[i], set->pages[i]);
		if (i % VIBGRANT_PIN_CHUNK == VIBGRANT_PIN_CHUNK - 1)
			cond_resched();
	}
	atomic64_sub(granted, &vibgrant_grants_held);
	if (pinned)
		unpin_user_pages_dirty_lock(set->pages, pinned, set->writable);
}

static void vibgrant_free(struct vibgrant_set *set)
{
	kvfree(set->refs);
	kvfree(set->pages);
	kfree(set);
}

/* Ends a complete set and gives its pages back to the process's limit. */
static void vibgrant_release_set(struct vibgrant_file *file, struct vibgrant_set *set)
{
	vibgrant_undo(set, set->npages, set->npages);
	atomic64_sub(set->npages, &set->mm->pinned_vm);
	atomic64_sub(set->npages, &file->pinned_pages);
	mmdrop(set->mm);
	vibgrant_free(set);
}

static int vibgrant_pin(struct vibgrant_set *set, unsigned long start, unsigned long *pinned)
{
	unsigned int gup_flags = FOLL_LONGTERM | (set->writable ? FOLL_WRITE : 0);

	while (*pinned < set->npages) {
		int n = min_t(unsigned long, set->npages - *pinned, VIBGRANT_PIN_CHUNK);
		int got = pin_user_pages_fast(start + *pinned * PAGE_SIZE, n, gup_flags,
					      set->pages + *pinned);

		if (got <= 0)
			return got ? got : -EFAULT;
		*pinned += got;
		if (fatal_signal_pending(current))
			return -EINTR;
		cond_resched();
	}
	return 0;
}

static int vibgrant_grant_all(struct vibgrant_set *set, domid_t domid, unsigned long *granted)
{
	while (*granted < set->npages) {
		struct page *page = set->pages[*granted];
		int ref = gnttab_grant_foreign_access(domid, xen_page_to_gfn(page), !set->writable);

		if (ref < 0)
			return ref; /* -ENOSPC: this guest's grant table is full */
		set->refs[*granted] = ref;
		++*granted;
		atomic64_inc(&vibgrant_grants_held);
		if (*granted % VIBGRANT_PIN_CHUNK == 0)
			cond_resched();
	}
	return 0;
}

static long vibgrant_ioctl_grant(struct vibgrant_file *file, void __user *arg)
{
	struct vibgrant_grant g;
	struct vibgrant_set *set;
	unsigned long pinned = 0, granted = 0, bytes;
	u32 handle;
	int err;

	if (copy_from_user(&g, arg, sizeof(g)))
		return -EFAULT;
	if (g.flags & ~VIBGRANT_WRITABLE)
		return -EINVAL;
	if (g.pages == 0 || g.pages > VIBGRANT_MAX_PAGES || !PAGE_ALIGNED(g.start) ||
	    check_mul_overflow((unsigned long)g.pages, PAGE_SIZE, &bytes) ||
	    !access_ok(u64_to_user_ptr(g.start), bytes))
		return -EINVAL;
	if (g.domid >= DOMID_FIRST_RESERVED)
		return -EINVAL;
	if (!access_ok(u64_to_user_ptr(g.refs), g.pages * sizeof(u32)))
		return -EFAULT;

	set = kzalloc(sizeof(*set), GFP_KERNEL_ACCOUNT);
	if (!set)
		return -ENOMEM;
	set->npages = g.pages;
	set->writable = g.flags & VIBGRANT_WRITABLE;
	set->pages = kvcalloc(set->npages, sizeof(*set->pages), GFP_KERNEL_ACCOUNT);
	set->refs = kvcalloc(set->npages, sizeof(*set->refs), GFP_KERNEL_ACCOUNT);
	if (!set->pages || !set->refs) {
		vibgrant_free(set);
		return -ENOMEM;
	}
	set->mm = current->mm;
	err = vibgrant_charge(set->mm, set->npages);
	if (err) {
		vibgrant_free(set);
		return err;
	}
	mmgrab(set->mm);

	err = vibgrant_pin(set, g.start, &pinned);
	if (!err)
		err = vibgrant_grant_all(set, g.domid, &granted);
	if (!err && copy_to_user(u64_to_user_ptr(g.refs), set->refs, set->npages * sizeof(u32)))
		err = -EFAULT;
	if (!err)
		err = xa_alloc(&file->sets, &handle, set, XA_LIMIT(1, VIBGRANT_MAX_SETS), GFP_KERNEL_ACCOUNT);
	if (err) {
		if (err == -EBUSY)
			err = -EMFILE; /* VIBGRANT_MAX_SETS sets on this file already */
		vibgrant_undo(set, granted, pinned);
		atomic64_sub(set->npages, &set->mm->pinned_vm);
		mmdrop(set->mm);
		vibgrant_free(set);
		return err;
	}
	atomic64_add(set->npages, &file->pinned_pages);

	g.handle = handle;
	if (copy_to_user(arg, &g, sizeof(g))) {
		/* Unless another thread guessed the handle and released it. */
		set = xa_erase(&file->sets, handle);
		if (set)
			vibgrant_release_set(file, set);
		return -EFAULT;
	}
	return 0;
}

static long vibgrant_ioctl_release(struct vibgrant_file *file, void __user *arg)
{
	struct vibgrant_release r;
	struct vibgrant_set *set;

	if (copy_from_user(&r, arg, sizeof(r)))
		return -EFAULT;
	if (r.handle == 0 || r.handle > VIBGRANT_MAX_SETS)
		return -ENOENT;
	set = xa_erase(&file->sets, (unsigned long)r.handle);
	if (!set)
		return -ENOENT;
	vibgrant_release_set(file, set);
	return 0;
}

static long vibgrant_ioctl_info(struct vibgrant_file *file, void __user *arg)
{
	struct vibgrant_info info = {
		.grants_held = atomic64_read(&vibgrant_grants_held),
		/* Version 1 entries: 8 bytes each in a 4 KiB frame. */
		.grants_total = (u64)gnttab_max_grant_frames() * (XEN_PAGE_SIZE / sizeof(struct grant_entry_v1)),
		.pinned_pages = atomic64_read(&file->pinned_pages),
	};

	return copy_to_user(arg, &info, sizeof(info)) ? -EFAULT : 0;
}

static irqreturn_t vibgrant_evtchn_interrupt(int irq, void *data)
{
	struct vibgrant_evtchn *ev = data;
	struct vibgrant_file *file = ev->file;
	unsigned long flags;

	spin_lock_irqsave(&file->ev_lock, flags);
	ev->masked = true;
	if (!ev->queued) {
		ev->queued = true;
		file->ev_ring[file->ev_prod++ % VIBGRANT_MAX_EVTCHNS] = ev;
	}
	spin_unlock_irqrestore(&file->ev_lock, flags);
	wake_up_interruptible(&file->ev_wait);
	return IRQ_HANDLED;
}

/* Called with ev_mutex held. unbind_from_irqhandler waits for a handler
 * still running and closes the port, unless a restore has already cut it
 * loose. */
static void vibgrant_evtchn_unbind(struct vibgrant_file *file, struct vibgrant_evtchn *ev)
{
	unsigned long flags;
	unsigned int i, kept;

	xa_erase(&file->ev_bindings, ev->port);
	unbind_from_irqhandler(ev->irq, ev);
	spin_lock_irqsave(&file->ev_lock, flags);
	if (ev->queued) {
		for (i = kept = file->ev_cons; i != file->ev_prod; i++) {
			struct vibgrant_evtchn *other = file->ev_ring[i % VIBGRANT_MAX_EVTCHNS];

			if (other != ev)
				file->ev_ring[kept++ % VIBGRANT_MAX_EVTCHNS] = other;
		}
		file->ev_prod = kept;
	}
	spin_unlock_irqrestore(&file->ev_lock, flags);
	file->ev_count--;
	kfree(ev);
}

static long vibgrant_ioctl_evtchn_bind(struct vibgrant_file *file, void __user *arg)
{
	struct vibgrant_evtchn_bind b;
	struct vibgrant_evtchn *ev, *stale;
	struct evtchn_close close;
	evtchn_port_t port;
	int err, irq;

	if (copy_from_user(&b, arg, sizeof(b)))
		return -EFAULT;
	if ((b.flags & ~VIBGRANT_EVTCHN_NOTIFY_ON_CLOSE) || b.remote_domid >= DOMID_FIRST_RESERVED)
		return -EINVAL;

	mutex_lock(&file->ev_mutex);
	if (file->ev_count >= VIBGRANT_MAX_EVTCHNS) {
		err = -EMFILE;
		goto out;
	}
	if (b.remote_port) {
		struct evtchn_bind_interdomain op = {
			.remote_dom = b.remote_domid,
			.remote_port = b.remote_port,
		};

		err = HYPERVISOR_event_channel_op(EVTCHNOP_bind_interdomain, &op);
		port = op.local_port;
	} else {
		struct evtchn_alloc_unbound op = {
			.dom = DOMID_SELF,
			.remote_dom = b.remote_domid,
		};

		err = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, &op);
		port = op.port;
	}
	if (err)
		goto out;

	/* A binding of this file from before a restore may carry the number
	 * Xen has just handed out again: it is dead, so it goes. */
	stale = xa_load(&file->ev_bindings, port);
	if (stale)
		vibgrant_evtchn_unbind(file, stale);

	err = -ENOMEM;
	ev = kzalloc(sizeof(*ev), GFP_KERNEL_ACCOUNT);
	if (!ev)
		goto close_port;
	ev->file = file;
	ev->port = port;
	ev->notify_on_close = b.flags & VIBGRANT_EVTCHN_NOTIFY_ON_CLOSE;
	err = xa_insert(&file->ev_bindings, port, ev, GFP_KERNEL_ACCOUNT);
	if (err) {
		kfree(ev);
		goto close_port;
	}
	/* Late EOI: a raised port stays masked until the caller unmasks it,
	 * so a guest's flood of events costs one interrupt per read. */
	irq = bind_evtchn_to_irqhandler_lateeoi(port, vibgrant_evtchn_interrupt, 0, "vibgrant", ev);
	if (irq < 0) {
		xa_erase(&file->ev_bindings, port);
		kfree(ev);
		err = irq;
		goto close_port;
	}
	ev->irq = irq;
	file->ev_count++;
	b.port = port;
	if (copy_to_user(arg, &b, sizeof(b))) {
		vibgrant_evtchn_unbind(file, ev);
		err = -EFAULT;
	}
	goto out;

close_port:
	close.port = port;
	if (HYPERVISOR_event_channel_op(EVTCHNOP_close, &close))
		pr_warn("cannot close event channel %u after a failed bind\n", port);
out:
	mutex_unlock(&file->ev_mutex);
	return err;
}

/* UNBIND, NOTIFY and UNMASK of one of the file's ports. Notifying and
 * unmasking a port that a restore left dead do nothing: Linux has cut its
 * irq from any event channel. */
static long vibgrant_ioctl_evtchn_port(struct vibgrant_file *file, unsigned int cmd, void __user *arg)
{
	struct vibgrant_evtchn_port p;
	struct vibgrant_evtchn *ev;
	unsigned long flags;
	bool was_masked;
	long err = 0;

	if (copy_from_user(&p, arg, sizeof(p)))
		return -EFAULT;
	mutex_lock(&file->ev_mutex);
	ev = xa_load(&file->ev_bindings, p.port);
	if (!ev) {
		err = -ENOENT;
	} else if (cmd == VIBGRANT_IOCTL_EVTCHN_UNBIND) {
		vibgrant_evtchn_unbind(file, ev);
	} else if (cmd == VIBGRANT_IOCTL_EVTCHN_NOTIFY) {
		notify_remote_via_irq(ev->irq);
	} else {
		spin_lock_irqsave(&file->ev_lock, flags);
		was_masked = ev->masked;
		ev->masked = false;
		spin_unlock_irqrestore(&file->ev_lock, flags);
		if (was_masked)
			xen_irq_lateeoi(ev->irq, 0);
	}
	mutex_unlock(&file->ev_mutex);
	return err;
}

static ssize_t vibgrant_read(struct file *filp, char __user *buf, size_t count, loff_t *ppos)
{
	struct vibgrant_file *file = filp->private_data;
	u32 ports[VIBGRANT_MAX_EVTCHNS];
	unsigned long flags;
	size_t n = 0;

	count /= sizeof(u32);
	if (count == 0)
		return 0;
	count = min_t(size_t, count, VIBGRANT_MAX_EVTCHNS);
	for (;;) {
		spin_lock_irqsave(&file->ev_lock, flags);
		while (n < count && file->ev_cons != file->ev_prod) {
			struct vibgrant_evtchn *ev = file->ev_ring[file->ev_cons++ % VIBGRANT_MAX_EVTCHNS];

			ev->queued = false;
			ports[n++] = ev->port;
		}
		spin_unlock_irqrestore(&file->ev_lock, flags);
		if (n)
			break;
		if (filp->f_flags & O_NONBLOCK)
			return -EAGAIN;
		if (wait_event_interruptible(file->ev_wait, READ_ONCE(file->ev_cons) != READ_ONCE(file->ev_prod)))
			return -ERESTARTSYS;
	}
	/* The ports read stay masked: a caller that loses them here has to
	 * unmask them to hear of them again. */
	if (copy_to_user(buf, ports, n * sizeof(u32)))
		return -EFAULT;
	return n * sizeof(u32);
}

static __poll_t vibgrant_poll(struct file *filp, poll_table *wait)
{
	struct vibgrant_file *file = filp->private_data;

	poll_wait(filp, &file->ev_wait, wait);
	return READ_ONCE(file->ev_cons) != READ_ONCE(file->ev_prod) ? EPOLLIN | EPOLLRDNORM : 0;
}

static long vibgrant_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	struct vibgrant_file *file = filp->private_data;

	switch (cmd) {
	case VIBGRANT_IOCTL_GRANT:
		return vibgrant_ioctl_grant(file, (void __user *)arg);
	case VIBGRANT_IOCTL_RELEASE:
		return vibgrant_ioctl_release(file, (void __user *)arg);
	case VIBGRANT_IOCTL_INFO:
		return vibgrant_ioctl_info(file, (void __user *)arg);
	case VIBGRANT_IOCTL_EVTCHN_BIND:
		return vibgrant_ioctl_evtchn_bind(file, (void __user *)arg);
	case VIBGRANT_IOCTL_EVTCHN_UNBIND:
	case VIBGRANT_IOCTL_EVTCHN_NOTIFY:
	case VIBGRANT_IOCTL_EVTCHN_UNMASK:
		return vibgrant_ioctl_evtchn_port(file, cmd, (void __user *)arg);
	default:
		return -ENOTTY;
	}
}

static int vibgrant_open(struct inode *inode, struct file *filp)
{
	struct vibgrant_file *file = kzalloc(sizeof(*file), GFP_KERNEL_ACCOUNT);

	if (!file)
		return -ENOMEM;
	xa_init_flags(&file->sets, XA_FLAGS_ALLOC1);
	mutex_init(&file->ev_mutex);
	xa_init(&file->ev_bindings);
	spin_lock_init(&file->ev_lock);
	init_waitqueue_head(&file->ev_wait);
	filp->private_data = file;
	return 0;
}

/* The last reference to the file (the process's exit included): every port
 * still bound is closed, telling its peer first if asked to, and every set
 * still held is ended and unpinned. */
static int vibgrant_close(struct inode *inode, struct file *filp)
{
	struct vibgrant_file *file = filp->private_data;
	struct vibgrant_evtchn *ev;
	struct vibgrant_set *set;
	unsigned long handle, port;

	mutex_lock(&file->ev_mutex);
	xa_for_each(&file->ev_bindings, port, ev) {
		/* A no-op for a port a restore left dead: Linux has cut the
		 * irq from any event channel. */
		if (ev->notify_on_close)
			notify_remote_via_irq(ev->irq);
		vibgrant_evtchn_unbind(file, ev);
	}
	mutex_unlock(&file->ev_mutex);
	xa_destroy(&file->ev_bindings);
	xa_for_each(&file->sets, handle, set) {
		xa_erase(&file->sets, handle);
		vibgrant_release_set(file, set);
	}
	xa_destroy(&file->sets);
	kfree(file);
	return 0;
}

static const struct file_operations vibgrant_fops = {
	.owner = THIS_MODULE,
	.open = vibgrant_open,
	.release = vibgrant_close,
	.read = vibgrant_read,
	.poll = vibgrant_poll,
	.llseek = no_llseek,
	.unlocked_ioctl = vibgrant_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

/* Any user may open it: a caller only ever grants its own pages, within its
 * own RLIMIT_MEMLOCK, as with /dev/infiniband/uverbs*. */
static struct miscdevice vibgrant_device = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "vibgrant",
	.nodename = "xen/vibgrant",
	.mode = 0666,
	.fops = &vibgrant_fops,
};

static int __init vibgrant_init(void)
{
	int err;

	if (!xen_domain())
		return -ENODEV;
	err = misc_register(&vibgrant_device);
	if (err)
		pr_err("cannot register /dev/xen/vibgrant: %d\n", err);
	return err;
}

static void __exit vibgrant_exit(void)
{
	misc_deregister(&vibgrant_device);
}

module_init(vibgrant_init);
module_exit(vibgrant_exit);

MODULE_DESCRIPTION("vib: grant a process's own pages, in place, to another Xen domain");
MODULE_AUTHOR("vib maintainers");
MODULE_LICENSE("Dual MIT/GPL");
