#!/bin/sh
# Pick kernel modules, with what they depend on, for a guest initramfs.
#
#   tools/traces/modules.sh MODULE_TREE LOAD_ORDER MODULE...
#
# MODULE_TREE is a lib/modules/VERSION directory (tools/guest/kernel.sh --modules). Writes the
# module names in load order (every module after what it depends on, from the .modinfo
# "depends=" of each .ko) to LOAD_ORDER, and prints one FILE=PATH_IN_GUEST per module
# (/lib/modules/NAME.ko) and one for the list (/lib/modules/load-order), the extra-file
# arguments of tools/guest/initramfs.sh.
set -eu

die() { echo "modules.sh: $*" >&2; exit 1; }

[ $# -ge 3 ] || die "usage: modules.sh MODULE_TREE LOAD_ORDER MODULE..."
tree=$1
order=$2
shift 2
[ -d "$tree/kernel" ] || die "$tree: not a lib/modules/VERSION directory"
: >"$order"

ko_of() { # NAME: the module's file (its name may use - for _)
    file=$(find "$tree/kernel" \( -name "$1.ko" -o -name "$(echo "$1" | tr _ -).ko" \) | head -n 1)
    [ -n "$file" ] || die "no module $1 in $tree"
    echo "$file"
}

add_module() { # NAME: depth first, every module after what it depends on
    grep -qx "$1" "$order" && return 0
    # POSIX sh has no local variables: $file and $deps are read again after the recursion
    file=$(ko_of "$1")
    deps=$(tr '\0' '\n' <"$file" | sed -n 's/^depends=//p' | tr , ' ')
    for dep in $deps; do
        add_module "$dep"
    done
    grep -qx "$1" "$order" || {
        file=$(ko_of "$1")
        echo "$1" >>"$order"
        echo "$file=/lib/modules/$1.ko"
    }
}

for m in "$@"; do add_module "$m"; done
echo "$order=/lib/modules/load-order"
