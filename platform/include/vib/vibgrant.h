/* SPDX-License-Identifier: (GPL-2.0 OR MIT) */
/*
 * The vibgrant guest kernel module's interface (/dev/xen/vibgrant): grant a
 * range of the caller's own pages, in place, to another domain. The module
 * pins the pages (long-term, counted against RLIMIT_MEMLOCK) and grants each
 * 4 KiB frame; releasing a set, or closing the file, ends the grants and
 * unpins. Shared by the module and libvib's platform layer.
 */
#ifndef VIB_VIBGRANT_H
#define VIB_VIBGRANT_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define VIBGRANT_DEVICE "/dev/xen/vibgrant"

#define VIBGRANT_WRITABLE (1u << 0) /* the grantee may write (pins FOLL_WRITE) */

/* Largest set one call grants (refs copied out in one go). */
#define VIBGRANT_MAX_PAGES (1u << 20)

struct vibgrant_grant {
	__u64 start;  /* in: page-aligned address in the caller */
	__u64 pages;  /* in: 4 KiB pages from start */
	__u64 refs;   /* in: address of __u32[pages] receiving the grant refs */
	__u32 domid;  /* in: the grantee */
	__u32 flags;  /* in: VIBGRANT_* */
	__u64 handle; /* out: names the set for VIBGRANT_IOCTL_RELEASE */
};

struct vibgrant_release {
	__u64 handle;
};

/* Most sets one open file may hold at once. */
#define VIBGRANT_MAX_SETS (1u << 16)

struct vibgrant_info {
	__u64 grants_held;   /* grants the module holds now, all files together */
	__u64 grants_total;  /* entries this guest's table can hold (max_grant_frames * 512) */
	__u64 pinned_pages;  /* pages this file has pinned */
};

#define VIBGRANT_IOCTL_GRANT _IOWR('V', 0x40, struct vibgrant_grant)
#define VIBGRANT_IOCTL_RELEASE _IOW('V', 0x41, struct vibgrant_release)
#define VIBGRANT_IOCTL_INFO _IOR('V', 0x42, struct vibgrant_info)

/*
 * Event channels, as /dev/xen/evtchn offers them, but safe across a save and
 * restore (or migration) of the guest: Linux's evtchn device BUGs when a port
 * bound before a restore is unbound after it, which every process holding one
 * does when it exits. Here a port bound before a restore is dead after it:
 * notifying or unmasking it does nothing, unbinding it only frees it, and
 * Xen may give its number to a new binding.
 *
 * read() returns pending ports as __u32s (at least one, or EAGAIN with
 * O_NONBLOCK); each stays masked until VIBGRANT_IOCTL_EVTCHN_UNMASK. poll()
 * reports POLLIN while a port is pending.
 */
#define VIBGRANT_MAX_EVTCHNS 64u /* bound on one open file at once */

struct vibgrant_evtchn_bind {
	__u32 remote_domid; /* in */
	__u32 remote_port;  /* in: that domain's unbound port, or 0 to allocate
			       a port remote_domid may bind to */
	__u32 port;         /* out: the local port */
	__u32 flags;        /* in: VIBGRANT_EVTCHN_* */
};

/* Notify the remote end when the file is closed with the port still bound:
 * the process exited or died without unbinding it. This is how the back-end
 * learns a process has gone (gntalloc's unmap notification can notify too,
 * but after a restore it would notify, and drop a reference to, whatever
 * port now carries the number). Not after a restore: the port is dead. */
#define VIBGRANT_EVTCHN_NOTIFY_ON_CLOSE (1u << 0)

struct vibgrant_evtchn_port {
	__u32 port;
};

#define VIBGRANT_IOCTL_EVTCHN_BIND _IOWR('V', 0x43, struct vibgrant_evtchn_bind)
#define VIBGRANT_IOCTL_EVTCHN_UNBIND _IOW('V', 0x44, struct vibgrant_evtchn_port)
#define VIBGRANT_IOCTL_EVTCHN_NOTIFY _IOW('V', 0x45, struct vibgrant_evtchn_port)
#define VIBGRANT_IOCTL_EVTCHN_UNMASK _IOW('V', 0x46, struct vibgrant_evtchn_port)

#endif /* VIB_VIBGRANT_H */
