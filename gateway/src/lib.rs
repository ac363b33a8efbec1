//! The imz gateway.
