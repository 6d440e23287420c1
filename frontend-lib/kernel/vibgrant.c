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
 * The caller is untrusted: sizes, counts and addresses are bounded
 * (VIBGRANT_MAX_PAGES per set, VIBGRANT_MAX_SETS per file, RLIMIT_MEMLOCK
 * per process), and every failure leaves nothing granted or pinned.
 *
 * Interface: vib/vibgrant.h (shared with libvib's platform layer).
 */
#define pr_fmt(fmt) "vibgrant: " fmt

#include <linux/capability.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/xarray.h>

#include <xen/grant_table.h>
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

/* An open file: its sets, by handle. */
struct vibgrant_file {
	struct xarray sets;
	atomic64_t pinned_pages;
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
	filp->private_data = file;
	return 0;
}

/* The last reference to the file (the process's exit included): every set
 * still held is ended and unpinned. */
static int vibgrant_close(struct inode *inode, struct file *filp)
{
	struct vibgrant_file *file = filp->private_data;
	struct vibgrant_set *set;
	unsigned long handle;

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
