//! The gateway's persistent cache in redb.
