# Writes while the origin is down (guest_write.rs): they must succeed in the
# guest (into the gateway's log), read back at once, and reach the origin
# when it returns. The host stops the origin at "origin-down" and starts it
# again at "origin-up", then waits until the origin's off/ matches WTREE.
sum() { md5sum | cut -c1-32; }
# Work offline on what is cached (Coda's rule): list off/ and read its files.
kv before "$(cat off/seed.txt)"
ls -l off > /dev/null
cat off/*.txt > /dev/null

step origin-down
echo offline > off/new.txt || fail "create while the origin is down"
echo appended >> off/seed.txt || fail "append to a cached file while the origin is down"
mkdir off/dir || fail "mkdir while the origin is down"
dd if=/dev/urandom of=off/dir/rand.bin bs=1024 count=300 2>/dev/null || fail "dd while the origin is down"
mv off/old.txt off/dir/renamed.txt || fail "rename while the origin is down"
rm off/doomed.txt || fail "unlink while the origin is down"
sync
echo 3 > /proc/sys/vm/drop_caches
kv readback "$(cat off/new.txt) $(tail -n 1 off/seed.txt) $(cat off/dir/renamed.txt)"
( cd off && find . -type f -print0 | xargs -0 md5sum ) | sed 's/^/WTREE f /'
( cd off && find . -type d ) | sed 's/^/WTREE d -  /'

step origin-up
