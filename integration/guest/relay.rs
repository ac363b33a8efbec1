//! imz-guest-relay PORT: the host end of the test guest's NFS connection.
//!
//! QEMU's `guestfwd=...-cmd:imz-guest-relay PORT` starts one of these per
//! TCP connection the guest opens to the forwarded address; stdin/stdout
//! are that connection. It relays to 127.0.0.1:PORT and nowhere else, with
//! TCP_NODELAY (without it, Nagle's algorithm and delayed ACKs add ~40 ms
//! to many NFS calls; `busybox nc` has no such option) and large buffers;
//! towards the guest it passes whole RPC records (record marking), which
//! both NFS and the portmapper use.
//! When either side closes, the other is shut down and the relay exits
//! (after at most 2 s, should the server keep its half open).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let Some(port) = std::env::args().nth(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: imz-guest-relay PORT");
        return ExitCode::from(2);
    };
    // Nothing but loopback, by construction.
    let Ok(sock) = TcpStream::connect(("127.0.0.1", port)) else {
        // Nothing listening (a gateway restarting): the guest sees the
        // connection close and its NFS client tries again.
        return ExitCode::from(1);
    };
    let _ = sock.set_nodelay(true);
    let Ok(mut to_server) = sock.try_clone() else {
        return ExitCode::from(1);
    };
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        // The guest closed: pass that on, and do not linger.
        let _ = to_server.shutdown(Shutdown::Write);
        std::thread::sleep(Duration::from_secs(2));
        std::process::exit(0);
    });
    let mut from_server = sock;
    let mut stdout = std::io::stdout().lock();
    // Whole RPC records, each in one write: the gateway sends a reply's
    // 4-byte record mark and its body in two writes, and relayed apart the
    // mark reaches the guest alone; QEMU's user-mode TCP then holds the
    // body back until the guest acknowledges the mark, which the guest
    // delays by 40 ms. (Measured: 53 ms per file created in the guest.)
    let mut record = Vec::with_capacity(1 << 20);
    loop {
        record.clear();
        let mut mark = [0u8; 4];
        if from_server.read_exact(&mut mark).is_err() {
            break;
        }
        let len = (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize;
        record.extend_from_slice(&mark);
        record.resize(4 + len, 0);
        if from_server.read_exact(&mut record[4..]).is_err() {
            break;
        }
        if stdout
            .write_all(&record)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            break;
        }
    }
    ExitCode::SUCCESS
}
