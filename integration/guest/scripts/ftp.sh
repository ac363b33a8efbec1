# pure-ftpd (Debian's, with the host's libraries) serving the mount to
# anonymous FTP (guest_servers.rs); the host downloads through hostfwd
# (control port 21, passive ports 30000-30003) while the guest waits.
# The ftp user's home (/etc/passwd) is /mnt: anonymous sessions are
# chrooted there.
pure-ftpd -e -H -4 -S 21 -p 30000:30003 -m 1000 -d &
pid=$!
i=0
until echo QUIT | nc 127.0.0.1 21 2>/dev/null | grep -q '^220'; do
  i=$((i + 1))
  [ $i -gt 100 ] && fail "pure-ftpd does not answer"
  sleep 0.2
done
step serving
kill $pid
