//! Test harness: starts real `imz` processes and talks to them the way a
//! user's programs would. Integration tests and benchmarks build on this;
//! nothing here mocks an imz component.

pub mod bench;
pub mod churn;
pub mod data;
pub mod gateway;
pub mod guest;
pub mod hold;
pub mod libnfs;
pub mod mount;
pub mod netns;
pub mod nfs;
pub mod pipelined;
pub mod process;
pub mod rng;

pub use gateway::{Fixture, GatewayProc};
pub use process::{Imz, OriginProc, imz_bin};
