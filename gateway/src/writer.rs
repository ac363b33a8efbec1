//! The writer: every client-visible change to the cache goes through one
//! thread, which gathers whatever changes are waiting into one redb
//! transaction and commits it durably once (group commit).
//!
//! One writer means mutations are serialised (a WRITE and a SETATTR of the
//! same file never interleave), and concurrent clients share an fsync
//! instead of paying one each. A reply is sent only after the commit that
//! holds the change is on disk.
//!
//! A mutation must check everything that can fail for a logical reason
//! (no such name, name exists, no space) before it changes anything, so a
//! refused mutation leaves nothing behind in the shared transaction. A
//! storage error is different: it aborts the whole transaction and every
//! mutation in it fails.

use std::sync::Arc;
use std::sync::mpsc;

use imz_cache::{Cache, WriteTxn};
use tokio::sync::oneshot;

use crate::vfs::VfsError;

/// Most mutations in one transaction.
const MAX_BATCH: usize = 256;
/// Most bytes of write payload in one transaction.
const MAX_BATCH_BYTES: usize = 64 << 20;

type Reply = Box<dyn FnOnce(Result<(), VfsError>) + Send>;
/// Runs a change in the open transaction (or, given none, fails it).
type Job = Box<dyn FnOnce(Option<&mut WriteTxn<'_>>) -> (bool, Reply) + Send>;

struct Queued {
    job: Job,
    bytes: usize,
}

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Queued>,
}

impl Writer {
    pub fn start(cache: Arc<Cache>) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::channel();
        std::thread::Builder::new()
            .name("imz-writer".into())
            .spawn(move || run(&cache, &jobs))?;
        Ok(Self { queue })
    }

    /// Runs `change` in the next transaction and waits until it is durable.
    /// `bytes` is the payload size, for batching.
    pub async fn run<T: Send + 'static>(
        &self,
        bytes: usize,
        change: impl FnOnce(&mut WriteTxn<'_>) -> Result<T, VfsError> + Send + 'static,
    ) -> Result<T, VfsError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |txn: Option<&mut WriteTxn<'_>>| {
            let result = match txn {
                Some(txn) => change(txn),
                None => Err(VfsError::Io("the cache cannot be written".into())),
            };
            // A storage failure may have left half a change in the
            // transaction: it must not be committed.
            let poisoned = matches!(result, Err(VfsError::Io(_)));
            let reply: Reply = Box::new(move |commit| {
                let _ = tx.send(commit.and(result));
            });
            (poisoned, reply)
        });
        self.queue
            .send(Queued { job, bytes })
            .map_err(|_| VfsError::Io("cache writer stopped".into()))?;
        rx.await
            .map_err(|_| VfsError::Io("cache writer stopped".into()))?
    }
}

impl Writer {
    /// Waits until every change queued before this call is committed.
    pub async fn drain(&self) {
        // The queue is first in, first out: an empty change behind the
        // others is done when they are.
        let _ = self.run(0, |_| Ok(())).await;
    }
}

fn run(cache: &Cache, jobs: &mpsc::Receiver<Queued>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        let mut bytes = batch[0].bytes;
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match jobs.try_recv() {
                Ok(q) => {
                    bytes += q.bytes;
                    batch.push(q);
                }
                Err(_) => break,
            }
        }
        let mut txn = match cache.write() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot open a cache transaction");
                for q in batch {
                    let (_, reply) = (q.job)(None);
                    reply(Ok(()));
                }
                continue;
            }
        };
        let mut replies = Vec::with_capacity(batch.len());
        let mut poisoned = false;
        for q in batch {
            let (p, reply) = (q.job)(Some(&mut txn));
            poisoned |= p;
            replies.push(reply);
        }
        let outcome = if poisoned {
            drop(txn);
            Err(VfsError::Io("a storage error aborted this change".into()))
        } else {
            txn.commit(true).map_err(VfsError::from)
        };
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "cache commit failed");
        }
        for reply in replies {
            reply(outcome.clone());
        }
    }
}
