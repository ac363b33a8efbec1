//! The portmapper side of the bare `mount -t nfs HOST:/imz /mnt`: a client
//! not told `port=` and `mountport=` asks the portmapper on port 111 where
//! NFS and MOUNT listen.
//!
//! Only the gateway on the standard NFS port (2049) takes part (there is one
//! such gateway per address, so registrations never fight). It either
//! - registers NFS v3 and MOUNT v3 over TCP at its port with the rpcbind
//!   already running (any machine with the NFS client tools has one), with
//!   PMAP v2 SET from loopback, and unregisters on a clean stop; or
//! - where nothing listens on port 111 and it may bind it (root), answers
//!   portmapper queries itself, over TCP and UDP: PMAP v2 NULL, GETPORT,
//!   DUMP, and rpcbind v3/v4 NULL, GETADDR, DUMP (what `mount.nfs`, the
//!   kernel, libnfs and `rpcinfo` ask). It knows NFS v3 and MOUNT v3 over
//!   TCP, and itself.
//!
//! If neither works the mount commands that name the ports still do; the
//! gateway says so in one log line.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const PORTMAP_PORT: u16 = 111;
/// The standard NFS port; only a gateway there takes part.
pub const NFS_PORT: u16 = 2049;
const PORTMAP_PROG: u32 = 100_000;
const NFS_PROG: u32 = 100_003;
const MOUNT_PROG: u32 = 100_005;
const NFS_VERS: u32 = 3;
const MOUNT_VERS: u32 = 3;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

// PMAP v2 and rpcbind v3/v4 procedures.
const PROC_NULL: u32 = 0;
const PROC_SET: u32 = 1;
const PROC_UNSET: u32 = 2;
const PMAP_GETPORT: u32 = 3;
const PMAP_DUMP: u32 = 4;
const RPCB_GETADDR: u32 = 3;
const RPCB_DUMP: u32 = 4;
const RPCB_GETVERSADDR: u32 = 9;

/// Largest call accepted; portmapper calls are a few dozen bytes.
const MAX_CALL: usize = 4096;
/// How long registration may wait for rpcbind.
const RPCBIND_TIMEOUT: Duration = Duration::from_secs(2);

/// The programs this gateway serves, as the portmapper lists them.
const MAPPINGS: [(u32, u32); 2] = [(NFS_PROG, NFS_VERS), (MOUNT_PROG, MOUNT_VERS)];

/// How the gateway is known to portmapper clients; undone on drop.
#[derive(Debug)]
pub enum Presence {
    /// Registered with the machine's rpcbind.
    Registered { port: u16 },
    /// Answering on port 111 itself, until these tasks stop.
    Serving(Vec<tokio::task::JoinHandle<()>>),
}

impl Drop for Presence {
    fn drop(&mut self) {
        match self {
            Presence::Registered { port } => {
                for (prog, vers) in MAPPINGS {
                    if let Err(e) = pmap_change(PROC_UNSET, prog, vers, *port) {
                        tracing::warn!(error = %e, prog, "could not unregister from rpcbind");
                    }
                }
            }
            Presence::Serving(tasks) => tasks.iter().for_each(|t| t.abort()),
        }
    }
}

/// What `imz status` says of `presence` for a gateway at `nfs`.
pub fn describe(presence: Option<&Presence>, nfs: SocketAddr) -> String {
    match presence {
        Some(Presence::Registered { .. }) => "registered with the running rpcbind".into(),
        Some(Presence::Serving(_)) => "answering portmapper queries on port 111".into(),
        None if nfs.port() == NFS_PORT => {
            "none (rpcbind refused, or port 111 not ours): mount with port= and mountport=".into()
        }
        None => String::new(),
    }
}

/// Makes the gateway listening at `nfs` known to portmapper clients, if it
/// is on the standard port. `None`: not on it, or neither way worked
/// (logged).
pub async fn announce(nfs: SocketAddr) -> Option<Presence> {
    let port = nfs.port();
    if port != NFS_PORT {
        return None;
    }
    let rpcbind_runs = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, PORTMAP_PORT))
        .await
        .is_ok();
    if rpcbind_runs {
        let registered = tokio::task::spawn_blocking(move || register(port)).await;
        return match registered {
            Ok(Ok(())) => {
                tracing::info!(port, "registered NFS and MOUNT with the running rpcbind");
                Some(Presence::Registered { port })
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "rpcbind refused our registration: mount with port= and mountport=");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "registering with rpcbind failed");
                None
            }
        };
    }
    match serve(SocketAddr::new(nfs.ip(), PORTMAP_PORT), port).await {
        Ok(tasks) => {
            tracing::info!(port, "answering portmapper queries on port 111");
            Some(Presence::Serving(tasks))
        }
        Err(e) => {
            tracing::info!(error = %e, "no portmapper (port 111 not ours): mount with port= and mountport=");
            None
        }
    }
}

fn register(port: u16) -> std::io::Result<()> {
    for (prog, vers) in MAPPINGS {
        // A registration left by a gateway that died would make SET fail.
        pmap_change(PROC_UNSET, prog, vers, port)?;
        if !pmap_change(PROC_SET, prog, vers, port)? {
            return Err(std::io::Error::other(format!(
                "rpcbind said no to program {prog} version {vers}"
            )));
        }
    }
    Ok(())
}

/// PMAP v2 SET or UNSET of `prog` `vers` over TCP at `port`, sent to the
/// local rpcbind; its boolean answer.
fn pmap_change(proc_: u32, prog: u32, vers: u32, port: u16) -> std::io::Result<bool> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PORTMAP_PORT);
    let mut stream = TcpStream::connect_timeout(&addr, RPCBIND_TIMEOUT)?;
    stream.set_read_timeout(Some(RPCBIND_TIMEOUT))?;
    stream.set_write_timeout(Some(RPCBIND_TIMEOUT))?;
    let mut call = Xdr::default();
    let xid = std::process::id() ^ (prog << 8) ^ proc_;
    call.u32(xid)
        .u32(0) // CALL
        .u32(2) // RPC version
        .u32(PORTMAP_PROG)
        .u32(2)
        .u32(proc_)
        .u32(0) // AUTH_NONE credential
        .u32(0)
        .u32(0) // AUTH_NONE verifier
        .u32(0)
        .u32(prog)
        .u32(vers)
        .u32(IPPROTO_TCP)
        .u32(u32::from(port));
    stream.write_all(&record(&call.0))?;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header)?;
    let len = (u32::from_be_bytes(header) & 0x7fff_ffff) as usize;
    if len > MAX_CALL {
        return Err(std::io::Error::other("oversized rpcbind reply"));
    }
    let mut reply = vec![0u8; len];
    stream.read_exact(&mut reply)?;
    let mut r = Reader::new(&reply);
    let answer = (|| {
        let (got_xid, mtype, stat) = (r.u32()?, r.u32()?, r.u32()?);
        let (_flavor, _verf) = (r.u32()?, r.opaque()?);
        let accept = r.u32()?;
        if got_xid != xid || mtype != 1 || stat != 0 || accept != 0 {
            return None;
        }
        r.u32()
    })();
    answer
        .map(|b| b != 0)
        .ok_or_else(|| std::io::Error::other("rpcbind sent an unexpected reply"))
}

/// Binds port 111 on `ip` (TCP and UDP) and answers there.
async fn serve(
    addr: SocketAddr,
    nfs_port: u16,
) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
    let tcp = tokio::net::TcpListener::bind(addr).await?;
    let udp = tokio::net::UdpSocket::bind(addr).await?;
    let tcp_task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match tcp.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    crate::listener::pause_after_accept_error(&e).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                if let Err(e) = serve_stream(stream, nfs_port).await {
                    tracing::debug!(%peer, error = %e, "portmapper connection ended");
                }
            });
        }
    });
    let local = udp.local_addr()?.ip();
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_CALL];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            if let Some(reply) = answer(&buf[..n], local, nfs_port) {
                let _ = udp.send_to(&reply, peer).await;
            }
        }
    });
    Ok(vec![tcp_task, udp_task])
}

/// One TCP connection: record-marked calls in, one reply per call out.
async fn serve_stream(mut stream: tokio::net::TcpStream, nfs_port: u16) -> std::io::Result<()> {
    let local = stream.local_addr()?.ip();
    loop {
        let mut call = Vec::new();
        loop {
            let header = match stream.read_u32().await {
                Ok(h) => h,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            let len = (header & 0x7fff_ffff) as usize;
            if call.len() + len > MAX_CALL {
                return Err(std::io::Error::other("oversized call"));
            }
            let at = call.len();
            call.resize(at + len, 0);
            stream.read_exact(&mut call[at..]).await?;
            if header & 0x8000_0000 != 0 {
                break;
            }
        }
        if let Some(reply) = answer(&call, local, nfs_port) {
            stream.write_all(&record(&reply)).await?;
        }
    }
}

fn record(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(0x8000_0000 | body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The reply to one portmapper call, or `None` for what deserves no answer
/// (not a call, or not parseable up to its program).
fn answer(call: &[u8], local: IpAddr, nfs_port: u16) -> Option<Vec<u8>> {
    let mut r = Reader::new(call);
    let xid = r.u32()?;
    if r.u32()? != 0 || r.u32()? != 2 {
        return None;
    }
    let (prog, vers, proc_) = (r.u32()?, r.u32()?, r.u32()?);
    let (_cred_flavor, _cred) = (r.u32()?, r.opaque()?);
    let (_verf_flavor, _verf) = (r.u32()?, r.opaque()?);
    let port_of = |p: u32, v: u32, proto: u32| {
        if MAPPINGS.contains(&(p, v)) && proto == IPPROTO_TCP {
            nfs_port
        } else if p == PORTMAP_PROG
            && (2..=4).contains(&v)
            && [IPPROTO_TCP, IPPROTO_UDP].contains(&proto)
        {
            // Itself: `rpcinfo` asks where the portmapper is first.
            PORTMAP_PORT
        } else {
            0
        }
    };
    let mut out = Xdr::default();
    out.u32(xid).u32(1).u32(0).u32(0).u32(0); // REPLY, ACCEPTED, AUTH_NONE verifier
    if prog != PORTMAP_PROG {
        out.u32(1); // PROG_UNAVAIL
        return Some(out.0);
    }
    if !(2..=4).contains(&vers) {
        out.u32(2).u32(2).u32(4); // PROG_MISMATCH, versions 2 to 4
        return Some(out.0);
    }
    let header = out.0.len();
    let results = (|| -> Option<()> {
        match (vers, proc_) {
            (_, PROC_NULL) => {
                out.u32(0);
            }
            // Registrations belong to a real rpcbind; this one knows its own.
            (_, PROC_SET | PROC_UNSET) => {
                out.u32(0).u32(0);
            }
            (2, PMAP_GETPORT) => {
                let (p, v, proto) = (r.u32()?, r.u32()?, r.u32()?);
                out.u32(0).u32(u32::from(port_of(p, v, proto)));
            }
            (2, PMAP_DUMP) => {
                out.u32(0);
                for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                    out.u32(1).u32(PORTMAP_PROG).u32(2).u32(proto);
                    out.u32(u32::from(PORTMAP_PORT));
                }
                for (p, v) in MAPPINGS {
                    out.u32(1).u32(p).u32(v).u32(IPPROTO_TCP);
                    out.u32(u32::from(nfs_port));
                }
                out.u32(0);
            }
            (3 | 4, RPCB_DUMP) => {
                out.u32(0);
                let ours = |port| universal_address(local, port);
                for (netid, v) in [
                    ("tcp", 4),
                    ("tcp", 3),
                    ("tcp", 2),
                    ("udp", 4),
                    ("udp", 3),
                    ("udp", 2),
                ] {
                    out.u32(1).u32(PORTMAP_PROG).u32(v).string(netid);
                    out.string(&ours(PORTMAP_PORT)).string("superuser");
                }
                for (p, v) in MAPPINGS {
                    out.u32(1).u32(p).u32(v).string("tcp");
                    out.string(&ours(nfs_port)).string("imz");
                }
                out.u32(0);
            }
            (3 | 4, RPCB_GETADDR) | (4, RPCB_GETVERSADDR) => {
                let (p, v) = (r.u32()?, r.u32()?);
                let netid = r.string()?;
                let proto = match netid.as_str() {
                    "tcp" | "tcp6" => IPPROTO_TCP,
                    "udp" | "udp6" => IPPROTO_UDP,
                    _ => 0,
                };
                let uaddr = match port_of(p, v, proto) {
                    0 => String::new(),
                    port => universal_address(local, port),
                };
                out.u32(0).string(&uaddr);
            }
            _ => {
                out.u32(3); // PROC_UNAVAIL
            }
        }
        Some(())
    })();
    if results.is_none() {
        out.0.truncate(header);
        out.u32(4); // GARBAGE_ARGS
    }
    Some(out.0)
}

/// rpcbind's "universal address": the IP address, then the port's two
/// bytes, dot-separated (`127.0.0.1.8.1` is port 2049).
fn universal_address(ip: IpAddr, port: u16) -> String {
    let [hi, lo] = port.to_be_bytes();
    format!("{ip}.{hi}.{lo}")
}

/// Writing XDR: big-endian words, strings padded to four bytes.
#[derive(Default)]
struct Xdr(Vec<u8>);

impl Xdr {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn string(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }
}

/// Reading XDR; `None` when the bytes run out.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self(bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        let (word, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*word))
    }

    fn opaque(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        let padded = len.checked_next_multiple_of(4)?;
        if padded > self.0.len() {
            return None;
        }
        let (body, rest) = self.0.split_at(padded);
        self.0 = rest;
        Some(&body[..len])
    }

    fn string(&mut self) -> Option<String> {
        self.opaque()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(vers: u32, proc_: u32, args: impl FnOnce(&mut Xdr)) -> Vec<u8> {
        let mut x = Xdr::default();
        x.u32(7)
            .u32(0)
            .u32(2)
            .u32(PORTMAP_PROG)
            .u32(vers)
            .u32(proc_);
        // AUTH_SYS credential with a body, as the kernel sends.
        x.u32(1).u32(8).u32(0).u32(0);
        x.u32(0).u32(0);
        args(&mut x);
        x.0
    }

    fn accepted(reply: &[u8]) -> Reader<'_> {
        let mut r = Reader::new(reply);
        assert_eq!(r.u32(), Some(7), "xid");
        assert_eq!(r.u32(), Some(1), "REPLY");
        assert_eq!(r.u32(), Some(0), "MSG_ACCEPTED");
        assert_eq!((r.u32(), r.opaque().map(<[u8]>::len)), (Some(0), Some(0)));
        r
    }

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn getport_names_nfs_and_mount_over_tcp_only() {
        for (prog, vers, proto, want) in [
            (NFS_PROG, 3, IPPROTO_TCP, 2049),
            (MOUNT_PROG, 3, IPPROTO_TCP, 2049),
            (MOUNT_PROG, 3, IPPROTO_UDP, 0),
            (PORTMAP_PROG, 2, IPPROTO_UDP, 111),
            (NFS_PROG, 4, IPPROTO_TCP, 0),
            (100_021, 4, IPPROTO_TCP, 0),
        ] {
            let c = call(2, PMAP_GETPORT, |x| {
                x.u32(prog).u32(vers).u32(proto).u32(0);
            });
            let reply = answer(&c, LOCAL, 2049).expect("a reply");
            let mut r = accepted(&reply);
            assert_eq!(r.u32(), Some(0), "SUCCESS");
            assert_eq!(r.u32(), Some(want), "{prog} v{vers} proto {proto}");
        }
    }

    #[test]
    fn getaddr_gives_a_universal_address() {
        for vers in [3, 4] {
            let c = call(vers, RPCB_GETADDR, |x| {
                x.u32(MOUNT_PROG).u32(3).string("tcp").string("").string("");
            });
            let reply = answer(&c, LOCAL, 2049).expect("a reply");
            let mut r = accepted(&reply);
            assert_eq!(r.u32(), Some(0));
            assert_eq!(r.string().as_deref(), Some("127.0.0.1.8.1"));
            let c = call(vers, RPCB_GETADDR, |x| {
                x.u32(NFS_PROG).u32(3).string("udp").string("").string("");
            });
            let reply = answer(&c, LOCAL, 2049).expect("a reply");
            let mut r = accepted(&reply);
            assert_eq!(r.u32(), Some(0));
            assert_eq!(r.string().as_deref(), Some(""), "not served over UDP");
        }
    }

    #[test]
    fn dump_lists_both_programs() {
        let reply = answer(&call(2, PMAP_DUMP, |_| {}), LOCAL, 2049).expect("a reply");
        let mut r = accepted(&reply);
        assert_eq!(r.u32(), Some(0));
        let mut listed = Vec::new();
        while r.u32() == Some(1) {
            listed.push((r.u32(), r.u32(), r.u32(), r.u32()));
        }
        assert_eq!(
            listed,
            vec![
                (Some(PORTMAP_PROG), Some(2), Some(IPPROTO_TCP), Some(111)),
                (Some(PORTMAP_PROG), Some(2), Some(IPPROTO_UDP), Some(111)),
                (Some(NFS_PROG), Some(3), Some(IPPROTO_TCP), Some(2049)),
                (Some(MOUNT_PROG), Some(3), Some(IPPROTO_TCP), Some(2049)),
            ]
        );
    }

    #[test]
    fn other_programs_versions_and_garbage_get_the_right_refusal() {
        let mut other = call(2, PROC_NULL, |_| {});
        other[12..16].copy_from_slice(&NFS_PROG.to_be_bytes());
        let reply = answer(&other, LOCAL, 2049).expect("a reply");
        assert_eq!(accepted(&reply).u32(), Some(1), "PROG_UNAVAIL");

        let reply = answer(&call(5, PROC_NULL, |_| {}), LOCAL, 2049).expect("a reply");
        let mut r = accepted(&reply);
        assert_eq!((r.u32(), r.u32(), r.u32()), (Some(2), Some(2), Some(4)));

        let set = call(2, PROC_SET, |x| {
            x.u32(NFS_PROG).u32(3).u32(6).u32(1);
        });
        let reply = answer(&set, LOCAL, 2049).expect("a reply");
        let mut r = accepted(&reply);
        assert_eq!((r.u32(), r.u32()), (Some(0), Some(0)), "SET refused");

        let reply = answer(&call(2, PMAP_GETPORT, |_| {}), LOCAL, 2049).expect("a reply");
        let mut r = accepted(&reply);
        assert_eq!(
            (r.u32(), r.u32()),
            (Some(4), None),
            "GARBAGE_ARGS, nothing else"
        );

        let c = call(2, PROC_NULL, |_| {});
        assert_eq!(answer(&c[..c.len() - 2], LOCAL, 2049), None, "cut header");
        assert_eq!(answer(&[], LOCAL, 2049), None);
    }
}
