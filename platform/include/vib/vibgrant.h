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

#endif /* VIB_VIBGRANT_H */
