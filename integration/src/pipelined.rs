//! Many NFS READs in flight on one connection, as the kernel client sends
//! them under readahead or parallel readers. `nfs3_client` waits for each
//! reply before the next call, so this writes the RPC records itself:
//! AUTH_NULL calls of NFSv3 READ, all sent before any reply is read.

use std::collections::HashMap;

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NFS_PROGRAM: u32 = 100_003;
const NFS_V3: u32 = 3;
const READ: u32 = 6;
/// Length of an XDR fattr3.
const FATTR3_LEN: usize = 84;

/// How the server answered one READ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadReply {
    /// NFS3_OK with these bytes.
    Data(Vec<u8>),
    /// An NFS error status (5 is NFS3ERR_IO).
    Nfs(u32),
    /// The call was accepted but not run: its RPC accept status (5 is
    /// SYSTEM_ERR).
    Rpc(u32),
}

/// Sends a READ of `file` (a file handle's bytes) for each `(offset,
/// count)` on one connection to 127.0.0.1:`port`, all before reading any
/// reply; returns the replies in the order of `reads`.
pub async fn read_all_at_once(
    port: u16,
    file: &[u8],
    reads: &[(u64, u32)],
) -> anyhow::Result<Vec<ReadReply>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    let mut calls = Vec::new();
    for (xid, &(offset, count)) in reads.iter().enumerate() {
        let mut body = Vec::new();
        for word in [xid as u32, 0, 2, NFS_PROGRAM, NFS_V3, READ, 0, 0, 0, 0] {
            body.extend_from_slice(&word.to_be_bytes());
        }
        put_opaque(&mut body, file);
        body.extend_from_slice(&offset.to_be_bytes());
        body.extend_from_slice(&count.to_be_bytes());
        calls.extend_from_slice(&(0x8000_0000 | body.len() as u32).to_be_bytes());
        calls.extend_from_slice(&body);
    }
    let (mut from_server, mut to_server) = stream.split();
    let send = async {
        to_server.write_all(&calls).await?;
        to_server.flush().await
    };
    let receive = async {
        let mut replies = HashMap::new();
        while replies.len() < reads.len() {
            let record = read_record(&mut from_server).await?;
            let (xid, reply) = parse_reply(&record)?;
            ensure!((xid as usize) < reads.len(), "reply to unknown xid {xid}");
            replies.insert(xid as usize, reply);
        }
        anyhow::Ok(replies)
    };
    let (sent, replies) = tokio::join!(send, receive);
    sent.context("sending the READs")?;
    let mut replies = replies?;
    (0..reads.len())
        .map(|i| {
            replies
                .remove(&i)
                .ok_or_else(|| anyhow::anyhow!("no reply to READ {i}"))
        })
        .collect()
}

fn put_opaque(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
    out.resize(out.len() + (4 - bytes.len() % 4) % 4, 0);
}

async fn read_record(stream: &mut (impl AsyncReadExt + Unpin)) -> anyhow::Result<Vec<u8>> {
    let mut record = Vec::new();
    loop {
        let mark = stream.read_u32().await.context("reading a record mark")?;
        let start = record.len();
        record.resize(start + (mark & 0x7fff_ffff) as usize, 0);
        stream.read_exact(&mut record[start..]).await?;
        if mark & 0x8000_0000 != 0 {
            return Ok(record);
        }
    }
}

/// An accepted reply's xid and READ3res.
fn parse_reply(record: &[u8]) -> anyhow::Result<(u32, ReadReply)> {
    let mut r = Words(record);
    let xid = r.u32()?;
    ensure!(r.u32()? == 1, "not a reply");
    ensure!(r.u32()? == 0, "call denied");
    let _verifier_flavor = r.u32()?;
    let verifier_len = r.u32()? as usize;
    r.skip(verifier_len.next_multiple_of(4))?;
    let accept = r.u32()?;
    if accept != 0 {
        return Ok((xid, ReadReply::Rpc(accept)));
    }
    let status = r.u32()?;
    if status != 0 {
        return Ok((xid, ReadReply::Nfs(status)));
    }
    if r.u32()? != 0 {
        r.skip(FATTR3_LEN)?;
    }
    let _count = r.u32()?;
    let _eof = r.u32()?;
    let len = r.u32()? as usize;
    let data = r.take(len)?.to_vec();
    Ok((xid, ReadReply::Data(data)))
}

struct Words<'a>(&'a [u8]);

impl<'a> Words<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("reply too short");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn skip(&mut self, n: usize) -> anyhow::Result<()> {
        self.take(n).map(|_| ())
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}
