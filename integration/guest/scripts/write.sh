# Write path through the kernel NFS client (guest_write.rs). Runs in /mnt.
# Every change is made under w/; at the end the guest reports what w/ holds
# (WTREE lines) and the host waits until the origin holds the same.
# /imz/src.tar: a source tree from the host.
dropc() { sync; echo 3 > /proc/sys/vm/drop_caches; }
sum() { md5sum | cut -c1-32; }
mkdir w || fail "mkdir w"

# create, write, append, overwrite in the middle, truncate (down and up)
echo hello > w/new.txt || fail "create"
echo more >> w/new.txt || fail "append"
kv append "$(cat w/new.txt | tr '\n' ' ')"
dd if=/dev/urandom of=w/data.bin bs=4096 count=50 2>/dev/null || fail "dd write"
printf 'XYZ' | dd of=w/data.bin bs=1 seek=5000 conv=notrunc 2>/dev/null || fail "overwrite"
cp w/data.bin /tmp/data.bin
truncate -s 100000 w/data.bin || fail "truncate down"
truncate -s 150000 w/data.bin || fail "truncate up"
dropc
kv trunc_size "$(stat -c %s w/data.bin)"
kv trunc_head "$(head -c 100000 w/data.bin | sum) $(head -c 100000 /tmp/data.bin | sum)"
kv trunc_tail_zero "$(tail -c 50000 w/data.bin | tr -d '\0' | wc -c)"

# rename: in place, across directories, over an existing file
echo a > w/a; echo b > w/b; echo c > w/c
mv w/a w/a2 || fail "rename"
mkdir -p w/sub/deeper || fail "mkdir -p"
mv w/b w/sub/deeper/b || fail "rename across dirs"
mv w/c w/a2 || fail "rename over existing"
kv renamed "$(cat w/a2) $(cat w/sub/deeper/b) $(ls w/c 2>&1 | grep -c 'No such')"

# mkdir/rmdir, unlink, symlink, chmod
mkdir w/tmpdir && rmdir w/tmpdir || fail "mkdir/rmdir"
echo x > w/gone && rm w/gone || fail "unlink"
ln -s sub/deeper/b w/link || fail "symlink"
kv link "$(readlink w/link) $(cat w/link)"
chmod 600 w/new.txt || fail "chmod"
kv mode "$(stat -c %a w/new.txt)"
rmdir w/sub 2>/dev/null && fail "rmdir of a non-empty dir succeeded"

# tar x of a source tree into the mount, tar c back out: same listing and bytes
mkdir /tmp/orig && tar xf /imz/src.tar -C /tmp/orig || fail "tar x to tmpfs"
t=$(now)
tar xf /imz/src.tar -C w || fail "tar x into the mount"
kv tar_x_secs "$(since "$t")"
dropc
tar cf /tmp/back.tar -C w src || fail "tar c out of the mount"
# Compared with the same tar run on the guest's tmpfs.
tar cf /tmp/local.tar -C /tmp/orig src || fail "tar c of tmpfs"
# Directory mtimes are left out: busybox tar does not restore them, so they
# record when the last entry was added, which differs between the two.
tvf() { tar tvf "$1" | awk '/^d/ { $4 = "-"; $5 = "-" } { print }' | sort; }
tvf /tmp/local.tar > /tmp/tv.orig
tvf /tmp/back.tar > /tmp/tv.back
kv tar_listing "$(cmp -s /tmp/tv.orig /tmp/tv.back && echo same || { diff /tmp/tv.orig /tmp/tv.back | head -20; echo differs; })"
kv tar_files "$(wc -l < /tmp/tv.orig)"
mkdir /tmp/back && tar xf /tmp/back.tar -C /tmp/back || fail "tar x back"
kv tar_bytes "$( (cd /tmp/orig && find . -type f -print0 | xargs -0 md5sum | sort | sum) ) $( (cd /tmp/back && find . -type f -print0 | xargs -0 md5sum | sort | sum) )"

# randomized writes/truncates/reads against an in-memory model
t=$(now)
imz-guest-fsx rw w/fsx.dat 400000 "$FSX_OPS" 9 > /tmp/fsx.out 2>&1
kv fsx_rc "$?"
kv fsx_secs "$(since "$t")"
cat /tmp/fsx.out

sync
dropc
# What w/ holds, for the host to find at the origin.
( cd w && find . -type f -print0 | xargs -0 md5sum ) | sed 's/^/WTREE f /'
( cd w && find . -type l ) | while read -r l; do echo "WTREE l $(readlink "w/$l")  $l"; done
( cd w && find . -type d ) | sed 's/^/WTREE d -  /'
