//! The imz origin: serves the master copy of a directory tree over HTTP,
//! with stable object ids, per-object versions and a durable journal of
//! every change (InterMezzo's kernel modification log).

pub mod wire;
