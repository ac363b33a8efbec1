//! A small NFSv3 client for tests, on `nfs3_client`: a real client speaking
//! the wire protocol to the gateway over TCP, one call per RPC.

use anyhow::{Context, anyhow, bail};
use nfs3_client::Nfs3ConnectionBuilder;
use nfs3_client::nfs3_types::nfs3::{
    self, COMMIT3args, CREATE3args, GETATTR3args, LOOKUP3args, MKDIR3args, Nfs3Option, Nfs3Result,
    READ3args, READDIR3args, READDIRPLUS3args, READLINK3args, REMOVE3args, RENAME3args, RMDIR3args,
    SETATTR3args, SYMLINK3args, WRITE3args, cookieverf3, createhow3, createverf3, diropargs3,
    fattr3, filename3, nfs_fh3, nfspath3, nfsstat3, nfstime3, post_op_attr, post_op_fh3, sattr3,
    set_atime, set_mtime, stable_how, symlinkdata3,
};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::{TokioConnector, TokioIo};
use tokio::net::TcpStream;

/// An NFS failure: a status from the server, or a transport error.
#[derive(Debug)]
pub enum NfsError {
    Status(nfsstat3),
    Rpc(String),
}

impl std::fmt::Display for NfsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(s) => write!(f, "NFS status {s:?}"),
            Self::Rpc(e) => write!(f, "RPC failure: {e}"),
        }
    }
}

impl std::error::Error for NfsError {}

impl NfsError {
    pub fn status(&self) -> Option<nfsstat3> {
        match self {
            Self::Status(s) => Some(*s),
            Self::Rpc(_) => None,
        }
    }
}

fn rpc(e: impl std::fmt::Debug) -> NfsError {
    NfsError::Rpc(format!("{e:?}"))
}

/// One mounted client connection.
pub struct Nfs {
    conn: nfs3_client::Nfs3Connection<TokioIo<TcpStream>>,
    pub root: nfs_fh3,
}

impl Nfs {
    /// Mounts `path` (e.g. `/imz`) from a server on 127.0.0.1:`port`.
    pub async fn mount(port: u16, path: &str) -> anyhow::Result<Self> {
        Self::connect(port, port, path, opaque_auth::default()).await
    }

    /// Mounts `path` from a server whose NFS and MOUNT services listen on
    /// different ports of 127.0.0.1, as root with AUTH_UNIX credentials, as
    /// the kernel client sends them (nfs-ganesha refuses AUTH_NULL
    /// changes; benchmarks use this for every server alike).
    pub async fn mount_ports(nfs_port: u16, mount_port: u16, path: &str) -> anyhow::Result<Self> {
        let root = opaque_auth::auth_unix(&auth_unix::default());
        Self::connect(nfs_port, mount_port, path, root).await
    }

    async fn connect(
        nfs_port: u16,
        mount_port: u16,
        path: &str,
        credential: opaque_auth<'static>,
    ) -> anyhow::Result<Self> {
        let conn = Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", path)
            .connect_from_privileged_port(false)
            .credential(credential)
            .mount_port(mount_port)
            .nfs3_port(nfs_port)
            .mount()
            .await
            .map_err(|e| anyhow!("mounting {path} from port {nfs_port}: {e:?}"))?;
        let root = conn.root_nfs_fh3();
        Ok(Self { conn, root })
    }

    pub async fn getattr(&mut self, fh: &nfs_fh3) -> Result<fattr3, NfsError> {
        match self
            .conn
            .getattr(&GETATTR3args { object: fh.clone() })
            .await
            .map_err(rpc)?
        {
            Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    /// Looks up `name` (any bytes, as a client may send) in `dir`.
    pub async fn lookup<N: AsRef<[u8]> + ?Sized>(
        &mut self,
        dir: &nfs_fh3,
        name: &N,
    ) -> Result<nfs_fh3, NfsError> {
        let args = LOOKUP3args {
            what: dirop(dir, name),
        };
        match self.conn.lookup(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(ok) => Ok(ok.object),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    /// Walks `a/b/c` from the mounted root.
    pub async fn lookup_path(&mut self, path: &str) -> Result<nfs_fh3, NfsError> {
        let mut fh = self.root.clone();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            fh = self.lookup(&fh, part).await?;
        }
        Ok(fh)
    }

    pub async fn read(
        &mut self,
        fh: &nfs_fh3,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), NfsError> {
        let args = READ3args {
            file: fh.clone(),
            offset,
            count,
        };
        match self.conn.read(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(ok) => Ok((ok.data.to_vec(), ok.eof)),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    /// Reads a whole file in 1 MiB requests.
    pub async fn read_all(&mut self, fh: &nfs_fh3) -> Result<Vec<u8>, NfsError> {
        let mut out = Vec::new();
        loop {
            let (bytes, eof) = self.read(fh, out.len() as u64, 1 << 20).await?;
            out.extend_from_slice(&bytes);
            if eof {
                return Ok(out);
            }
            if bytes.is_empty() {
                return Err(NfsError::Rpc("empty read before EOF".into()));
            }
        }
    }

    pub async fn read_path(&mut self, path: &str) -> Result<Vec<u8>, NfsError> {
        let fh = self.lookup_path(path).await?;
        self.read_all(&fh).await
    }

    pub async fn readlink(&mut self, fh: &nfs_fh3) -> Result<String, NfsError> {
        let target = self.readlink_bytes(fh).await?;
        Ok(String::from_utf8_lossy(&target).into_owned())
    }

    /// The symlink's target as the server sent it.
    pub async fn readlink_bytes(&mut self, fh: &nfs_fh3) -> Result<Vec<u8>, NfsError> {
        let args = READLINK3args {
            symlink: fh.clone(),
        };
        match self.conn.readlink(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(ok) => Ok(ok.data.as_ref().to_vec()),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    /// Lists a directory with plain READDIR, `count` bytes per reply,
    /// following cookies to the end: (name, fileid) in server order.
    pub async fn readdir(
        &mut self,
        dir: &nfs_fh3,
        count: u32,
    ) -> Result<Vec<(String, u64)>, NfsError> {
        let raw = self.readdir_bytes(dir, count).await?;
        Ok(raw
            .into_iter()
            .map(|(name, id)| (String::from_utf8_lossy(&name).into_owned(), id))
            .collect())
    }

    /// [`readdir`](Self::readdir) with names as the server sent them.
    pub async fn readdir_bytes(
        &mut self,
        dir: &nfs_fh3,
        count: u32,
    ) -> Result<Vec<(Vec<u8>, u64)>, NfsError> {
        let mut out = Vec::new();
        let mut cookie = 0;
        let mut verf = cookieverf3::default();
        // A directory that changes between two pages answers the second with
        // BAD_COOKIE (its cookie verifier moved); a client starts over, as
        // the kernel's does. A few times: one that never settles is an error.
        let mut restarts = 0;
        loop {
            let args = READDIR3args {
                dir: dir.clone(),
                cookie,
                cookieverf: verf,
                count,
            };
            match self.conn.readdir(&args).await.map_err(rpc)? {
                Nfs3Result::Ok(ok) => {
                    verf = ok.cookieverf;
                    for e in &ok.reply.entries.0 {
                        out.push((e.name.as_ref().to_vec(), e.fileid));
                        cookie = e.cookie;
                    }
                    if ok.reply.eof {
                        return Ok(out);
                    }
                    if ok.reply.entries.0.is_empty() {
                        return Err(NfsError::Rpc("READDIR returned nothing before EOF".into()));
                    }
                }
                Nfs3Result::Err((nfsstat3::NFS3ERR_BAD_COOKIE, _))
                    if cookie != 0 && restarts < 3 =>
                {
                    restarts += 1;
                    out.clear();
                    cookie = 0;
                    verf = cookieverf3::default();
                }
                Nfs3Result::Err((s, _)) => return Err(NfsError::Status(s)),
            }
        }
    }

    /// Lists a directory with READDIRPLUS: (name, attributes, handle).
    pub async fn readdirplus(
        &mut self,
        dir: &nfs_fh3,
        dircount: u32,
        maxcount: u32,
    ) -> Result<Vec<(String, fattr3, nfs_fh3)>, NfsError> {
        let mut out = Vec::new();
        let mut cookie = 0;
        let mut verf = cookieverf3::default();
        loop {
            let args = READDIRPLUS3args {
                dir: dir.clone(),
                cookie,
                cookieverf: verf,
                dircount,
                maxcount,
            };
            match self.conn.readdirplus(&args).await.map_err(rpc)? {
                Nfs3Result::Ok(ok) => {
                    verf = ok.cookieverf;
                    let n = ok.reply.entries.0.len();
                    for e in ok.reply.entries.0 {
                        cookie = e.cookie;
                        let attr = match e.name_attributes {
                            post_op_attr::Some(a) => a,
                            post_op_attr::None => {
                                return Err(NfsError::Rpc("entry without attributes".into()));
                            }
                        };
                        let fh = match e.name_handle {
                            post_op_fh3::Some(h) => h,
                            post_op_fh3::None => {
                                return Err(NfsError::Rpc("entry without handle".into()));
                            }
                        };
                        out.push((
                            String::from_utf8_lossy(e.name.as_ref()).into_owned(),
                            attr,
                            fh,
                        ));
                    }
                    if ok.reply.eof {
                        return Ok(out);
                    }
                    if n == 0 {
                        return Err(NfsError::Rpc(
                            "READDIRPLUS returned nothing before EOF".into(),
                        ));
                    }
                }
                Nfs3Result::Err((s, _)) => return Err(NfsError::Status(s)),
            }
        }
    }
}

/// How CREATE treats an existing name.
#[derive(Debug, Clone, Copy)]
pub enum CreateMode {
    Unchecked,
    Guarded,
    Exclusive([u8; 8]),
}

/// Attribute changes for SETATTR and CREATE.
#[derive(Debug, Clone, Default)]
pub struct Attrs {
    pub mode: Option<u32>,
    pub size: Option<u64>,
    /// Seconds since the epoch.
    pub mtime: Option<u32>,
}

impl Attrs {
    fn sattr(&self) -> sattr3 {
        sattr3 {
            mode: self.mode.map_or(Nfs3Option::None, Nfs3Option::Some),
            uid: Nfs3Option::None,
            gid: Nfs3Option::None,
            size: self.size.map_or(Nfs3Option::None, Nfs3Option::Some),
            atime: set_atime::DONT_CHANGE,
            mtime: match self.mtime {
                Some(s) => set_mtime::SET_TO_CLIENT_TIME(nfstime3 {
                    seconds: s,
                    nseconds: 0,
                }),
                None => set_mtime::DONT_CHANGE,
            },
        }
    }
}

/// What a WRITE answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub count: u32,
    pub committed: stable_how,
    pub verf: [u8; 8],
}

fn fh_of(fh: post_op_fh3) -> Result<nfs_fh3, NfsError> {
    match fh {
        post_op_fh3::Some(h) => Ok(h),
        post_op_fh3::None => Err(NfsError::Rpc("no handle in the reply".into())),
    }
}

fn dirop<'a, N: AsRef<[u8]> + ?Sized>(dir: &nfs_fh3, name: &'a N) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3::from(name.as_ref()),
    }
}

impl Nfs {
    pub async fn create<N: AsRef<[u8]> + ?Sized>(
        &mut self,
        dir: &nfs_fh3,
        name: &N,
        mode: CreateMode,
        attrs: &Attrs,
    ) -> Result<nfs_fh3, NfsError> {
        let how = match mode {
            CreateMode::Unchecked => createhow3::UNCHECKED(attrs.sattr()),
            CreateMode::Guarded => createhow3::GUARDED(attrs.sattr()),
            CreateMode::Exclusive(v) => createhow3::EXCLUSIVE(createverf3(v)),
        };
        let args = CREATE3args {
            where_: dirop(dir, name),
            how,
        };
        match self.conn.create(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(ok) => fh_of(ok.obj),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    pub async fn write(
        &mut self,
        fh: &nfs_fh3,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<Written, NfsError> {
        let args = WRITE3args {
            file: fh.clone(),
            offset,
            count: data.len() as u32,
            stable,
            data: Opaque::borrowed(data),
        };
        match self.conn.write(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(ok) => Ok(Written {
                count: ok.count,
                committed: ok.committed,
                verf: ok.verf.0,
            }),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    /// Writes a whole file in 1 MiB UNSTABLE pieces, then COMMITs; returns
    /// the commit verifier.
    pub async fn write_all(&mut self, fh: &nfs_fh3, data: &[u8]) -> Result<[u8; 8], NfsError> {
        for (i, piece) in data.chunks(1 << 20).enumerate() {
            let w = self
                .write(fh, (i << 20) as u64, piece, stable_how::UNSTABLE)
                .await?;
            if w.count as usize != piece.len() {
                return Err(NfsError::Rpc(format!(
                    "short write: {} of {}",
                    w.count,
                    piece.len()
                )));
            }
        }
        self.commit(fh).await
    }

    pub async fn commit(&mut self, fh: &nfs_fh3) -> Result<[u8; 8], NfsError> {
        let args = COMMIT3args {
            file: fh.clone(),
            offset: 0,
            count: 0,
        };
        match self.conn.commit(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(ok) => Ok(ok.verf.0),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    /// Creates (or truncates) `path` under the root with `data`.
    pub async fn put_file(&mut self, path: &str, data: &[u8]) -> Result<nfs_fh3, NfsError> {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (self.lookup_path(d).await?, n),
            None => (self.root.clone(), path),
        };
        let attrs = Attrs {
            size: Some(0),
            ..Default::default()
        };
        let fh = self
            .create(&dir, name, CreateMode::Unchecked, &attrs)
            .await?;
        self.write_all(&fh, data).await?;
        Ok(fh)
    }

    pub async fn setattr(&mut self, fh: &nfs_fh3, attrs: &Attrs) -> Result<fattr3, NfsError> {
        let args = SETATTR3args {
            object: fh.clone(),
            new_attributes: attrs.sattr(),
            guard: Nfs3Option::None,
        };
        match self.conn.setattr(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(ok) => match ok.obj_wcc.after {
                post_op_attr::Some(a) => Ok(a),
                post_op_attr::None => Err(NfsError::Rpc("no attributes after SETATTR".into())),
            },
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    pub async fn mkdir<N: AsRef<[u8]> + ?Sized>(
        &mut self,
        dir: &nfs_fh3,
        name: &N,
    ) -> Result<nfs_fh3, NfsError> {
        let args = MKDIR3args {
            where_: dirop(dir, name),
            attributes: Attrs::default().sattr(),
        };
        match self.conn.mkdir(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(ok) => fh_of(ok.obj),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    pub async fn symlink<N: AsRef<[u8]> + ?Sized, T: AsRef<[u8]> + ?Sized>(
        &mut self,
        dir: &nfs_fh3,
        name: &N,
        target: &T,
    ) -> Result<nfs_fh3, NfsError> {
        let args = SYMLINK3args {
            where_: dirop(dir, name),
            symlink: symlinkdata3 {
                symlink_attributes: Attrs::default().sattr(),
                symlink_data: nfspath3::from(target.as_ref()),
            },
        };
        match self.conn.symlink(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(ok) => fh_of(ok.obj),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    pub async fn remove<N: AsRef<[u8]> + ?Sized>(
        &mut self,
        dir: &nfs_fh3,
        name: &N,
    ) -> Result<(), NfsError> {
        let args = REMOVE3args {
            object: dirop(dir, name),
        };
        match self.conn.remove(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    pub async fn rmdir(&mut self, dir: &nfs_fh3, name: &str) -> Result<(), NfsError> {
        let args = RMDIR3args {
            object: dirop(dir, name),
        };
        match self.conn.rmdir(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }

    pub async fn rename<F: AsRef<[u8]> + ?Sized, T: AsRef<[u8]> + ?Sized>(
        &mut self,
        from: &nfs_fh3,
        from_name: &F,
        to: &nfs_fh3,
        to_name: &T,
    ) -> Result<(), NfsError> {
        let args = RENAME3args {
            from: dirop(from, from_name),
            to: dirop(to, to_name),
        };
        match self.conn.rename(&args).await.map_err(rpc)? {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((s, _)) => Err(NfsError::Status(s)),
        }
    }
}

/// Mount errors a test may expect.
pub async fn mount_status(port: u16, path: &str) -> anyhow::Result<()> {
    Nfs::mount(port, path).await.map(|_| ())
}

/// Asserts a result is a given NFS status.
pub fn expect_status<T: std::fmt::Debug>(
    r: Result<T, NfsError>,
    want: nfsstat3,
) -> anyhow::Result<()> {
    match r {
        Err(NfsError::Status(s)) if s == want => Ok(()),
        other => bail!("expected {want:?}, got {other:?}"),
    }
}

pub use nfs3::ftype3;
pub use nfs3_client::nfs3_types::nfs3::stable_how as Stable;

/// Convenience for tests that want the whole error as context.
pub fn ctx<T>(r: Result<T, NfsError>, what: &str) -> anyhow::Result<T> {
    r.map_err(anyhow::Error::from)
        .with_context(|| what.to_owned())
}
