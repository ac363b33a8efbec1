# busybox httpd serving a directory of the mount (guest_servers.rs). The
# host fetches pages through a QEMU hostfwd and changes files at the origin
# while the guest waits at the step; httpd keeps serving meanwhile.
httpd -f -p 8080 -h /mnt/www &
pid=$!
i=0
until wget -q -O /dev/null http://127.0.0.1:8080/index.html; do
  i=$((i + 1))
  [ $i -gt 100 ] && fail "httpd does not answer"
  sleep 0.2
done
step serving
kill $pid
