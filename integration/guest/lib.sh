# Helpers for guest test scripts (sourced by /init before the script; busybox
# sh). The script runs with /mnt (the NFS mount) as its working directory;
# its output goes to the host. Lines starting with "@@IMZ:" are protocol:
#
#   @@IMZ:KV key=value   a result the host-side test asserts on (kv)
#   @@IMZ:STEP name      the guest waits here until the host answers with
#                        "@@IMZ:GO text" on the same serial line (step)
#   @@IMZ:T name=secs    a timing, guest uptime (the host prints them)
#   @@IMZ:RC n           the script's exit status (written by /init)

# Guest uptime in seconds (busybox date has no %N).
now() { cut -d' ' -f1 /proc/uptime; }

# Seconds elapsed since $1 (a `now` value), two decimals.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# kv KEY VALUE: report a result to the host.
kv() { echo "@@IMZ:KV $1=$2"; }

# step NAME: tell the host we reached NAME and wait until it says go; the
# host's text (possibly empty) is left in $REPLY_TEXT.
step() {
  echo "@@IMZ:STEP $1"
  IFS= read -r _imz_reply <&3 || { echo "imz-guest: host channel closed at step $1"; exit 98; }
  case $_imz_reply in
    "@@IMZ:GO"*) REPLY_TEXT=${_imz_reply#@@IMZ:GO}; REPLY_TEXT=${REPLY_TEXT# } ;;
    *) echo "imz-guest: unexpected reply at step $1: $_imz_reply"; exit 97 ;;
  esac
}

# timing NAME: report guest uptime as a named timing.
timing() { echo "@@IMZ:T $1=$(now)"; }

# fail MESSAGE: stop the script with a message the host shows.
fail() { echo "FAIL: $*"; exit 1; }

# check DESCRIPTION COMMAND...: run COMMAND, fail with DESCRIPTION if it fails.
check() {
  _imz_what=$1; shift
  "$@" || fail "$_imz_what (exit $?): $*"
}

# within SECONDS COMMAND...: run COMMAND with a time limit; exit 124 on timeout.
within() { _imz_t=$1; shift; timeout "$_imz_t" "$@"; }
