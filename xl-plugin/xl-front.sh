#!/bin/sh
# xl front for vib: `xl vib-attach|vib-detach|vib-list ...` run the vib
# toolstack (xl-vib); every other command line goes to Xen's own xl,
# untouched (same arguments, same exit code, exec'd so signals and the
# terminal are xl's). `xl create` first has xl-vib check the config's vib=
# lines and keep them for vibd (xl keeps no copy of lines it does not
# know), then runs Xen's xl create as is; `xl migrate` first has xl-vib
# send that kept config to the target host. The vib-backend package installs
# it as /usr/sbin/xl (Xen's is diverted); from a source install, put it
# ahead of the real xl in PATH, or alias xl to it. VIB_REAL_XL and
# VIB_XL_VIB override the two paths (tests, unusual installs).
#
# Xen's xl takes only argument-less global flags before the subcommand
# (-v, -f, -N, -t, -T), so the first word not starting with '-' is the
# subcommand.

real_xl="${VIB_REAL_XL:-@VIB_REAL_XL@}"
xl_vib="${VIB_XL_VIB:-@VIB_XL_VIB@}"

subcommand=
for arg in "$@"; do
    case "$arg" in
        --) break ;;
        -*) ;;
        *) subcommand="$arg"; break ;;
    esac
done

case "$subcommand" in
    vib-*)
        # xl's global flags mean nothing to xl-vib; the subcommand and its
        # arguments go through unchanged.
        while [ $# -gt 0 ]; do
            case "$1" in
                -*) shift ;;
                *) break ;;
            esac
        done
        exec "$xl_vib" "$@"
        ;;
esac

if [ "$subcommand" = create ] || [ "$subcommand" = migrate ]; then
    # xl's global flags (argument-less: -v -f -N -t -T) stay for Xen's xl;
    # the subcommand's own arguments are everything after it. create keeps
    # the config's vib= lines here; migrate sends them to the target host
    # (xl's migration stream does not carry them).
    globals=
    while [ $# -gt 0 ]; do
        arg="$1"
        shift
        [ "$arg" = "$subcommand" ] && break
        globals="$globals $arg"
    done
    "$xl_vib" "vib-$subcommand-hook" ${VIB_STASH_DIR:+--stash-dir "$VIB_STASH_DIR"} -- "$@" || exit $?
    # shellcheck disable=SC2086 # the flags are single words, split on purpose
    set -- $globals "$subcommand" "$@"
fi

if [ ! -e "$real_xl" ]; then
    echo "xl: Xen's xl ($real_xl) is not installed (package xen-utils-common)" >&2
    exit 127
fi
# Installed *as* the real xl's path, this would exec itself forever.
self=$(readlink -f "$0" 2>/dev/null)
if [ -n "$self" ] && [ "$(readlink -f "$real_xl" 2>/dev/null)" = "$self" ]; then
    echo "xl (vib front): $real_xl is this script; set VIB_REAL_XL to Xen's xl" >&2
    exit 1
fi
exec "$real_xl" "$@"
