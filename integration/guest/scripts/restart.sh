# Gateway restarts under a mounted guest (guest_restart.rs). Runs in /mnt.
# The host restarts the gateway at each step: SIGTERM + start ("graceful"),
# then kill -9 + start ("kill9") while the guest is reading. Afterwards the
# same mount must go on working: no ESTALE for the cwd, for an open file or
# for names looked up before, and files never read before must be fetched.
dropc() { sync; echo 3 > /proc/sys/vm/drop_caches; }
sum() { md5sum | cut -c1-32; }

cd keep || fail "cd keep"
exec 4< open.bin || fail "open open.bin"
kv before_a "$(sum < a.bin)"
ls -l > /tmp/ls.0 || fail "ls -l"

# A reader in the background across the kill -9: every pass must succeed.
reader() {
  i=0
  while [ $i -lt "$BG_PASSES" ]; do
    dropc
    if r=$(within 120 md5sum < ../large.bin); then echo "${r%% *}"; else echo "ERR $?"; fi
    i=$((i + 1))
  done > /tmp/bg.out 2>&1
}

for phase in graceful kill9; do
  [ $phase = kill9 ] && { reader & bg=$!; }
  step "$phase"
  t=$(now)
  dropc
  kv ${phase}_a "$(within 120 cat a.bin | sum)"
  kv ${phase}_first_secs "$(since "$t")"
  kv ${phase}_new "$(within 60 cat new-$phase.bin | sum)"
  kv ${phase}_fd "$(within 60 cat /proc/self/fd/4 | sum)"
  ls -l > /tmp/ls.1 2>&1
  kv ${phase}_ls "$(cmp -s /tmp/ls.0 /tmp/ls.1 && echo same || echo differs)"
  kv ${phase}_cwd "$(ls . | wc -l)"
  kv ${phase}_stat "$(stat -c %s a.bin 2>&1)"
  kv ${phase}_parent "$(ls .. | tr '\n' ' ')"
done
wait $bg
kv bg_passes "$(wc -l < /tmp/bg.out)"
kv bg_distinct "$(sort -u /tmp/bg.out | tr '\n' ' ')"
grep ERR /tmp/bg.out && fail "background reader failed across the kill -9"
kv errors "$(dmesg | grep -ci 'stale\|nfs.*error' || true)"
dmesg | grep -i nfs
exit 0
