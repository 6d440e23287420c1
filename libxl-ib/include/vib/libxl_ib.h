/* SPDX-License-Identifier: MIT */
/*
 * libxl-ib C API: vib devices of Xen domains, for toolstacks written in C
 * (the C++ API is vib/libxl_ib.hpp). No exception crosses this interface:
 * every function returns VIB_TK_OK (0) or a negative VIB_TK_ERR_* code, and
 * vib_tk_error() gives the message of the last failure on that handle.
 *
 * A handle is not thread-safe; use one per thread.
 */
#ifndef VIB_LIBXL_IB_H
#define VIB_LIBXL_IB_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VIB_TK_OK             0
#define VIB_TK_ERR_INVALID   (-1)  /* bad spec, argument or config file */
#define VIB_TK_ERR_NOT_FOUND (-2)  /* no such domain, device or file */
#define VIB_TK_ERR_EXISTS    (-3)  /* the device id is taken */
#define VIB_TK_ERR_TIMEDOUT  (-4)  /* the back-end did not answer in time */
#define VIB_TK_ERR_BACKEND   (-5)  /* the back-end or hotplug script reported an error */
#define VIB_TK_ERR_XENSTORE  (-6)  /* the store refused an operation */
#define VIB_TK_ERR_FAIL      (-7)  /* anything else (out of memory, ...) */

typedef struct vib_tk vib_tk;

/* Opens the real Xen's store (local_xen_dir == NULL), or the host-local
 * Xen served from local_xen_dir, acting as domain local_domid. On failure
 * *out is NULL; the message is written to errbuf if given. */
int vib_tk_open(vib_tk **out, const char *local_xen_dir, unsigned local_domid,
                char *errbuf, size_t errlen);
void vib_tk_close(vib_tk *tk);

/* The message of the last failure on tk ("" if none). Valid until the next
 * call on tk. */
const char *vib_tk_error(const vib_tk *tk);

/* Checks one vib= item without a handle; the message goes to errbuf. */
int vib_spec_check(const char *spec, char *errbuf, size_t errlen);

/* Domain name or id -> id. */
int vib_tk_resolve_domain(vib_tk *tk, const char *domain, unsigned *domid_out);

/* Adds a device described by spec to a running domain and waits up to
 * timeout_ms for the back-end (0: do not wait). devid_out may be NULL. */
int vib_tk_attach(vib_tk *tk, unsigned domid, const char *spec, unsigned timeout_ms, unsigned *devid_out);

/* Removes a device: gracefully, forcibly after timeout_ms, or at once with
 * force. *forced_out (may be NULL) tells whether the back-end was bypassed. */
int vib_tk_detach(vib_tk *tk, unsigned domid, unsigned devid, int force, unsigned timeout_ms, int *forced_out);

/* The devices of a domain as the JSON of `xl vib-list --json`; free *json_out
 * with free(). */
int vib_tk_list_json(vib_tk *tk, unsigned domid, char **json_out);

/* Attaches every vib= item of an xl config to a just-created domain without
 * waiting. count_out (may be NULL) gets the number of devices attached (0
 * when the domain was provisioned before). */
int vib_tk_provision(vib_tk *tk, unsigned domid, const char *config_text, unsigned *count_out);

/* The same from the config xl saved in userdata_dir (NULL: /var/lib/xen),
 * waiting up to wait_ms for the file to appear. */
int vib_tk_provision_domain(vib_tk *tk, unsigned domid, const char *userdata_dir, unsigned wait_ms,
                            unsigned *count_out);

/* Removes the devices of domains that no longer exist. */
int vib_tk_cleanup(vib_tk *tk, unsigned *removed_out);

#ifdef __cplusplus
}
#endif

#endif /* VIB_LIBXL_IB_H */
