# Read path through the kernel NFS client (guest_read.rs). Runs in /mnt.
# The host asserts on the KV lines and on the MD5/FIND/STAT/LINK lines.
# Set by the host: FSX_SEED FSX_LEN FSX_OPS.

dropc() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# --- 10,000-entry directory: cold, then again from an empty client cache.
t=$(now)
ls -l big > /tmp/big.l || fail "ls -l big"
kv big_ls_secs "$(since "$t")"
kv big_ls_lines "$(wc -l < /tmp/big.l)"
awk 'NR > 1 { print $NF }' /tmp/big.l > /tmp/big.names
kv big_names_md5 "$(md5sum < /tmp/big.names | cut -d' ' -f1)"
kv big_dups "$(sort /tmp/big.names | uniq -d | wc -l)"
# Regular files of 1..5 bytes each, as the host wrote them.
kv big_bad_lines "$(awk 'NR > 1 && ($1 !~ /^-rw/ || $5 < 1 || $5 > 5)' /tmp/big.l | wc -l)"
dropc
# Raw readdir order (busybox find does not sort): no duplicates, nothing missed.
find big -mindepth 1 -maxdepth 1 > /tmp/big.raw || fail "find big"
kv big_raw_count "$(wc -l < /tmp/big.raw)"
kv big_raw_dups "$(sort /tmp/big.raw | uniq -d | wc -l)"
kv big_dot_entries "$(ls -a big | grep -c '^\.\.\?$')"

# --- Byte-exact reads: md5 of every file, cold, then after dropping the
# client's caches (served from the gateway's cache the second time).
t=$(now)
( cd tree && find . -type f -print0 | xargs -0 md5sum ) > /tmp/md5.1 || fail "md5sum tree"
kv md5_cold_secs "$(since "$t")"
sed 's/^/MD5 /' /tmp/md5.1
dropc
( cd tree && find . -type f -print0 | xargs -0 md5sum ) > /tmp/md5.2 || fail "md5sum tree (2)"
kv md5_again_same "$(sort /tmp/md5.1 | md5sum | cut -c1-32) $(sort /tmp/md5.2 | md5sum | cut -c1-32)"

# --- find: every name with its type.
find tree | sort | while read -r p; do
  if [ -L "$p" ]; then ty=l; elif [ -d "$p" ]; then ty=d; elif [ -f "$p" ]; then ty=f; else ty=o; fi
  echo "FIND $ty $p"
done
kv find_count "$(find tree | wc -l)"

# --- stat: size, mtime, mode and type of every file and directory.
find tree ! -type l -print0 | xargs -0 stat -c 'STAT %s %Y %a %f %n'

# --- symlinks: targets, reads through them, directories through them.
find tree -type l | sort | while read -r p; do echo "LINK $p -> $(readlink "$p")"; done
kv link_file_md5 "$(md5sum < tree/link-to-file | cut -d' ' -f1)"
kv link_dir_list "$(ls tree/d1/up | tr '\n' ' ')"
kv link_abs_target "$(readlink tree/abs-link)"
if cat tree/dangling >/dev/null 2>/tmp/dangling.err; then kv dangling_read ok
else kv dangling_read "$(cat /tmp/dangling.err)"; fi
kv lstat_type "$(stat -c %F tree/link-to-file)"

# --- cp -r of the tree out of the mount, then compare the copy.
t=$(now)
cp -a tree /tmp/copy || fail "cp -a tree"
kv cp_secs "$(since "$t")"
( cd /tmp/copy && find . -type f -print0 | xargs -0 md5sum ) > /tmp/md5.copy
kv copy_same "$(sort /tmp/md5.1 | md5sum | cut -c1-32) $(sort /tmp/md5.copy | md5sum | cut -c1-32)"
kv copy_link "$(readlink /tmp/copy/link-to-file)"
kv copy_count "$(cd /tmp/copy && find . | wc -l)"
cp -r tree/d2 /tmp/copy-r || fail "cp -r tree/d2"
kv copy_r_same "$(cd /tmp/copy-r && find . -type f -print0 | xargs -0 md5sum | sort | md5sum | cut -c1-32)"
kv copy_r_want "$(cd tree/d2 && find . -type f -print0 | xargs -0 md5sum | sort | md5sum | cut -c1-32)"

# --- tar c out of the mount, listing back.
tar cf /tmp/tree.tar tree || fail "tar c tree"
kv tar_entries "$(tar tf /tmp/tree.tar | wc -l)"

# --- Randomized reads (fsx-like) of a large file, with cache drops.
t=$(now)
imz-guest-fsx read fsx.bin "$FSX_SEED" "$FSX_LEN" "$FSX_OPS" 42 > /tmp/fsx.out 2>&1
rc=$?
cat /tmp/fsx.out
kv fsx_rc "$rc"
kv fsx_secs "$(since "$t")"

# --- Big sequential read: md5 of a multi-MiB file, cold.
dropc
t=$(now)
kv big_file_md5 "$(md5sum < large.bin | cut -d' ' -f1)"
kv big_file_secs "$(since "$t")"
