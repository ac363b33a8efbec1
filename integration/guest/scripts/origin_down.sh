# The origin goes away under a mounted guest (guest_origin_down.rs).
# Cached data must stay readable; uncached data must fail with EIO within a
# few seconds, and the guest must never hang; when the origin is back,
# the same mount reads everything again.
dropc() { sync; echo 3 > /proc/sys/vm/drop_caches; }
sum() { md5sum | cut -c1-32; }

# Fill the gateway's cache: one file read, a directory listed.
kv before_cached "$(sum < cached.bin)"
ls -l listed > /tmp/l0 || fail "ls -l listed"
ls -l > /dev/null

step origin-down
dropc
t=$(now)
kv during_cached "$(within 60 cat cached.bin | sum)"
kv during_cached_secs "$(since "$t")"
ls -l listed > /tmp/l1 2>&1
kv during_listed "$(cmp -s /tmp/l0 /tmp/l1 && echo same || echo differs)"
kv during_stat "$(within 60 stat -c %s uncached.bin 2>&1)"
t=$(now)
if within 60 cat uncached.bin > /dev/null 2> /tmp/err; then kv during_uncached "read ok"
else kv during_uncached "exit $? $(cat /tmp/err)"; fi
kv during_uncached_secs "$(since "$t")"
t=$(now)
# (busybox ls would show an empty directory: it ignores readdir errors)
r=$(within 60 imz-guest-fsx readdir unlisted 2>&1)
kv during_unlisted "exit $? $r"
kv during_unlisted_secs "$(since "$t")"

step origin-up
# Poll (bounded) until the uncached file reads again.
t=$(now)
ok=no
while [ "$(since "$t" | cut -d. -f1)" -lt 60 ]; do
  if within 60 cat uncached.bin > /tmp/u 2>/dev/null; then ok=yes; break; fi
  sleep 0.5
done
kv after_uncached "$ok $(sum < /tmp/u)"
kv after_secs "$(since "$t")"
kv after_unlisted "$(ls unlisted 2>&1 | tr '\n' ' ')"
kv after_cached "$(sum < cached.bin)"
