//! Test harness: starts real `imz` processes and talks to them the way a
//! user's programs would. Integration tests and benchmarks build on this;
//! nothing here mocks an imz component.

pub mod process;

pub use process::{Imz, OriginProc, imz_bin};
